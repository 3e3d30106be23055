"""Tests for sharpax.sam (SAM / ASAM as the first transform of an optax chain).

Every numerical check compares against an independent reference: hand-written two-pass SAM
loops over pytree leaves, NumPy formulas from the papers (Foret et al. 2021, Kwon et al. 2021),
or optax.contrib.sam. sharpax._common is deliberately not used here.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import sharpax

NDEV = 8
TIGHT = dict(rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------


def leaves_of(tree):
    return jax.tree_util.tree_leaves(tree)


def ref_norm(tree):
    """Global L2 norm, summed leaf by leaf in float32."""
    total = jnp.zeros([], jnp.float32)
    for leaf in leaves_of(tree):
        total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return jnp.sqrt(total)


def ref_sam_grad(loss, params, batch, rho, *, eps=1e-12, ascent=None):
    """Two-pass SAM by hand: g, ε = ρ g / (‖g‖ + eps), return ∇L(w + ε).

    ``ascent`` (if given) replaces g in ε only (what a transform before sam changes).
    """
    g = jax.grad(loss)(params, batch) if ascent is None else ascent
    flat_g, treedef = jax.tree_util.tree_flatten(g)
    flat_w = treedef.flatten_up_to(params)
    scale = rho / (ref_norm(g) + eps)
    perturbed = [w + scale * gl for w, gl in zip(flat_w, flat_g)]
    return jax.grad(loss)(treedef.unflatten(perturbed), batch)


def ref_sgd_step(params, grads, trace, lr, momentum):
    """optax.sgd(lr, momentum) by hand: trace = g + μ trace; w -= lr · trace."""
    if momentum:
        trace = jax.tree.map(lambda g, t: g + momentum * t, grads, trace)
    else:
        trace = grads
    params = jax.tree.map(lambda w, t: w - lr * t, params, trace)
    return params, trace


def tree_allclose(actual, expected, **tol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(leaves_of(actual), leaves_of(expected)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), **(tol or TIGHT)
        )


def tree_maxdiff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(leaves_of(a), leaves_of(b))
    )


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in leaves_of(tree))


# ------------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------------


def quad_problem(seed=0):
    """L(w) = ½ zᵀ A z − bᵀ z with z = concat(w['a'].ravel(), w['b']); A SPD (float64 numpy)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(5, 5))
    a = m @ m.T / 5 + np.eye(5)
    b = rng.normal(size=5)
    params = {"a": rng.normal(size=(2, 2)), "b": rng.normal(size=1)}
    return a, b, params


def quad_flat(w):
    return np.concatenate([np.ravel(w["a"]), np.ravel(w["b"])])


def quad_unflat(z):
    return {"a": z[:4].reshape(2, 2), "b": z[4:]}


def quad_loss_jax(w, batch):
    a, b = batch
    z = jnp.concatenate([w["a"].ravel(), w["b"].ravel()])
    return 0.5 * z @ a @ z - b @ z


def mlp_init(seed=0, d_in=4, d_hidden=8, d_out=1, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    params = {
        "layer1": {
            "w": rng.normal(size=(d_in, d_hidden)) / np.sqrt(d_in),
            "b": 0.1 * rng.normal(size=d_hidden),
        },
        "layer2": {
            "w": rng.normal(size=(d_hidden, d_out)) / np.sqrt(d_hidden),
            "b": 0.1 * rng.normal(size=d_out),
        },
    }
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["layer1"]["w"] + params["layer1"]["b"])
    out = h @ params["layer2"]["w"] + params["layer2"]["b"]
    return jnp.mean(jnp.square(out[:, 0] - y))


def mlp_data(n=32, d_in=4, seed=1, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in))
    y = np.sin(x @ rng.normal(size=d_in)) + 0.1 * rng.normal(size=n)
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def sam_update(opt, state, params, loss, batch):
    grad_fn = lambda p: jax.grad(loss)(p, batch)  # noqa: E731
    return opt.update(grad_fn(params), state, params, grad_fn=grad_fn)


# ------------------------------------------------------------------------------------------------
# Equality to hand-written two-pass SAM
# ------------------------------------------------------------------------------------------------


def test_quadratic_matches_numpy_two_pass_sam_with_momentum():
    """Quadratic with analytic gradient A z − b, reference entirely in float64 NumPy."""
    a, b, w0 = quad_problem()
    rho, lr, mu = 0.1, 0.05, 0.9
    batch = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w0)
    opt = optax.chain(sharpax.sam(rho), optax.sgd(lr, momentum=mu))
    state = opt.init(params)

    z = quad_flat(w0)
    trace = np.zeros_like(z)
    for _ in range(6):
        g = a @ z - b
        e = rho * g / (np.linalg.norm(g) + 1e-12)
        g_sam = a @ (z + e) - b
        trace = g_sam + mu * trace
        z = z - lr * trace

        updates, state = sam_update(opt, state, params, quad_loss_jax, batch)
        params = optax.apply_updates(params, updates)
        tree_allclose(params, quad_unflat(z))


@pytest.mark.parametrize("use_jit", [False, True])
def test_mlp_matches_hand_written_two_pass_sam_with_momentum(use_jit):
    rho, lr, mu = 0.05, 0.1, 0.9
    params = mlp_init()
    batch = mlp_data()
    opt = optax.chain(sharpax.sam(rho), optax.sgd(lr, momentum=mu))
    state = opt.init(params)
    step = functools.partial(sam_update, opt, loss=mlp_loss)
    if use_jit:
        step = jax.jit(step)

    ref_params = params
    trace = jax.tree.map(jnp.zeros_like, params)
    for _ in range(5):
        g_sam = ref_sam_grad(mlp_loss, ref_params, batch, rho)
        ref_params, trace = ref_sgd_step(ref_params, g_sam, trace, lr, mu)

        updates, state = step(state=state, params=params, batch=batch)
        params = optax.apply_updates(params, updates)
        tree_allclose(params, ref_params)
    # The SAM gradient is not the plain gradient (the test is sensitive to ε).
    g_plain = jax.grad(mlp_loss)(ref_params, batch)
    assert tree_maxdiff(g_plain, ref_sam_grad(mlp_loss, ref_params, batch, rho)) > 1e-3


def test_equals_optax_contrib_sam_opaque_mode():
    rho, lr, mu = 0.05, 0.1, 0.9
    params = mlp_init(seed=3)
    batch = mlp_data(seed=4)
    ours = optax.chain(sharpax.sam(rho, eps=0.0), optax.sgd(lr, momentum=mu))
    theirs = optax.contrib.sam(
        optax.sgd(lr, momentum=mu),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    p_ours = p_theirs = params
    for _ in range(5):
        g = jax.grad(mlp_loss)(p_ours, batch)
        u, s_ours = ours.update(
            g, s_ours, p_ours, grad_fn=lambda p: jax.grad(mlp_loss)(p, batch)
        )
        p_ours = optax.apply_updates(p_ours, u)

        g = jax.grad(mlp_loss)(p_theirs, batch)
        u, s_theirs = theirs.update(
            g, s_theirs, p_theirs, grad_fn=lambda p, i: jax.grad(mlp_loss)(p, batch)
        )
        p_theirs = optax.apply_updates(p_theirs, u)
        tree_allclose(p_ours, p_theirs)


def test_tiny_eps_also_matches_optax_contrib_sam():
    rho, lr = 0.05, 0.1
    params = mlp_init(seed=5)
    batch = mlp_data(seed=6)
    ours = optax.chain(sharpax.sam(rho, eps=1e-12), optax.sgd(lr))
    theirs = optax.contrib.sam(
        optax.sgd(lr),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    grad_fn = lambda p: jax.grad(mlp_loss)(p, batch)  # noqa: E731
    u_ours, _ = ours.update(grad_fn(params), ours.init(params), params, grad_fn=grad_fn)
    u_theirs, _ = theirs.update(
        grad_fn(params), theirs.init(params), params, grad_fn=lambda p, i: grad_fn(p)
    )
    tree_allclose(u_ours, u_theirs)


# ------------------------------------------------------------------------------------------------
# ASAM, schedules, inject_hyperparams
# ------------------------------------------------------------------------------------------------


def recording_quad(seed):
    """The quadratic problem in float32 and a grad_fn that records the params it is called at."""
    a, b, w0 = quad_problem(seed=seed)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w0)
    batch = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    seen = []

    def grad_fn(p):
        seen.append(p)
        return jax.grad(quad_loss_jax)(p, batch)

    return a, b, params, seen, grad_fn


@pytest.mark.parametrize("eta", [0.01, 0.5])
def test_asam_matches_numpy_formula(eta):
    """ASAM: T = |w| + η, ε = ρ T² g / (‖T g‖ + eps); checked on ε and on the returned gradient."""
    a, b, params, seen, grad_fn = recording_quad(seed=2)
    rho = 0.3
    tx = sharpax.sam(rho, adaptive=True, eta=eta)
    out, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)

    z = quad_flat(jax.tree.map(np.asarray, params)).astype(np.float64)
    g = a @ z - b
    t = np.abs(z) + eta
    e = rho * t**2 * g / (np.linalg.norm(t * g) + 1e-12)
    tree_allclose(seen[-1], quad_unflat(z + e))
    tree_allclose(out, quad_unflat(a @ (z + e) - b), rtol=1e-5, atol=1e-5)
    # ASAM's perturbation differs from plain SAM's.
    e_sam = rho * g / np.linalg.norm(g)
    assert np.max(np.abs(e - e_sam)) > 1e-3


@pytest.mark.parametrize("as_function", [False, True])
def test_asam_adaptive_mask_scales_only_the_marked_leaves(as_function):
    """The ASAM authors' rule: T = |w| + η on 'weight' leaves, T = 1 on the others (biases)."""
    a, b, params, seen, grad_fn = recording_quad(seed=4)
    rho, eta = 0.5, 0.0
    mask = {"a": True, "b": False}
    tx = sharpax.sam(rho, adaptive=True, eta=eta, adaptive_mask=(lambda p: mask) if as_function else mask)
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
    z = quad_flat(jax.tree.map(np.asarray, params)).astype(np.float64)
    g = a @ z - b
    t = np.concatenate([np.abs(z[:4]) + eta, np.ones(1)])  # 'b' unscaled
    e = rho * t**2 * g / np.linalg.norm(t * g)
    tree_allclose(seen[-1], quad_unflat(z + e))


def test_asam_default_mask_is_bitwise_the_unmasked_formula():
    """Old versus new: no mask, an all-True mask and the pre-mask formula agree bit for bit."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
    grads = jax.tree.map(lambda x: x * 0.7 - 0.1, params)
    rho, eta, eps = 0.4, 0.01, 1e-12

    @jax.jit
    def pre_mask(g, w):  # the formula as it stood before adaptive_mask existed
        t = lambda x: jnp.abs(x) + eta
        scaled = jax.tree.map(lambda gi, wi: t(wi) * gi, g, w)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(scaled)))
        scale = jnp.where(norm > 0, rho / (jnp.where(norm > 0, norm, 1.0) + eps), 0.0)
        return jax.tree.map(lambda tg, wi: scale * t(wi) * tg, scaled, w)

    from sharpax import _common

    for mask in (None, {"w": True, "b": True}):
        eps_tree = jax.jit(
            lambda g, w, m=mask: _common.perturbation(g, w, rho, adaptive=True, eta=eta, eps=eps,
                                                      adaptive_mask=m)
        )(grads, params)
        for k in params:
            np.testing.assert_array_equal(eps_tree[k], pre_mask(grads, params)[k])


def test_adaptive_mask_errors():
    with pytest.raises(ValueError, match="adaptive=True"):
        sharpax.sam(0.05, adaptive_mask={"w": True})
    params = {"w": jnp.ones(2), "b": jnp.ones(1)}
    tx = sharpax.sam(0.05, adaptive=True, adaptive_mask={"w": True})
    with pytest.raises(ValueError, match="adaptive_mask"):
        tx.update(params, tx.init(params), params, grad_fn=lambda p: p)
    tx = sharpax.sam(0.05, adaptive=True, adaptive_mask={"w": 1, "b": 0})
    with pytest.raises(TypeError, match="adaptive_mask"):
        tx.update(params, tx.init(params), params, grad_fn=lambda p: p)


@pytest.mark.parametrize("use_jit", [False, True])
def test_rho_schedule_is_evaluated_at_state_count(use_jit):
    sched = optax.linear_schedule(0.0, 0.2, transition_steps=4)
    lr = 0.1
    params = mlp_init(seed=7)
    batch = mlp_data(seed=8)
    opt = optax.chain(sharpax.sam(sched), optax.sgd(lr))
    state = opt.init(params)
    step = functools.partial(sam_update, opt, loss=mlp_loss)
    if use_jit:
        step = jax.jit(step)
    params0 = params
    ref_params = params
    for t in range(6):
        rho_t = float(sched(t))
        g_sam = ref_sam_grad(mlp_loss, ref_params, batch, rho_t)
        ref_params, _ = ref_sgd_step(ref_params, g_sam, None, lr, 0.0)
        updates, state = step(state=state, params=params, batch=batch)
        if t == 0:  # rho(0) = 0: the plain gradient
            plain = jax.grad(mlp_loss)(params, batch)
            tree_allclose(updates, jax.tree.map(lambda g: -lr * g, plain))
        params = optax.apply_updates(params, updates)
        tree_allclose(params, ref_params)
        assert int(state[0].count) == t + 1

    # The schedule reads state.count, not the number of calls: jump the counter to 3.
    fresh = opt.init(params0)
    jumped = (fresh[0]._replace(count=jnp.asarray(3, jnp.int32)),) + tuple(fresh[1:])
    updates, _ = step(state=jumped, params=params0, batch=batch)
    expected = ref_sam_grad(mlp_loss, params0, batch, float(sched(3)))
    tree_allclose(updates, jax.tree.map(lambda g: -lr * g, expected))


def test_inject_hyperparams_under_jit_and_changing_rho():
    lr = 0.1
    params = mlp_init(seed=9)
    batch = mlp_data(seed=10)
    opt = optax.chain(optax.inject_hyperparams(sharpax.sam)(rho=0.05), optax.sgd(lr))
    state = opt.init(params)
    step = jax.jit(functools.partial(sam_update, opt, loss=mlp_loss))

    u1, _ = step(state=state, params=params, batch=batch)
    tree_allclose(u1, jax.tree.map(lambda g: -lr * g, ref_sam_grad(mlp_loss, params, batch, 0.05)))
    assert float(state[0].hyperparams["rho"]) == pytest.approx(0.05)

    state[0].hyperparams["rho"] = jnp.asarray(0.4, jnp.float32)
    u2, new_state = step(state=state, params=params, batch=batch)
    tree_allclose(u2, jax.tree.map(lambda g: -lr * g, ref_sam_grad(mlp_loss, params, batch, 0.4)))
    assert tree_maxdiff(u1, u2) > 1e-4
    assert float(new_state[0].hyperparams["rho"]) == pytest.approx(0.4)
    assert int(new_state[0].inner_state.count) == 1

    state[0].hyperparams["rho"] = jnp.asarray(0.0, jnp.float32)
    u0, _ = step(state=state, params=params, batch=batch)
    tree_allclose(u0, jax.tree.map(lambda g: -lr * g, jax.grad(mlp_loss)(params, batch)))


# ------------------------------------------------------------------------------------------------
# Edge cases: zero gradient, validation, dtypes, counters
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_zero_gradient_gives_finite_output(adaptive, use_jit):
    # Genuinely flat loss at w: relu is flat for w < 0, so g = 0 exactly.
    def loss(w, batch):
        return jnp.sum(jax.nn.relu(w["a"])) + jnp.sum(jax.nn.relu(w["b"]))

    params = {"a": -jnp.ones((3, 2)), "b": -2.0 * jnp.ones(4)}
    opt = optax.chain(sharpax.sam(0.05, adaptive=adaptive), optax.sgd(0.1))
    step = functools.partial(sam_update, opt, loss=loss)
    if use_jit:
        step = jax.jit(step)
    updates, _ = step(state=opt.init(params), params=params, batch=None)
    assert all_finite(updates)
    tree_allclose(updates, jax.tree.map(jnp.zeros_like, params), rtol=0, atol=0)

    # Zero clean gradient but a non-zero grad_fn: ε = 0, so the output is grad_fn(params).
    tx = sharpax.sam(0.05, adaptive=adaptive)
    grad_fn = lambda p: jax.tree.map(lambda x: 3.0 * x + 1.0, p)  # noqa: E731
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, _ = tx.update(zeros, tx.init(params), params, grad_fn=grad_fn)
    assert all_finite(out)
    tree_allclose(out, grad_fn(params), rtol=0, atol=0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_finite_under_inject_hyperparams_float16(adaptive):
    params = {"w": jnp.ones(3, jnp.float16)}
    tx = optax.inject_hyperparams(sharpax.sam)(rho=0.05, adaptive=adaptive)
    grad_fn = lambda p: jax.tree.map(lambda x: 2 * x, p)  # noqa: E731
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, _ = tx.update(zeros, tx.init(params), params, grad_fn=grad_fn)
    assert all_finite(out)
    # ε = 0, so the output is grad_fn at the unperturbed params: 2 w, exactly.
    tree_allclose(out, {"w": 2 * params["w"]}, rtol=0, atol=0)


def test_missing_grad_fn_raises_type_error():
    params = mlp_init()
    grads = jax.grad(mlp_loss)(params, mlp_data())
    tx = sharpax.sam(0.05)
    with pytest.raises(TypeError, match="grad_fn"):
        tx.update(grads, tx.init(params), params)
    opt = optax.chain(sharpax.sam(0.05), optax.sgd(0.1))
    with pytest.raises(TypeError, match="grad_fn"):
        opt.update(grads, opt.init(params), params)
    with pytest.raises(TypeError, match="grad_fn"):
        tx.update(grads, tx.init(params), params, grad_fn="not callable")


def test_missing_params_raises_value_error():
    params = mlp_init()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = sharpax.sam(0.05)
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(params), None, grad_fn=lambda p: p)


@pytest.mark.parametrize("rho", [-0.1, -1, -1e-9])
def test_negative_rho_raises_value_error(rho):
    with pytest.raises(ValueError, match="rho"):
        sharpax.sam(rho)
    with pytest.raises(ValueError, match="rho"):
        sharpax.sam(rho, adaptive=True)


def test_negative_eta_raises_value_error():
    with pytest.raises(ValueError, match="eta"):
        sharpax.sam(0.05, adaptive=True, eta=-0.01)


def test_eps_and_bools_are_validated_like_looksam_and_vsam():
    for make in (sharpax.sam, sharpax.looksam, sharpax.vsam):
        with pytest.raises(ValueError, match="eps"):
            make(0.05, eps=-1e-12)
        with pytest.raises(TypeError, match="rho"):
            make(True)
        with pytest.raises(TypeError, match="eps"):
            make(0.05, eps=False)
    with pytest.raises(TypeError, match="eta"):
        sharpax.sam(0.05, adaptive=True, eta=True)
    with pytest.raises(TypeError, match="eps"):
        sharpax.sam(0.05, eps=lambda count: 1e-12)  # only rho may be a schedule


@pytest.mark.parametrize(
    "rho",
    [np.float32(-0.1), np.array(-0.1), jnp.asarray(-0.1)],
    ids=["np.float32", "0d-ndarray", "concrete-jax-array"],
)
def test_negative_numpy_rho_raises_value_error(rho):
    with pytest.raises(ValueError, match="rho"):
        sharpax.sam(rho)


def test_bfloat16_params_keep_dtype_and_are_finite():
    lr = 0.1
    params = mlp_init(seed=11, dtype=jnp.bfloat16)
    batch = mlp_data(seed=12, dtype=jnp.bfloat16)
    opt = optax.chain(sharpax.sam(0.05), optax.sgd(lr, momentum=0.9))
    state = opt.init(params)
    step = jax.jit(functools.partial(sam_update, opt, loss=mlp_loss))
    # Loose agreement with the float32 reference from the same starting point.
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    batch32 = jax.tree.map(lambda x: x.astype(jnp.float32), batch)
    ref = ref_sam_grad(mlp_loss, params32, batch32, 0.05)
    for i in range(3):
        updates, state = step(state=state, params=params, batch=batch)
        for u, p in zip(leaves_of(updates), leaves_of(params)):
            assert u.dtype == jnp.bfloat16 and u.shape == p.shape
        if i == 0:
            tree_allclose(jax.tree.map(lambda u: -u / lr, updates), ref, rtol=5e-2, atol=3e-2)
        params = optax.apply_updates(params, updates)
        assert all(p.dtype == jnp.bfloat16 for p in leaves_of(params))
        assert all_finite(params) and all_finite(updates)


@pytest.mark.parametrize("use_jit", [False, True])
def test_count_and_num_sam_steps_advance(use_jit):
    params = mlp_init()
    batch = mlp_data()
    opt = optax.chain(sharpax.sam(0.05), optax.sgd(0.1))
    state = opt.init(params)
    assert isinstance(state[0], sharpax.SAMState)
    assert int(state[0].count) == 0 and int(state[0].num_sam_steps) == 0
    step = functools.partial(sam_update, opt, loss=mlp_loss)
    if use_jit:
        step = jax.jit(step)
    for t in range(1, 4):
        updates, state = step(state=state, params=params, batch=batch)
        params = optax.apply_updates(params, updates)
        assert state[0].count.dtype == jnp.int32
        assert state[0].num_sam_steps.dtype == jnp.int32
        assert int(state[0].count) == t and int(state[0].num_sam_steps) == t


# ------------------------------------------------------------------------------------------------
# Transforms before sam affect only the ascent direction
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pre, pre_ref, changes_direction",
    [
        (
            optax.clip_by_global_norm(0.05),
            lambda g: jax.tree.map(lambda x: x * jnp.minimum(1.0, 0.05 / ref_norm(g)), g),
            False,  # rescales g: same ε, so the same SAM gradient as without clipping
        ),
        (
            optax.clip(0.02),  # element-wise: changes the ascent *direction*
            lambda g: jax.tree.map(lambda x: jnp.clip(x, -0.02, 0.02), g),
            True,
        ),
    ],
    ids=["clip_by_global_norm", "clip"],
)
def test_transforms_before_sam_change_only_the_ascent(pre, pre_ref, changes_direction):
    rho, lr = 0.2, 0.1
    params = mlp_init(seed=13)
    batch = mlp_data(seed=14)
    opt = optax.chain(pre, sharpax.sam(rho), optax.sgd(lr))
    g = jax.grad(mlp_loss)(params, batch)
    g_clipped = pre_ref(g)
    assert tree_maxdiff(g, g_clipped) > 1e-3  # clipping is active
    updates, _ = opt.update(
        g, opt.init(params), params, grad_fn=lambda p: jax.grad(mlp_loss)(p, batch)
    )
    got = jax.tree.map(lambda u: -u / lr, updates)
    # ε is built from the clipped g; the returned gradient is the raw grad_fn output.
    tree_allclose(got, ref_sam_grad(mlp_loss, params, batch, rho, ascent=g_clipped))
    assert float(ref_norm(got)) > 0.05  # not clipped
    unclipped = ref_sam_grad(mlp_loss, params, batch, rho)
    if changes_direction:
        assert tree_maxdiff(got, unclipped) > 1e-4
    else:
        tree_allclose(got, unclipped)


# ------------------------------------------------------------------------------------------------
# Gradient accumulation with optax.MultiSteps
# ------------------------------------------------------------------------------------------------

K_MICRO = 3


def micro_batches(seed=15, k=K_MICRO, n_per=8):
    """k equal micro-batches and the full batch they make up."""
    x, y = mlp_data(n=k * n_per, seed=seed)
    mbs = [(x[i * n_per : (i + 1) * n_per], y[i * n_per : (i + 1) * n_per]) for i in range(k)]
    return mbs, (x, y)


def test_multisteps_after_sam_averages_per_micro_batch_sam_gradients():
    """chain(sam, MultiSteps(sgd, k)) emits sgd(mean_i SAM_i), SAM_i built on micro-batch i."""
    rho, lr, mu = 0.1, 0.1, 0.9
    params = mlp_init(seed=16)
    mbs, _ = micro_batches()
    opt = optax.chain(
        sharpax.sam(rho),
        optax.MultiSteps(optax.sgd(lr, momentum=mu), K_MICRO).gradient_transformation(),
    )
    state = opt.init(params)
    step = jax.jit(functools.partial(sam_update, opt, loss=mlp_loss))

    ref_params = params
    trace = jax.tree.map(jnp.zeros_like, params)
    for macro in range(2):
        sam_grads = [ref_sam_grad(mlp_loss, ref_params, mb, rho) for mb in mbs]
        mean = jax.tree.map(lambda *gs: sum(gs) / len(gs), *sam_grads)
        ref_params, trace = ref_sgd_step(ref_params, mean, trace, lr, mu)

        for i, mb in enumerate(mbs):
            updates, state = step(state=state, params=params, batch=mb)
            if i < K_MICRO - 1:
                tree_allclose(updates, jax.tree.map(jnp.zeros_like, params), rtol=0, atol=0)
            params = optax.apply_updates(params, updates)
        tree_allclose(params, ref_params)
        # sam's counter counts micro-steps (relevant for a rho schedule).
        assert int(state[0].count) == K_MICRO * (macro + 1)


def test_multisteps_wrapping_sam_is_not_large_batch_sam():
    """MultiSteps(chain(sam, sgd), k): documented by reading optax/transforms/_accumulation.py.

    Every micro-step calls the inner update with the running mean of the accumulated gradients
    and the current micro-batch's grad_fn; the inner state is kept only at the emitting step and
    updates are zeroed before it. So the emitted update is
    -lr · grad_{B_k}(w + ρ ḡ/‖ḡ‖) with ḡ the mean of the k micro-batch gradients: the
    perturbation is the large-batch one but the descent gradient is only the last micro-batch's.
    """
    rho, lr = 0.1, 0.1
    params = mlp_init(seed=17)
    mbs, full = micro_batches(seed=18)
    ms = optax.MultiSteps(optax.chain(sharpax.sam(rho), optax.sgd(lr)), K_MICRO)
    state = ms.init(params)

    step = jax.jit(functools.partial(sam_update, ms, loss=mlp_loss))
    micro_grads = [jax.grad(mlp_loss)(params, mb) for mb in mbs]
    for i, mb in enumerate(mbs):
        updates, state = step(state=state, params=params, batch=mb)
        inner_sam_state = state.inner_opt_state[0]
        if i < K_MICRO - 1:
            tree_allclose(updates, jax.tree.map(jnp.zeros_like, params), rtol=0, atol=0)
            assert int(inner_sam_state.count) == 0  # inner state discarded until emit
        else:
            assert int(inner_sam_state.count) == 1
    got = jax.tree.map(lambda u: -u / lr, updates)

    g_mean = jax.tree.map(lambda *gs: sum(gs) / len(gs), *micro_grads)
    predicted = ref_sam_grad(mlp_loss, params, mbs[-1], rho, ascent=g_mean)
    tree_allclose(got, predicted)

    large_batch_sam = ref_sam_grad(mlp_loss, params, full, rho)
    # ḡ is the full-batch gradient (equal micro-batches), so ε is the large-batch one ...
    tree_allclose(
        large_batch_sam,
        ref_sam_grad(mlp_loss, params, full, rho, ascent=g_mean),
        rtol=1e-5,
        atol=1e-6,
    )
    # ... but the descent gradient is not: neither large-batch SAM nor mean of per-micro SAM.
    assert tree_maxdiff(got, large_batch_sam) > 1e-3
    per_micro_mean = jax.tree.map(
        lambda *gs: sum(gs) / len(gs), *[ref_sam_grad(mlp_loss, params, mb, rho) for mb in mbs]
    )
    assert tree_maxdiff(got, per_micro_mean) > 1e-3


# ------------------------------------------------------------------------------------------------
# 8 devices: pmap and shard_map
# ------------------------------------------------------------------------------------------------


def dp_setup():
    rho, lr = 0.1, 0.1
    params = mlp_init(seed=19)
    x, y = mlp_data(n=NDEV * 4, seed=20)
    shards = (x.reshape(NDEV, 4, -1), y.reshape(NDEV, 4))
    return rho, lr, params, (x, y), shards


def local_step(opt, params, state, xb, yb, *, pmean_in_grad_fn):
    def grad_fn(p):
        g = jax.grad(mlp_loss)(p, (xb, yb))
        return jax.lax.pmean(g, "batch") if pmean_in_grad_fn else g

    local_grads = jax.grad(mlp_loss)(params, (xb, yb))  # un-averaged clean gradient
    return opt.update(local_grads, state, params, grad_fn=grad_fn)


def per_shard_sam_grads(params, shards, rho):
    xs, ys = shards
    return [ref_sam_grad(mlp_loss, params, (xs[i], ys[i]), rho) for i in range(NDEV)]


def run_pmap(opt, params, shards, *, pmean_in_grad_fn):
    fn = jax.pmap(
        functools.partial(local_step, opt, pmean_in_grad_fn=pmean_in_grad_fn),
        axis_name="batch",
        in_axes=(None, None, 0, 0),
    )
    return fn(params, opt.init(params), *shards)


def run_shard_map(opt, params, shards, *, pmean_in_grad_fn, stacked, check_vma=True):
    """shard_map over 8 devices. With check_vma (the default) params are replicated inputs,
    so they are first made device-varying (jax.lax.pcast(..., to='varying')): otherwise
    jax.grad w.r.t. them already returns the psum over devices (see the test below)."""
    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("batch",))

    def body(p, s, xb, yb):
        if check_vma:
            p = jax.lax.pcast(p, "batch", to="varying")
        u, s = local_step(opt, p, s, xb[0], yb[0], pmean_in_grad_fn=pmean_in_grad_fn)
        if stacked:
            u = jax.tree.map(lambda x: x[None], u)
        return u, s

    fn = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P("batch"), P("batch")),
            out_specs=(P("batch") if stacked else P(), P()),
            check_vma=check_vma,
        )
    )
    return fn(params, opt.init(params), *shards)


MAPPERS = ["pmap", "shard_map", "shard_map_no_check_vma"]


def run_mapped(mapper, opt, params, shards, *, pmean_in_grad_fn, stacked=False):
    """Returns (updates, sam_state): per-device stacked when ``stacked``, else device 0's."""
    if mapper == "pmap":
        updates, state = run_pmap(opt, params, shards, pmean_in_grad_fn=pmean_in_grad_fn)
        if not stacked:
            for d in range(1, NDEV):  # replicated
                tree_allclose(
                    jax.tree.map(lambda u: u[d], updates),
                    jax.tree.map(lambda u: u[0], updates),
                    rtol=0,
                    atol=1e-7,
                )
            updates = jax.tree.map(lambda u: u[0], updates)
        assert np.all(np.asarray(state[0].count) == 1)
        return updates, jax.tree.map(lambda x: x[0], state[0])
    updates, state = run_shard_map(
        opt,
        params,
        shards,
        pmean_in_grad_fn=pmean_in_grad_fn,
        stacked=stacked,
        check_vma=(mapper == "shard_map"),
    )
    return updates, state[0]


@pytest.mark.parametrize("mapper", MAPPERS)
def test_synced_mode_equals_full_batch_sam(mapper):
    rho, lr, params, full, shards = dp_setup()
    opt = optax.chain(sharpax.sam(rho, axis_name="batch"), optax.sgd(lr))
    updates, sam_state = run_mapped(mapper, opt, params, shards, pmean_in_grad_fn=True)
    assert int(sam_state.count) == 1 and int(sam_state.num_sam_steps) == 1
    expected = ref_sam_grad(mlp_loss, params, full, rho)
    tree_allclose(jax.tree.map(lambda u: -u / lr, updates), expected, rtol=1e-5, atol=1e-5)
    # Per-device ascent would give a different answer: the test sees the pmean of the ascent.
    per_device = jax.tree.map(lambda *gs: sum(gs) / NDEV, *per_shard_sam_grads(params, shards, rho))
    assert tree_maxdiff(expected, per_device) > 1e-3


def test_pmean_updates_recipe_equals_full_batch_sam():
    """The recipe shared with looksam/vsam: per-device grad_fn, output averaged after sam."""
    from sharpax.sam import pmean_updates

    rho, lr, params, full, shards = dp_setup()
    opt = optax.chain(sharpax.sam(rho, axis_name="batch"), pmean_updates("batch"), optax.sgd(lr))
    updates, _ = run_pmap(opt, params, shards, pmean_in_grad_fn=False)
    for d in range(NDEV):  # every device applies the same, full-batch SAM update
        tree_allclose(
            jax.tree.map(lambda u, d=d: -u[d] / lr, updates),
            ref_sam_grad(mlp_loss, params, full, rho),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("mapper", MAPPERS)
def test_per_device_mode_equals_mean_of_per_shard_sam(mapper):
    rho, lr, params, _, shards = dp_setup()
    opt = optax.chain(sharpax.sam(rho, axis_name=None), optax.sgd(lr))
    refs = per_shard_sam_grads(params, shards, rho)  # one shard at a time, one device
    mean_ref = jax.tree.map(lambda *gs: sum(gs) / NDEV, *refs)

    # (a) Averaging inside grad_fn (the documented usage): mean of per-shard SAM gradients.
    updates, _ = run_mapped(mapper, opt, params, shards, pmean_in_grad_fn=True)
    tree_allclose(jax.tree.map(lambda u: -u / lr, updates), mean_ref, rtol=1e-5, atol=1e-5)

    # (b) Without averaging, each device returns its own shard's SAM gradient (un-averaged).
    stacked, _ = run_mapped(mapper, opt, params, shards, pmean_in_grad_fn=False, stacked=True)
    for d in range(NDEV):
        tree_allclose(
            jax.tree.map(lambda u: -u[d] / lr, stacked), refs[d], rtol=1e-5, atol=1e-5
        )


def test_shard_map_with_invariant_params_grad_is_already_summed():
    """Documents a JAX pitfall (not a sharpax bug): under shard_map with check_vma=True and
    replicated (invariant) params, jax.grad already psums the per-device gradients, so the
    clean gradient is NDEV x the full-batch one, the pmean in synced mode is a no-op and
    per-device (m-sharpness) ascent is impossible; the result is NDEV x full-batch SAM."""
    rho, lr, params, full, shards = dp_setup()
    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("batch",))
    for axis_name in ("batch", None):
        opt = optax.chain(sharpax.sam(rho, axis_name=axis_name), optax.sgd(lr))
        fn = jax.jit(
            jax.shard_map(
                lambda p, s, xb, yb: local_step(opt, p, s, xb[0], yb[0], pmean_in_grad_fn=True),
                mesh=mesh,
                in_specs=(P(), P(), P("batch"), P("batch")),
                out_specs=(P(), P()),
            )
        )
        updates, _ = fn(params, opt.init(params), *shards)
        expected = ref_sam_grad(mlp_loss, params, full, rho)
        got = jax.tree.map(lambda u: -u / (lr * NDEV), updates)
        tree_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def logreg_problem():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(64, 5))
    y = (x @ rng.normal(size=5) + 0.3 * rng.normal(size=64) > 0).astype(np.float32)
    params = {"w": jnp.zeros(5, jnp.float32), "b": jnp.zeros([], jnp.float32)}
    return params, (jnp.asarray(x, jnp.float32), jnp.asarray(y))


def logreg_loss(params, batch):
    x, y = batch
    logits = x @ params["w"] + params["b"]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))


@pytest.mark.parametrize(
    "use_jit, adaptive",
    [(False, False), (True, False), (True, True)],
    ids=["eager", "jit", "asam-jit"],
)
def test_training_reduces_loss_and_stays_finite(use_jit, adaptive):
    params, batch = logreg_problem()
    opt = optax.chain(sharpax.sam(0.05, adaptive=adaptive), optax.sgd(0.5, momentum=0.9))
    state = opt.init(params)

    def step(params, state):
        updates, state = sam_update(opt, state, params, logreg_loss, batch)
        return optax.apply_updates(params, updates), state

    if use_jit:
        step = jax.jit(step)
    loss0 = float(logreg_loss(params, batch))
    for _ in range(50):
        params, state = step(params, state)
        assert all_finite(params)
    loss_end = float(logreg_loss(params, batch))
    assert np.isfinite(loss_end)
    assert loss_end < 0.6 * loss0, (loss0, loss_end)
    assert int(state[0].num_sam_steps) == 50


# ------------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------------

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@st.composite
def pytrees(draw):
    """(params, clean grads): nested dict/list of 1-3 leaves, shapes up to 3-D, mixed dtypes.
    Gradient entries have magnitude in [0.1, 2] and random sign (never all zero)."""
    n = draw(st.integers(1, 3))
    shapes = [tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))) for _ in range(n)]
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in range(n)]
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    ws, gs = [], []
    for shape, dtype in zip(shapes, dtypes):
        ws.append(jnp.asarray(rng.uniform(-2.0, 2.0, size=shape).astype(np.float32), dtype))
        g = rng.uniform(0.1, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        gs.append(jnp.asarray(g.astype(np.float32), dtype))
    layout = draw(st.sampled_from(["dict", "list", "nested"]))

    def build(leaves):
        if layout == "dict":
            return {f"p{i}": leaf for i, leaf in enumerate(leaves)}
        if layout == "list":
            return list(leaves)
        return {"a": [leaves[0]], "b": {"c": list(leaves[1:])}}

    return build(ws), build(gs)


def prop_grad_fn(p):
    """Dtype-preserving gradient function. |x| + 1 is rounded once whatever XLA fuses or
    upcasts, so jitted and eager evaluations agree bit for bit."""
    return jax.tree.map(lambda x: (jnp.abs(x) + 1).astype(x.dtype), p)


@functools.partial(jax.jit, static_argnames=("rho", "adaptive", "eta"))
def jitted_sam_recording(params, grads, rho, adaptive, eta=0.01):
    """One sam update at params and one at zeros_like(params), same clean grads (jitted once:
    eager mode would compile every op for every drawn shape). Returns, for each, the output,
    the state and the params grad_fn was called at (w + ε)."""

    def one(w):
        seen = []

        def grad_fn(p):
            seen.append(p)
            return prop_grad_fn(p)

        tx = sharpax.sam(rho, adaptive=adaptive, eta=eta)
        out, state = tx.update(grads, tx.init(w), w, grad_fn=grad_fn)
        assert len(seen) == 1
        return out, state, seen[0]

    return one(params), one(jax.tree.map(jnp.zeros_like, params))


def numpy_perturbation(params, grads, rho, adaptive, eta):
    """ε from the papers in float64 NumPy, leaf by leaf (values as stored in each dtype)."""
    ws = [np.asarray(w, np.float64) for w in leaves_of(params)]
    gs = [np.asarray(g, np.float64) for g in leaves_of(grads)]
    ts = [np.abs(w) + eta if adaptive else np.ones_like(w) for w in ws]
    norm = np.sqrt(sum(np.sum((t * g) ** 2) for t, g in zip(ts, gs)))
    return [rho * t * t * g / (norm + 1e-12) for t, g in zip(ts, gs)], ts


def prop_settings(n):
    return hypothesis.settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )


@prop_settings(25)
@hypothesis.given(tree=pytrees(), rho=st.floats(0.01, 1.0), adaptive=st.booleans())
def test_property_tree_dtypes_finite_and_perturbation(tree, rho, adaptive):
    """Output has the params' structure, shapes and dtypes and is finite; grad_fn is called at
    w + ε with ε the paper's formula (element-wise, up to rounding in each leaf's dtype) and
    ‖ε‖ = ρ (SAM) or ‖ε / T‖ = ρ (ASAM, T = |w| + η)."""
    params, grads = tree
    eta = 0.01
    (out, state, perturbed), (_, _, perturbed0) = jitted_sam_recording(
        params, grads, rho, adaptive, eta
    )
    assert jax.tree.structure(out) == jax.tree.structure(params)
    assert jax.tree.structure(perturbed) == jax.tree.structure(params)
    for o, wp, w in zip(leaves_of(out), leaves_of(perturbed), leaves_of(params)):
        assert o.shape == w.shape and o.dtype == w.dtype
        assert wp.shape == w.shape and wp.dtype == w.dtype
    assert all_finite(out) and all_finite(perturbed)
    assert int(state.count) == 1 and int(state.num_sam_steps) == 1

    # (a) Element-wise against the formula. ε is rounded to the dtype, then w + ε rounded
    # again: |d − ε| ≤ u·(|ε| + |w + ε|) + subnormal (+ float32 slack for the norm).
    eps_ref, ts = numpy_perturbation(params, grads, rho, adaptive, eta)
    sq, err_sq = 0.0, 0.0
    for wp, w, e, t in zip(leaves_of(perturbed), leaves_of(params), eps_ref, ts):
        w64 = np.asarray(w, np.float64)
        d = np.asarray(wp, np.float64) - w64
        fi = jnp.finfo(w.dtype)
        bound = float(fi.eps) * (np.abs(e) + np.abs(w64 + e)) + float(fi.smallest_subnormal)
        bound = bound + 1e-5 * np.abs(e)
        assert np.all(np.abs(d - e) <= bound), (w.dtype, np.max(np.abs(d - e) - bound))
        sq += float(np.sum((d / t) ** 2))
        err_sq += float(np.sum((bound / t) ** 2))
    # (b) The norm of what grad_fn actually received, with the same rounding budget.
    assert abs(np.sqrt(sq) - rho) <= np.sqrt(err_sq) + 1e-5 * rho

    # (c) At w = 0 rounding cannot hide ε (w + ε = ε), so the norm check is tight in every
    # dtype: ‖ε / T‖ = ρ within a few units in the last place of the coarsest dtype.
    t0 = eta if adaptive else 1.0
    norm0 = np.sqrt(sum(np.sum((np.asarray(x, np.float64) / t0) ** 2)
                        for x in leaves_of(perturbed0)))
    u_max = max(float(jnp.finfo(x.dtype).eps) for x in leaves_of(params))
    sub_max = max(float(jnp.finfo(x.dtype).smallest_subnormal) for x in leaves_of(params))
    n_total = sum(x.size for x in leaves_of(params))
    tol0 = 2 * u_max * rho + np.sqrt(n_total) * sub_max / t0 + 1e-6  # float16 subnormals
    assert abs(norm0 - rho) <= tol0, (norm0, rho, tol0)


@prop_settings(10)
@hypothesis.given(tree=pytrees(), adaptive=st.booleans())
def test_property_rho_zero_returns_grad_fn_at_params_exactly(tree, adaptive):
    params, grads = tree
    (out, _, perturbed), _ = jitted_sam_recording(params, grads, 0.0, adaptive)
    expected = jax.jit(prop_grad_fn)(params)
    for o, e, wp, w in zip(
        leaves_of(out), leaves_of(expected), leaves_of(perturbed), leaves_of(params)
    ):
        assert o.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(wp, np.float32), np.asarray(w, np.float32))
        np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(e, np.float32))
