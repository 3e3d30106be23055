"""Tests of sharpax.msam (Momentum-SAM, Becker et al. 2024) against a hand-written NumPy reference.

The reference is the authors' SGD-MSAM (MarlonBecker/MSAM, ``optimizer/msam.py``) written in
float64 NumPy with a hand-derived MLP gradient: the stored params are the perturbed weights w̃ and
one step with the gradient d at w̃ is

  w = w̃ + f·v;  v = μ v + d;  w = w − lr·v;  f = rho / (‖v‖ + eps);  w̃ = w − f·v.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import sharpax
from sharpax import msam, msam_unperturbed_params

# ----------------------------------------------------------------------------- tiny problem


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def np_grad(p, x, y):
    """Hand-derived float64 gradient of ``mlp_loss`` (independent of jax)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = np.tanh(x @ p["w1"] + p["b1"])
    r = h @ p["w2"] - y
    dout = 2.0 * r / r.size
    dh = (dout @ p["w2"].T) * (1.0 - h**2)
    return {"b1": dh.sum(0), "w1": x.T @ dh, "w2": h.T @ dout}


def mlp_init(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 1)}
    return {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}


def mlp_data(steps, batch=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, batch, 3)).astype(np.float32)
    y = rng.normal(size=(steps, batch, 1)).astype(np.float32)
    return x, y


def tmap(fn, *trees):
    return {k: fn(*(t[k] for t in trees)) for k in trees[0]}


def tnorm(tree):
    return np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in tree.values()))


def to64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def assert_close(got, want, rtol=1e-5, atol=1e-6, msg=""):
    for k in want:
        np.testing.assert_allclose(
            np.asarray(got[k], np.float64), want[k], rtol=rtol, atol=atol, err_msg=f"{k} {msg}"
        )


def reference_msam(steps, lr, rho_at, mu, wd=0.0, eps=1e-12, undo="stored"):
    """Authors' SGD-MSAM in float64. Returns lists of (w̃_t, w_t, f_t) after each step.

    ``undo='stored'`` undoes the last perturbation with the applied scale f (exact);
    ``undo='current_rho'`` reproduces the authors' code (current rho, old 1/‖v‖).
    """
    xs, ys = mlp_data(steps)
    wt = to64(mlp_init())  # stored (perturbed) params; equal to w at the start
    v = tmap(np.zeros_like, wt)
    f, inv_norm = 0.0, 0.0
    out = []
    for t in range(steps):
        rho = rho_at(t)
        d = tmap(lambda g, p: g + wd * p, np_grad(wt, xs[t], ys[t]), wt)
        scale = f if undo == "stored" else rho * inv_norm
        w = tmap(lambda p, m, c=scale: p + c * m, wt, v)
        v = tmap(lambda m, g: mu * m + g, v, d)
        w = tmap(lambda p, m: p - lr * m, w, v)
        inv_norm = 1.0 / (tnorm(v) + eps)
        f = rho * inv_norm
        wt = tmap(lambda p, m, c=f: p - c * m, w, v)
        out.append((wt, w, f))
    return out


def run_library(opt, steps, params=None, jit=True):
    xs, ys = mlp_data(steps)
    params = {k: jnp.asarray(v) for k, v in mlp_init().items()} if params is None else params
    state = opt.init(params)

    def step(p, s, x, y):
        u, s = opt.update(jax.grad(mlp_loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    out = []
    for t in range(steps):
        params, state = step(params, state, xs[t], ys[t])
        out.append((params, state))
    return out


def msam_state(state):
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, sharpax.MSAMState))
        if isinstance(s, sharpax.MSAMState)
    ]
    assert len(found) == 1
    return found[0]


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_msam_matches_numpy_reference_constant_rho(wd):
    steps, lr, rho, mu = 20, 0.05, 0.3, 0.9
    ref = reference_msam(steps, lr, lambda t: rho, mu, wd=wd)
    opt = msam(lr, rho=rho, momentum=mu)
    if wd:
        opt = optax.chain(optax.add_decayed_weights(wd), opt)
    got = run_library(opt, steps)
    for t, ((wt, w, f), (params, state)) in enumerate(zip(ref, got, strict=True)):
        assert_close(params, wt, msg=f"w̃ step {t}")
        assert_close(msam_unperturbed_params(params, state), w, msg=f"w step {t}")
        np.testing.assert_allclose(float(msam_state(state).perturbation_scale), f, rtol=1e-5)
        assert int(msam_state(state).count) == t + 1
    # the perturbation is real: w̃ and w differ by rho (in global norm) at every step
    np.testing.assert_allclose(tnorm(tmap(lambda a, b: a - b, ref[-1][0], ref[-1][1])), rho)
    assert tnorm(tmap(lambda a, b: a - b, ref[-1][1], to64(mlp_init()))) > 0.1  # it moved


def test_msam_rho_schedule_undoes_the_stored_scale():
    steps, lr, mu = 20, 0.05, 0.9
    rho_sched = optax.linear_schedule(0.6, 0.05, steps)
    rho_at = lambda t: float(np.float32(rho_sched(t)))
    ref = reference_msam(steps, lr, rho_at, mu, undo="stored")
    quirk = reference_msam(steps, lr, rho_at, mu, undo="current_rho")
    got = run_library(msam(lr, rho=rho_sched, momentum=mu), steps)
    for t, ((wt, w, f), (params, state)) in enumerate(zip(ref, got, strict=True)):
        assert_close(params, wt, msg=f"w̃ step {t}")
        assert_close(msam_unperturbed_params(params, state), w, msg=f"w step {t}")
        np.testing.assert_allclose(float(msam_state(state).perturbation_scale), f, rtol=1e-5)
    # The authors' undo (current rho, old 1/|v|) is measurably different: the test discriminates.
    diff = tnorm(tmap(lambda a, b: a - b, ref[-1][1], quirk[-1][1]))
    assert diff > 1e-3


# ----------------------------------------------------------------------------- special cases


def test_rho_zero_equals_sgd_with_momentum():
    steps, lr, mu = 15, 0.05, 0.9
    got = run_library(msam(lr, rho=0.0, momentum=mu), steps)
    want = run_library(optax.sgd(lr, momentum=mu), steps)
    for (p, s), (q, _) in zip(got, want, strict=True):
        for k in q:
            np.testing.assert_allclose(np.asarray(p[k]), np.asarray(q[k]), rtol=1e-6, atol=1e-7)
        # w = w̃ when rho = 0
        for k, v in msam_unperturbed_params(p, s).items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(p[k]))


def test_first_step_perturbation_is_minus_rho_unit_gradient():
    lr, rho = 0.1, 0.5
    params = {k: jnp.asarray(v) for k, v in mlp_init().items()}
    xs, ys = mlp_data(1)
    g0 = np_grad(to64(mlp_init()), xs[0], ys[0])
    [(p1, s1)] = run_library(msam(lr, rho=rho, momentum=0.9), 1, params=params)
    w1 = tmap(lambda w, g: w - lr * g, to64(mlp_init()), g0)
    unit = tmap(lambda g: g / tnorm(g0), g0)
    assert_close(msam_unperturbed_params(p1, s1), w1)
    assert_close(
        tmap(lambda a, b: np.asarray(a, np.float64) - b, p1, w1), tmap(lambda u: -rho * u, unit)
    )


def test_zero_gradients_stay_finite():
    opt = msam(0.1, rho=1.0)
    params = {"a": jnp.ones(3), "b": jnp.zeros((2, 2))}
    state = opt.init(params)
    for _ in range(3):
        u, state = opt.update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, u)
    for leaf in jax.tree.leaves((params, state, msam_unperturbed_params(params, state))):
        assert np.all(np.isfinite(np.asarray(leaf)))
    np.testing.assert_array_equal(np.asarray(params["a"]), np.ones(3))
    w = msam_unperturbed_params(params, state)  # f = rho / eps is huge, but f·v = 0
    for k in params:
        np.testing.assert_array_equal(np.asarray(w[k]), np.asarray(params[k]))
    # a real gradient afterwards: finite, and the perturbation has norm rho
    g = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.ones((2, 2))}
    u, state = opt.update(g, state, params)
    params = optax.apply_updates(params, u)
    w = msam_unperturbed_params(params, state)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((params, w)))
    np.testing.assert_allclose(tnorm({k: w[k] - params[k] for k in w}), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(w["a"]), 1.0 - 0.1 * np.array([1.0, -2.0, 0.5]), rtol=1e-6
    )


def test_bfloat16_params_keep_their_dtype():
    params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in mlp_init().items()}
    opt = msam(0.05, rho=0.3)
    state = opt.init(params)
    xs, ys = mlp_data(4)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p))
    grad = jax.jit(jax.grad(mlp_loss))
    for t in range(4):
        g = grad(params, jnp.asarray(xs[t], jnp.bfloat16), jnp.asarray(ys[t], jnp.bfloat16))
        u, state = update(g, state, params)
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(u))
        params = optax.apply_updates(params, u)
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    w = msam_unperturbed_params(params, state)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(w))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.momentum))
    assert all(np.all(np.isfinite(np.asarray(leaf, np.float32))) for leaf in jax.tree.leaves(w))
    # the bf16 view is w̃ + f v rounded: ‖w − w̃‖ ≈ rho
    d = np.sqrt(
        sum(
            np.sum((np.asarray(w[k], np.float32) - np.asarray(params[k], np.float32)) ** 2)
            for k in w
        )
    )
    np.testing.assert_allclose(d, 0.3, rtol=0.05)


# ----------------------------------------------------------------------------- nesting


def test_inside_chain_and_inject_hyperparams():
    steps, lr, rho, mu = 8, 0.05, 0.3, 0.9
    ref = reference_msam(steps, lr, lambda t: rho, mu)
    chained = optax.chain(optax.identity(), msam(lr, rho=rho, momentum=mu))
    injected = optax.inject_hyperparams(msam)(learning_rate=lr, rho=rho, momentum=mu)
    for opt in (chained, injected):
        got = run_library(opt, steps)
        for t, ((wt, w, _), (params, state)) in enumerate(zip(ref, got, strict=True)):
            assert_close(params, wt, msg=f"w̃ step {t}")
            assert_close(msam_unperturbed_params(params, state), w, msg=f"w step {t}")
    state = injected.init({k: jnp.asarray(v) for k, v in mlp_init().items()})
    assert isinstance(state.inner_state, sharpax.MSAMState)


def test_unperturbed_params_needs_exactly_one_msam_state():
    params = jnp.zeros(2)
    with pytest.raises(ValueError, match="exactly one"):
        msam_unperturbed_params(params, optax.sgd(0.1).init(params))
    two = optax.chain(msam(0.1), msam(0.1))
    with pytest.raises(ValueError, match="found 2"):
        msam_unperturbed_params(params, two.init(params))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="rho"):
        msam(0.1, rho=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        msam(0.1, momentum=1.5)
    with pytest.raises(TypeError, match="learning_rate"):
        msam("0.1")


# ----------------------------------------------------------------------------- data parallel


def test_shard_map_with_pmean_grads_equals_global_batch():
    n_dev, steps, lr, rho = 8, 5, 0.05, 0.3
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("batch",))
    opt = optax.chain(optax.add_decayed_weights(1e-2), msam(lr, rho=rho))
    xs, ys = mlp_data(steps, batch=4 * n_dev, seed=3)

    def local(p, s, x, y):
        g = jax.lax.pmean(jax.grad(mlp_loss)(p, x, y), "batch")
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    dp = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), P("batch"), P("batch")),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )

    @jax.jit
    def single(p, s, x, y):
        u, s = opt.update(jax.grad(mlp_loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    p0 = {k: jnp.asarray(v) for k, v in mlp_init().items()}
    pa, sa = p0, opt.init(p0)
    pb, sb = p0, opt.init(p0)
    for t in range(steps):
        pa, sa = dp(pa, sa, xs[t], ys[t])
        pb, sb = single(pb, sb, xs[t], ys[t])
        for k in pa:
            np.testing.assert_allclose(np.asarray(pa[k]), np.asarray(pb[k]), rtol=1e-5, atol=1e-6)
    wa, wb = msam_unperturbed_params(pa, sa), msam_unperturbed_params(pb, sb)
    for k in wa:
        np.testing.assert_allclose(np.asarray(wa[k]), np.asarray(wb[k]), rtol=1e-5, atol=1e-6)
