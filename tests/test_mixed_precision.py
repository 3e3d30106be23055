"""Every sharpax method with bfloat16 and float16 params and gradients.

Each transform runs a few steps on a tiny nonlinear least-squares problem, params and data
stored in a half-precision dtype, every gradient computed in that dtype. At each step its
output must keep the params' dtype, be finite, and agree with a hand-written NumPy float64
reference of the algorithm evaluated at the params and data *as stored* (so rounding does
not accumulate along the trajectory), within 8 units of the dtype's eps relative to the
output's scale. The radius is large (``RHO = 0.5``) so that the SAM gradient differs from
the clean one by more than twice that tolerance: each check also asserts that it could tell
the method from plain gradient descent (or from what a wrong branch would return).
The float16 range tests give gradients whose squares overflow (|g| = 300) or underflow
(|g| = 1e-4) float16: norms and inner products must be accumulated in float32.

Already covered elsewhere and not repeated: SAM's and ASAM's perturbation in every dtype
(tests/test_sam.py property tests), GSAM and MSAM keeping bf16 (test_gsam.py,
test_msam.py), LookSAM / vSAM caches in float32 (test_scheduled_presets.py), SAF's bf16
buffer (test_saf.py), MESA's float32 EMA of bf16 variables (test_mesa.py).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpax

HALF = (jnp.bfloat16, jnp.float16)
RHO = 0.5
N_EX, D_IN, D_OUT = 8, 3, 2
# Max error / max |reference| allowed, in units of the dtype's eps (2^-7 bf16, 2^-10 f16).
# Measured worst case over the cases below: 4.3 eps (bf16: ESAM's weight perturbation of
# radius rho / beta = 1 and LookSAM's reuse step, whose ‖g‖/‖g_v‖ amplifies the rounding of
# g_v = g_s − proj(g_s)); typical 0.3-1.5 eps.
TOL_EPS = 8.0


def tol(dtype) -> float:
    return TOL_EPS * float(jnp.finfo(dtype).eps)


def stored(x) -> np.ndarray:
    """The values of a jax array as stored, in float64."""
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def tmap(f, *trees):
    return {k: f(*(t[k] for t in trees)) for k in trees[0]}


def np_dot(a, b) -> float:
    return float(sum(np.sum(a[k] * b[k]) for k in a))


def np_norm(a) -> float:
    return float(np.sqrt(np_dot(a, a)))


# ------------------------------------------------------------------------------- the problem
# l_i(w, b) = ½‖tanh(x_i w) + b − y_i‖², L = mean_i l_i.


def make_problem(dtype, seed=0, steps=4):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(D_IN, D_OUT)), dtype),
        "b": jnp.asarray(0.3 * rng.normal(size=(D_OUT,)), dtype),
    }
    batches = []
    for _ in range(steps):
        x = rng.normal(size=(N_EX, D_IN)) * rng.uniform(0.3, 2.0, size=(N_EX, 1))
        batches.append((jnp.asarray(x, dtype), jnp.asarray(rng.normal(size=(N_EX, D_OUT)), dtype)))
    return params, batches


def losses_fn(p, batch):
    x, y = batch
    r = jnp.tanh(x @ p["w"]) + p["b"] - y
    return 0.5 * jnp.sum(r * r, axis=1)


def loss_fn(p, batch):
    return jnp.mean(losses_fn(p, batch))


def np_losses(p, batch):
    x, y = batch
    r = np.tanh(x @ p["w"]) + p["b"] - y
    return 0.5 * np.sum(r * r, axis=1)


def np_grad(p, batch, idx=None):
    x, y = batch
    if idx is not None:
        x, y = x[idx], y[idx]
    t = np.tanh(x @ p["w"])
    r = t + p["b"] - y
    return {"w": x.T @ (r * (1 - t * t)) / len(x), "b": r.mean(axis=0)}


def np_sam_eps(p, g, rho=RHO, adaptive=False, eta=0.01):
    if adaptive:
        t = tmap(lambda w: np.abs(w) + eta, p)
        norm = np_norm(tmap(lambda a, b: a * b, t, g))
        return tmap(lambda tt, gg: rho * tt * tt * gg / norm, t, g)
    norm = np_norm(g)
    return tmap(lambda gg: rho * gg / norm, g)


def np_at(p, eps):
    return tmap(lambda a, b: a + b, p, eps)


def np_sam_grad(p, batch, **kw):
    return np_grad(np_at(p, np_sam_eps(p, np_grad(p, batch), **kw)), batch)


# ------------------------------------------------------------------------------- the driver


@functools.partial(jax.jit, static_argnums=0, static_argnames=("sam_step",))
def _update(tx, state, params, batch, sam_step=None):
    grads = jax.grad(loss_fn)(params, batch)
    extra = {"grad_fn": lambda p: jax.grad(loss_fn)(p, batch)}
    if sam_step is not None:
        extra["sam_step"] = sam_step
    return (grads, *tx.update(grads, state, params, **extra))


def check(out, ref, dtype, alternatives=()):
    """``out`` has ``dtype``, is finite and is within tolerance of ``ref``, and not of any
    of ``alternatives`` (e.g. the plain gradient): the comparison can tell them apart."""
    for k in ref:
        assert out[k].dtype == dtype, (k, out[k].dtype)
    got = tmap(stored, out)
    assert all(np.all(np.isfinite(v)) for v in got.values())
    scale = max(float(np.max(np.abs(v))) for v in ref.values())
    err = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
    assert err <= tol(dtype) * scale, (err / scale / float(jnp.finfo(dtype).eps), "eps")
    for alt in alternatives:
        gap = max(float(np.max(np.abs(alt[k] - ref[k]))) for k in ref)
        # Beyond twice the tolerance, ``out`` cannot be within it of both.
        assert gap > 2 * tol(dtype) * scale, "the reference is not distinguishable"


def descend(params, updates, lr=0.1):
    return optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))


def run_steps(tx, dtype, reference, sam_steps=None, steps=4, seed=0):
    """Runs ``tx`` and checks each step's output against ``reference(t, p, batch, state_ref)``,
    which returns ``(expected, alternatives, state_ref)``. Returns the final state."""
    params, batches = make_problem(dtype, seed, steps)
    state = tx.init(params)
    ref_state = None
    for t in range(steps):
        sam_step = None if sam_steps is None else sam_steps[t]
        _, out, state = _update(tx, state, params, batches[t], sam_step=sam_step)
        p64, b64 = tmap(stored, params), tuple(map(stored, batches[t]))
        expected, alts, ref_state = reference(t, p64, b64, ref_state)
        check(out, expected, dtype, alts)
        params = descend(params, out)
    return state


# ------------------------------------------------------------------------------- SAM family


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_and_asam(dtype, adaptive):
    def ref(t, p, b, _):
        return np_sam_grad(p, b, adaptive=adaptive), [np_grad(p, b)], None

    run_steps(sharpax.sam(RHO, adaptive=adaptive), dtype, ref)


@pytest.mark.parametrize("dtype", HALF)
def test_gsam(dtype):
    alpha = 0.8

    def ref(t, p, b, _):
        g, gs = np_grad(p, b), np_sam_grad(p, b)
        coef = np_dot(g, gs) / np_dot(gs, gs)
        d = tmap(lambda s, gg: s - alpha * (gg - coef * s), gs, g)
        return d, [g, gs], None

    run_steps(sharpax.gsam(RHO, alpha=alpha), dtype, ref)


@pytest.mark.parametrize("dtype", HALF)
def test_esam_data_selection(dtype):
    """gamma = 0.5: the gradient at w + ε of the 4 examples whose loss rose most.

    Rises closer than the rounding of the losses may be ordered either way: the output
    must be the gradient of a subset S with min rise(S) ≥ max rise(rest) − that margin."""
    tx = sharpax.esam(RHO, beta=1.0, gamma=0.5)
    update = jax.jit(lambda g, s, p, bt: tx.update(g, s, p, loss_fn=losses_fn, batch=bt))
    params, batches = make_problem(dtype, seed=3)
    state = tx.init(params)
    subsets = [list(c) for c in itertools.combinations(range(N_EX), N_EX // 2)]
    for batch in batches:
        out, state = update(jax.grad(loss_fn)(params, batch), state, params, batch)
        p, b = tmap(stored, params), tuple(map(stored, batch))
        eps = np_sam_eps(p, np_grad(p, b))
        after = np_losses(np_at(p, eps), b)
        rise = after - np_losses(p, b)
        margin = 8 * float(jnp.finfo(dtype).eps) * np.max(after)
        cands = [np_grad(np_at(p, eps), b, sub) for sub in subsets]
        got = tmap(stored, out)
        best = int(np.argmin([max(np.max(np.abs(got[k] - c[k])) for k in c) for c in cands]))
        rest = np.setdiff1d(np.arange(N_EX), subsets[best])
        assert rise[subsets[best]].min() >= rise[rest].max() - margin, (rise, subsets[best])
        check(out, cands[best], dtype, [np_grad(p, b), np_sam_grad(p, b)])
        params = descend(params, out)


@pytest.mark.parametrize("dtype", HALF)
def test_esam_weight_perturbation_is_one_of_the_masked_perturbations(dtype):
    """beta = 0.5: each tensor is perturbed or not; the output is the gradient at
    w + (rho/beta)·m⊙g/‖m⊙g‖ for one of the 4 masks m (none: the plain gradient)."""
    beta = 0.5
    masks = [(False, False), (True, False), (False, True), (True, True)]

    def candidates(p, b):
        g = np_grad(p, b)
        out = []
        for mw, mb in masks:
            m = {"w": g["w"] * mw, "b": g["b"] * mb}
            n = np_norm(m)
            eps = tmap(lambda x: (RHO / beta) * x / n if n > 0 else 0 * x, m)
            out.append(np_grad(np_at(p, eps), b))
        return out

    tx = sharpax.esam(RHO, beta=beta, gamma=1.0, seed=1)
    params, batches = make_problem(dtype, seed=1, steps=6)
    state = tx.init(params)
    seen = set()
    for batch in batches:
        _, out, state = _update(tx, state, params, batch)
        cands = candidates(tmap(stored, params), tuple(map(stored, batch)))
        got = tmap(stored, out)
        errs = [max(float(np.max(np.abs(got[k] - c[k]))) for k in c) for c in cands]
        best = int(np.argmin(errs))
        check(out, cands[best], dtype)  # two masks may give gradients closer than rounding
        seen.add(best)
        params = descend(params, out)
    assert len(seen) >= 2  # the draws do change the mask


# ------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("dtype", HALF)
def test_looksam(dtype):
    """k = 2: SAM steps 0 and 2 cache g_v; steps 1 and 3 add alpha·‖g‖/‖g_v‖·g_v."""
    alpha = 0.7

    def ref(t, p, b, g_v):
        g = np_grad(p, b)
        if t % 2 == 0:
            gs = np_sam_grad(p, b)
            coef = np_dot(gs, g) / np_dot(g, g)
            return gs, [g], tmap(lambda s, gg: s - coef * gg, gs, g)
        scale = alpha * np_norm(g) / np_norm(g_v)
        return tmap(lambda gg, v: gg + scale * v, g, g_v), [g], g_v

    state = run_steps(sharpax.looksam(RHO, k=2, alpha=alpha), dtype, ref)
    assert int(sharpax.num_sam_steps(state)) == 2
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.reuse.g_v))


@pytest.mark.parametrize("dtype", HALF)
def test_vsam_reuse_steps_add_the_decayed_psf(dtype):
    """Host-dispatched SAM step, then two reuse steps: g + 0.7·psf, g + 0.49·psf."""

    def ref(t, p, b, psf):
        g = np_grad(p, b)
        if t == 0:
            gs = np_sam_grad(p, b)
            return gs, [g], tmap(lambda s, gg: s - gg, gs, g)
        w = 0.7**t
        return tmap(lambda gg, q: gg + w * q, g, psf), [g], psf

    tx = sharpax.vsam(RHO, window=4, blocks=2, reuse_decay=0.7, max_reuse=6)
    state = run_steps(tx, dtype, ref, sam_steps=[True, False, False], steps=3)
    assert int(sharpax.num_sam_steps(state)) == 1
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state.reuse.psf))
    assert int(state.schedule.num_recorded) == 1
    n = float(state.schedule.psf_norms[-1])  # ‖psf‖ of the SAM step, finite and positive
    assert np.isfinite(n) and n > 0


@pytest.mark.parametrize("dtype", HALF)
def test_ae_sam_decides_from_the_gradient_norm(dtype):
    """On device (lax.cond): SAM iff ‖g‖² ≥ μ + c_t σ (float64 EMA reference), else g."""
    decay, total = 0.5, 6

    def ref(t, p, b, stats):
        mu, var = stats or (0.0, np.exp(-10.0))
        g = np_grad(p, b)
        s = np_dot(g, g)
        mu = decay * mu + (1 - decay) * s
        var = decay * var + (1 - decay) * (s - mu) ** 2
        frac = min(t / total, 1.0)
        threshold = mu + (frac * -1.0 + (1 - frac) * 1.0) * np.sqrt(var)
        assert abs(s - threshold) > 0.05 * s  # a decision far from a tie
        decisions.append(s >= threshold)
        return (np_sam_grad(p, b) if s >= threshold else g), [], (mu, var)

    decisions = []
    tx = sharpax.ae_sam(RHO, total_steps=total, decay=decay)
    state = run_steps(tx, dtype, ref, steps=total, seed=5)
    assert int(sharpax.num_sam_steps(state)) == sum(decisions)
    assert 0 < sum(decisions) < total  # both kinds of step were checked


@pytest.mark.parametrize("dtype", HALF)
def test_ss_sam_and_scheduled_sam(dtype):
    """SS-SAM with p(t) = 1 on even steps, 0 on odd ones (plain g); and scheduled_sam with
    every_k(2) and decayed_psf(0.5, 1): reuse steps return g + 0.5·psf."""
    alternate = lambda t: jnp.where(t % 2 == 0, 1.0, 0.0)

    def ref_ss(t, p, b, _):
        g = np_grad(p, b)
        return (np_sam_grad(p, b), [g], None) if t % 2 == 0 else (g, [np_sam_grad(p, b)], None)

    state = run_steps(sharpax.ss_sam(RHO, probability=alternate), dtype, ref_ss)
    assert int(sharpax.num_sam_steps(state)) == 2

    def ref_sched(t, p, b, psf):
        g = np_grad(p, b)
        if t % 2 == 0:
            gs = np_sam_grad(p, b)
            return gs, [g], tmap(lambda s, gg: s - gg, gs, g)
        return tmap(lambda gg, q: gg + 0.5 * q, g, psf), [g], psf

    tx = sharpax.scheduled_sam(
        RHO,
        schedule=sharpax.schedules.every_k(2),
        reuse=sharpax.reuse_rules.decayed_psf(decay=0.5, max_reuse=1),
    )
    assert int(sharpax.num_sam_steps(run_steps(tx, dtype, ref_sched))) == 2


# ------------------------------------------------------------------------------- MSAM


@pytest.mark.parametrize("dtype", HALF)
def test_msam(dtype):
    """v ← μv + d, f = ρ/‖v‖, update = f_old·v_old − lr·v − f·v, in float64 from the
    half-precision gradients as stored; the momentum stays float32."""
    lr, rho, mom = 0.1, 0.5, 0.9
    tx = sharpax.msam(lr, rho=rho, momentum=mom)
    params, batches = make_problem(dtype, seed=2)
    state = tx.init(params)
    v, f = tmap(np.zeros_like, tmap(stored, params)), 0.0
    for batch in batches:
        d = jax.grad(loss_fn)(params, batch)
        out, state = jax.jit(tx.update)(d, state, params)
        v_old, f_old = v, f
        v = tmap(lambda m, g: mom * m + g, v, tmap(stored, d))
        f = rho / np_norm(v)
        expected = tmap(lambda a, b: f_old * a - (lr + f) * b, v_old, v)
        # Computed in float32 and rounded once: it must differ from momentum SGD's step.
        check(out, expected, dtype, [tmap(lambda b: -lr * b, v)])
        assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(state.momentum))
        params = optax.apply_updates(params, out)


# ------------------------------------------------------------------------------- SAF / MESA
# A linear softmax classifier z = x W (half precision), cross-entropy in float32.

TAU, WEIGHT, C = 2.0, 0.5, 3


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_term_and_grad(x, z, ref):
    """WEIGHT·mean_b τ²·KL(softmax(ref/τ) ‖ softmax(z/τ)) and its gradient w.r.t. W."""
    p, q = np_softmax(ref / TAU), np_softmax(z / TAU)
    kl = TAU**2 * np.sum(p * (np.log(p) - np.log(q)), axis=1)
    dz = WEIGHT * TAU * (q - p) / len(z)
    return WEIGHT * kl.mean(), x.T @ dz


def classifier(dtype, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(D_IN, C)), dtype)
    x = jnp.asarray(2 * rng.normal(size=(N_EX, D_IN)), dtype)
    labels = jnp.asarray(rng.integers(0, C, N_EX), jnp.int32)
    return w, x, labels


def ce_task(w, batch):
    logits = batch["x"] @ w
    onehot = jax.nn.one_hot(batch["label"], C)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot).mean()
    return loss, {"logits": logits, "labels": batch["label"]}


def np_ce_grad(x, z, labels):
    return x.T @ (np_softmax(z) - np.eye(C)[labels]) / len(z)


def check_term_and_grad(loss, out, grads, x, z_ref, dtype):
    """The term and the gradient of loss + term against float64, from the logits as computed."""
    z, labels = stored(out.aux["logits"]), np.asarray(out.aux["labels"])
    term, dw = np_term_and_grad(x, z, z_ref)
    assert out.term.dtype == jnp.float32 and np.isfinite(float(loss))
    np.testing.assert_allclose(float(out.term), term, rtol=tol(dtype))
    ce = np_ce_grad(x, z, labels)
    check({"w": grads}, {"w": dw + ce}, dtype, [{"w": ce}])


@pytest.mark.parametrize("dtype", HALF)
def test_with_saf_half_params_and_buffer(dtype):
    """Buffer in the params' dtype: epoch 1's term reads the logits of epoch 0 as stored."""
    traj = sharpax.saf(N_EX, C, lag=1, start_epoch=0, temperature=TAU, weight=WEIGHT, dtype=dtype)
    f = sharpax.with_saf(ce_task, traj, ids_fn=lambda b: b["id"])
    f = jax.jit(jax.value_and_grad(f, has_aux=True))
    w0, x, labels = classifier(dtype, 7)
    batch = {"x": x, "label": labels, "id": jnp.arange(N_EX)}
    (_, out0), _ = f(w0, traj.init(), batch, 0)
    assert out0.state.logits.dtype == dtype and float(out0.term) == 0.0
    written = stored(out0.state.logits[:, 0])
    np.testing.assert_array_equal(written, stored(out0.aux["logits"]))  # stored as computed
    w1 = w0 + jnp.asarray(np.random.default_rng(9).normal(size=w0.shape), dtype)
    (loss, out1), grads = f(w1, out0.state, batch, 1)
    check_term_and_grad(loss, out1, grads, stored(x), written, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_with_mesa_half_params_float32_teacher(dtype):
    """The EMA of half-precision params is float32; the term and gradient use its logits."""
    teacher = sharpax.mesa(0.5, start_epoch=0, temperature=TAU, weight=WEIGHT)
    w0, x, labels = classifier(dtype, 8)
    batch = {"x": x, "label": labels}
    w1 = w0 + jnp.asarray(np.random.default_rng(9).normal(size=w0.shape), dtype)
    state = teacher.update(teacher.init(w0), w1)
    assert state.ema.dtype == jnp.float32
    ema = 0.5 * stored(w0) + 0.5 * stored(w1)
    np.testing.assert_allclose(stored(state.ema), ema, rtol=1e-6)
    f = sharpax.with_mesa(ce_task, teacher, lambda e, b: b["x"].astype(jnp.float32) @ e)
    (loss, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(w1, state, batch, 0)
    check_term_and_grad(loss, out, grads, stored(x), stored(x) @ ema, dtype)


# ------------------------------------------------------------------------------- range
# float16's range: |g| = 300 squares past its max (65504), |g| = 1e-4 squares below its
# smallest subnormal (6e-8). A norm or inner product accumulated in float16 would be inf
# or 0 and ε would vanish; every transform computes them in float32.

N_BIG = 4096
RANGES = (1e-4, 300.0)


def _range_problem():
    """Params 0, clean gradient c·u, and grad_fn(w + ε) = c·(u + k·roll(ε)), k = ‖u‖/ρ:
    at ε = ρu/‖u‖ it is c·(u + roll(u)). ``c`` is an argument so one compile serves both."""
    rng = np.random.default_rng(11)
    u = rng.uniform(1.0, 2.0, N_BIG) * rng.choice([-1.0, 1.0], N_BIG)
    k = np.linalg.norm(u) / RHO
    u16 = jnp.asarray(u, jnp.float16)

    def grad_fn(p, c):
        return (c * (u16 + k * jnp.roll(p, 1))).astype(p.dtype)

    return jnp.zeros(N_BIG, jnp.float16), u, grad_fn


RANGE_CASES = {
    "sam": (lambda: sharpax.sam(RHO), lambda g, gs: gs),
    "gsam": (
        lambda: sharpax.gsam(RHO, alpha=0.5),
        lambda g, gs: gs - 0.5 * (g - (g @ gs) / (gs @ gs) * gs),
    ),
    "esam": (lambda: sharpax.esam(RHO, beta=1.0, gamma=1.0), lambda g, gs: gs),
    "looksam": (lambda: sharpax.looksam(RHO, k=2), lambda g, gs: gs),
    "vsam": (lambda: sharpax.vsam(RHO, window=4, blocks=2, warmup_steps=1), lambda g, gs: gs),
    "ss_sam": (lambda: sharpax.ss_sam(RHO, probability=1.0), lambda g, gs: gs),
    "ae_sam": (lambda: sharpax.ae_sam(RHO, total_steps=4), None),
}


@pytest.mark.parametrize("name", list(RANGE_CASES))
def test_float16_norms_neither_overflow_nor_underflow(name):
    make, expected_fn = RANGE_CASES[name]
    params, u, grad_fn = _range_problem()
    tx = make()
    update = jax.jit(lambda g, s, p, c: tx.update(g, s, p, grad_fn=lambda q: grad_fn(q, c)))
    for c in RANGES:
        g = jnp.asarray(c * u, jnp.float16)
        out, state = update(g, tx.init(params), params, jnp.float16(c))
        g64, gs64 = stored(g), c * (u + np.roll(u, 1))
        if name == "ae_sam":  # ‖g‖² in float32; the decision follows the float64 rule
            s = float(g64 @ g64)
            np.testing.assert_allclose(float(state.schedule.last_sq_norm), s, rtol=1e-5)
            mu, var = 0.1 * s, 0.9 * np.exp(-10.0) + 0.1 * (0.9 * s) ** 2
            sam = s >= mu + np.sqrt(var)
            assert sam == (c > 1)  # tiny: σ is still the initial e⁻⁵, so no SAM step
            check({"x": out}, {"x": gs64 if sam else g64}, jnp.float16,
                  [{"x": g64 if sam else gs64}])  # fmt: skip
            continue
        check({"x": out}, {"x": expected_fn(g64, gs64)}, jnp.float16, [{"x": g64}])
        if name == "vsam":  # the recorded statistic n = ‖g_s − g‖
            n = np.linalg.norm(gs64 - g64)
            np.testing.assert_allclose(float(state.schedule.psf_norms[-1]), n, rtol=4e-3)
        if name == "looksam":  # the reuse step scales g_v by ‖g‖ / ‖g_v‖ (both in float32)
            out, _ = tx.update(g, state, params, sam_step=False)
            g_v = gs64 - (gs64 @ g64) / (g64 @ g64) * g64
            ref = g64 + 0.7 * np.linalg.norm(g64) / np.linalg.norm(g_v) * g_v
            check({"x": out}, {"x": ref}, jnp.float16, [{"x": g64}])


@pytest.mark.parametrize("c", RANGES, ids=["tiny", "huge"])
def test_float16_asam_and_msam_norms(c):
    params, u, _ = _range_problem()
    g = jnp.asarray(c * u, jnp.float16)
    g64 = stored(g)
    # ASAM at w = 0: T = η, ε = ρ·η·g/‖g‖ (grad_fn returns the point it is called at).
    tx = sharpax.sam(RHO, adaptive=True, eta=0.01)
    eps, _ = tx.update(g, tx.init(params), params, grad_fn=lambda p: p)
    check({"x": eps}, {"x": RHO * 0.01 * g64 / np.linalg.norm(g64)}, jnp.float16)
    # MSAM's first step: v = g, update = −(lr + f)·g with f = ρ/‖g‖ (lr = f: equal parts).
    f = RHO / np.linalg.norm(g64)
    tx = sharpax.msam(f, rho=RHO)
    out, state = tx.update(g, tx.init(params), params)
    check({"x": out}, {"x": -2 * f * g64}, jnp.float16, [{"x": -f * g64}])
    np.testing.assert_allclose(float(state.perturbation_scale), f, rtol=1e-5)
