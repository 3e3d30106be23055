"""Tests for sharpax.sharpness on quadratics with known Hessians.

Every numeric check is against numpy (float64) closed forms: for
L(w) = 0.5 wᵀAw + bᵀw the gradient is Aw + b, the Hessian is A, and
L(θ + d) − L(θ) = gᵀd + 0.5 dᵀAd exactly.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpax import sharpness

# Two leaves; jax.tree.leaves order for a dict is sorted keys: "a" (3,), then "b" (2, 2).
SHAPES = {"a": (3,), "b": (2, 2)}
N = 7


def flatten(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def unflatten(vec) -> dict:
    vec = np.asarray(vec)
    return {"a": vec[:3].reshape(3), "b": vec[3:].reshape(2, 2)}


def make_matrix(eigenvalues, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues, np.float64)) @ q.T


def make_quadratic(a_mat, b_vec):
    a32 = jnp.asarray(a_mat, jnp.float32)
    b32 = jnp.asarray(b_vec, jnp.float32)

    def loss_fn(params):
        w = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(params)])
        return 0.5 * w @ (a32 @ w) + b32 @ w

    return loss_fn


def np_loss(a_mat, b_vec, w) -> float:
    return float(0.5 * w @ a_mat @ w + b_vec @ w)


def make_params(seed=1, dtype=jnp.float32) -> dict:
    vec = np.random.default_rng(seed).normal(size=N)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), unflatten(vec))


SPD = make_matrix([10.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1], seed=0)
INDEFINITE = make_matrix([5.0, -8.0, 3.0, -1.0, 0.5, 2.0, -0.2], seed=2)
B_VEC = np.random.default_rng(3).normal(size=N)


# ----------------------------------------------------------------------------- sam_sharpness


def np_sam_sharpness(a_mat, b_vec, w, rho) -> float:
    """L(w + ε) − L(w) = gᵀε + ½ εᵀAε for the quadratic, with ε = ρ g / ‖g‖."""
    g = a_mat @ w + b_vec
    eps = rho * g / np.linalg.norm(g)
    return g @ eps + 0.5 * eps @ a_mat @ eps


@pytest.mark.parametrize("a_mat", [SPD, INDEFINITE], ids=["spd", "indefinite"])
@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_sam_sharpness_matches_closed_form(a_mat, rho):
    params = make_params()
    expected = np_sam_sharpness(a_mat, B_VEC, flatten(params), rho)
    got = sharpness.sam_sharpness(make_quadratic(a_mat, B_VEC), params, rho)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), expected, rtol=2e-4, atol=2e-5)


def test_sam_sharpness_rho_zero_and_array_rho():
    params = make_params()
    loss_fn = make_quadratic(SPD, B_VEC)
    assert float(sharpness.sam_sharpness(loss_fn, params, 0.0)) == 0.0
    w = flatten(params)
    g = SPD @ w + B_VEC
    eps = 0.1 * g / np.linalg.norm(g)
    np.testing.assert_allclose(
        float(sharpness.sam_sharpness(loss_fn, params, jnp.float32(0.1))),
        g @ eps + 0.5 * eps @ SPD @ eps,
        rtol=2e-4,
    )


def test_sam_sharpness_zero_gradient_is_zero_not_nan():
    loss_fn = make_quadratic(SPD, np.zeros(N))
    params = jax.tree.map(jnp.zeros_like, make_params())  # w = 0: gradient exactly 0
    got = sharpness.sam_sharpness(loss_fn, params, 0.05)
    assert float(got) == 0.0


# ------------------------------------------------------------------ hessian_top_eigenvalue


def largest_magnitude(a_mat):
    vals, vecs = np.linalg.eigh(a_mat)
    i = int(np.argmax(np.abs(vals)))
    return vals[i], vecs[:, i]


@pytest.mark.parametrize("a_mat", [SPD, INDEFINITE], ids=["spd", "indefinite"])
def test_top_eigenvalue_matches_eigh(a_mat):
    lam_ref, vec_ref = largest_magnitude(a_mat)
    lam, vec = sharpness.hessian_top_eigenvalue(
        make_quadratic(a_mat, B_VEC),
        make_params(),
        num_iters=40,
        key=jax.random.key(0),
        return_eigenvector=True,
    )
    assert lam.dtype == jnp.float32 and lam.shape == ()
    np.testing.assert_allclose(float(lam), lam_ref, rtol=1e-5)
    v = flatten(vec)
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-5)
    np.testing.assert_allclose(abs(v @ vec_ref), 1.0, atol=1e-5)
    # Eigen-pair residual ‖Av − λv‖ is small.
    assert np.linalg.norm(a_mat @ v - float(lam) * v) < 1e-3 * abs(lam_ref)
    assert jax.tree.structure(vec) == jax.tree.structure(make_params())


def test_top_eigenvalue_indefinite_picks_negative():
    lam = sharpness.hessian_top_eigenvalue(
        make_quadratic(INDEFINITE, B_VEC), make_params(), num_iters=40, key=jax.random.key(1)
    )
    assert float(lam) == pytest.approx(-8.0, rel=1e-5)


def test_top_eigenvalue_random_symmetric_with_gap():
    rng = np.random.default_rng(7)
    m = rng.normal(size=(N, N))
    a_mat = (m + m.T) / 2
    vals = np.sort(np.abs(np.linalg.eigvalsh(a_mat)))
    gap = vals[-2] / vals[-1]
    assert gap < 0.9, gap  # the test needs an eigen-gap for 200 iterations to converge
    lam_ref, _ = largest_magnitude(a_mat)
    lam = sharpness.hessian_top_eigenvalue(
        make_quadratic(a_mat, B_VEC), make_params(), num_iters=200, key=jax.random.key(2)
    )
    np.testing.assert_allclose(float(lam), lam_ref, rtol=1e-4)


SMALL_GAP = make_matrix([3.0, 2.7, 2.0, 1.0, 0.5, -0.3, 0.1], seed=4)


def np_power_iteration(a_mat, key, num_iters, tol=None):
    """Numpy power iteration (PyHessian's loop) from the documented start vector.

    Start: one jax.random.split sub-key per leaf, standard normal, unit global norm. Each
    iteration: w = Av, λ = vᵀw, v = w/‖w‖; with tol, stop once |λ − λ_prev| ≤ tol·(|λ_prev| + 1e-6).
    Returns (λ, number of iterations run).
    """
    sub_keys = jax.random.split(key, 2)
    v = np.concatenate(
        [
            np.ravel(np.asarray(jax.random.normal(k, shape, jnp.float32), np.float64))
            for k, shape in zip(sub_keys, [SHAPES["a"], SHAPES["b"]], strict=True)
        ]
    )
    v /= np.linalg.norm(v)
    lams = []
    for _ in range(num_iters):
        w = a_mat @ v
        lams.append(v @ w)
        v = w / np.linalg.norm(w)
        if tol is not None and len(lams) >= 2:
            if abs(lams[-1] - lams[-2]) <= tol * (abs(lams[-2]) + 1e-6):
                break
    return lams[-1], len(lams)


def test_top_eigenvalue_follows_power_iteration_step_by_step():
    """Few iterations on a small-gap matrix: matches numpy power iteration from the same start."""
    key = jax.random.key(3)
    for num_iters in (1, 3):
        lam_ref, _ = np_power_iteration(SMALL_GAP, key, num_iters)
        lam = sharpness.hessian_top_eigenvalue(
            make_quadratic(SMALL_GAP, B_VEC), make_params(), num_iters=num_iters, key=key
        )
        np.testing.assert_allclose(float(lam), lam_ref, rtol=1e-5)
    assert abs(lam_ref - 3.0) > 1e-3  # not converged yet: the check above is about the iteration


def test_top_eigenvalue_tol_stops_early():
    key = jax.random.key(0)
    loss_fn = make_quadratic(SMALL_GAP, B_VEC)
    # A loose tolerance stops after a few iterations, where the numpy loop stops.
    lam_ref, iters = np_power_iteration(SMALL_GAP, key, 500, tol=1e-2)
    assert 2 <= iters < 20 and abs(lam_ref - 3.0) > 1e-3, (iters, lam_ref)
    lam = sharpness.hessian_top_eigenvalue(loss_fn, make_params(), num_iters=500, key=key, tol=1e-2)
    np.testing.assert_allclose(float(lam), lam_ref, rtol=1e-5)
    # A tight tolerance converges to the eigh value (gap 0.9: ~150 iterations).
    lam = sharpness.hessian_top_eigenvalue(loss_fn, make_params(), num_iters=500, key=key, tol=1e-9)
    np.testing.assert_allclose(float(lam), 3.0, rtol=1e-5)


def test_top_eigenvalue_zero_hessian_no_nan():
    b32 = jnp.asarray(B_VEC, jnp.float32)

    def linear(params):
        w = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(params)])
        return b32 @ w

    lam, vec = sharpness.hessian_top_eigenvalue(
        linear, make_params(), key=jax.random.key(0), return_eigenvector=True
    )
    assert float(lam) == 0.0
    assert np.all(np.isfinite(flatten(vec)))


# ----------------------------------------------------------------------------- loss_landscape


def np_direction(params, key, relative):
    """Independent numpy re-derivation of the documented direction: same jax.random draws."""
    leaves = jax.tree.leaves(params)
    out = []
    for k, w in zip(jax.random.split(key, len(leaves)), leaves, strict=True):
        d = np.asarray(jax.random.normal(k, w.shape, jnp.float32), np.float64)
        if relative:
            w_norm = np.linalg.norm(np.asarray(w, np.float64))
            d = d * (w_norm / np.linalg.norm(d))
        out.append(np.ravel(d))
    return np.concatenate(out)


@pytest.mark.parametrize("relative", [True, False])
def test_loss_landscape_matches_numpy_quadratic(relative):
    params = make_params()
    scales = np.array([0.0, 0.07, -0.3, 1.0])
    key = jax.random.key(5)
    got = sharpness.loss_landscape(
        make_quadratic(INDEFINITE, B_VEC),
        params,
        scales=scales,
        num_directions=3,
        key=key,
        relative=relative,
    )
    assert got.shape == (3, 4) and got.dtype == jnp.float32
    w = flatten(params)
    expected = np.array(
        [
            [np_loss(INDEFINITE, B_VEC, w + s * np_direction(params, k, relative)) for s in scales]
            for k in jax.random.split(key, 3)
        ]
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    # Scale 0: every direction sees the very same, unperturbed params.
    got = np.asarray(got)
    assert np.all(got[:, 0] == got[0, 0])
    np.testing.assert_allclose(got[0, 0], np_loss(INDEFINITE, B_VEC, w), rtol=1e-6)
    # Directions differ.
    assert len(np.unique(got[:, 1])) == 3


def test_loss_landscape_relative_norms_per_leaf():
    """‖perturbation of leaf l‖ = |s|·‖w_l‖ in every direction; zero-norm leaves stay put."""
    params = {"a": jnp.arange(1.0, 4.0), "b": jnp.full((2, 2), -0.5), "zero": jnp.zeros(5)}
    norms = {k: float(np.linalg.norm(np.asarray(v))) for k, v in params.items()}
    scales = np.array([0.0, 0.07, -0.5, 2.0])
    for name in params:

        def loss_fn(p, name=name):
            return jnp.sqrt(jnp.sum((p[name] - params[name]) ** 2))

        got = sharpness.loss_landscape(
            loss_fn, params, scales=scales, num_directions=2, key=jax.random.key(1)
        )
        expected = np.broadcast_to(np.abs(scales) * norms[name], (2, 4))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)


def test_loss_landscape_absolute_is_unit_gaussian_noise():
    params = {"w": jnp.full((4000,), 10.0)}

    def loss_fn(p):
        return jnp.mean((p["w"] - 10.0) ** 2)  # empirical variance of the noise

    got = sharpness.loss_landscape(
        loss_fn,
        params,
        scales=[0.5, 2.0],
        num_directions=2,
        key=jax.random.key(2),
        relative=False,
    )
    np.testing.assert_allclose(np.asarray(got), [[0.25, 4.0]] * 2, rtol=0.1)


# ----------------------------------------------------------------------------- jit, dtypes, errors


def test_all_jit_compatible():
    loss_fn = make_quadratic(INDEFINITE, B_VEC)
    params = make_params()
    key = jax.random.key(0)

    sharp = jax.jit(lambda p, r: sharpness.sam_sharpness(loss_fn, p, r))(params, 0.1)
    expected = np_sam_sharpness(INDEFINITE, B_VEC, flatten(params), 0.1)
    np.testing.assert_allclose(float(sharp), expected, rtol=2e-4, atol=2e-5)

    lam = jax.jit(lambda p, k: sharpness.hessian_top_eigenvalue(loss_fn, p, key=k))(params, key)
    lam_ref, _ = largest_magnitude(INDEFINITE)
    np.testing.assert_allclose(lam, lam_ref, rtol=1e-4)

    scales = jnp.array([0.0, 0.1])
    land = jax.jit(
        lambda p, s, k: sharpness.loss_landscape(loss_fn, p, scales=s, num_directions=2, key=k)
    )(params, scales, key)
    w = flatten(params)
    expected = [
        [np_loss(INDEFINITE, B_VEC, w + s * np_direction(params, k, True)) for s in (0.0, 0.1)]
        for k in jax.random.split(key, 2)
    ]
    np.testing.assert_allclose(land, expected, rtol=1e-5, atol=1e-5)


def test_bf16_params():
    params16 = make_params(dtype=jnp.bfloat16)
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params16)  # same point
    loss_fn = make_quadratic(SPD, B_VEC)

    sharp = sharpness.sam_sharpness(loss_fn, params16, 0.3)
    assert sharp.dtype == jnp.float32 and np.isfinite(float(sharp))
    # ε is rounded to bf16 (~3 significant digits): loose agreement with the closed form.
    expected = np_sam_sharpness(SPD, B_VEC, flatten(params32), 0.3)
    np.testing.assert_allclose(float(sharp), expected, rtol=0.05)

    lam, vec = sharpness.hessian_top_eigenvalue(
        loss_fn, params16, key=jax.random.key(0), return_eigenvector=True
    )
    assert lam.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(vec))
    np.testing.assert_allclose(float(lam), 10.0, rtol=0.02)

    land = sharpness.loss_landscape(
        loss_fn, params16, scales=[0.0, 0.07], num_directions=2, key=jax.random.key(0)
    )
    assert land.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(land)))
    np.testing.assert_allclose(land[:, 0], np_loss(SPD, B_VEC, flatten(params32)), rtol=1e-5)


def test_pytree_of_python_float_and_nested_structure():
    params = {"x": [jnp.ones(2), 2.0], "y": (jnp.zeros((1, 3)),)}

    def loss_fn(p):
        return 3.0 * jnp.sum(p["x"][0] ** 2) + p["x"][1] ** 2 + jnp.sum(p["y"][0] ** 2)

    # Hessian diag(6, 6, 2, 2, 2, 2); gradient (6, 6, 4, 0, 0, 0).
    lam = sharpness.hessian_top_eigenvalue(loss_fn, params, key=jax.random.key(0))
    np.testing.assert_allclose(float(lam), 6.0, rtol=1e-4)
    g = np.array([6.0, 6.0, 4.0, 0.0, 0.0, 0.0])
    eps = 0.1 * g / np.linalg.norm(g)
    expected = g @ eps + 0.5 * eps @ (np.array([6.0, 6.0, 2.0, 2.0, 2.0, 2.0]) * eps)
    got = sharpness.sam_sharpness(loss_fn, params, 0.1)
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)


def test_errors():
    loss_fn = make_quadratic(SPD, B_VEC)
    params = make_params()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="rho"):
        sharpness.sam_sharpness(loss_fn, params, -0.1)
    with pytest.raises(TypeError, match="loss_fn"):
        sharpness.sam_sharpness(None, params)
    with pytest.raises(ValueError, match="at least one array leaf"):
        sharpness.sam_sharpness(loss_fn, {})
    with pytest.raises(TypeError, match="floating-point"):
        sharpness.sam_sharpness(loss_fn, {"a": jnp.arange(3)})
    with pytest.raises(ValueError, match="num_iters"):
        sharpness.hessian_top_eigenvalue(loss_fn, params, num_iters=0, key=key)
    with pytest.raises(TypeError, match="key"):
        sharpness.hessian_top_eigenvalue(loss_fn, params, key=None)
    with pytest.raises(ValueError, match="tol"):
        sharpness.hessian_top_eigenvalue(loss_fn, params, key=key, tol=-1.0)
    with pytest.raises(ValueError, match="scales"):
        sharpness.loss_landscape(loss_fn, params, scales=[[0.1]], num_directions=1, key=key)
    with pytest.raises(ValueError, match="scales"):
        sharpness.loss_landscape(loss_fn, params, scales=[], num_directions=1, key=key)
    with pytest.raises(ValueError, match="num_directions"):
        sharpness.loss_landscape(loss_fn, params, scales=[0.1], num_directions=0, key=key)


def test_keys_integer_arguments_and_bools():
    loss_fn = make_quadratic(SPD, B_VEC)
    params = make_params()
    # Typed keys and raw uint32[2] keys are both accepted (and give the same directions).
    typed = sharpness.loss_landscape(
        loss_fn, params, scales=[0.1], num_directions=np.int64(2), key=jax.random.key(4)
    )
    raw = sharpness.loss_landscape(
        loss_fn, params, scales=[0.1], num_directions=2, key=jax.random.PRNGKey(4)
    )
    assert typed.shape == (2, 1)
    np.testing.assert_allclose(typed, raw, rtol=1e-6)
    lam = sharpness.hessian_top_eigenvalue(
        loss_fn, params, num_iters=np.int32(3), key=jax.random.PRNGKey(0)
    )
    assert np.isfinite(float(lam))
    # Anything else is not a key: a clear TypeError, never a silent int seed.
    for bad in (
        0,
        np.int64(3),
        jnp.zeros(3, jnp.uint32),
        jnp.zeros(2),
        "key",
        jax.random.split(jax.random.key(0), 2),
    ):
        with pytest.raises(TypeError, match="PRNG key"):
            sharpness.hessian_top_eigenvalue(loss_fn, params, key=bad)
        with pytest.raises(TypeError, match="PRNG key"):
            sharpness.loss_landscape(loss_fn, params, scales=[0.1], num_directions=1, key=bad)
    # Bools are neither ints nor numbers.
    with pytest.raises(TypeError, match="num_directions"):
        sharpness.loss_landscape(
            loss_fn, params, scales=[0.1], num_directions=True, key=jax.random.key(0)
        )
    with pytest.raises(TypeError, match="num_iters"):
        sharpness.hessian_top_eigenvalue(loss_fn, params, num_iters=2.0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="rho"):
        sharpness.sam_sharpness(loss_fn, params, True)
