"""Tests for sharpax.trajectory (what SAF and MESA share): the trajectory KL.

Every numerical check compares against an independent reference: NumPy float64 formulas of
τ²·KL(softmax(ref/τ) ‖ softmax(z/τ)) and its gradient τ·(softmax(z/τ) − softmax(ref/τ)).
The references, the linear task loss and the end-to-end training harness defined here are
shared with tests/test_saf.py and tests/test_mesa.py (imported from this module).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from sharpax import trajectory as tr

TAU, WEIGHT = 5.0, 0.3


# ------------------------------------------------------------------------------------------------
# Independent references (NumPy, float64)
# ------------------------------------------------------------------------------------------------


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_traj_kl(z, ref, tau):
    """τ² Σ_c p_c (log p_c − log q_c), p = softmax(ref/τ), q = softmax(z/τ)."""
    p = np_softmax(np.asarray(ref, np.float64) / tau)
    q = np_softmax(np.asarray(z, np.float64) / tau)
    return tau**2 * np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def np_traj_kl_grad(z, ref, tau):
    """d/dz of τ²·KL = τ (softmax(z/τ) − softmax(ref/τ)) (per row)."""
    return tau * (np_softmax(np.asarray(z, np.float64) / tau) - np_softmax(np.asarray(ref) / tau))


def as_stored(x, dtype):
    """What a buffer of ``dtype`` holds for ``x`` (rounded by ml_dtypes, not by the code)."""
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    return np.asarray(x, np.float32).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# trajectory_kl
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 5.0])
def test_trajectory_kl_matches_numpy(tau):
    rng = np.random.default_rng(0)
    z, ref = rng.normal(size=(2, 6, 7)).astype(np.float32) * 4
    out = tr.trajectory_kl(jnp.asarray(z), jnp.asarray(ref), tau)
    assert out.shape == (6,) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, np_traj_kl(z, ref, tau), rtol=1e-5, atol=1e-6)
    # Direction matters: KL(p_ref ‖ q_z), not KL(q_z ‖ p_ref).
    assert not np.allclose(np_traj_kl(z, ref, tau), np_traj_kl(ref, z, tau), rtol=1e-3)
    np.testing.assert_allclose(tr.trajectory_kl(z, z, tau), 0.0, atol=1e-6)


def test_trajectory_kl_gradient_and_stop_gradient():
    rng = np.random.default_rng(1)
    tau = 5.0
    z, ref = rng.normal(size=(2, 4, 5)).astype(np.float32) * 3
    gz, gref = jax.jit(jax.grad(lambda a, b: jnp.sum(tr.trajectory_kl(a, b, tau)), argnums=(0, 1)))(
        jnp.asarray(z), jnp.asarray(ref)
    )
    np.testing.assert_allclose(gz, np_traj_kl_grad(z, ref, tau), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gref, 0.0)


def test_trajectory_kl_bf16_inputs_computed_in_float32():
    rng = np.random.default_rng(2)
    z, ref = rng.normal(size=(2, 3, 9)).astype(np.float32) * 6
    zb, rb = jnp.asarray(z, jnp.bfloat16), jnp.asarray(ref, jnp.bfloat16)
    out = tr.trajectory_kl(zb, rb, 5.0)
    assert out.dtype == jnp.float32
    expected = np_traj_kl(as_stored(z, ml_dtypes.bfloat16), as_stored(ref, ml_dtypes.bfloat16), 5.0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)


def test_trajectory_kl_errors_and_masked_reference_class():
    with pytest.raises(ValueError, match="same shape"):
        tr.trajectory_kl(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="temperature"):
        tr.trajectory_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 0.0)
    # A -inf reference logit is a zero-probability class: contributes 0, not NaN.
    ref = jnp.array([[0.0, -jnp.inf, 1.0]])
    z = jnp.array([[0.5, 0.0, 0.0]])
    out, g = jax.jit(jax.value_and_grad(lambda a: tr.trajectory_kl(a, ref, 2.0).sum()))(z)
    p = np_softmax(np.array([0.0, 1.0]) / 2.0)  # reference mass on classes 0 and 2 only
    q = np_softmax(np.array([0.5, 0.0, 0.0]) / 2.0)[[0, 2]]
    assert np.isfinite(out) and np.all(np.isfinite(g))
    np.testing.assert_allclose(out, 4.0 * np.sum(p * np.log(p / q)), rtol=1e-5)



# ------------------------------------------------------------------------------------------------
# Shared by the SAF and MESA tests: a linear task loss, an end-to-end harness
# ------------------------------------------------------------------------------------------------


def linear_loss(w, batch):
    """Task loss 0.5‖w‖² (gradient w) with logits x @ w in the aux."""
    return 0.5 * jnp.sum(w**2), {"logits": batch["x"] @ w, "tag": 7}



EN, EB, EPOCHS = 96, 16, 6


def make_dataset():
    rng = np.random.default_rng(9)
    centers = rng.normal(size=(3, 4)) * 2.5
    y = np.arange(EN) % 3
    x = (centers[y] + rng.normal(size=(EN, 4))).astype(np.float32)
    return x, y.astype(np.int32)


def data_source(x, y, epoch):
    """Shuffled batches that carry each example's index in the training set."""
    perm = np.random.default_rng(100 + epoch).permutation(EN)
    for k in range(0, EN, EB):
        ids = perm[k : k + EB]
        yield {"x": x[ids], "y": y[ids], "id": ids}


def mlp_init():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (4, 16)) * 0.5, "b1": jnp.zeros(16),
        "w2": jax.random.normal(k2, (16, 3)) * 0.5, "b2": jnp.zeros(3),
    }


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def ce_loss(params, batch):
    logits = mlp(params, batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"logits": logits, "ce": loss}


def train(wrapped, traj_state, after_step, check_batch=None):
    x, y = make_dataset()
    params = mlp_init()
    opt = optax.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, traj_state, batch, epoch):
        (_loss, out), grads = jax.value_and_grad(wrapped, has_aux=True)(
            params, traj_state, batch, epoch
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out

    ce, terms, logged = [], [], []
    for epoch in range(EPOCHS):
        epoch_ce = []
        for batch in data_source(x, y, epoch):
            if check_batch is not None:
                check_batch(batch)  # host boundary, NumPy
            params, opt_state, out = step(params, opt_state, traj_state, batch, jnp.int32(epoch))
            traj_state = after_step(out.state, params)
            epoch_ce.append(float(out.aux["ce"]))
            terms.append((epoch, float(out.term)))
            logged.append((epoch, batch["id"], np.asarray(out.aux["logits"])))
        ce.append(np.mean(epoch_ce))
    return ce, terms, logged, traj_state


def test_a_nan_reference_gives_a_nan_kl_never_zero():
    logits = jnp.array([[1.0, 2.0, 0.5], [0.3, 0.1, 0.2]])
    ref = jnp.array([[jnp.nan, 1.0, 0.0], [0.3, -jnp.inf, 0.2]])
    kl = np.asarray(tr.trajectory_kl(logits, ref, 2.0))
    assert np.isnan(kl[0])  # NaN is reported
    assert np.isfinite(kl[1]) and kl[1] > 0  # a -inf reference logit has probability 0: finite
