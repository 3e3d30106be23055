"""Tests of sharpax.gsam (Zhuang et al., ICLR 2022) against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import sharpax
from sharpax.gsam import gsam, gsam_rho_schedule

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


SHAPES = {"w1": (3, 4), "b1": (4,), "w2": (4, 1)}


def mlp_init(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=v), dtype) for k, v in SHAPES.items()}


def mlp_data(steps, batch=8, seed=1, lead=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, *lead, batch, 3)).astype(np.float32)
    scale = rng.exponential(size=(steps, *lead, 1, 1))
    y = (rng.normal(size=(steps, *lead, batch, 1)) * scale).astype(np.float32)
    return x, y


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in sorted(tree)])


def unflat(vec):
    out, i = {}, 0
    for k in sorted(SHAPES):
        n = int(np.prod(SHAPES[k]))
        out[k] = vec[i : i + n].reshape(SHAPES[k])
        i += n
    return out


def np_gsam(w, x, y, rho, alpha, *, minimize_fp=True, adaptive=False, eps=1e-12):
    """GSAM direction from the paper / big_vision ``gsam_gradient``, float64 flat vectors."""
    g = flat(np_grad(unflat(w), x, y))
    e = rho * (np.abs(w) if adaptive else 1.0) * g / (np.linalg.norm(g) + eps)
    g_s = flat(np_grad(unflat(w + e), x, y))
    if minimize_fp:
        g_perp = g - (g @ g_s) / (g_s @ g_s) * g_s
        return g_s - alpha * g_perp, g, g_s
    s_perp = g_s - (g_s @ g) / (g @ g) * g
    return g + alpha * s_perp, g, g_s


def make_step(opt):
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)
        updates, state = opt.update(
            grads, state, params, grad_fn=lambda p: jax.grad(mlp_loss)(p, x, y)
        )
        return optax.apply_updates(params, updates), state, updates

    return step


def assert_close(out, ref, rtol=1e-5, err_msg=""):
    """Elementwise ``rtol``, with an absolute floor of ``rtol · max|ref|`` (float32 cancellations)."""
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.abs(ref).max(), err_msg=err_msg)


def trees_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# ----------------------------------------------------------------------------- one step


@pytest.mark.parametrize("minimize_fp", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_one_step_matches_reference(minimize_fp, adaptive):
    rho, alpha = 0.3, 0.7
    opt = gsam(rho, alpha=alpha, minimize_fp=minimize_fp, adaptive=adaptive)
    xs, ys = mlp_data(1, seed=4)
    params = mlp_init(2)
    _, state, updates = make_step(opt)(params, opt.init(params), xs[0], ys[0])
    d, g, g_s = np_gsam(
        flat(params), xs[0], ys[0], rho, alpha, minimize_fp=minimize_fp, adaptive=adaptive
    )
    # the two directions really differ from g and g_s (the test is not vacuous)
    assert np.linalg.norm(d - g_s) > 1e-2 * np.linalg.norm(g_s)
    assert np.linalg.norm(d - g) > 1e-2 * np.linalg.norm(g)
    assert_close(flat(updates), d)
    assert int(state.count) == int(state.num_sam_steps) == 1
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))


def test_adaptive_differs_from_plain():
    xs, ys = mlp_data(1, seed=4)
    params = mlp_init(2)
    outs = []
    for adaptive in (False, True):
        opt = gsam(0.3, alpha=0.5, adaptive=adaptive)
        outs.append(flat(make_step(opt)(params, opt.init(params), xs[0], ys[0])[2]))
    assert np.linalg.norm(outs[0] - outs[1]) > 1e-3 * np.linalg.norm(outs[0])


@pytest.mark.parametrize("minimize_fp", [True, False])
def test_decomposition_is_orthogonal(minimize_fp):
    rho, alpha = 0.5, 0.9
    opt = gsam(rho, alpha=alpha, minimize_fp=minimize_fp)
    xs, ys = mlp_data(3, seed=8)
    step = make_step(opt)
    params, state = mlp_init(3), opt.init(mlp_init(3))
    for t in range(3):
        _, g, g_s = np_gsam(flat(params), xs[t], ys[t], rho, alpha, minimize_fp=minimize_fp)
        params, state, updates = step(params, state, xs[t], ys[t])
        d = flat(updates)
        base = g_s if minimize_fp else g  # d − base is ⟂ to base, and non-zero
        diff = d - base
        assert np.linalg.norm(diff) > 1e-3 * np.linalg.norm(base)
        cos = (diff @ base) / (np.linalg.norm(diff) * np.linalg.norm(base))
        assert abs(cos) < 1e-4, (t, cos)


# ----------------------------------------------------------------------------- many steps


def test_fifteen_steps_in_chain_with_schedules_match_reference():
    steps, lr_peak, lr_end, rho_max, rho_min = 15, 0.2, 0.02, 0.4, 0.1
    lr = optax.warmup_cosine_decay_schedule(0.0, lr_peak, 4, steps, lr_end)
    rho = gsam_rho_schedule(lr, rho_max=rho_max, rho_min=rho_min, lr_max=lr_peak, lr_min=lr_end)
    alpha = optax.linear_schedule(0.2, 0.9, steps)
    opt = optax.chain(gsam(rho, alpha=alpha), optax.sgd(lr))
    step = make_step(opt)
    xs, ys = mlp_data(steps, seed=5)
    params = mlp_init(1)
    state = opt.init(params)

    def np_lr(t):
        if t < 4:
            return lr_peak * t / 4
        c = 0.5 * (1 + np.cos(np.pi * (t - 4) / (steps - 4)))
        return lr_end + (lr_peak - lr_end) * c

    w_free = flat(params)  # free-running float64 trajectory
    for t in range(steps):
        lr_t = np_lr(t)
        rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_end) / (lr_peak - lr_end)
        alpha_t = 0.2 + 0.7 * t / steps
        d_forced, _, _ = np_gsam(flat(params), xs[t], ys[t], rho_t, alpha_t)
        d_free, _, _ = np_gsam(w_free, xs[t], ys[t], rho_t, alpha_t)
        w_free = w_free - lr_t * d_free
        params, state, updates = step(params, state, xs[t], ys[t])
        if t == 0:  # lr = 0: no move, but GSAM still ran with rho below rho_min
            assert rho_t < rho_min
            np.testing.assert_array_equal(flat(updates), 0.0)
        else:
            assert_close(flat(updates), -lr_t * d_forced, err_msg=str(t))
    np.testing.assert_allclose(flat(params), w_free, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(w_free - flat(mlp_init(1))) > 1e-2
    assert int(state[0].count) == steps


def test_alpha_schedule_is_evaluated_at_count():
    rho = 0.2
    alphas = [0.0, 0.5, 2.0]
    opt = gsam(rho, alpha=lambda t: jnp.asarray(alphas, jnp.float32)[t])
    step = make_step(opt)
    xs, ys = mlp_data(3, seed=9)
    params, state = mlp_init(), opt.init(mlp_init())
    for t in range(3):
        d, _, _ = np_gsam(flat(params), xs[t], ys[t], rho, alphas[t])
        params, state, updates = step(params, state, xs[t], ys[t])
        assert_close(flat(updates), d)


# ----------------------------------------------------------------------------- alpha = 0 is SAM


@pytest.mark.parametrize(
    "rho", [0.1, optax.linear_schedule(0.3, 0.01, 10)], ids=["constant", "schedule"]
)
def test_alpha_zero_equals_sam_bit_for_bit(rho):
    steps, lr = 10, 0.1
    a = optax.chain(gsam(rho, alpha=0.0), optax.sgd(lr))
    b = optax.chain(sharpax.sam(rho), optax.sgd(lr))
    step_a, step_b = make_step(a), make_step(b)
    xs, ys = mlp_data(steps)
    pa, sa = mlp_init(), a.init(mlp_init())
    pb, sb = mlp_init(), b.init(mlp_init())
    for t in range(steps):
        pa, sa, ua = step_a(pa, sa, xs[t], ys[t])
        pb, sb, ub = step_b(pb, sb, xs[t], ys[t])
        trees_equal(ua, ub)
        trees_equal(pa, pb)
    assert int(sa[0].num_sam_steps) == int(sb[0].num_sam_steps) == steps


# ----------------------------------------------------------------------------- zero gradients


@pytest.mark.parametrize("minimize_fp", [True, False])
def test_zero_gradients_are_finite(minimize_fp):
    alpha = 0.7
    opt = gsam(0.1, alpha=alpha, minimize_fp=minimize_fp)
    xs, ys = mlp_data(1, seed=2)
    params = mlp_init()
    state = opt.init(params)
    g = np_grad(params, xs[0], ys[0])
    zeros = jax.tree.map(jnp.zeros_like, params)
    real = lambda p: jax.grad(mlp_loss)(p, xs[0], ys[0])
    upd = jax.jit(lambda u, p, f: opt.update(u, state, p, grad_fn=f)[0], static_argnums=2)

    # g = 0: no ascent (ε = 0), g_s = g(w); nothing to project on / from
    out = flat(upd(zeros, params, real))
    assert np.all(np.isfinite(out))
    expected = flat(g) if minimize_fp else alpha * flat(g)
    assert_close(out, expected)

    # g = 0 and g_s = 0
    out = flat(upd(zeros, params, lambda p: jax.tree.map(jnp.zeros_like, p)))
    np.testing.assert_array_equal(out, 0.0)

    # g_s = 0, g ≠ 0: g_⊥ = g, so d = −α g (minimize_fp); d = g otherwise
    grads = jax.tree.map(jnp.asarray, jax.grad(mlp_loss)(params, xs[0], ys[0]))
    out = flat(upd(grads, params, lambda p: jax.tree.map(jnp.zeros_like, p)))
    assert np.all(np.isfinite(out))
    expected = -alpha * flat(g) if minimize_fp else flat(g)
    assert_close(out, expected)


# ----------------------------------------------------------------------------- rho schedule


def test_rho_schedule_warmup_cosine_matches_formula():
    init, peak, warm, total, end = 0.0, 3e-3, 10, 100, 3e-5
    lr = optax.warmup_cosine_decay_schedule(init, peak, warm, total, end)
    rho_max, rho_min = 0.6, 0.1
    sched = gsam_rho_schedule(lr, rho_max=rho_max, rho_min=rho_min, lr_max=peak, lr_min=end)
    for t in (0, 1, 5, 10, 11, 37, 64, 99, 100, 150):
        if t < warm:
            lr_t = init + (peak - init) * t / warm
        else:
            c = 0.5 * (1 + np.cos(np.pi * min(t - warm, total - warm) / (total - warm)))
            lr_t = end + (peak - end) * c
        expected = rho_min + (rho_max - rho_min) * (lr_t - end) / (peak - end)
        value = sched(jnp.asarray(t))
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=1e-7, err_msg=str(t))
    np.testing.assert_allclose(float(sched(10)), rho_max, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), rho_min, rtol=1e-6)
    assert float(sched(0)) < rho_min  # not clipped (authors' behaviour)


def test_rho_schedule_linear_constant_and_degenerate():
    lr = optax.linear_schedule(1.6, 0.016, 90)
    sched = gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02, lr_max=1.6, lr_min=0.016)
    for t in (0, 30, 45, 89, 90):
        lr_t = 1.6 + (0.016 - 1.6) * min(t, 90) / 90
        expected = 0.02 + 0.02 * (lr_t - 0.016) / (1.6 - 0.016)
        np.testing.assert_allclose(float(sched(t)), expected, rtol=1e-5, err_msg=str(t))
    # a constant learning rate
    sched = gsam_rho_schedule(0.05, rho_max=1.0, rho_min=0.2, lr_max=0.1, lr_min=0.0)
    np.testing.assert_allclose(float(sched(7)), 0.6, rtol=1e-6)
    # lr_max == lr_min: rho_max whatever the learning rate
    sched = gsam_rho_schedule(lr, rho_max=0.3, rho_min=0.1, lr_max=0.5, lr_min=0.5)
    for t in (0, 50, 1000):
        np.testing.assert_allclose(float(sched(t)), 0.3, rtol=1e-7)
    assert jnp.asarray(sched(3)).dtype == jnp.float32
    # works under jit
    np.testing.assert_allclose(float(jax.jit(sched)(jnp.asarray(4))), 0.3, rtol=1e-7)


# ----------------------------------------------------------------------------- dtypes


def test_bf16_params_keep_dtype():
    rho, alpha = 0.2, 0.5
    opt = optax.chain(gsam(rho, alpha=alpha), optax.sgd(0.1))
    params = mlp_init(dtype=jnp.bfloat16)
    state = opt.init(params)
    xs, ys = mlp_data(2, seed=6)
    step = make_step(opt)
    for t in range(2):
        d, _, _ = np_gsam(flat(params), xs[t], ys[t], rho, alpha)
        new, state, updates = step(params, state, xs[t], ys[t])
        for tree in (new, updates):
            assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(tree))
        out = flat(updates)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, -0.1 * d, rtol=0.1, atol=2e-3 * np.abs(d).max())
        params = new


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_raise():
    for kwargs, err, name in [
        ({"rho": -0.1, "alpha": 0.1}, ValueError, "rho"),
        ({"rho": "big", "alpha": 0.1}, TypeError, "rho"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"alpha": "x"}, TypeError, "alpha"),
        ({"alpha": True}, TypeError, "alpha"),
        ({"alpha": 0.1, "adaptive": 1}, TypeError, "adaptive"),
        ({"alpha": 0.1, "minimize_fp": None}, TypeError, "minimize_fp"),
        ({"alpha": 0.1, "eps": -1e-3}, ValueError, "eps"),
        ({"alpha": 0.1, "eps": lambda t: 0.0}, TypeError, "eps"),
    ]:
        with pytest.raises(err, match=name):
            gsam(**kwargs)
    with pytest.raises(TypeError, match="alpha"):
        gsam(0.1)  # alpha is required
    lr = optax.constant_schedule(0.1)
    good = {"rho_max": 0.5, "rho_min": 0.1, "lr_max": 0.1, "lr_min": 0.0}
    for key, bad, err in [
        ("rho_max", -0.5, ValueError),
        ("rho_min", -0.1, ValueError),
        ("rho_min", "a", TypeError),
        ("lr_max", None, TypeError),
        ("lr_min", lambda t: t, TypeError),
    ]:
        with pytest.raises(err, match=key):
            gsam_rho_schedule(lr, **{**good, key: bad})
    with pytest.raises(TypeError, match="learning_rate"):
        gsam_rho_schedule("fast", **good)


def test_missing_grad_fn_or_params_raises():
    opt = gsam(0.1, alpha=0.5)
    params = mlp_init()
    state = opt.init(params)
    for kwargs in ({}, {"grad_fn": None}, {"grad_fn": 3.0}):
        with pytest.raises(TypeError, match="grad_fn"):
            opt.update(params, state, params, **kwargs)
    with pytest.raises(ValueError, match="params"):
        opt.update(params, state, None, grad_fn=lambda p: p)


# ----------------------------------------------------------------------------- data parallel

N_DEV = 8


@pytest.mark.parametrize("axis_name", ["batch", None])
def test_data_parallel_mean_of_per_device_directions(axis_name):
    steps, rho, alpha, lr = 3, 0.2, 0.6, 0.1
    opt = optax.chain(
        gsam(rho, alpha=alpha, axis_name=axis_name), sharpax.pmean_updates("batch"), optax.sgd(lr)
    )
    xs, ys = mlp_data(steps, batch=4, seed=7, lead=(N_DEV,))
    xs = xs * (1.0 + 0.5 * np.arange(N_DEV, dtype=np.float32))[None, :, None, None]

    def step(params, state, x, y):
        grads = jax.grad(mlp_loss)(params, x, y)  # this device's own gradient
        updates, state = opt.update(
            grads, state, params, grad_fn=lambda p: jax.grad(mlp_loss)(p, x, y)
        )
        return optax.apply_updates(params, updates), state, updates

    mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("batch",))
    squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
    expand = lambda t: jax.tree.map(lambda a: a[None], t)
    fn = jax.jit(
        jax.shard_map(
            lambda *args: expand(step(*squeeze(args))),
            mesh=mesh,
            in_specs=(P("batch"),) * 4,
            out_specs=(P("batch"),) * 3,
        )
    )
    rep = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), tree)
    params, state = rep(mlp_init()), rep(opt.init(mlp_init()))
    for t in range(steps):
        w = flat(squeeze(params))
        gs = [flat(np_grad(unflat(w), xs[t, i], ys[t, i])) for i in range(N_DEV)]
        g_bar = np.mean(gs, axis=0)
        ds = []
        for i in range(N_DEV):
            g = gs[i]
            ascent = g_bar if axis_name else g
            g_s = flat(
                np_grad(unflat(w + rho * ascent / np.linalg.norm(ascent)), xs[t, i], ys[t, i])
            )
            ds.append(g_s - alpha * (g - (g @ g_s) / (g_s @ g_s) * g_s))
        d = np.mean(ds, axis=0)
        params, state, updates = fn(params, state, xs[t], ys[t])
        for i in range(N_DEV):
            out = flat(jax.tree.map(lambda a, i=i: a[i], updates))
            assert_close(out, -lr * d, err_msg=f"{t} {i}")
        for leaf in jax.tree.leaves(params):
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaf)[:1].repeat(N_DEV, 0))
    # the shared ascent matters: the other choice gives a different direction
    other = []
    for i in range(N_DEV):
        g = gs[i]
        ascent = g if axis_name else g_bar
        g_s = flat(np_grad(unflat(w + rho * ascent / np.linalg.norm(ascent)), xs[t, i], ys[t, i]))
        other.append(g_s - alpha * (g - (g @ g_s) / (g_s @ g_s) * g_s))
    assert np.linalg.norm(np.mean(other, axis=0) - d) > 1e-4 * np.linalg.norm(d)
