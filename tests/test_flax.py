"""sharpax.flax.TrainState: apply_gradients hands grad_fn / sam_step / extra arguments to tx.update."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpax
from sharpax.flax import TrainState


def loss(params, x):
    return jnp.sum(jnp.tanh(x @ params["w"]) ** 2)


def _data(t):
    return jax.random.normal(jax.random.key(t), (8, 3))


@pytest.mark.parametrize("make", [lambda: sharpax.sam(0.05), lambda: sharpax.vsam(0.05, window=4, blocks=2),
                                  lambda: sharpax.looksam(0.05, k=3)])  # fmt: skip
def test_apply_gradients_equals_the_optax_loop(make):
    tx = optax.chain(make(), optax.sgd(0.1, momentum=0.9))
    params = {"w": jnp.ones((3, 2))}
    state = TrainState.create(apply_fn=None, params=params, tx=tx)
    opt_state = tx.init(params)

    @jax.jit
    def by_state(state, x):
        grads = jax.grad(loss)(state.params, x)
        return state.apply_gradients(grads=grads, grad_fn=lambda p: jax.grad(loss)(p, x))

    @jax.jit
    def by_hand(params, opt_state, x):
        grads = jax.grad(loss)(params, x)
        updates, opt_state = tx.update(
            grads, opt_state, params, grad_fn=lambda p: jax.grad(loss)(p, x)
        )
        return optax.apply_updates(params, updates), opt_state

    for t in range(6):
        state = by_state(state, _data(t))
        params, opt_state = by_hand(params, opt_state, _data(t))
        np.testing.assert_array_equal(state.params["w"], params["w"])
    assert int(state.step) == 6
    assert int(sharpax.num_sam_steps(state.opt_state)) == int(sharpax.num_sam_steps(opt_state)) > 0


def test_sam_step_and_update_kwargs_reach_the_transform():
    tx = optax.chain(sharpax.looksam(0.05, k=2), optax.sgd(0.1))
    state = TrainState.create(apply_fn=None, params={"w": jnp.ones((3, 2))}, tx=tx)
    grads = jax.grad(loss)(state.params, _data(0))
    reuse = state.apply_gradients(grads=grads, sam_step=False)  # no grad_fn needed
    assert int(sharpax.num_sam_steps(reuse.opt_state)) == 0
    esam = optax.chain(sharpax.esam(0.05, beta=1.0, gamma=0.5), optax.sgd(0.1))
    state = TrainState.create(apply_fn=None, params={"w": jnp.ones((3, 2))}, tx=esam)
    per_example = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2, axis=-1)
    new = state.apply_gradients(
        grads=grads, update_kwargs={"loss_fn": per_example, "batch": _data(0)}
    )
    assert int(sharpax.num_sam_steps(new.opt_state)) == 1
    with pytest.raises(TypeError, match="per-example losses"):
        state.apply_gradients(grads=grads)  # ESAM's data selection without its inputs


def test_import_sharpax_does_not_import_flax():
    code = "import sys, sharpax; assert 'flax' not in sys.modules, 'sharpax imported flax'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_sharpax_flax_does_not_import_flax_until_used():
    code = (
        "import sys, sharpax.flax as m; assert 'flax.training' not in sys.modules; "
        "m.TrainState; assert 'flax.training' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
