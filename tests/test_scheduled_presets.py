"""Tests of the presets sharpax.looksam / sharpax.vsam against hand-written references."""

import functools
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import sharpax
from sharpax import _vsam_window, looksam, vsam
from sharpax.sam import pmean_updates

# ----------------------------------------------------------------------------- tiny problems


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def mlp_init(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 1)}
    return {k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in shapes.items()}


def mlp_data(steps, batch=8, seed=1, lead=()):
    """Per-step batches; a prefix of the same stream whatever ``steps`` is.

    NumPy arrays: indexing them per step costs nothing (eager jax indexing compiles).
    """
    rng = np.random.default_rng(seed)
    n = max(steps, 100)
    x = rng.normal(size=(n, *lead, batch, 3)).astype(np.float32)
    y = rng.normal(size=(n, *lead, batch, 1)).astype(np.float32)
    return x[:steps], y[:steps]


# Executions of grad_fn inside compiled steps (via jax.debug.callback): how many, and the
# step index (the transform's count before the step) of each.
CALLS = {"run": 0, "steps": []}


def _count_run(count):
    CALLS["run"] += 1
    CALLS["steps"].append(int(count))


def make_step(opt, sam_step=None, with_grad_fn=True):
    """One jitted training step of the MLP with ``opt = chain(<sharpax>, sgd)``."""

    def step(params, state, x, y):
        def grad_fn(p):
            jax.debug.callback(_count_run, state[0].count)
            return jax.grad(mlp_loss)(p, x, y)

        grads = jax.grad(mlp_loss)(params, x, y)
        kwargs = {"sam_step": sam_step}
        if with_grad_fn:
            kwargs["grad_fn"] = grad_fn
        updates, state = opt.update(grads, state, params, **kwargs)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


class Setup(NamedTuple):
    opt: optax.GradientTransformationExtraArgs
    cond_step: Any  # sam_step=None: lax.cond on device
    sam_fn: Any  # sam_step=True
    reuse_fn: Any  # sam_step=False, no grad_fn at all


def _setup(opt):
    return Setup(opt, make_step(opt), make_step(opt, True), make_step(opt, False, False))


VSAM_WINDOW, VSAM_WARMUP = 6, 4


@pytest.fixture(scope="module")
def vsam_setup():
    # Compiled once and shared by several tests (compilation dominates the runtime).
    transform = vsam(
        0.05,
        window=VSAM_WINDOW,
        blocks=3,
        warmup_steps=VSAM_WARMUP,
        sensitivity=(4.0, 4.0),
        seed=11,
    )
    return _setup(optax.chain(transform, optax.sgd(0.1, momentum=0.9)))


@pytest.fixture(scope="module")
def looksam_setup():
    return _setup(optax.chain(looksam(0.05, k=3), optax.sgd(0.1, momentum=0.9)))


def run_cond(setup, steps, seed=5):
    """Trajectory of the lax.cond path: list of (params, state) after each step."""
    xs, ys = mlp_data(steps, seed=seed)
    params = mlp_init()
    state = setup.opt.init(params)
    out = [(params, state)]
    for t in range(steps):
        params, state = setup.cond_step(params, state, xs[t], ys[t])
        out.append((params, state))
    return out


@jax.jit
def reference_sam_step(params, x, y, rho, lr):
    """Hand-written two-pass SAM + SGD (Foret et al. 2021), independent of sharpax."""
    g = jax.grad(mlp_loss)(params, x, y)
    norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda w, gg: w + rho * gg / (norm + 1e-12), params, g)
    g_sam = jax.grad(mlp_loss)(perturbed, x, y)
    return jax.tree.map(lambda w, gg: w - lr * gg, params, g_sam)


def assert_trees_close(a, b, atol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=0)


def inner(state):
    """The sharpax state at the head of ``optax.chain(sharpax_transform, ...)``."""
    return state[0]


def all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- equal to SAM


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: looksam(0.1, k=1),
        lambda: vsam(0.1, window=4, blocks=2, warmup_steps=2**31 - 1),
    ],
    ids=["looksam_k1", "vsam_permanent_warmup"],
)
def test_full_sam_configurations_equal_two_pass_sam(make_opt):
    lr, rho, steps = 0.2, 0.1, 6
    opt = optax.chain(make_opt(), optax.sgd(lr))
    step = make_step(opt)
    xs, ys = mlp_data(steps)
    params = ref = mlp_init()
    state = opt.init(params)
    for t in range(steps):
        assert bool(sharpax.sam_due(state))
        params, state = step(params, state, xs[t], ys[t])
        ref = reference_sam_step(ref, xs[t], ys[t], rho, lr)
        assert_trees_close(params, ref, atol=1e-6)
    assert int(sharpax.num_sam_steps(state)) == steps
    assert float(jnp.abs(ref["w1"] - mlp_init()["w1"]).max()) > 1e-3  # it did move


# ----------------------------------------------------------------------------- LookSAM formula


def test_looksam_matches_numpy_formula_on_quadratic():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 4))
    a_mat = m @ m.T + np.eye(4)
    b_vec = rng.normal(size=4)
    rho, alpha, k, lr, steps = 0.2, 0.7, 3, 0.05, 10

    # numpy reference (float64), Liu et al. 2022, Alg. 1
    w = np.array([1.0, -2.0, 0.5, 3.0])
    ref_traj = []
    g_v = None
    for t in range(steps):
        g = a_mat @ w + b_vec
        if t % k == 0:
            g_s = a_mat @ (w + rho * g / (np.linalg.norm(g) + 1e-12)) + b_vec
            g_v = g_s - (g_s @ g) / (g @ g) * g
            out = g_s
        else:
            out = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
        w = w - lr * out
        ref_traj.append(w.copy())

    a_j, b_j = jnp.asarray(a_mat, jnp.float32), jnp.asarray(b_vec, jnp.float32)
    grad = lambda p: a_j @ p + b_j
    opt = optax.chain(looksam(rho, k=k, alpha=alpha), optax.sgd(lr))

    @jax.jit
    def step(p, s):
        u, s = opt.update(grad(p), s, p, grad_fn=grad)
        return optax.apply_updates(p, u), s

    p = jnp.array([1.0, -2.0, 0.5, 3.0])
    s = opt.init(p)
    for t in range(steps):
        assert bool(inner(s).sam_due) == (t % k == 0)
        p, s = step(p, s)
        np.testing.assert_allclose(np.asarray(p), ref_traj[t], rtol=1e-5, atol=1e-5)
        # The cached norm is that of the cached direction (reuse steps read only it).
        np.testing.assert_allclose(
            float(inner(s).reuse.g_v_norm), np.linalg.norm(np.asarray(inner(s).reuse.g_v)), rtol=1e-6
        )
    assert int(inner(s).num_sam_steps) == 4


def test_looksam_zero_gradients_and_parallel_direction_no_nan():
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    opt = looksam(0.05, k=2)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(opt.update, static_argnames=("grad_fn", "sam_step"))
    zero_fn = lambda p: zeros
    state = opt.init(params)
    for _ in range(4):
        out, state = update(zeros, state, params, grad_fn=zero_fn)
        assert all_finite((out, state))
        np.testing.assert_array_equal(np.asarray(out["a"]), 0.0)
    assert int(state.num_sam_steps) == 2
    # g_s parallel to g: the orthogonal part is 0 and a reuse step returns g itself.
    g = jax.tree.map(lambda x: 0.5 * x, params)
    state = opt.init(params)
    _, state = opt.update(g, state, params, grad_fn=lambda p: jax.tree.map(lambda x: 3 * x, g))
    assert_trees_close(state.reuse.g_v, zeros, atol=1e-6)
    out, state = opt.update(g, state, params, sam_step=False)
    assert all_finite(out)
    assert_trees_close(out, g, atol=1e-6)


def test_looksam_override_counts_what_happened():
    opt = looksam(0.05, k=4)
    params = jnp.ones(2)
    g = jnp.array([0.3, -0.2])
    state = opt.init(params)
    _, state = opt.update(g, state, params, grad_fn=lambda p: 2 * p, sam_step=False)
    out, state = opt.update(g, state, params, grad_fn=lambda p: 2 * p, sam_step=True)
    assert int(state.num_sam_steps) == 1 and int(state.count) == 2
    assert not bool(state.sam_due)  # the schedule stays count % k
    ref_eps = 0.05 * np.array([0.3, -0.2]) / np.linalg.norm([0.3, -0.2])
    np.testing.assert_allclose(np.asarray(out), 2 * (np.ones(2) + ref_eps), rtol=1e-6)


def test_caches_are_float32_for_bfloat16_params():
    """g_v (LookSAM) and psf (vSAM) keep float32 precision for bf16 params.

    g = (1, 1), g_s = (3, 2**-8), all exact in bf16: g_v = g_s - (g_s·g / g·g) g =
    (1.498046875, -1.498046875) and psf = g_s - g = (2, 2**-8 - 1) need more than bf16's
    8 significant bits.
    """
    params = jnp.zeros(2, jnp.bfloat16)
    g = jnp.array([1.0, 1.0], jnp.bfloat16)
    g_s = jnp.array([3.0, 2.0**-8], jnp.bfloat16)
    grad_fn = lambda p: g_s
    lk = looksam(0.05, k=2)
    state = lk.init(params)
    assert state.reuse.g_v.dtype == jnp.float32
    out, state = lk.update(g, state, params, grad_fn=grad_fn)
    assert out.dtype == jnp.bfloat16 and state.reuse.g_v.dtype == jnp.float32
    g64, gs64 = np.array([1.0, 1.0]), np.array([3.0, 2.0**-8])
    g_v = gs64 - gs64 @ g64 / (g64 @ g64) * g64
    np.testing.assert_array_equal(np.asarray(state.reuse.g_v), g_v)  # exact in float32
    assert not np.array_equal(np.asarray(jnp.asarray(g_v, jnp.bfloat16), np.float64), g_v)
    # The reuse step: g + alpha ‖g‖/‖g_v‖ g_v, computed in float32, returned in bf16.
    out, state = lk.update(g, state, params, sam_step=False)
    ref = g64 + 0.7 * np.linalg.norm(g64) / np.linalg.norm(g_v) * g_v
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2**-8)

    vs = vsam(0.05, window=4, blocks=2)
    state = vs.init(params)
    assert state.reuse.psf.dtype == jnp.float32
    _, state = vs.update(g, state, params, grad_fn=grad_fn, sam_step=True)
    np.testing.assert_array_equal(np.asarray(state.reuse.psf), gs64 - g64)
    np.testing.assert_allclose(float(state.schedule.psf_norms[-1]), np.linalg.norm(gs64 - g64), rtol=1e-6)


# ----------------------------------------------------------------------------- vSAM mechanics


@functools.partial(jax.jit, static_argnames=("sam_step",))
def small_vsam_update(g, u, state, decay, max_reuse, warmup, sam_step):
    """vsam(window=6, blocks=3, seed=3) on 3 params with grad_fn(p) = g + u, so psf = u.

    reuse_decay, max_reuse and warmup_steps are traced: one compilation serves several tests.
    """
    opt = vsam(
        0.05,
        window=6,
        blocks=3,
        seed=3,
        sensitivity=(1.0, 1.0),
        reuse_decay=decay,
        max_reuse=max_reuse,
        warmup_steps=warmup,
    )
    return opt.update(g, state, jnp.zeros(3), grad_fn=lambda p: g + u, sam_step=sam_step)


def small_vsam_init(warmup=0):
    return vsam(window=6, blocks=3, seed=3, warmup_steps=warmup).init(jnp.zeros(3))


# reuse_decay=1: max_reuse steps of weight 1 (the integer count; the authors' float test
# `w > decay**max_reuse` would never reuse), a documented deviation.
@pytest.mark.parametrize("decay,max_reuse", [(0.7, 6), (0.5, 2), (1.0, 2), (0.0, 1)])
def test_vsam_reuse_weight_sequence(decay, max_reuse):
    g, u = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 2.0, -1.0])
    update = functools.partial(small_vsam_update, decay=decay, max_reuse=max_reuse, warmup=0)
    state = small_vsam_init()
    out, state = update(g, u, state, sam_step=True)
    np.testing.assert_allclose(np.asarray(out), [1.0, 2.0, -1.0])
    weights = []
    for _ in range(max_reuse + 3):
        out, state = update(g, u, state, sam_step=False)
        weights.append(float(out[1]) / 2.0)
        np.testing.assert_allclose(np.asarray(out), g + weights[-1] * u, rtol=1e-6)
    expected = [decay**i for i in range(1, max_reuse + 1)] + [0.0] * 3
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert int(state.num_sam_steps) == 1 and int(state.reuse.reuse_left) == 0
    # a new SAM step resets the weight
    _, state = update(g, u, state, sam_step=True)
    out, state = update(g, u, state, sam_step=False)
    np.testing.assert_allclose(float(out[1]), 2.0 * decay, rtol=1e-6)


def test_vsam_reuse_step_needs_neither_grad_fn_nor_params():
    opt = vsam(window=4, blocks=2, max_reuse=1)
    g = {"w": jnp.ones(2)}
    update = jax.jit(lambda g, s: opt.update(g, s, sam_step=False))
    out, state = update(g, opt.init(g))  # no SAM step yet: plain g
    assert_trees_close(out, g, atol=0)
    assert int(state.num_sam_steps) == 0 and int(state.count) == 1


def sequential_plan(u, pos, taken, quota, prob):
    """The authors' per-step rule, one step at a time."""
    w = len(u)
    plan = np.zeros(w, bool)
    for i in range(pos, w):
        plan[i] = (taken < quota and u[i] < prob) or (w - i <= quota - taken)
        taken += plan[i]
    return plan


def test_window_plan_equals_sequential_rule():
    rng = np.random.default_rng(0)
    plan_fn = jax.jit(jax.vmap(_vsam_window._plan_window))
    for w in (2, 9):
        n = 300
        u = rng.uniform(size=(n, w)).astype(np.float32)
        pos = rng.integers(0, w, size=n)
        quota = rng.integers(0, w + 1, size=n)
        taken = rng.integers(0, quota + 2)
        prob = rng.uniform(size=n).astype(np.float32)
        got = np.asarray(plan_fn(u, pos, taken, quota, prob))
        for i in range(n):
            want = sequential_plan(u[i], pos[i], taken[i], quota[i], prob[i])
            np.testing.assert_array_equal(got[i], want, err_msg=str(i))


def test_vsam_quota_met_in_every_window(vsam_setup):
    window, warmup, windows = VSAM_WINDOW, VSAM_WARMUP, 12
    steps = warmup + windows * window
    CALLS["run"], CALLS["steps"] = 0, []
    traj = run_cond(vsam_setup, steps, seed=1)
    jax.effects_barrier()
    states = [inner(s) for _, s in traj]
    # Independent of the state: the steps on which grad_fn actually ran.
    ran = np.zeros(steps, bool)
    ran[CALLS["steps"]] = True
    assert len(CALLS["steps"]) == len(set(CALLS["steps"]))  # at most once per step
    assert ran[:warmup].all()
    assert int(states[-1].num_sam_steps) == ran.sum()
    quotas = []
    for j in range(windows):
        first = warmup + j * window
        s = states[first]  # state before the window's first step
        assert int(s.schedule.window_pos) == 0 and int(s.schedule.taken) == 0
        q = int(s.schedule.quota)
        assert q == int(np.floor(float(s.schedule.base_rate)))
        assert 1 <= q <= int(window * 0.8)
        np.testing.assert_allclose(float(s.schedule.sam_rate), q / window, rtol=1e-6)
        # grad_fn ran exactly `quota` times in the window ...
        assert ran[first : first + window].sum() == q, (j, q, ran[first : first + window])
        # ... on the steps the plan made at the window start said.
        np.testing.assert_array_equal(np.asarray(s.schedule.plan), ran[first : first + window])
        quotas.append(q)
    assert max(quotas) > 1  # the rate moved: this checked more than the minimum quota


@jax.jit
def _constructed_step(state, s_r, s_v, base, turn, quad):
    """vSAM (window 6, blocks 3, warm-up 12) on g = e1, grad_fn = g + a·e2: psf = a·e2.

    a = base**(min(k, turn) - max(k - turn, 0)) + quad·k², k = SAM steps so far.
    """
    opt = vsam(0.05, window=6, blocks=3, sensitivity=(s_r, s_v), warmup_steps=12)
    k = state.num_sam_steps.astype(jnp.float32)
    a = base ** (jnp.minimum(k, turn) - jnp.maximum(k - turn, 0.0)) + quad * k**2
    g = jnp.array([1.0, 0.0, 0.0])
    grad_fn = lambda p: g + a * jnp.array([0.0, 1.0, 0.0])
    _, state = opt.update(g, state, jnp.zeros(3), grad_fn=grad_fn)
    return state


def constructed_run(sensitivity, base, turn, quad, steps):
    """Returns base_rate at each window start and the final state."""
    state = vsam(window=6, blocks=3, warmup_steps=12).init(jnp.zeros(3))
    rates = []
    for t in range(steps):
        if t >= 12 and (t - 12) % 6 == 0:
            rates.append(float(state.schedule.base_rate))
        state = _constructed_step(state, *sensitivity, base, turn, quad)
    return np.array(rates), state


def test_vsam_rate_formula_matches_numpy_at_first_window():
    s1, s2, window, blocks, warmup = 0.3, 0.2, 6, 3, 12
    rates, _ = constructed_run((s1, s2), 1.1, 1e9, 0.05, warmup + 1)
    # numpy: n_k = a_k (‖e2‖ = 1), r_k = n_k / ‖e1‖ = n_k, v from sorted blocks once full
    a = np.array([1.1**k + 0.05 * k**2 for k in range(warmup)])
    v = [
        np.mean(np.var(np.sort(a[k - window + 1 : k + 1]).reshape(blocks, -1), axis=1, ddof=1))
        for k in range(window - 1, warmup)
    ]
    r_buf, v_buf = a[-window:], np.array(v[-window:])
    dr = np.clip(np.mean(np.diff(r_buf) / r_buf[:-1]), -1, 1)
    dv = np.clip(np.mean(np.diff(v_buf) / v_buf[:-1]), -1, 1)
    expected = np.clip(1.0 * (1 + s1 * dr + s2 * dv), 1, int(window * 0.8))
    assert expected > 1.05
    np.testing.assert_allclose(rates[0], expected, rtol=1e-5)


@pytest.mark.parametrize("sensitivity", [(1.0, 0.0), (0.0, 1.0)], ids=["r", "v"])
def test_vsam_rate_rises_and_falls_with_statistic(sensitivity):
    # The PSF norm grows 1.3x per SAM step for 30 SAM steps, then shrinks 1/1.3x per SAM step:
    # r = n / ‖g‖ changes by the same factor, v (variance of sorted neighbours) by its square.
    turn, cap = 30, 4  # cap = floor(6 * 0.8)
    rates, state = constructed_run(sensitivity, 1.3, float(turn), 0.0, 12 + 16 * 6)
    peak = int(np.argmax(rates))
    rise, fall = rates[: peak + 1], rates[peak:]
    assert rise[0] > 1.0 and np.all(np.diff(rise) > 0) and rise[-1] == cap, rates
    assert np.all(np.diff(fall) <= 0) and fall[-1] == 1.0, rates
    assert np.sum(np.diff(fall) < 0) >= 2, rates  # it came down window by window
    assert int(state.num_sam_steps) > turn + 6  # the shrinking values filled the buffers
    assert all_finite(state)


def test_vsam_statistics_helpers_match_numpy():
    rng = np.random.default_rng(3)
    buf = rng.uniform(0.5, 2.0, size=10).astype(np.float32)
    buf[6] = 0.0  # a zero denominator is skipped
    for m in [0, 1, 2, 5, 10]:
        got = float(_vsam_window._mean_relative_change(jnp.asarray(buf), m))
        pairs = [(buf[i], buf[i + 1]) for i in range(10 - m, 9) if buf[i] > 0]
        want = np.clip(np.mean([(b - a) / a for a, b in pairs]), -1, 1) if pairs else 0.0
        np.testing.assert_allclose(got, want, rtol=1e-6)
    got = float(_vsam_window._block_variance(jnp.asarray(buf), 5))
    want = np.mean(np.var(np.sort(buf).reshape(5, 2), axis=1, ddof=1))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_vsam_zero_gradients_no_nan():
    zeros = jnp.zeros(3)
    state = small_vsam_init(warmup=5)
    for _ in range(5 + 3 * 6):
        out, state = small_vsam_update(zeros, zeros, state, 0.7, 6, 5, sam_step=None)
        assert all_finite((out, state))
    assert int(state.num_sam_steps) == 5 + 3  # warm-up + one SAM step per window
    assert float(state.schedule.base_rate) == 1.0


def test_vsam_stat_mask_selects_leaves():
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    g = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 2.0])}
    psf = {"a": jnp.array([0.0, 3.0]), "b": jnp.array([4.0, 0.0])}
    grad_fn = lambda p: jax.tree.map(jnp.add, g, psf)
    for mask, n, gn in [
        (None, 5.0, np.sqrt(5.0)),
        ({"a": False, "b": True}, 4.0, 2.0),
        (lambda p: {"a": True, "b": False}, 3.0, 1.0),
    ]:
        opt = vsam(window=4, blocks=2, stat_mask=mask)
        _, state = opt.update(g, opt.init(params), params, grad_fn=grad_fn, sam_step=True)
        np.testing.assert_allclose(float(state.schedule.psf_norms[-1]), n, rtol=1e-6)
        np.testing.assert_allclose(float(state.schedule.psf_ratios[-1]), n / gn, rtol=1e-6)


def test_vsam_sam_step_override_is_honoured_and_quota_kept():
    window = 6
    g, u = jnp.array([0.3, -0.2, 0.0]), jnp.array([0.0, 0.1, 0.5])
    update = functools.partial(small_vsam_update, g, u, decay=0.7, max_reuse=6, warmup=0)
    state = small_vsam_init()
    assert int(state.schedule.quota) == 1
    # Skip the planned SAM step: it is made up later in the window.
    first = int(np.argmax(np.asarray(state.schedule.plan)))
    assert first < window - 1  # (seed chosen so that there is something to make up)
    did = []
    for i in range(window):
        override = False if i == first else bool(state.sam_due)
        n0 = int(state.num_sam_steps)
        _, state = update(state, sam_step=override)
        did.append(int(state.num_sam_steps) - n0)
    assert did[first] == 0 and sum(did[first + 1 :]) == 1 and sum(did) == 1, did
    # Force an extra SAM step at the start of the next window: the plan drops one.
    assert int(state.schedule.window_pos) == 0
    q = int(state.schedule.quota)
    did = []
    for i in range(window):
        override = True if i == 0 else bool(state.sam_due)
        n0 = int(state.num_sam_steps)
        _, state = update(state, sam_step=override)
        did.append(int(state.num_sam_steps) - n0)
    assert did[0] == 1 and sum(did) == q, did


# ----------------------------------------------------------------------------- grad_fn skipped


@pytest.mark.parametrize("name", ["looksam_setup", "vsam_setup"])
def test_grad_fn_not_executed_on_reuse_steps(name, request):
    setup = request.getfixturevalue(name)
    CALLS["run"], CALLS["steps"] = 0, []
    traj = run_cond(setup, 14)
    jax.effects_barrier()
    n_sam = int(sharpax.num_sam_steps(traj[-1][1]))
    assert CALLS["run"] == n_sam and 0 < n_sam < 14, (CALLS, n_sam)

    # Static sam_step: no conditional in the program; with False grad_fn is never called.
    traced = {"n": 0}

    def step(params, state, x, y, sam_step):
        def grad_fn(p):
            traced["n"] += 1
            return jax.grad(mlp_loss)(p, x, y)

        grads = jax.grad(mlp_loss)(params, x, y)
        return setup.opt.update(grads, state, params, grad_fn=grad_fn, sam_step=sam_step)

    params, state = traj[-1]
    x, y = mlp_data(1)
    args = (params, state, x[0], y[0])
    jaxpr = str(jax.make_jaxpr(lambda *a: step(*a, None))(*args))
    assert "cond[" in jaxpr and traced["n"] == 1  # grad_fn traced inside the SAM branch only
    for flag in (False, True):
        traced["n"] = 0
        jaxpr = str(jax.make_jaxpr(lambda *a, f=flag: step(*a, f))(*args))
        assert "cond[" not in jaxpr
        assert traced["n"] == int(flag)  # never even called with sam_step=False


# ----------------------------------------------------------------------------- host dispatch


@pytest.mark.parametrize("name", ["looksam_setup", "vsam_setup"])
def test_two_function_loop_equals_cond_path(name, request):
    setup = request.getfixturevalue(name)
    steps = 30
    xs, ys = mlp_data(steps, seed=5)
    traj = run_cond(setup, steps, seed=5)
    decisions_a = [bool(sharpax.sam_due(s)) for _, s in traj[:-1]]
    assert 0 < sum(decisions_a) < steps

    # Two compiled programs, the host picks one per step from sam_due.
    p, s = mlp_init(), setup.opt.init(mlp_init())
    for t in range(steps):
        due = bool(sharpax.sam_due(s))
        assert due == decisions_a[t]
        p, s = (setup.sam_fn if due else setup.reuse_fn)(p, s, xs[t], ys[t])
        assert_trees_close(p, traj[t + 1][0], atol=1e-6)

    # Plan-ahead loop: one host read per window.
    p, s = mlp_init(), setup.opt.init(mlp_init())
    t, decisions_c, reads = 0, [], 0
    while t < steps:
        reads += 1
        for due in sharpax.upcoming_sam_steps(s):
            if t == steps:
                break
            decisions_c.append(bool(due))
            p, s = (setup.sam_fn if due else setup.reuse_fn)(p, s, xs[t], ys[t])
            t += 1
    assert decisions_c == decisions_a
    assert_trees_close(p, traj[-1][0], atol=1e-6)
    if name == "vsam_setup":
        assert reads == 1 + -(-(steps - VSAM_WARMUP) // VSAM_WINDOW)


# ----------------------------------------------------------------------------- resume


def test_vsam_jit_resume_from_saved_state_is_exact(vsam_setup):
    steps, cut = 30, 13
    xs, ys = mlp_data(steps, seed=9)
    full = run_cond(vsam_setup, steps, seed=9)[-1]
    p, s = run_cond(vsam_setup, cut, seed=9)[-1]
    saved = jax.tree.map(np.asarray, (p, s))  # e.g. what a checkpointer writes
    p, s = jax.tree.map(jnp.asarray, saved)
    for t in range(cut, steps):
        p, s = vsam_setup.cond_step(p, s, xs[t], ys[t])
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert VSAM_WARMUP < int(sharpax.num_sam_steps(s)) < steps


# ----------------------------------------------------------------------------- data parallel

N_DEV = 8


def dp_setup(axis_name, steps):
    opt = vsam(
        0.05, window=4, blocks=2, warmup_steps=4, sensitivity=(4.0, 4.0), axis_name=axis_name
    )
    xs, ys = mlp_data(steps, batch=4, seed=7, lead=(N_DEV,))
    xs = xs * (1.0 + np.arange(N_DEV, dtype=np.float32))[None, :, None, None]  # per device

    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = opt.update(
            grads, state, params, grad_fn=lambda p: jax.grad(mlp_loss)(p, x, y)
        )
        return jax.tree.map(lambda w, u: w - 0.1 * u, params, updates), state

    rep = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), tree)
    return step, rep(mlp_init()), rep(opt.init(mlp_init())), xs, ys


SCHEDULE_FIELDS = [
    "sam_due",
    "plan",
    "base_rate",
    "quota",
    "num_sam_steps",
    "psf_ratios",
    "psf_vars",
]


def field(state, name):
    return optax.tree_utils.tree_get(state, name)


def replicas_agree(state):
    return all(
        np.all(np.asarray(field(state, f)) == np.asarray(field(state, f))[0])
        for f in SCHEDULE_FIELDS
    )


@pytest.mark.parametrize(
    "mapper,axis_name", [("pmap", "batch"), ("pmap", None), ("shard_map", "batch")]
)
def test_vsam_decisions_across_devices(mapper, axis_name):
    steps = 16
    step, params, state, xs, ys = dp_setup(axis_name, steps)
    if mapper == "pmap":
        fn = jax.pmap(step, axis_name="batch")
    else:
        mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("batch",))
        squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
        expand = lambda t: jax.tree.map(lambda a: a[None], t)
        fn = jax.jit(
            jax.shard_map(
                lambda *args: expand(step(*squeeze(args))),
                mesh=mesh,
                in_specs=(P("batch"),) * 4,
                out_specs=(P("batch"), P("batch")),
            )
        )
    dues, rates = [], []
    for t in range(steps):
        params, state = fn(params, state, xs[t], ys[t])
        if axis_name:
            assert replicas_agree(state), t
        dues.append(np.asarray(state.sam_due))
        rates.append(np.asarray(state.schedule.base_rate))
    dues, rates = np.array(dues), np.array(rates)
    if axis_name:
        assert 0 < dues[:, 0].sum() < steps and len(np.unique(rates[:, 0])) > 1  # nontrivial
    else:
        # Control: without axis_name each device follows its own statistics and drifts.
        assert np.ptp(rates[-1]) > 0 and not replicas_agree(state)


# The documented data-parallel recipe: per-device grads and grad_fn (no pmean inside),
# axis_name for the ascent (and vSAM's statistics), the output averaged by pmean_updates.


def recipe_run(transform, steps, lr=0.1):
    """pmap over 8 devices; returns per-step (replica-0 params, sharpax state) and the data."""
    opt = optax.chain(transform, pmean_updates("batch"), optax.sgd(lr))
    xs, ys = mlp_data(steps, batch=4, seed=7, lead=(N_DEV,))
    xs = xs * (1.0 + 0.5 * np.arange(N_DEV, dtype=np.float32))[None, :, None, None]

    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)  # this device's own gradient
        grad_fn = lambda p: jax.grad(mlp_loss)(p, x, y)  # per device, no pmean
        updates, state = opt.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    rep = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), tree)
    params, state = rep(mlp_init()), rep(opt.init(mlp_init()))
    fn = jax.pmap(step, axis_name="batch")
    out = [(mlp_init(), jax.tree.map(lambda a: a[0], state[0]))]
    for t in range(steps):
        params, state = fn(params, state, xs[t], ys[t])
        for leaf in jax.tree.leaves(params):  # the averaged update keeps replicas equal
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaf)[:1].repeat(N_DEV, 0))
        out.append((jax.tree.map(lambda a: a[0], params), jax.tree.map(lambda a: a[0], state[0])))
    return out, state[0], xs, ys


def per_device_grads(unravel):
    """``grads(w, xs, ys)``: per-device gradients at the flat params ``w`` (float64 NumPy)."""

    @jax.jit
    def grads(w, xs, ys):
        return jax.vmap(
            lambda x, y: jax.flatten_util.ravel_pytree(jax.grad(mlp_loss)(unravel(w), x, y))[0]
        )(xs, ys)

    return lambda w, xs, ys: np.asarray(grads(jnp.asarray(w, jnp.float32), xs, ys), np.float64)


def test_looksam_data_parallel_recipe_is_per_device_looksam():
    rho, k, alpha, lr, steps = 0.1, 2, 0.7, 0.1, 5
    out, _, xs, ys = recipe_run(looksam(rho, k=k, alpha=alpha, axis_name="batch"), steps, lr)
    w0, unravel = jax.flatten_util.ravel_pytree(mlp_init())
    grads = per_device_grads(unravel)
    w = np.asarray(w0, np.float64)
    w_full = w.copy()  # single-device LookSAM on the global batch, for contrast
    g_v = g_v_full = None
    unit = lambda v: v / np.linalg.norm(v)
    for t in range(steps):
        g = grads(w, xs[t], ys[t])
        gbar = g.mean(0)
        gf = grads(w_full, xs[t], ys[t]).mean(0)
        if t % k == 0:  # SAM step: shared ascent along the mean gradient
            g_s = grads(w + rho * unit(gbar), xs[t], ys[t])
            g_v = g_s - np.sum(g_s * g, 1, keepdims=True) / np.sum(g * g, 1, keepdims=True) * g
            update = g_s.mean(0)
            gs_full = grads(w_full + rho * unit(gf), xs[t], ys[t]).mean(0)
            g_v_full = gs_full - gs_full @ gf / (gf @ gf) * gf
            update_full = gs_full
        else:  # reuse step: each device's own g and g_v, then the mean
            scale = alpha * np.linalg.norm(g, axis=1) / np.linalg.norm(g_v, axis=1)
            update = (g + scale[:, None] * g_v).mean(0)
            update_full = gf + alpha * np.linalg.norm(gf) / np.linalg.norm(g_v_full) * g_v_full
        w = w - lr * update
        w_full = w_full - lr * update_full
        got = np.asarray(jax.flatten_util.ravel_pytree(out[t + 1][0])[0], np.float64)
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=str(t))
    assert int(out[-1][1].num_sam_steps) == 3
    # Documented: the reuse steps are per-device LookSAM, not global-batch LookSAM.
    assert np.max(np.abs(w - w_full)) > 1e-2


def test_vsam_data_parallel_recipe_equals_global_batch_vsam_given_its_decisions():
    rho, lr, steps, decay, max_reuse = 0.1, 0.1, 12, 0.7, 6
    transform = vsam(
        rho, window=4, blocks=2, warmup_steps=2, sensitivity=(4.0, 4.0), axis_name="batch"
    )
    out, final_state, xs, ys = recipe_run(transform, steps, lr)
    did = np.diff([int(s.num_sam_steps) for _, s in out]).astype(bool)
    assert 0 < did.sum() < steps and not did[2:].all()
    w0, unravel = jax.flatten_util.ravel_pytree(mlp_init())
    grads = per_device_grads(unravel)
    w = np.asarray(w0, np.float64)
    psf, weight, left = None, 1.0, 0
    for t in range(steps):
        g = grads(w, xs[t], ys[t])
        gbar = g.mean(0)
        if did[t]:  # global-batch SAM step: psf of the global batch = mean of per-device psf
            eps = rho * gbar / np.linalg.norm(gbar)
            g_s = grads(w + eps, xs[t], ys[t])
            psf_dev = g_s - g
            psf, weight, left = psf_dev.mean(0), 1.0, max_reuse
            update = g_s.mean(0)
            # Statistics: device means of per-device norms, the same on every device.
            state = out[t + 1][1]
            n_ref = np.linalg.norm(psf_dev, axis=1).mean()
            r_ref = (np.linalg.norm(psf_dev, axis=1) / np.linalg.norm(g, axis=1)).mean()
            np.testing.assert_allclose(float(state.schedule.psf_norms[-1]), n_ref, rtol=1e-4)
            np.testing.assert_allclose(float(state.schedule.psf_ratios[-1]), r_ref, rtol=1e-4)
        elif left > 0:
            weight, left = weight * decay, left - 1
            update = gbar + weight * psf
        else:
            update = gbar
        w = w - lr * update
        got = np.asarray(jax.flatten_util.ravel_pytree(out[t + 1][0])[0], np.float64)
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=str(t))
    assert replicas_agree(final_state)
    # upcoming_sam_steps reads replica 0 of the pmapped state.
    pos = int(final_state.schedule.window_pos[0])
    np.testing.assert_array_equal(
        sharpax.upcoming_sam_steps(final_state), np.asarray(final_state.schedule.plan[0])[pos:]
    )


# ----------------------------------------------------------------------------- state readers


def test_helpers_read_nested_states():
    params = jnp.array([1.0, -2.0])
    loss = lambda w: jnp.sum(w**4)
    chain = optax.chain(
        optax.clip_by_global_norm(10.0),
        vsam(0.05, window=4, blocks=2, warmup_steps=2),
        optax.sgd(0.01),
    )
    injected = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(
            vsam(0.05, window=4, blocks=2, warmup_steps=2), optax.sgd(learning_rate)
        )
    )(learning_rate=0.01)
    for opt, get_inner in [(chain, lambda s: s[1]), (injected, lambda s: s.inner_state[0])]:
        p, s = params, opt.init(params)
        for _ in range(5):  # eager, host-dispatched through the chain
            due = bool(sharpax.sam_due(s))
            u, s = opt.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss), sam_step=due)
            p = optax.apply_updates(p, u)
        st = get_inner(s)
        assert isinstance(st, sharpax.ScheduledSAMState)
        assert int(sharpax.num_sam_steps(s)) == int(st.num_sam_steps) >= 2
        assert bool(sharpax.sam_due(s)) == bool(st.sam_due)
        np.testing.assert_allclose(float(sharpax.sam_rate(s)), int(st.schedule.quota) / 4, rtol=1e-6)
        np.testing.assert_array_equal(
            sharpax.upcoming_sam_steps(s), np.asarray(st.schedule.plan)[int(st.schedule.window_pos) :]
        )

    # LookSAM under inject_hyperparams, with an injected rho and a static k.
    opt = optax.inject_hyperparams(looksam, static_args=("k",))(rho=0.05, k=2)
    s = opt.init(params)
    _, s = opt.update(jax.grad(loss)(params), s, params, grad_fn=jax.grad(loss))
    assert not bool(sharpax.sam_due(s)) and int(sharpax.num_sam_steps(s)) == 1
    np.testing.assert_array_equal(sharpax.upcoming_sam_steps(s), [False])
    with pytest.raises(ValueError, match="sam_rate"):
        sharpax.sam_rate(s)
    with pytest.raises(ValueError, match="num_sam_steps"):
        sharpax.num_sam_steps(optax.sgd(0.1).init(params))


# ----------------------------------------------------------------------------- validation


def test_invalid_arguments_raise_clear_errors():
    params = jnp.ones(2)
    for opt in (looksam(), vsam(window=10, blocks=5)):
        state = opt.init(params)
        for bad in (jnp.asarray(True), 1, np.bool_(True)):
            with pytest.raises(TypeError, match="sam_step must be None"):
                opt.update(params, state, params, grad_fn=lambda p: p, sam_step=bad)
        with pytest.raises(TypeError, match="grad_fn"):
            opt.update(params, state, params)
        with pytest.raises(ValueError, match="params"):
            opt.update(params, state, None, grad_fn=lambda p: p, sam_step=True)
    with pytest.raises(ValueError, match="multiple of blocks"):
        vsam(window=10, blocks=3)
    with pytest.raises(ValueError, match="multiple of blocks"):
        vsam(window=5, blocks=5)
    with pytest.raises(ValueError, match="max_rate"):
        vsam(window=10, blocks=5, max_rate=1.5)
    with pytest.raises(ValueError, match="max_rate"):
        vsam(window=4, blocks=2, max_rate=0.2)
    with pytest.raises(ValueError, match="sensitivity"):
        vsam(sensitivity=0.1)
    with pytest.raises(ValueError, match="reuse_decay"):
        vsam(reuse_decay=1.5)
    with pytest.raises(ValueError, match="max_reuse"):
        vsam(max_reuse=-1)
    with pytest.raises(TypeError, match="window"):
        vsam(window=jnp.asarray(10))
    with pytest.raises(ValueError, match="k must"):
        looksam(k=0)
    with pytest.raises(ValueError, match="rho"):
        looksam(-0.1)
    with pytest.raises(ValueError, match="eps"):
        looksam(eps=-1.0)
    # NumPy integers are ints; bools are neither ints nor numbers.
    state = vsam(window=np.int64(4), blocks=np.int32(2), max_reuse=np.int64(2)).init(params)
    assert state.schedule.plan.shape == (4,)
    looksam(k=np.int64(3))
    for make, match in [
        (lambda: looksam(k=True), "k must be an int"),
        (lambda: looksam(alpha=True), "alpha"),
        (lambda: vsam(window=True, blocks=1), "window"),
        (lambda: vsam(max_reuse=False), "max_reuse"),
        (lambda: vsam(reuse_decay=True), "reuse_decay"),
        (lambda: vsam(max_rate=True), "max_rate"),
        (lambda: vsam(sensitivity=(0.1, True)), "sensitivity"),
        (lambda: vsam(window=4.0, blocks=2), "window"),
    ]:
        with pytest.raises(TypeError, match=match):
            make()
    opt = vsam(window=4, blocks=2, stat_mask={"a": True})
    with pytest.raises(ValueError, match="stat_mask"):
        opt.update({"b": params}, opt.init({"b": params}), {"b": params}, grad_fn=lambda p: p)
