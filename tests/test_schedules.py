"""Tests of sharpax.schedules against hand-written NumPy references of the papers' rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import sharpax
from sharpax import schedules
from sharpax.schedules import StepInfo

# ----------------------------------------------------------------------------- helpers


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def np_grad(p, x, y):
    """Hand-derived float64 gradient of ``mlp_loss`` (independent of jax)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = np.tanh(x @ p["w1"] + p["b1"])
    r = h @ p["w2"] - y
    dout = 2.0 * r / r.size
    dh = (dout @ p["w2"].T) * (1.0 - h**2)
    return {"b1": dh.sum(0), "w1": x.T @ dh, "w2": h.T @ dout}


def mlp_init(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 1)}
    return {k: jnp.asarray(rng.normal(size=v), jnp.float32) for k, v in shapes.items()}


def mlp_data(steps, batch=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, batch, 3)).astype(np.float32)
    # heteroscedastic targets: minibatch gradient norms vary a lot from step to step
    y = (rng.normal(size=(steps, batch, 1)) * rng.exponential(size=(steps, 1, 1))).astype(
        np.float32
    )
    return x, y


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in sorted(tree)])


def unflat(vec, like):
    out, i = {}, 0
    for k in sorted(like):
        n = int(np.prod(like[k].shape))
        out[k] = vec[i : i + n].reshape(like[k].shape)
        i += n
    return out


def np_flat_grad(w, like, x, y):
    return flat(np_grad(unflat(w, like), x, y))


def ae_reference(s, total_steps, decay=0.9, c_start=1.0, c_end=-1.0):
    """AE-SAM's rule (Jiang et al. 2023, Alg. 1) in float64 on a sequence s_t = ‖g_t‖².

    Returns per step: the decision, μ_t, σ²_t, and the lagged decision for t+1
    (s_t ≥ μ_t + c_{t+1} σ_t), plus the margins s_t − threshold of both.
    """
    c = lambda t: min(t / total_steps, 1.0) * c_end + (1 - min(t / total_steps, 1.0)) * c_start
    mu, var = 0.0, np.exp(-10.0)
    out = []
    for t, st in enumerate(s):
        mu = decay * mu + (1 - decay) * st
        var = decay * var + (1 - decay) * (st - mu) ** 2
        thr, thr_next = mu + c(t) * np.sqrt(var), mu + c(t + 1) * np.sqrt(var)
        out.append((st >= thr, mu, var, st >= thr_next, (st - thr) / st, (st - thr_next) / st))
    return out


# ----------------------------------------------------------------------------- every_k


@pytest.mark.parametrize("k", [1, 3, "int32_array"])
def test_every_k_decisions(k):
    sched = schedules.every_k(jnp.int32(3) if k == "int32_array" else k)
    k = 3 if k == "int32_array" else k
    state, due = sched.init(jnp.zeros(2))
    assert sched.decide is None and sched.grad_stats is None and sched.sam_stats is None
    got = [bool(due)]
    update = jax.jit(sched.update)
    for t in range(12):
        state, due = update(state, StepInfo(jnp.int32(t), jnp.asarray(got[-1]), None, None))
        got.append(bool(due))
    assert got == [t % k == 0 for t in range(13)]


# ----------------------------------------------------------------------------- AE-SAM schedule


def random_sq_norms(n, seed=0):
    return np.random.default_rng(seed).lognormal(0.0, 0.7, size=n).astype(np.float32)


def test_gradient_norm_adaptive_matches_numpy_rule():
    steps, total = 40, 30  # past total_steps: c_t stays at threshold_end
    s = random_sq_norms(steps)
    ref = ae_reference(s.astype(np.float64), total, decay=0.8, c_start=1.2, c_end=-0.8)
    assert min(abs(r[4]) for r in ref) > 1e-4  # no near-tie: float32 cannot flip a decision
    sched = schedules.gradient_norm_adaptive(
        total_steps=total, decay=0.8, threshold_start=1.2, threshold_end=-0.8
    )
    state, due = sched.init(jnp.zeros(3))
    assert bool(due)
    np.testing.assert_allclose(float(state.var), np.exp(-10.0), rtol=1e-6)
    assert float(state.mean) == 0.0
    decide, update = jax.jit(sched.decide), jax.jit(sched.update)
    decisions = []
    for t in range(steps):
        st = jnp.float32(s[t])
        assert np.isclose(float(sched.grad_stats({"a": jnp.sqrt(st)[None]})), s[t], rtol=1e-6)
        did = decide(state, due, jnp.int32(t), st)
        decisions.append(bool(did))
        assert bool(did) == ref[t][0], t
        state, due = update(state, StepInfo(jnp.int32(t), did, st, None))
        np.testing.assert_allclose(float(state.mean), ref[t][1], rtol=1e-5)
        np.testing.assert_allclose(float(state.var), ref[t][2], rtol=1e-4)
        np.testing.assert_allclose(float(state.last_sq_norm), s[t], rtol=1e-7)
        if abs(ref[t][5]) > 1e-4:
            assert bool(due) == ref[t][3], t
    assert 0 < sum(decisions) < steps  # nontrivial


def test_gradient_norm_adaptive_lagged_decisions():
    steps, total = 30, 30
    s = random_sq_norms(steps, seed=4)
    ref = ae_reference(s.astype(np.float64), total)
    assert min(abs(r[5]) for r in ref) > 1e-4
    sched = schedules.gradient_norm_adaptive(total_steps=total, lagged=True)
    assert sched.decide is None  # the decision is known on the host
    state, due = sched.init(jnp.zeros(3))
    update = jax.jit(sched.update)
    decisions = []
    for t in range(steps):
        did = due  # lagged: the decision made at the previous step
        decisions.append(bool(did))
        state, due = update(state, StepInfo(jnp.int32(t), did, jnp.float32(s[t]), None))
    want = [True] + [r[3] for r in ref[:-1]]
    assert decisions == want
    assert bool(due) == ref[-1][3]
    assert 0 < sum(decisions) < steps
    # the lagged and the current-step rules differ somewhere on this sequence
    assert decisions != [r[0] for r in ref]


# ----------------------------------------------------------------------------- AE-SAM end to end


def ae_loop(opt, steps, seed):
    xs, ys = mlp_data(steps, seed=seed)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        sq = sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads))
        updates, state = opt.update(
            grads, state, params, grad_fn=lambda p: jax.grad(mlp_loss)(p, x, y)
        )
        return optax.apply_updates(params, updates), state, updates, sq

    params = mlp_init()
    state = opt.init(params)
    out = []
    for t in range(steps):
        new_params, state, updates, sq = step(params, state, xs[t], ys[t])
        out.append((params, updates, float(sq), int(sharpax.num_sam_steps(state))))
        params = new_params
    return out, xs, ys


@pytest.mark.parametrize("alpha", [None, 0.7], ids=["ae_sam", "ae_looksam"])
def test_ae_sam_end_to_end_matches_reference(alpha):
    steps, total, rho, lr, seed = 30, 30, 0.1, 0.1, 2
    opt = optax.chain(sharpax.ae_sam(rho, total_steps=total, lookahead_alpha=alpha), optax.sgd(lr))
    out, xs, ys = ae_loop(opt, steps, seed)
    like = mlp_init()
    sq = np.array([o[2] for o in out], np.float64)
    ref = ae_reference(sq, total)
    assert min(abs(r[4]) for r in ref) > 1e-4  # no near-tie
    did = np.diff([0] + [o[3] for o in out]).astype(bool)
    np.testing.assert_array_equal(did, [r[0] for r in ref])
    assert 0 < did.sum() < steps and did[0]
    g_v = None
    reuse_checked = 0
    for t, (params, updates, sq_t, _) in enumerate(out):
        w = flat(params)
        g = np_flat_grad(w, like, xs[t], ys[t])
        np.testing.assert_allclose(sq_t, g @ g, rtol=1e-5)
        if did[t]:  # SAM step: gradient at w + rho g/‖g‖
            d = np_flat_grad(w + rho * g / np.linalg.norm(g), like, xs[t], ys[t])
            g_v = d - (d @ g) / (g @ g) * g
        elif alpha is None:  # SGD step
            d = g
        else:  # AE-LookSAM reuse step
            d = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
            reuse_checked += 1
        np.testing.assert_allclose(flat(updates), -lr * d, rtol=1e-4, atol=1e-6, err_msg=str(t))
    if alpha is not None:
        assert reuse_checked > 0


# ----------------------------------------------------------------------------- Bernoulli


def reference_draws(seed, steps, p):
    key = jax.random.PRNGKey(seed)
    u = jax.vmap(lambda t: jax.random.uniform(jax.random.fold_in(key, t)))(jnp.arange(steps))
    return np.asarray(u) < np.asarray(p(np.arange(steps)), np.float32)


def bernoulli_decisions(sched, steps):
    state, due = sched.init(jnp.zeros(2))

    def body(carry, t):
        state, due = carry
        state, new_due = sched.update(state, StepInfo(t, due, None, None))
        return (state, new_due), due

    _, dues = jax.jit(lambda s, d: jax.lax.scan(body, (s, d), jnp.arange(steps)))(state, due)
    return np.asarray(dues)


@pytest.mark.parametrize(
    "probability",
    [0.3, schedules.probability_ramp(0.1, 0.9, 100, shape="linear")],
    ids=["constant", "ramp"],
)
def test_bernoulli_decisions_are_the_documented_draws(probability):
    seed, steps = 7, 200
    p = probability if callable(probability) else (lambda t: np.full(np.shape(t), probability))
    got = bernoulli_decisions(schedules.bernoulli(probability, seed=seed), steps)
    np.testing.assert_array_equal(got, reference_draws(seed, steps, p))
    if callable(probability):  # the ramp is visible: more SAM steps at the end
        assert got[:50].sum() < got[-50:].sum()


def test_bernoulli_empirical_fraction():
    steps, p = 2000, 0.3
    got = bernoulli_decisions(schedules.bernoulli(p, seed=3), steps)
    lo, hi = scipy.stats.binom.interval(0.999, steps, p)
    assert lo <= got.sum() <= hi
    # another seed gives other draws
    assert not np.array_equal(got, bernoulli_decisions(schedules.bernoulli(p, seed=4), steps))
    assert not bernoulli_decisions(schedules.bernoulli(0.0), 50).any()
    assert bernoulli_decisions(schedules.bernoulli(1.0), 50).all()


@pytest.mark.parametrize("shape", ["constant", "linear", "cosine", "step"])
def test_probability_ramp_values(shape):
    start, end, total = 0.2, 0.8, 100
    if shape == "constant":
        end = start
    ramp = schedules.probability_ramp(start, end, total, shape=shape)
    t = np.array([0, 1, 10, 25, 49, 50, 51, 75, 99, 100, 101, 300])
    x = np.minimum(t / total, 1.0)
    want = {
        "constant": np.full_like(x, start),
        "linear": start + (end - start) * x,
        "cosine": start + (end - start) * (1 - np.cos(np.pi * x)) / 2,
        "step": np.where(x < 0.5, start, end),
    }[shape]
    got = np.array([float(ramp(jnp.int32(i))) for i in t])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert ramp(jnp.int32(3)).dtype == jnp.float32
    # jit-able (an optax schedule of the step)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(ramp))(jnp.asarray(t))), want, atol=1e-6)


def test_bad_arguments_raise_naming_the_argument():
    ramp = schedules.probability_ramp
    cases = [
        (lambda: ramp(-0.1, 0.5, 10), ValueError, "start"),
        (lambda: ramp(0.1, 1.5, 10), ValueError, "end"),
        (lambda: ramp(0.1, 0.5, 0), ValueError, "total_steps"),
        (lambda: ramp(0.1, 0.5, 10.0), TypeError, "total_steps"),
        (lambda: ramp(0.1, 0.5, 10, shape="sine"), ValueError, "shape"),
        (lambda: ramp(0.1, 0.5, 10, shape="constant"), ValueError, "start == end"),
        (lambda: ramp("a", 0.5, 10), TypeError, "start"),
        (lambda: schedules.bernoulli(1.5), ValueError, "probability"),
        (lambda: schedules.bernoulli(-0.5), ValueError, "probability"),
        (lambda: schedules.bernoulli(True), TypeError, "probability"),
        (lambda: schedules.bernoulli(0.5, seed=-1), ValueError, "seed"),
        (lambda: schedules.bernoulli(0.5, seed=1.0), TypeError, "seed"),
        (lambda: schedules.every_k(0), ValueError, "k"),
        (lambda: schedules.every_k(2.0), TypeError, "k"),
        (lambda: schedules.gradient_norm_adaptive(total_steps=0), ValueError, "total_steps"),
        (lambda: schedules.gradient_norm_adaptive(total_steps=5, decay=1.0), ValueError, "decay"),
        (lambda: schedules.gradient_norm_adaptive(total_steps=5, decay=-0.1), ValueError, "decay"),
        (lambda: schedules.gradient_norm_adaptive(total_steps=5, lagged=1), TypeError, "lagged"),
        (
            lambda: schedules.gradient_norm_adaptive(total_steps=5, threshold_start="x"),
            TypeError,
            "threshold_start",
        ),
        (lambda: schedules.bounded(3), TypeError, "Schedule"),
        (
            lambda: schedules.bounded(schedules.every_k(1), min_fraction=-0.1),
            ValueError,
            "min_fraction",
        ),
        (
            lambda: schedules.bounded(schedules.every_k(1), max_fraction=1.1),
            ValueError,
            "max_fraction",
        ),
        (
            lambda: schedules.bounded(schedules.every_k(1), min_fraction=0.6, max_fraction=0.5),
            ValueError,
            "min_fraction must be <= max_fraction",
        ),
    ]
    for make, err, match in cases:
        with pytest.raises(err, match=match):
            make()


# ----------------------------------------------------------------------------- bounded


def bounds_reference(inner, steps, min_fraction, max_fraction):
    """The documented forced/forbidden rule (float32 floors) on top of inner decisions."""
    f32 = np.float32
    s, out = 0, []
    for t in range(steps):
        total = f32(t + 1)
        force = s < np.floor(f32(min_fraction) * total)
        forbid = s + 1 > np.floor(f32(max_fraction) * total)
        d = (inner[t] or force) and not forbid
        out.append(d)
        s += d
    return out


def run_schedule_by_hand(sched, steps):
    state, due = sched.init(jnp.zeros(2))
    update = jax.jit(sched.update)
    got = []
    for t in range(steps):
        got.append(bool(due))
        state, due = update(state, StepInfo(jnp.int32(t), due, None, None))
    return got


@pytest.mark.parametrize(
    "k,min_fraction,max_fraction", [(1, 0.0, 0.25), (10, 0.3, 1.0), (2, 0.2, 0.35)]
)
def test_bounded_fraction_and_rule(k, min_fraction, max_fraction):
    steps = 60
    sched = schedules.bounded(
        schedules.every_k(k), min_fraction=min_fraction, max_fraction=max_fraction
    )
    got = run_schedule_by_hand(sched, steps)
    inner = [t % k == 0 for t in range(steps)]
    assert got == bounds_reference(inner, steps, min_fraction, max_fraction)
    counts = np.cumsum(got)
    for t in range(1, steps + 1):
        frac = counts[t - 1] / t
        assert (
            np.floor(min_fraction * t + 1e-9) / t <= frac <= np.floor(max_fraction * t + 1e-9) / t
        )
    assert got != inner  # the bounds acted


def test_bounded_variance_adaptive_through_scheduled_sam():
    steps, max_fraction = 20, 0.5
    inner = schedules.variance_adaptive(window=4, blocks=2, warmup_steps=6, seed=1)
    sched = schedules.bounded(inner, max_fraction=max_fraction)
    opt = optax.chain(
        sharpax.scheduled_sam(0.05, schedule=sched, reuse=sharpax.reuse_rules.plain()),
        optax.sgd(0.1),
    )
    xs, ys = mlp_data(steps)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = opt.update(
            grads, state, params, grad_fn=lambda p: jax.grad(mlp_loss)(p, x, y)
        )
        return optax.apply_updates(params, updates), state

    params = mlp_init()
    state = opt.init(params)
    s_before, inner_dues, did = 0, [], []
    for t in range(steps):
        bstate = state[0].schedule
        inner_dues.append(bool(bstate.inner_due))
        assert int(bstate.sam_steps) == s_before
        params, state = step(params, state, xs[t], ys[t])
        n = int(sharpax.num_sam_steps(state))
        did.append(n > s_before)
        s_before = n
        assert n <= np.floor(max_fraction * (t + 1))
    assert did == bounds_reference(inner_dues, steps, 0.0, max_fraction)
    assert all(inner_dues[:6])  # warm-up wants SAM every step ...
    assert not all(did[:6])  # ... and the bound forbids some
    assert sum(did) > 0
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_vsam_schedule_skips_non_finite_statistics_and_keeps_taking_sam_steps():
    schedule = schedules.variance_adaptive(window=4, blocks=2)
    state, due = schedule.init(None)
    rng = np.random.default_rng(0)
    finite_sam_steps, injected = 0, False
    for step in range(40):
        did = jnp.asarray(bool(due))
        stats = (jnp.float32(rng.uniform(0.5, 1.5)), jnp.float32(rng.uniform(0.1, 0.3)))
        if bool(due) and step >= 8 and not injected:
            stats = (jnp.float32(np.nan), jnp.float32(np.nan))  # one SAM step's statistics: NaN
            injected = True
        elif bool(due):
            finite_sam_steps += 1
        info = schedules.StepInfo(jnp.int32(step), did, None, stats)
        state, due = schedule.update(state, info)
    assert injected and int(state.num_skipped) == 1
    assert int(state.num_recorded) == finite_sam_steps
    assert np.all(np.isfinite(np.asarray(state.psf_norms)))
    assert np.isfinite(float(state.base_rate)) and int(state.quota) >= 1  # SAM steps go on
