"""Contracts shared by every sharpax state: one buffer per leaf, so states can be donated.

``jax.jit(..., donate_argnums=...)`` refuses to donate the same buffer twice, and a state
leaf aliasing a caller's array would be invalidated by donating either of them. Checked on
the states returned by ``init`` and by one eager and one jitted ``update``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpax
from sharpax.sam import pmean_updates

PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "h": jnp.ones(4, jnp.bfloat16)}
VARIABLES = {
    "params": {"w": jnp.ones((3, 2)), "h": jnp.ones(4, jnp.bfloat16)},
    "batch_stats": {"mean": jnp.zeros(2)},
    "step": jnp.zeros([], jnp.int32),
    "flag": jnp.ones([], bool),
}

TRANSFORMS = {
    "sam": lambda: sharpax.sam(0.05),
    "asam": lambda: sharpax.sam(0.05, adaptive=True),
    "looksam": lambda: sharpax.looksam(0.05, k=2),
    "vsam": lambda: sharpax.vsam(0.05, window=4, blocks=2, warmup_steps=1),
    "chain": lambda: optax.chain(
        sharpax.vsam(0.05, window=4, blocks=2), optax.sgd(0.1, momentum=0.9)
    ),
}


def pointers(tree):
    return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree)]


def assert_distinct_and_donatable(state):
    ptrs = pointers(state)
    assert len(ptrs) == len(set(ptrs)), "two state leaves share one buffer"
    leaves = jax.tree.leaves(state)
    out = jax.jit(lambda s: s, donate_argnums=0)(state)
    jax.block_until_ready(out)
    assert all(leaf.is_deleted() for leaf in leaves)  # really donated, leaf by leaf


def grad_fn(p):
    """Gradient of 0.5‖p‖² (so grads = params)."""
    return p


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_optimizer_states_have_one_buffer_per_leaf(name):
    opt = TRANSFORMS[name]()
    assert_distinct_and_donatable(opt.init(PARAMS))
    # After one eager and one jitted update (SAM step, then reuse step for LookSAM/vSAM).
    _, eager = opt.update(PARAMS, opt.init(PARAMS), PARAMS, grad_fn=grad_fn)
    assert_distinct_and_donatable(eager)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, grad_fn=grad_fn))
    state = opt.init(PARAMS)
    for _ in range(2):
        _, state = update(PARAMS, state, PARAMS)
    assert_distinct_and_donatable(state)


def test_saf_state_has_one_buffer_per_leaf():
    traj = sharpax.saf(8, 3, lag=1, start_epoch=0)
    assert_distinct_and_donatable(traj.init())
    _, state = jax.jit(traj.update)(traj.init(), jnp.ones((2, 3)), jnp.array([1, 4]), 0)
    assert_distinct_and_donatable(state)


def test_mesa_ema_never_aliases_the_variables():
    teacher = sharpax.mesa(0.9)
    caller = set(pointers(VARIABLES))
    state = teacher.init(VARIABLES)
    # float32 leaves (astype would be a no-op), int and bool leaves: all copies.
    assert not caller & set(pointers(state.ema))
    assert_distinct_and_donatable(teacher.init(VARIABLES))
    for update in (teacher.update, jax.jit(teacher.update)):
        new = update(teacher.init(VARIABLES), VARIABLES)
        assert not caller & set(pointers(new.ema))  # integer leaves copied, not passed through
        assert_distinct_and_donatable(new)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(VARIABLES))


def test_pmean_updates_has_an_empty_state_and_averages():
    tx = pmean_updates("i")
    assert tx.init(PARAMS) == optax.EmptyState()
    u = jnp.arange(8.0)[:, None] * jnp.ones((8, 2))
    out = jax.pmap(lambda v: tx.update(v, tx.init(v))[0], axis_name="i")(u)
    np.testing.assert_allclose(np.asarray(out), np.full((8, 2), 3.5))
    with pytest.raises(TypeError, match="axis_name"):
        pmean_updates(None)
