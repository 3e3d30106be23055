"""Old versus new: SAF and MESA after the split of sharpax/trajectory.py, bit for bit.

``tests/legacy/trajectory_v0.py`` is a frozen copy of ``sharpax/trajectory.py`` from
before SAF and MESA moved to ``sharpax/saf.py`` and ``sharpax/mesa.py``. On fixed
problems both run side by side and every output must agree exactly
(``assert_array_equal``, dtypes included): SAF's term, its gradient and the buffer over
several epochs (start_epoch, end_epoch, lag, duplicate ids, ``where`` masks, a bfloat16
buffer, bad ids, eager and jitted, checkify), on 8 devices (pmap and shard_map with
``axis_name``, jit with a sharded buffer), MESA's EMA, loss and gradients, and the
``with_saf`` / ``with_mesa`` wrappers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from legacy import trajectory_v0 as old

import sharpax

NDEV = 8


def assert_same(a, b):
    """Identical pytrees: same structure (by position), dtypes, shapes and bits."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def stream(rng, n, c, batch, num_epochs, bad=False, per_epoch=3):
    """(epoch, logits, ids, where): shuffled ids with duplicates and padding rows."""
    for e in range(num_epochs):
        for _ in range(per_epoch):
            ids = rng.integers(0, n, size=batch)
            ids[1] = ids[0]  # a duplicate id in every batch
            where = rng.random(batch) > 0.25
            ids[~where] = rng.choice([-1, n, 10 * n], size=int((~where).sum()))  # junk
            if bad and e == num_epochs - 1:
                ids[where.argmax()] = n  # an unmasked bad id in the last epoch
            z = (rng.normal(size=(batch, c)) * 3).astype(np.float32)
            yield e, z, ids.astype(np.int32), where


# ------------------------------------------------------------------------------------------------
# SAF on one device
# ------------------------------------------------------------------------------------------------

SAF_CASES = [
    {"lag": 1, "start_epoch": 0},
    {"lag": 2, "start_epoch": 3, "temperature": 2.0, "weight": 0.7},
    {"lag": 1, "start_epoch": 1, "end_epoch": 3, "dtype": jnp.bfloat16},
    {"lag": 3, "start_epoch": 2, "end_epoch": 5, "weight": 0.0},
]


@pytest.mark.parametrize("case", range(len(SAF_CASES)))
def test_saf_jitted_steps_match_the_previous_code(case):
    kwargs = SAF_CASES[case]
    n, c, batch = 10, 4, 6
    t_old, t_new = old.saf(n, c, **kwargs), sharpax.saf(n, c, **kwargs)
    assert t_old.nbytes == t_new.nbytes

    def make(traj):
        def step(state, z, ids, epoch, where):
            return jax.value_and_grad(
                lambda zz: traj.update(state, zz, ids, epoch, where=where), has_aux=True
            )(z)

        return jax.jit(step)

    s_old, s_new = t_old.init(), t_new.init()
    assert_same(s_old, s_new)
    step_old, step_new = make(t_old), make(t_new)
    rng = np.random.default_rng(case)
    terms = []
    for e, z, ids, where in stream(rng, n, c, batch, 2 * kwargs["lag"] + 4, bad=True):
        (term_o, s_old), g_o = step_old(s_old, z, ids, jnp.int32(e), where)
        (term_n, s_new), g_n = step_new(s_new, z, ids, jnp.int32(e), where)
        assert_same((term_o, g_o, s_old), (term_n, g_n, s_new))
        terms.append(float(term_n))
    # The problem exercised both the term and the poisoning (bad id in the last epoch).
    assert any(t > 0 for t in terms) or kwargs.get("weight") == 0.0
    assert np.isnan(terms[-1])


def test_saf_eager_updates_with_python_epochs_match_the_previous_code():
    n, c = 8, 3
    t_old = old.saf(n, c, lag=1, start_epoch=1, end_epoch=3)
    t_new = sharpax.saf(n, c, lag=1, start_epoch=1, end_epoch=3)
    s_old, s_new = t_old.init(), t_new.init()
    rng = np.random.default_rng(20)
    for e, z, ids, where in stream(rng, n, c, 5, 4, per_epoch=1):
        term_o, s_old = t_old.update(s_old, z, ids, e, where=where)
        term_n, s_new = t_new.update(s_new, z, ids, e, where=where)
        assert_same((term_o, s_old), (term_n, s_new))
    # Without `where`: every id is real (no padding); duplicates keep the last occurrence.
    ids = np.array([3, 3, 0, 7], np.int32)
    z = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert_same(t_old.update(s_old, z, ids, 3), t_new.update(s_new, z, ids, 3))


def test_saf_errors_match_the_previous_code():
    def outcome(make, m):
        try:
            make(m)
        except (TypeError, ValueError) as e:
            return type(e).__name__, str(e)
        return None

    n, c = 12, 4
    z, ids = jnp.zeros((3, c)), jnp.arange(3)
    cases = [
        lambda m: m.saf(0, 3),
        lambda m: m.saf(3, 3, lag=0),
        lambda m: m.saf(3, 3, start_epoch=2, end_epoch=2),
        lambda m: m.saf(3, 3, dtype=jnp.int32),
        lambda m: m.saf(3, 3, debug_checks=1),
        lambda m: m.check_example_ids(np.array([0, -1, 12, 5]), n),
        lambda m: m.check_example_ids(np.array([0.0]), n),
        lambda m: m.saf(n, c).check_ids(np.array([1, 40]), where=np.array([True, True])),
        lambda m: m.saf(n, c).update(m.saf(n, c).init(), z, jnp.array([1, 2, 99]), 0),
        lambda m: m.saf(n, c).update(m.saf(n, c).init(), jnp.zeros((3, 5)), ids, 0),
        lambda m: m.saf(n, c).update(m.saf(n, c).init(), z, jnp.arange(4), 0),
        lambda m: m.saf(n, c).update(m.saf(n, c).init(), z, ids, -1),
        lambda m: m.saf(n, c).update(m.saf(n, c).init(), z, ids, 0, where=jnp.ones(2, bool)),
        lambda m: m.saf(n, c, lag=1).update(m.saf(n, c).init(), z, ids, 0),
        lambda m: m.mesa(1.5),
        lambda m: m.mesa(0.9).loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 0),
        lambda m: m.with_saf(lambda p, b: (0.0, {}), object()),
        lambda m: m.with_mesa(lambda p, b: (0.0, {}), m.mesa(), None),
    ]
    for make in cases:
        got_old, got_new = outcome(make, old), outcome(make, sharpax)
        assert got_old is not None and got_old == got_new


def test_saf_checkify_matches_the_previous_code():
    def run(m):
        traj = m.saf(12, 4, lag=1, start_epoch=0, debug_checks=True)
        checked = jax.jit(checkify.checkify(traj.update))
        err, out = checked(traj.init(), jnp.ones((3, 4)), jnp.array([1, 12, -5]), jnp.int32(0))
        err_ok, out_ok = checked(traj.init(), jnp.ones((3, 4)), jnp.array([1, 1, 0]), 0)
        return err.get(), out, err_ok.get(), out_ok

    e_old, out_old, ok_old, good_old = run(old)
    e_new, out_new, ok_new, good_new = run(sharpax)
    assert e_old is not None and e_old == e_new and ok_old is None and ok_new is None
    assert_same((out_old, good_old), (out_new, good_new))


# ------------------------------------------------------------------------------------------------
# SAF on 8 devices
# ------------------------------------------------------------------------------------------------

DN, DC, DB = 32, 5, 16  # examples, classes, global batch (2 per device)


def device_stream(num_epochs=3):
    rng = np.random.default_rng(3)
    for e in range(num_epochs):
        perm = rng.permutation(DN)
        for k in range(0, DN, DB):
            ids = perm[k : k + DB].astype(np.int32)
            ids[5] = ids[2]  # a duplicate across devices
            where = np.ones(DB, bool)
            where[[3, 11]] = False
            z = (rng.normal(size=(DB, DC)) * 2).astype(np.float32)
            yield e, z, ids, where


def test_saf_pmap_axis_name_matches_the_previous_code():
    def run(m):
        traj = m.saf(DN, DC, lag=1, start_epoch=1, axis_name="b")
        step = jax.pmap(
            lambda s, z, i, w, e: jax.value_and_grad(
                lambda zz: traj.update(s, zz, i, e, where=w), has_aux=True
            )(z),
            axis_name="b",
            in_axes=(0, 0, 0, 0, None),
        )
        state = jax.tree.map(lambda a: np.stack([a] * NDEV), traj.init())
        out = []
        for e, z, ids, where in device_stream():
            (term, state), g = step(
                state,
                z.reshape(NDEV, -1, DC),
                ids.reshape(NDEV, -1),
                where.reshape(NDEV, -1),
                jnp.int32(e),
            )
            out.append((term, g, state))
        return out

    assert_same(run(old), run(sharpax))


def test_saf_shard_map_axis_name_matches_the_previous_code():
    mesh = jax.make_mesh((NDEV,), ("x",))
    rep, shd = NamedSharding(mesh, P()), NamedSharding(mesh, P("x"))

    def run(m):
        traj = m.saf(DN, DC, lag=1, start_epoch=1, axis_name="x")

        def local(state, z, ids, where, epoch):
            (term, new), g = jax.value_and_grad(
                lambda zz: traj.update(state, zz, ids, epoch, where=where), has_aux=True
            )(z)
            return term[None], new, g

        step = jax.jit(
            jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(P(), P("x"), P("x"), P("x"), P()),
                out_specs=(P("x"), P(), P("x")),
            )
        )
        state, out = jax.device_put(traj.init(), rep), []
        for e, z, ids, where in device_stream():
            put = [jax.device_put(a, shd) for a in (z, ids, where)]
            terms, state, g = step(state, *put, jax.device_put(jnp.int32(e), rep))
            out.append((terms, g, state))
        return out

    assert_same(run(old), run(sharpax))


@pytest.mark.parametrize("explicit", [False, True])
def test_saf_jit_with_sharded_buffer_matches_the_previous_code(explicit):
    if explicit:  # jax.make_mesh: Explicit axis types (sharding in types)
        mesh = jax.make_mesh((NDEV,), ("x",))
    else:
        mesh = Mesh(np.array(jax.devices()[:NDEV]), ("x",))
    shd = NamedSharding(mesh, P("x"))

    def run(m):
        traj = m.saf(DN, DC, lag=1, start_epoch=1, dtype=jnp.bfloat16)
        state = traj.init(sharding=shd)
        assert state.logits.addressable_shards[0].data.shape == (DN // NDEV, 2, DC)
        step = jax.jit(
            lambda s, z, i, w, e: jax.value_and_grad(
                lambda zz: traj.update(s, zz, i, e, where=w), has_aux=True
            )(z)
        )
        out = []
        for e, z, ids, where in device_stream():
            put = [jax.device_put(a, shd) for a in (z, ids, where)]
            (term, state), g = step(state, *put, jnp.int32(e))
            out.append((term, g, state))
        assert state.logits.sharding.spec[0] == "x"
        return out

    assert_same(run(old), run(sharpax))


# ------------------------------------------------------------------------------------------------
# MESA
# ------------------------------------------------------------------------------------------------


def variables_at(k):
    rng = np.random.default_rng(30 + k)
    return {
        "params": {
            "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2,)), jnp.bfloat16),
        },
        "batch_stats": {"mean": jnp.asarray(rng.normal(size=(2,)), jnp.float32)},
        "step": jnp.asarray(k, jnp.int32),
        "flag": jnp.asarray(k % 2 == 0),
    }


@pytest.mark.parametrize("decay", ["const", "schedule"])
def test_mesa_init_update_and_loss_match_the_previous_code(decay):
    d = 0.9 if decay == "const" else (lambda count: 0.5 + 0.1 * jnp.minimum(count, 4))

    def run(m):
        teacher = m.mesa(d, start_epoch=1, end_epoch=3, temperature=2.0, weight=0.8)
        state = teacher.init(variables_at(0))
        upd, out = jax.jit(teacher.update), [state]
        for k in range(1, 5):
            state = upd(state, variables_at(k))
            out.append(state)
        state = teacher.update(state, variables_at(5))  # eager
        out.append(state)
        rng = np.random.default_rng(31)
        z, t = (rng.normal(size=(2, 6, 4)) * 3).astype(np.float32)
        where = np.array([True, False, True, True, False, True])

        @jax.jit
        def loss_and_grads(z, t, epoch):
            f = lambda a, b: teacher.loss(a, b, epoch, where=where)
            return jax.value_and_grad(f, argnums=(0, 1))(z, t)

        for e in range(5):
            out.append(loss_and_grads(z, t, jnp.int32(e)))
            out.append(teacher.loss(jnp.asarray(z, jnp.bfloat16), t, e))  # eager, Python epoch
        assert [teacher.active(e) for e in range(5)] == [False, True, True, False, False]
        return out

    assert_same(run(old), run(sharpax))


# ------------------------------------------------------------------------------------------------
# Wrappers
# ------------------------------------------------------------------------------------------------


def linear_loss(w, batch):
    return 0.5 * jnp.sum(w**2), {"logits": batch["x"] @ w, "tag": 7}


def test_with_saf_matches_the_previous_code():
    rng = np.random.default_rng(40)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    ws = rng.normal(size=(4, 3, 2)).astype(np.float32)

    def run(m):
        traj = m.saf(6, 2, lag=1, start_epoch=1)
        f = m.with_saf(linear_loss, traj, ids_fn=lambda b: b["id"], where_fn=lambda b: b["where"])
        step = jax.jit(jax.value_and_grad(f, has_aux=True))
        batch = {"x": x, "id": np.array([4, 0, 4, 9]), "where": np.array([1, 1, 1, 0], bool)}
        state, out = traj.init(), []
        for e, w in enumerate(ws):
            (total, aux), g = step(w, state, batch, jnp.int32(e // 2))
            state = aux.state
            out.append((total, aux.state, aux.term, aux.aux["logits"], g))
        # Default readers (the frozen code reads batch["example_id"], sharpax batch["id"]);
        # concrete ids and a Python epoch (host id check while tracing).
        f_default = m.with_saf(linear_loss, traj)
        batch = {"x": x, "example_id": np.array([1, 2, 3, 5]), "id": np.array([1, 2, 3, 5])}
        (total, aux), g = jax.jit(
            lambda w, s: jax.value_and_grad(f_default, has_aux=True)(w, s, batch, 3)
        )(ws[0], state)
        out.append((total, aux.state, aux.term, g))
        return out

    assert_same(run(old), run(sharpax))


def test_with_mesa_matches_the_previous_code():
    rng = np.random.default_rng(41)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    w, ema = rng.normal(size=(2, 3, 2)).astype(np.float32)
    where = np.array([True, True, False, True])

    def run(m):
        teacher = m.mesa(0.9, start_epoch=1, end_epoch=3)
        f = m.with_mesa(linear_loss, teacher, lambda e, b: b["x"] @ e, where_fn=lambda b: where)
        state = teacher.init(jnp.asarray(ema))
        traced = jax.jit(jax.value_and_grad(f, has_aux=True))
        static = jax.jit(jax.value_and_grad(f, has_aux=True), static_argnums=3)
        out = []
        for e in range(4):
            (total, aux), g = traced(w, state, {"x": x}, jnp.int32(e))
            out.append((total, aux.state, aux.term, g))
            (total, aux), g = static(w, state, {"x": x}, e)
            out.append((total, aux.state, aux.term, g))
        return out

    assert_same(run(old), run(sharpax))
