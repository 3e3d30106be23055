"""Old versus new: the looksam / vsam presets reproduce the pre-refactor code bit for bit.

``tests/legacy/reuse_v0.py`` is a frozen copy of ``sharpax/reuse.py`` from before
schedules and reuse rules became separate parts (the version whose numerics were
checked against the authors' vSAM optimizer and optax.contrib.sam). On fixed
problems both run side by side; every update, every decision and every state field
must agree exactly, on the on-device (``lax.cond``) path, the host-dispatch path,
with overridden decisions, in bfloat16, under ``optax.inject_hyperparams`` and on 8
devices with ``axis_name``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from legacy import reuse_v0

import sharpax


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def mlp_init(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    shapes = {"w1": (3, 8), "b1": (8,), "w2": (8, 1)}
    return {k: jnp.asarray(rng.normal(size=v), dtype) for k, v in shapes.items()}


def batches(steps, n=16, dtype=jnp.float32):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(steps, n, 3))
    y = np.sin(x.sum(-1, keepdims=True)) + 0.3 * rng.normal(size=(steps, n, 1))
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def make_step(opt, sam_step):
    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        kwargs = {} if sam_step is False else {"grad_fn": lambda p: jax.grad(mlp_loss)(p, x, y)}
        updates, state = opt.update(grads, state, params, sam_step=sam_step, **kwargs)
        return optax.apply_updates(params, updates), updates, state

    return jax.jit(step)


def inner(state):
    """The looksam / vsam state inside a chain (or inject_hyperparams) state."""
    while "num_sam_steps" not in getattr(state, "_fields", ()):
        state = state.inner_state if hasattr(state, "inner_state") else state[0]
    return state


def assert_same_state(old, new, kind):
    old, new = inner(old), inner(new)
    for f in ("count", "num_sam_steps", "sam_due"):
        np.testing.assert_array_equal(getattr(old, f), getattr(new, f), err_msg=f)
    if kind == "looksam":
        pairs = {"g_v": new.reuse.g_v, "g_v_norm": new.reuse.g_v_norm}
    else:
        skip = ("num_recorded", "num_skipped")  # new fields; num_skipped stays 0 here
        pairs = {f: getattr(new.schedule, f) for f in new.schedule._fields if f not in skip}
        assert int(new.schedule.num_skipped) == 0
        pairs.update({f: getattr(new.reuse, f) for f in new.reuse._fields})
        np.testing.assert_array_equal(old.num_sam_steps, new.schedule.num_recorded)
    for f, value in pairs.items():
        jax.tree.map(
            lambda a, b, f=f: np.testing.assert_array_equal(a, b, err_msg=f), getattr(old, f), value
        )


def run_pair(old_opt, new_opt, kind, *, steps, path, dtype=jnp.float32, overrides=None):
    """Runs both optimizers side by side; compares params, updates and state each step."""
    params = mlp_init(dtype)
    xs, ys = batches(steps, dtype=dtype)
    olds = {s: make_step(old_opt, s) for s in (None, True, False)}
    news = {s: make_step(new_opt, s) for s in (None, True, False)}
    p_old = p_new = params
    s_old, s_new = old_opt.init(params), new_opt.init(params)
    decisions = []
    for t in range(steps):
        due = bool(sharpax.sam_due(s_new))
        assert due == bool(reuse_v0.sam_due(s_old))
        np.testing.assert_array_equal(
            sharpax.upcoming_sam_steps(s_new), reuse_v0.upcoming_sam_steps(s_old)
        )
        if path == "cond":
            choice = None
        elif overrides is not None:
            choice = bool(overrides[t])
        else:
            choice = due
        decisions.append(due)
        p_old, u_old, s_old = olds[choice](p_old, s_old, xs[t], ys[t])
        p_new, u_new, s_new = news[choice](p_new, s_new, xs[t], ys[t])
        jax.tree.map(np.testing.assert_array_equal, u_old, u_new)
        jax.tree.map(np.testing.assert_array_equal, p_old, p_new)
        assert_same_state(s_old, s_new, kind)
    return decisions


LOOKSAM_CASES = [
    dict(k=1),
    dict(k=3, alpha=0.5),
    dict(rho=optax.linear_schedule(0.1, 0.01, 20), k=4, alpha=optax.linear_schedule(0.9, 0.1, 20)),
]
VSAM_CASES = [
    dict(window=10, blocks=5),
    dict(window=10, blocks=5, warmup_steps=7, max_rate=0.5, sensitivity=(0.5, 0.3)),
    dict(window=8, blocks=2, reuse_decay=1.0, max_reuse=3, seed=3,
         stat_mask={"w1": False, "b1": True, "w2": True}),  # fmt: skip
    dict(window=6, blocks=3, reuse_decay=0.0, max_reuse=0, rho=optax.linear_schedule(0.2, 0.0, 30)),
]


def chain(opt):
    return optax.chain(opt, optax.sgd(0.05, momentum=0.9))


@pytest.mark.parametrize("path", ["cond", "host"])
@pytest.mark.parametrize("case", LOOKSAM_CASES)
def test_looksam_matches_the_previous_code(case, path):
    decisions = run_pair(
        chain(reuse_v0.looksam(**case)), chain(sharpax.looksam(**case)), "looksam",
        steps=12, path=path,
    )  # fmt: skip
    assert any(decisions) and not all(decisions) or case.get("k") == 1


@pytest.mark.parametrize("path", ["cond", "host"])
@pytest.mark.parametrize("case", VSAM_CASES)
def test_vsam_matches_the_previous_code(case, path):
    decisions = run_pair(
        chain(reuse_v0.vsam(**case)), chain(sharpax.vsam(**case)), "vsam", steps=40, path=path
    )
    assert 0 < sum(decisions) < len(decisions)


@pytest.mark.parametrize("kind", ["looksam", "vsam"])
def test_overridden_decisions_match_the_previous_code(kind):
    """A caller that ignores sam_due (random static sam_step) gets the same results."""
    overrides = np.random.default_rng(5).random(30) < 0.4
    args = dict(k=3) if kind == "looksam" else dict(window=6, blocks=3, warmup_steps=2)
    old, new = getattr(reuse_v0, kind)(**args), getattr(sharpax, kind)(**args)
    run_pair(chain(old), chain(new), kind, steps=30, path="host", overrides=overrides)


@pytest.mark.parametrize("kind", ["looksam", "vsam"])
def test_bfloat16_params_match_the_previous_code(kind):
    args = dict(k=2) if kind == "looksam" else dict(window=6, blocks=3)
    old, new = getattr(reuse_v0, kind)(**args), getattr(sharpax, kind)(**args)
    run_pair(chain(old), chain(new), kind, steps=20, path="cond", dtype=jnp.bfloat16)


def test_inject_hyperparams_match_the_previous_code():
    def build(module):
        return optax.inject_hyperparams(module.vsam, static_args=("window", "blocks"))(
            rho=0.05, window=6, blocks=3, max_reuse=2
        )

    run_pair(build(reuse_v0), build(sharpax), "vsam", steps=20, path="host")


@pytest.mark.parametrize("kind", ["looksam", "vsam"])
def test_data_parallel_matches_the_previous_code(kind):
    """8 devices, shard_map, per-device gradients, axis_name, pmean_updates: same bits."""
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    args = dict(k=2) if kind == "looksam" else dict(window=6, blocks=3)

    def build(module):
        opt = getattr(module, kind)(0.05, axis_name="batch", **args)
        return optax.chain(opt, sharpax.pmean_updates("batch"), optax.sgd(0.05))

    def stepper(opt):
        @jax.jit
        @functools.partial(
            jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
            out_specs=(P(), P()),
        )  # fmt: skip
        def step(params, state, x, y):
            grads = jax.grad(mlp_loss)(params, x, y)
            updates, state = opt.update(
                grads, state, params, grad_fn=lambda p: jax.grad(mlp_loss)(p, x, y)
            )
            return optax.apply_updates(params, updates), state

        return step

    old_opt, new_opt = build(reuse_v0), build(sharpax)
    old_step, new_step = stepper(old_opt), stepper(new_opt)
    params = mlp_init()
    xs, ys = batches(16, n=32)
    p_old, s_old = params, old_opt.init(params)
    p_new, s_new = params, new_opt.init(params)
    for t in range(16):
        p_old, s_old = old_step(p_old, s_old, xs[t], ys[t])
        p_new, s_new = new_step(p_new, s_new, xs[t], ys[t])
        jax.tree.map(np.testing.assert_array_equal, p_old, p_new)
        assert_same_state(s_old, s_new, kind)
    assert 0 < int(sharpax.num_sam_steps(s_new)) < 16
