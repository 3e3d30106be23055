"""Tests for MESA (sharpax.mesa): the EMA teacher and its trajectory term.

Every numerical check compares against an independent reference: NumPy float64 formulas of
τ²·KL(softmax(ref/τ) ‖ softmax(z/τ)) and its gradient (tests/test_trajectory.py) and a
Python EMA loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_trajectory import (
    EB,
    EN,
    EPOCHS,
    TAU,
    ce_loss,
    linear_loss,
    mlp,
    mlp_init,
    np_traj_kl,
    np_traj_kl_grad,
    train,
)

from sharpax.mesa import MESAState, mesa, with_mesa

# ------------------------------------------------------------------------------------------------
# MESA
# ------------------------------------------------------------------------------------------------


def test_mesa_ema_matches_python_loop():
    rng = np.random.default_rng(4)
    decay = 0.9

    def variables_at(k):
        return {
            "params": {
                "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                "b": jnp.asarray(rng.normal(size=(2,)), jnp.bfloat16),
            },
            "batch_stats": {"mean": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
            "step": jnp.asarray(k, jnp.int32),
        }

    teacher = mesa(decay)
    v0 = variables_at(0)
    state = teacher.init(v0)
    assert state.ema["params"]["b"].dtype == jnp.float32  # bf16 EMA would never move
    ref = {k: np.asarray(x, np.float64) for k, x in
           [("w", v0["params"]["w"]), ("b", v0["params"]["b"]), ("m", v0["batch_stats"]["mean"])]}
    upd = jax.jit(teacher.update)
    for k in range(1, 5):
        v = variables_at(k)
        state = upd(state, v)
        for key, x in [("w", v["params"]["w"]), ("b", v["params"]["b"]),
                       ("m", v["batch_stats"]["mean"])]:
            ref[key] = decay * ref[key] + (1 - decay) * np.asarray(x, np.float64)
    for got, key in [(state.ema["params"]["w"], "w"), (state.ema["params"]["b"], "b"),
                     (state.ema["batch_stats"]["mean"], "m")]:
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, ref[key], rtol=1e-6, atol=1e-7)
    assert int(state.ema["step"]) == 4 and state.ema["step"].dtype == jnp.int32  # copied
    assert int(state.count) == 4


def test_mesa_decay_schedule_and_errors():
    teacher = mesa(lambda count: jnp.where(count == 0, 0.0, 0.5))
    state = teacher.init({"w": jnp.array([0.0])})
    state = teacher.update(state, {"w": jnp.array([4.0])})  # decay 0: copy
    state = teacher.update(state, {"w": jnp.array([0.0])})  # decay 0.5
    np.testing.assert_allclose(state.ema["w"], [2.0])
    with pytest.raises(ValueError, match="decay"):
        mesa(1.5)
    with pytest.raises(TypeError, match="decay"):
        mesa(True)
    with pytest.raises(ValueError, match="pytree structure"):
        teacher.update(state, {"v": jnp.array([0.0])})
    with pytest.raises(ValueError, match="ema_logits must have the shape"):
        teacher.loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 0)


def test_mesa_loss_formula_gating_mask_and_stop_gradient():
    rng = np.random.default_rng(5)
    z, t = rng.normal(size=(2, 5, 4)).astype(np.float32) * 3
    teacher = mesa(start_epoch=2, temperature=TAU, weight=0.8)

    @jax.jit
    def run(z, t, where):
        grads = jax.grad(lambda a, b: teacher.loss(a, b, 2), argnums=(0, 1))(z, t)
        masked = teacher.loss(z, t, 3, where=where)
        return teacher.loss(z, t, 2), teacher.loss(z, t, 1), masked, grads

    where = np.array([True, False, True, True, False])
    at_start, before, masked, (gz, gt) = run(z, t, where)
    np.testing.assert_allclose(at_start, 0.8 * np.mean(np_traj_kl(z, t, TAU)), rtol=1e-5)
    assert float(before) == 0.0
    np.testing.assert_allclose(
        masked, 0.8 * np.mean(np_traj_kl(z[where], t[where], TAU)), rtol=1e-5
    )
    np.testing.assert_allclose(gz, 0.8 / 5 * np_traj_kl_grad(z, t, TAU), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(gt, 0.0)


def test_mesa_end_epoch_gates_the_term_and_the_teacher():
    rng = np.random.default_rng(11)
    z, t = rng.normal(size=(2, 5, 4)).astype(np.float32)
    teacher = mesa(0.9, start_epoch=1, end_epoch=3, temperature=TAU, weight=0.8)
    on = 0.8 * np.mean(np_traj_kl(z, t, TAU))
    terms = [float(jax.jit(teacher.loss)(z, t, jnp.int32(e))) for e in range(5)]
    np.testing.assert_allclose(terms, [0.0, on, on, 0.0, 0.0], rtol=1e-5)
    assert [teacher.active(e) for e in range(5)] == [False, True, True, False, False]
    assert mesa(0.9, start_epoch=1).active(10**6)  # None: never ends



@pytest.mark.parametrize("end", [0, 2, -1, 1.5])
def test_mesa_end_epoch_must_follow_start_epoch(end):
    with pytest.raises((ValueError, TypeError), match="end_epoch"):
        mesa(0.9, start_epoch=2, end_epoch=end)


# ------------------------------------------------------------------------------------------------
# Combinators
# ------------------------------------------------------------------------------------------------


def test_with_mesa_teacher_is_constant_and_runs_or_is_skipped_as_designed():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    w, ema = rng.normal(size=(2, 4, 2)).astype(np.float32)
    teacher = mesa(0.9, start_epoch=2, temperature=TAU, weight=0.8)
    state = MESAState(ema=jnp.asarray(ema), count=jnp.int32(0))
    f = with_mesa(linear_loss, teacher, lambda e, b: b["x"] @ e)
    step = jax.jit(jax.value_and_grad(f, has_aux=True))
    (total, out), g = step(w, state, {"x": x}, jnp.int32(2))
    term = 0.8 * np.mean(np_traj_kl(x @ w, x @ ema, TAU))
    np.testing.assert_allclose(out.term, term, rtol=1e-5)
    np.testing.assert_allclose(total, 0.5 * np.sum(w.astype(np.float64) ** 2) + term, rtol=1e-5)
    np.testing.assert_allclose(
        g, w + x.T @ (0.8 / 3 * np_traj_kl_grad(x @ w, x @ ema, TAU)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(out.state.ema, ema)  # returned unchanged
    assert int(out.state.count) == 0

    # Count the teacher's executions (a debug callback inside teacher_fn) and traces.
    runs, traces = [], []

    def counted_teacher(e, b):
        traces.append(1)
        jax.debug.callback(lambda: runs.append(1))
        return b["x"] @ e

    counted = with_mesa(linear_loss, teacher, counted_teacher)
    # Traced epoch before start: the teacher runs (no lax.cond), the term is gated to 0.
    traced_step = jax.jit(jax.value_and_grad(counted, has_aux=True))
    (total, out), g = traced_step(w, state, {"x": x}, jnp.int32(1))
    jax.effects_barrier()
    assert len(runs) == 1 and float(out.term) == 0.0
    np.testing.assert_allclose(g, w, rtol=1e-6)  # task-loss gradient only
    jaxpr = str(jax.make_jaxpr(counted)(w, state, {"x": x}, jnp.int32(1)))
    assert "cond[" not in jaxpr
    # Traced epoch at start: the same compiled step, the term is on.
    (_, out), _ = traced_step(w, state, {"x": x}, jnp.int32(2))
    jax.effects_barrier()
    assert len(runs) == 2
    np.testing.assert_allclose(out.term, term, rtol=1e-5)

    # Python epoch before start: the teacher is neither traced nor run.
    traces.clear()
    runs.clear()
    static_step = jax.jit(counted, static_argnums=3)
    total, out = static_step(w, state, {"x": x}, 1)
    jax.effects_barrier()
    assert float(out.term) == 0.0 and not traces and not runs
    np.testing.assert_allclose(total, 0.5 * np.sum(w.astype(np.float64) ** 2), rtol=1e-6)
    # Python epoch from start on: it runs.
    total, out = static_step(w, state, {"x": x}, 2)
    jax.effects_barrier()
    assert len(traces) == 1 and len(runs) == 1
    np.testing.assert_allclose(out.term, term, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# End to end: a tiny MLP on a data source that yields example ids
# ------------------------------------------------------------------------------------------------


def test_end_to_end_mesa_training():
    teacher = mesa(0.9, start_epoch=1)
    wrapped = with_mesa(ce_loss, teacher, lambda ema, batch: mlp(ema, batch["x"]))
    update = jax.jit(teacher.update)
    ce, terms, _, state = train(
        wrapped, teacher.init(mlp_init()), after_step=lambda state, params: update(state, params)
    )
    assert np.all(np.isfinite(ce)) and all(np.isfinite(t) for _, t in terms)
    assert ce[-1] < 0.5 * ce[0]
    assert all(t == 0.0 for e, t in terms if e < 1) and all(t > 0 for e, t in terms if e >= 1)
    assert int(state.count) == EPOCHS * EN // EB
