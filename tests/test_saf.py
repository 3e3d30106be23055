"""Tests for SAF (sharpax.saf): the per-example logit ring buffer and its trajectory term.

Every numerical check compares against an independent reference: NumPy float64 formulas of
τ²·KL(softmax(ref/τ) ‖ softmax(z/τ)) and its gradient (tests/test_trajectory.py) and a
Python dict history of the logits each example produced in each epoch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_trajectory import (
    EB,
    EN,
    EPOCHS,
    TAU,
    WEIGHT,
    as_stored,
    ce_loss,
    linear_loss,
    np_traj_kl,
    np_traj_kl_grad,
    train,
)

import sharpax
from sharpax.saf import check_example_ids, saf, with_saf

NDEV = 8


# ------------------------------------------------------------------------------------------------
# SAF: multi-epoch simulation against a dict history
# ------------------------------------------------------------------------------------------------

N, C, B = 12, 4, 4


def epoch_schedule(rng, num_epochs, skip_epoch):
    """Shuffled ids per epoch (numpy permutation); at ``skip_epoch`` only 8 of 12 examples."""
    out = []
    for e in range(num_epochs):
        perm = rng.permutation(N)
        if e == skip_epoch:
            perm = perm[:8]
        out.append([perm[k : k + B] for k in range(0, len(perm), B)])
    return out


def run_saf_simulation(lag, start_epoch, dtype, end_epoch=None):
    rng = np.random.default_rng(10 + lag)
    num_epochs = 2 * lag + 3
    schedule = epoch_schedule(rng, num_epochs, skip_epoch=lag + 1)
    produced = rng.normal(size=(num_epochs, N, C)).astype(np.float32) * 3  # logits of i at e
    traj = saf(N, C, lag=lag, start_epoch=start_epoch, end_epoch=end_epoch, temperature=TAU,
                  weight=WEIGHT, dtype=dtype)
    step = jax.jit(jax.value_and_grad(traj.update, argnums=1, has_aux=True))
    state = traj.init()
    history = {}  # (example id, epoch) -> the logits it produced then, as stored
    seen_terms = []
    for e, batches in enumerate(schedule):
        for ids in batches:
            z = produced[e, ids]
            (term, state), grad = step(state, jnp.asarray(z), jnp.asarray(ids), jnp.int32(e))
            # Reference: exactly the logits this example produced `lag` epochs earlier.
            refs = [history.get((int(i), e - lag)) for i in ids]
            valid = np.array([r is not None for r in refs])
            exp_grad = np.zeros_like(z, np.float64)
            active = e >= start_epoch and (end_epoch is None or e < end_epoch)
            if active and valid.any():
                ref = np.stack([r for r in refs if r is not None])
                exp_term = WEIGHT * np.mean(np_traj_kl(z[valid], ref, TAU))
                exp_grad[valid] = WEIGHT / valid.sum() * np_traj_kl_grad(z[valid], ref, TAU)
            else:
                exp_term = 0.0
            np.testing.assert_allclose(term, exp_term, rtol=2e-5, atol=1e-7)
            np.testing.assert_allclose(grad, exp_grad, rtol=2e-5, atol=1e-7)
            seen_terms.append((e, float(term), int(valid.sum())))
            for i, zi in zip(ids, z):
                history[(int(i), e)] = as_stored(zi, dtype)
    return traj, state, history, num_epochs, seen_terms


@pytest.mark.parametrize("lag,start_epoch", [(1, 0), (2, 3), (3, 1)])
def test_saf_matches_history_over_shuffled_epochs(lag, start_epoch):
    _traj, state, history, num_epochs, seen = run_saf_simulation(lag, start_epoch, jnp.float32)
    # The gating and exclusion paths were actually exercised.
    assert all(t == 0.0 for e, t, cnt in seen if e < start_epoch)
    if start_epoch > lag:  # references existed before start_epoch, and were ignored
        assert any(e < start_epoch and cnt > 0 for e, t, cnt in seen)
    else:  # the term is on from the first epoch that has references
        assert all(cnt == 0 for e, t, cnt in seen if e < lag)
        assert any(e == lag and cnt > 0 and t > 0 for e, t, cnt in seen)
    assert any(cnt < B and t > 0 for e, t, cnt in seen)  # stale/unseen entries excluded
    assert all(t == 0.0 for e, t, cnt in seen if e < lag)  # nothing written lag epochs before
    # Final buffer: slot s of row i holds the latest epoch e ≡ s (mod lag+1) in which i was seen.
    logits, stamps = np.asarray(state.logits, np.float64), np.asarray(state.written_epoch)
    for i in range(N):
        for s in range(lag + 1):
            epochs = [e for e in range(num_epochs) if e % (lag + 1) == s and (i, e) in history]
            if epochs:
                assert stamps[i, s] == max(epochs)
                np.testing.assert_array_equal(logits[i, s], history[(i, max(epochs))])
            else:
                assert stamps[i, s] == -1


def test_saf_end_epoch_switches_the_term_off_and_keeps_writing():
    # lag 1, on for epochs [1, 3) only: the authors' `kl_start_epoch < epoch < kl_end_epoch`
    # with kl_start_epoch 0 and kl_end_epoch 3.
    _traj, state, _history, num_epochs, seen = run_saf_simulation(1, 1, jnp.float32, end_epoch=3)
    assert num_epochs == 5
    assert any(e in (1, 2) and t > 0 for e, t, cnt in seen)
    assert all(t == 0.0 for e, t, cnt in seen if e >= 3)
    assert any(e >= 3 and cnt > 0 for e, t, cnt in seen)  # references existed, were ignored
    # The buffer kept being written after the end: the last epoch's logits are stored.
    assert int(np.max(np.asarray(state.written_epoch))) == num_epochs - 1


@pytest.mark.parametrize("end", [0, 2, -1, 1.5])
def test_saf_end_epoch_must_follow_start_epoch(end):
    with pytest.raises((ValueError, TypeError), match="end_epoch"):
        saf(4, 3, start_epoch=2, end_epoch=end)


def test_saf_bf16_buffer_halves_memory_and_matches_history():
    traj32 = saf(N, C, lag=2)
    traj16 = saf(N, C, lag=2, dtype=jnp.bfloat16)
    stamps = N * 3 * 4
    assert traj32.nbytes == N * 3 * C * 4 + stamps
    assert traj16.nbytes - stamps == (traj32.nbytes - stamps) // 2
    state = traj16.init()
    assert state.logits.dtype == jnp.bfloat16 and state.written_epoch.dtype == jnp.int32
    assert state.logits.nbytes + state.written_epoch.nbytes == traj16.nbytes
    # Terms use exactly the bf16-rounded past logits (reference rounds with ml_dtypes).
    _, state, _history, _, _ = run_saf_simulation(2, 2, jnp.bfloat16)
    assert state.logits.dtype == jnp.bfloat16
    # README numbers.
    assert saf(50_000, 100).nbytes - 50_000 * 4 * 4 == 80_000_000
    assert saf(1_281_167, 1000).nbytes > 20e9


def test_saf_start_gating_and_never_written_entries():
    traj = saf(4, 3, lag=1, start_epoch=2, temperature=TAU, weight=WEIGHT)
    upd = jax.jit(traj.update)
    term_and_grad = jax.jit(
        jax.value_and_grad(lambda s, a, i, e: traj.update(s, a, i, e)[0], argnums=1)
    )
    state = traj.init()
    ids = jnp.array([0, 1])
    z = jnp.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    # epoch 0 reads epoch -1: never-written slots (stamp -1) must not count as references.
    traj0 = saf(4, 3, lag=1, start_epoch=0)
    assert float(jax.jit(traj0.update)(traj0.init(), z, ids, 0)[0]) == 0.0
    term, state = upd(state, z, ids, 0)
    assert float(term) == 0.0
    term, g = term_and_grad(state, 2 * z, ids, 1)  # valid references, but epoch < start
    assert float(term) == 0.0 and np.all(np.asarray(g) == 0.0)
    _, state = upd(state, 2 * z, ids, 1)
    # epoch 2: ids 0, 1 were written at epoch 1, id 2 never → mean over the two valid only.
    z3 = jnp.array([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    term, state = upd(state, z3, jnp.array([0, 1, 2]), 2)
    exp = WEIGHT * np.mean(np_traj_kl(np.asarray(z3[:2]), np.asarray(2 * z), TAU))
    np.testing.assert_allclose(term, exp, rtol=1e-5)
    # No valid reference at all → exactly 0 (no 0/0 NaN), zero gradient.
    term, g = term_and_grad(state, z, jnp.array([3, 2]), 5)
    assert float(term) == 0.0 and np.all(np.asarray(g) == 0.0)


def test_saf_where_masks_padding_and_duplicates_keep_last():
    traj = saf(6, 2, lag=1, start_epoch=0)
    state = traj.init()
    z = jnp.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    ids = jnp.array([1, -1, 1, 99])  # padding rows carry junk ids
    where = jnp.array([True, False, True, False])
    term, state = jax.jit(traj.update)(state, z, ids, 0, where=where)
    assert float(term) == 0.0
    stamps = np.asarray(state.written_epoch)
    assert stamps[1, 0] == 0 and (stamps[[0, 2, 3, 4, 5]] == -1).all()
    np.testing.assert_array_equal(state.logits[1, 0], [3.0, 0.0])  # last occurrence of id 1
    traj.check_ids(ids, where=where)  # padding ids are not checked


# ------------------------------------------------------------------------------------------------
# SAF: id and shape errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 12, 1000])
def test_host_check_names_bad_ids(bad):
    ids = np.array([0, 5, bad, 3])
    with pytest.raises(ValueError, match=r"example ids must be integers in \[0, num_examples=12\)"):
        check_example_ids(ids, 12)
    with pytest.raises(ValueError, match=rf"\[{bad}\] at positions \[2\]"):
        saf(12, 4).check_ids(ids)
    with pytest.raises(TypeError, match="integers"):
        check_example_ids(np.array([0.0, 1.0]), 12)
    check_example_ids(np.array([0, 11]), 12)


def test_eager_update_raises_on_bad_ids():
    traj = saf(12, 4)
    with pytest.raises(ValueError, match="out-of-range id"):
        traj.update(traj.init(), jnp.zeros((2, 4)), jnp.array([3, -2]), 0)


def test_checkify_reports_bad_ids_inside_jit():
    traj = saf(12, 4, lag=1, start_epoch=0, debug_checks=True)
    checked = jax.jit(checkify.checkify(traj.update))
    state = traj.init()
    err, _ = checked(state, jnp.zeros((3, 4)), jnp.array([1, 12, -5]), jnp.int32(0))
    msg = err.get()
    assert msg is not None and "example ids must lie in [0, num_examples=12)" in msg
    assert "got 2 out-of-range" in msg and "[-5, 12]" in msg
    with pytest.raises(checkify.JaxRuntimeError, match="num_examples=12"):
        err.throw()
    err, _ = checked(state, jnp.zeros((3, 4)), jnp.array([1, 11, 0]), jnp.int32(0))
    assert err.get() is None
    # Also through value_and_grad, as in a training step.
    step = jax.jit(checkify.checkify(jax.value_and_grad(
        lambda z, ids: traj.update(state, z, ids, 3)[0])))
    err, _ = step(jnp.zeros((2, 4)), jnp.array([0, 40]))
    assert "num_examples=12" in err.get()


def test_default_update_has_no_effects_so_jit_keeps_its_fast_path():
    # A checkify effect in the jaxpr sends every call of the jitted step through
    # JAX's Python dispatch path (milliseconds per step on a GPU), so the in-jit
    # check is opt-in.
    def effects(traj):
        def step(state, z, ids):
            return jax.value_and_grad(traj.update, argnums=1, has_aux=True)(state, z, ids, 3)

        return jax.make_jaxpr(step)(traj.init(), jnp.zeros((2, 4)), jnp.array([0, 1])).effects

    assert effects(saf(12, 4)) == set()
    assert effects(saf(12, 4, debug_checks=True)) != set()
    with pytest.raises(TypeError, match="debug_checks must be a bool"):
        saf(12, 4, debug_checks=1)


def test_unchecked_jit_bad_ids_write_nothing_and_poison_term_and_gradient():
    traj = saf(12, 4, lag=1, start_epoch=1)
    step = jax.jit(jax.value_and_grad(traj.update, argnums=1, has_aux=True))
    z = jnp.asarray(np.random.default_rng(11).normal(size=(3, 4)), jnp.float32)
    (_, state), _ = step(traj.init(), z, jnp.array([2, 5, 7]), jnp.int32(0))
    before = jax.device_get(state)
    assert (before.written_epoch[[2, 5, 7], 0] == 0).all()
    # Before start_epoch (epoch 0) and after it (epoch 1, references exist), one bad id
    # among valid ones: all or nothing, loud in both the value and the gradient.
    for epoch in (0, 1):
        for ids in ([2, -1, 7], [2, 5, 12], [1000, 3, 4]):
            (term, new), g = step(state, 2 * z, jnp.array(ids), jnp.int32(epoch))
            assert np.isnan(float(term)), (epoch, ids)
            assert np.isnan(np.asarray(g)).all(), (epoch, ids)
            after = jax.device_get(new)
            np.testing.assert_array_equal(after.written_epoch, before.written_epoch)
            np.testing.assert_array_equal(after.logits, before.logits)
    # The same bad id masked out by `where` (padding) is neither checked nor written.
    where = jnp.array([True, False, True])
    (term, new), g = step(state, 2 * z, jnp.array([2, -1, 7]), jnp.int32(1), where=where)
    z_np = np.asarray(z)[[0, 2]]
    exp = WEIGHT * np.mean(np_traj_kl(2 * z_np, z_np, TAU))  # saf defaults: τ = 5, λ = 0.3
    np.testing.assert_allclose(float(term), exp, rtol=1e-5)
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[1] == 0).all()
    assert (np.asarray(new.written_epoch)[[2, 7], 1] == 1).all()


def test_with_saf_checks_concrete_ids_on_the_host():
    traj = saf(5, 2, lag=1, start_epoch=0)
    f = with_saf(linear_loss, traj)
    batch = {"x": np.ones((2, 4), np.float32), "id": np.array([1, 5])}
    w = jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"\[5\] at positions \[1\]"):
        jax.value_and_grad(f, has_aux=True)(w, traj.init(), batch, 0)
    # Concrete ids closed over by a jitted step are checked while tracing.
    with pytest.raises(ValueError, match="out-of-range"):
        jax.jit(lambda p, s: f(p, s, batch, 0))(w, traj.init())
    # Masked padding ids are not checked.
    f_masked = with_saf(linear_loss, traj, where_fn=lambda b: np.array([True, False]))
    (_, out), _ = jax.value_and_grad(f_masked, has_aux=True)(w, traj.init(), batch, 0)
    assert np.asarray(out.state.written_epoch)[1, 0] == 0


def test_shape_and_argument_errors_at_trace_time():
    traj = saf(12, 4)
    state = traj.init()
    upd = jax.jit(traj.update)
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, 4\)"):
        upd(state, jnp.zeros((3, 5)), jnp.arange(3), 0)
    with pytest.raises(ValueError, match=r"logits must have shape \(batch, num_classes\)"):
        upd(state, jnp.zeros((4,)), jnp.arange(4), 0)
    with pytest.raises(ValueError, match=r"example_ids must have shape \(3,\)"):
        upd(state, jnp.zeros((3, 4)), jnp.arange(4), 0)
    with pytest.raises(ValueError, match=r"example_ids must have shape \(3,\)"):
        upd(state, jnp.zeros((3, 4)), jnp.zeros((3, 1), jnp.int32), 0)
    with pytest.raises(TypeError, match="example_ids must be integers"):
        upd(state, jnp.zeros((3, 4)), jnp.zeros((3,)), 0)
    with pytest.raises(ValueError, match="where must be a boolean mask"):
        upd(state, jnp.zeros((3, 4)), jnp.arange(3), 0, where=jnp.ones(2, bool))
    with pytest.raises(ValueError, match="epoch counts from 0"):
        traj.update(state, jnp.zeros((3, 4)), jnp.arange(3), -1)
    with pytest.raises(TypeError, match="epoch must be an integer"):
        upd(state, jnp.zeros((3, 4)), jnp.arange(3), jnp.float32(1.0))
    with pytest.raises(ValueError, match="state.logits has shape"):
        saf(12, 4, lag=1).update(state, jnp.zeros((3, 4)), jnp.arange(3), 0)
    for kwargs, match in [
        ({"num_examples": 0, "num_classes": 3}, "num_examples"),
        ({"num_examples": 3, "num_classes": 3, "lag": 0}, "lag"),
        ({"num_examples": 3, "num_classes": 3, "start_epoch": -1}, "start_epoch"),
        ({"num_examples": 3, "num_classes": 3, "temperature": 0.0}, "temperature"),
        ({"num_examples": 3, "num_classes": 3, "weight": -1.0}, "weight"),
        ({"num_examples": 3, "num_classes": 3, "dtype": jnp.int32}, "floating dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            saf(**kwargs)
    # NumPy integers are ints; bools and floats are not (TypeError naming the argument).
    assert saf(np.int64(12), np.int32(4), lag=np.int64(1)).nbytes == 12 * 2 * 4 * 4 + 12 * 2 * 4
    for kwargs, match in [
        ({"num_examples": True, "num_classes": 3}, "num_examples"),
        ({"num_examples": 3, "num_classes": 3.0}, "num_classes"),
        ({"num_examples": 3, "num_classes": 3, "start_epoch": True}, "start_epoch"),
        ({"num_examples": 3, "num_classes": 3, "temperature": True}, "temperature"),
        ({"num_examples": 3, "num_classes": 3, "weight": False}, "weight"),
    ]:
        with pytest.raises(TypeError, match=match):
            saf(**kwargs)
    with pytest.raises(TypeError, match="num_examples"):
        check_example_ids(np.array([0]), True)


# ------------------------------------------------------------------------------------------------
# SAF on 8 devices: pmap / shard_map with axis_name, jit with a sharded buffer
# ------------------------------------------------------------------------------------------------

DN, DC, DB = 32, 5, 16  # examples, classes, global batch (2 per device)


def device_stream(seed=3, num_epochs=3):
    """(epoch, ids, logits) with shuffled ids; the same for 1 and 8 devices."""
    rng = np.random.default_rng(seed)
    for e in range(num_epochs):
        perm = rng.permutation(DN)
        for k in range(0, DN, DB):
            yield e, perm[k : k + DB], rng.normal(size=(DB, DC)).astype(np.float32) * 2


def single_device_run(traj):
    """Reference on one device, full global batch: terms, grads, states after each step."""
    step = jax.jit(jax.value_and_grad(traj.update, argnums=1, has_aux=True))
    state, out = traj.init(), []
    for e, ids, z in device_stream():
        (term, state), g = step(state, jnp.asarray(z), jnp.asarray(ids), jnp.int32(e))
        out.append((float(term), np.asarray(g), jax.device_get(state)))
    return out


@pytest.fixture(scope="module")
def single_device_reference():
    traj = saf(DN, DC, lag=1, start_epoch=1, temperature=TAU, weight=WEIGHT)
    return single_device_run(traj)


def test_single_device_reference_is_nontrivial_and_matches_the_formula(single_device_reference):
    terms = [t for t, _, _ in single_device_reference]
    assert terms[:2] == [0.0, 0.0] and all(t > 0 for t in terms[2:])
    # The fixture the multi-device tests compare against, checked independently:
    # lag 1, start_epoch 1, every example seen once per epoch.
    history = {}
    for (e, ids, z), (term, grad, _) in zip(device_stream(), single_device_reference):
        exp_term, exp_grad = 0.0, np.zeros_like(z, np.float64)
        if e >= 1:
            ref = np.stack([history[(int(i), e - 1)] for i in ids])
            exp_term = WEIGHT * np.mean(np_traj_kl(z, ref, TAU))
            exp_grad = WEIGHT / len(ids) * np_traj_kl_grad(z, ref, TAU)
        np.testing.assert_allclose(term, exp_term, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(grad, exp_grad, rtol=2e-5, atol=1e-7)
        history.update({(int(i), e): zi for i, zi in zip(ids, z)})


def test_pmap_axis_name_matches_single_device(single_device_reference):
    traj = saf(DN, DC, lag=1, start_epoch=1, temperature=TAU, weight=WEIGHT, axis_name="b")
    step = jax.pmap(
        jax.value_and_grad(traj.update, argnums=1, has_aux=True),
        axis_name="b",
        in_axes=(0, 0, 0, None),
    )
    state = jax.tree.map(lambda a: np.stack([a] * NDEV), traj.init())
    for (e, ids, z), (term1, grad1, state1) in zip(device_stream(), single_device_reference):
        (terms, state), grads = step(
            state, z.reshape(NDEV, -1, DC), ids.reshape(NDEV, -1), jnp.int32(e)
        )
        np.testing.assert_allclose(terms, np.full(NDEV, term1), rtol=1e-5, atol=1e-8)
        # pmean of per-device gradients == the full-batch single-device gradient.
        np.testing.assert_allclose(
            np.asarray(grads).reshape(DB, DC) / NDEV, grad1, rtol=1e-5, atol=1e-8
        )
        for r in range(NDEV):  # every replica holds the single-device buffer
            np.testing.assert_array_equal(state.logits[r], state1.logits)
            np.testing.assert_array_equal(state.written_epoch[r], state1.written_epoch)


def test_pmap_axis_name_with_where_padding_matches_dict_history():
    """8 devices, each with 2 real rows and 1 padding row (junk id, junk logits, where=False);
    one real example is also masked out at epoch 2. Reference: a dict history (NumPy)."""
    n, c, lag, start = 16, 3, 1, 1
    traj = saf(n, c, lag=lag, start_epoch=start, temperature=TAU, weight=WEIGHT, axis_name="b")
    step = jax.pmap(
        lambda s, z, i, w, e: jax.value_and_grad(
            lambda zz: traj.update(s, zz, i, e, where=w), has_aux=True
        )(z),
        axis_name="b",
        in_axes=(0, 0, 0, 0, None),
    )
    rng = np.random.default_rng(12)
    state = jax.tree.map(lambda a: np.stack([a] * NDEV), traj.init())
    history = {}
    terms = []
    for e in range(3):
        real = rng.permutation(n).reshape(NDEV, 2)
        ids = np.concatenate([real, rng.choice([-1, 3, 999], size=(NDEV, 1))], axis=1)
        where = np.ones((NDEV, 3), bool)
        where[:, 2] = False
        if e == 2:
            where[4, 0] = False  # a real example masked out: neither read nor written
        z = (rng.normal(size=(NDEV, 3, c)) * 2).astype(np.float32)
        (term, state), grads = step(state, z, ids, where, jnp.int32(e))
        # Reference: full-batch mean over the rows with a reference written at e - lag.
        flat_ids, flat_z, flat_w = ids.reshape(-1), z.reshape(-1, c), where.reshape(-1)
        refs = [history.get((int(i), e - lag)) if m else None for i, m in zip(flat_ids, flat_w)]
        valid = np.array([r is not None for r in refs])
        exp_grad = np.zeros_like(flat_z, np.float64)
        exp_term = 0.0
        if e >= start and valid.any():
            ref = np.stack([r for r in refs if r is not None])
            exp_term = WEIGHT * np.mean(np_traj_kl(flat_z[valid], ref, TAU))
            exp_grad[valid] = WEIGHT / valid.sum() * np_traj_kl_grad(flat_z[valid], ref, TAU)
        np.testing.assert_allclose(term, np.full(NDEV, exp_term), rtol=1e-5, atol=1e-8)
        # pmean of the per-device gradients is the full-batch gradient; padding rows get 0.
        np.testing.assert_allclose(
            np.asarray(grads).reshape(-1, c) / NDEV, exp_grad, rtol=1e-5, atol=1e-8
        )
        for i, zi, m in zip(flat_ids, flat_z, flat_w):
            if m:
                history[(int(i), e)] = zi.astype(np.float64)
        terms.append(exp_term)
    assert terms[0] == 0.0 and terms[1] > 0 and terms[2] > 0
    stamps, logits = np.asarray(state.written_epoch), np.asarray(state.logits)
    for r in range(NDEV):  # identical replicas, exactly the history (padding never written)
        for i in range(n):
            for slot in range(lag + 1):
                epochs = [e for e in range(3) if e % (lag + 1) == slot and (i, e) in history]
                assert stamps[r, i, slot] == (max(epochs) if epochs else -1)
                if epochs:
                    np.testing.assert_array_equal(logits[r, i, slot], history[(i, max(epochs))])
    # A bad id on one device only, unmasked: every device gets NaN and nothing is written.
    ids[5, 1] = 999
    (term, new), grads = step(state, z, ids, where, jnp.int32(3))
    assert np.isnan(np.asarray(term)).all()
    assert np.isnan(np.asarray(grads)[np.asarray(where)]).all()
    np.testing.assert_array_equal(np.asarray(new.written_epoch), stamps)
    np.testing.assert_array_equal(np.asarray(new.logits), logits)


def test_shard_map_axis_name_matches_single_device(single_device_reference):
    traj = saf(DN, DC, lag=1, start_epoch=1, temperature=TAU, weight=WEIGHT, axis_name="x")
    mesh = jax.make_mesh((NDEV,), ("x",))

    def local(state, z, ids, epoch):
        (term, new), g = jax.value_and_grad(traj.update, argnums=1, has_aux=True)(
            state, z, ids, epoch
        )
        return term[None], new, g

    step = jax.jit(jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P("x"), P("x"), P()), out_specs=(P("x"), P(), P("x"))
    ))
    rep, shd = NamedSharding(mesh, P()), NamedSharding(mesh, P("x"))
    state = jax.device_put(traj.init(), rep)
    for (e, ids, z), (term1, grad1, state1) in zip(device_stream(), single_device_reference):
        epoch = jax.device_put(jnp.int32(e), rep)
        terms, state, grads = step(state, jax.device_put(z, shd), jax.device_put(ids, shd), epoch)
        np.testing.assert_allclose(terms, np.full(NDEV, term1), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(np.asarray(grads) / NDEV, grad1, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(state.logits, state1.logits)
        np.testing.assert_array_equal(state.written_epoch, state1.written_epoch)


@pytest.mark.parametrize("explicit", [False, True])
def test_jit_with_sharded_buffer_matches_single_device(single_device_reference, explicit):
    traj = saf(DN, DC, lag=1, start_epoch=1, temperature=TAU, weight=WEIGHT)
    if explicit:  # jax.make_mesh: Explicit axis types (sharding in types)
        mesh = jax.make_mesh((NDEV,), ("x",))
    else:
        mesh = Mesh(np.array(jax.devices()[:NDEV]), ("x",))
    shd = NamedSharding(mesh, P("x"))
    state = traj.init(sharding=shd)
    assert state.logits.addressable_shards[0].data.shape == (DN // NDEV, 2, DC)
    assert state.written_epoch.addressable_shards[0].data.shape == (DN // NDEV, 2)
    step = jax.jit(jax.value_and_grad(traj.update, argnums=1, has_aux=True))
    for (e, ids, z), (term1, grad1, state1) in zip(device_stream(), single_device_reference):
        (term, state), g = step(
            state, jax.device_put(z, shd), jax.device_put(ids, shd), jnp.int32(e)
        )
        np.testing.assert_allclose(term, term1, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(g, grad1, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(state.logits, state1.logits)
        np.testing.assert_array_equal(state.written_epoch, state1.written_epoch)
    assert state.logits.sharding.spec[0] == "x"  # still sharded along the example axis


# ------------------------------------------------------------------------------------------------
# Combinators
# ------------------------------------------------------------------------------------------------


def test_with_saf_total_aux_and_gradient():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    w0, w1 = rng.normal(size=(2, 4, 2)).astype(np.float32)
    traj = saf(5, 2, lag=1, start_epoch=1, temperature=TAU, weight=WEIGHT)
    f = jax.jit(jax.value_and_grad(with_saf(linear_loss, traj), has_aux=True))
    batch = {"x": x, "id": np.array([4, 0, 2])}
    (_, out), _ = f(w0, traj.init(), batch, 0)
    (total, out), g = f(w1, out.state, batch, 1)
    z1, z0 = x @ w1, x @ w0
    term = WEIGHT * np.mean(np_traj_kl(z1, z0, TAU))
    np.testing.assert_allclose(out.term, term, rtol=1e-5)
    np.testing.assert_allclose(total, 0.5 * np.sum(w1.astype(np.float64) ** 2) + term, rtol=1e-5)
    exp_g = w1 + x.T @ (WEIGHT / 3 * np_traj_kl_grad(z1, z0, TAU))
    np.testing.assert_allclose(g, exp_g, rtol=1e-5, atol=1e-6)
    assert out.aux["tag"] == 7
    np.testing.assert_allclose(out.state.logits[np.array([4, 0, 2]), 1], z1, rtol=1e-6)


def test_with_saf_and_sam_write_clean_logits_once():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    w = rng.normal(size=(4, 2)).astype(np.float32)
    traj = saf(3, 2, lag=1, start_epoch=0)
    f = with_saf(lambda p, b: (jnp.mean(jnp.sum((b["x"] @ p) ** 2, -1)), {"logits": b["x"] @ p}),
                    traj)
    opt = optax.chain(sharpax.sam(0.5), optax.sgd(0.1))
    batch = {"x": x, "id": np.array([0, 1, 2])}

    @jax.jit
    def train_step(w, opt_state, saf_state, epoch):
        (_loss, out), grads = jax.value_and_grad(f, has_aux=True)(w, saf_state, batch, epoch)
        grad_fn = lambda p: jax.grad(f, has_aux=True)(p, saf_state, batch, epoch)[0]
        updates, opt_state = opt.update(grads, opt_state, w, grad_fn=grad_fn)
        return optax.apply_updates(w, updates), opt_state, out.state

    w_new, _, state = train_step(w, opt.init(w), traj.init(), jnp.int32(0))
    # The buffer holds the clean logits x @ w (not the perturbed pass's), written at epoch 0.
    np.testing.assert_allclose(state.logits[:, 0], x @ w, rtol=1e-6)
    assert (np.asarray(state.written_epoch) == np.array([[0, -1]] * 3)).all()
    assert not np.allclose(w_new, w)


# ------------------------------------------------------------------------------------------------
# End to end: a tiny MLP on a data source that yields example ids
# ------------------------------------------------------------------------------------------------


def test_end_to_end_saf_training():
    traj = saf(EN, 3, lag=1, start_epoch=1)
    ce, terms, logged, state = train(
        with_saf(ce_loss, traj),
        traj.init(),
        after_step=lambda state, params: state,
        check_batch=lambda batch: traj.check_ids(batch["id"]),
    )
    assert np.all(np.isfinite(ce)) and all(np.isfinite(t) for _, t in terms)
    assert ce[-1] < 0.5 * ce[0]
    assert all(t == 0.0 for e, t in terms if e < 1) and all(t > 0 for e, t in terms if e >= 1)
    # Every example's logits were stored under its own id (no batch/id mismatch).
    stamps = np.asarray(state.written_epoch)
    assert set(stamps[:, (EPOCHS - 1) % 2]) == {EPOCHS - 1}
    assert set(stamps[:, EPOCHS % 2]) == {EPOCHS - 2}
    buffer = np.asarray(state.logits)
    for epoch, ids, logits in logged[-2 * (EN // EB) :]:
        np.testing.assert_array_equal(buffer[ids, epoch % 2], logits)


def test_saf_term_is_nan_when_a_used_reference_is_nan():
    traj = sharpax.saf(num_examples=4, num_classes=2, lag=1, start_epoch=0)
    state = traj.init()
    ids = jnp.array([0, 3])
    bad = jnp.array([[0.5, 1.0], [jnp.nan, 0.0]])  # example 3's logits are NaN at epoch 0
    _, state = traj.update(state, bad, ids, 0)
    term, _ = traj.update(state, jnp.ones((2, 2)), ids, 1)  # reads epoch 0's references
    assert np.isnan(float(term))
    clean_term, _ = traj.update(state, jnp.ones((1, 2)), jnp.array([0]), 1)
    assert np.isfinite(float(clean_term))  # example 0's reference is finite


def test_with_saf_reads_batch_id_and_says_how_to_pass_ids_fn():
    traj = sharpax.saf(num_examples=4, num_classes=2, lag=1, start_epoch=0)

    def loss_fn(w, batch):
        logits = batch["x"] @ w
        return jnp.mean(logits**2), {"logits": logits}

    batch = {"x": jnp.ones((2, 3)), "example_id": jnp.array([0, 1])}
    with pytest.raises(KeyError, match=r"by default batch\['id'\].*ids_fn=lambda batch: batch\['example_id'\]"):
        sharpax.with_saf(loss_fn, traj)(jnp.ones((3, 2)), traj.init(), batch, 0)
    loss, out = sharpax.with_saf(loss_fn, traj, ids_fn=lambda b: b["example_id"])(
        jnp.ones((3, 2)), traj.init(), batch, 0
    )
    assert np.isfinite(float(loss)) and out.state.written_epoch[1].tolist()[0] == 0
    # The default reads batch["id"], the key experiments/' pipelines and the notebook use.
    renamed = {"x": batch["x"], "id": batch["example_id"]}
    _, default = sharpax.with_saf(loss_fn, traj)(jnp.ones((3, 2)), traj.init(), renamed, 0)
    np.testing.assert_array_equal(default.state.written_epoch, out.state.written_epoch)
