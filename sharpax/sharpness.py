"""Sharpness diagnostics: SAM sharpness, Hessian top eigenvalue and loss landscapes.

Pure functions over a ``loss_fn(params) -> scalar`` (close over the batch:
``lambda p: loss(p, batch)``); ``params`` may be any pytree of floating-point
arrays. All three are jit-friendly when ``loss_fn`` is traceable, return
float32 results whatever the params' dtype, and accumulate norms and dot
products in float32.

Called eagerly, each call compiles its loops afresh (``loss_fn`` is usually a
new closure over a new batch). When probing many batches or checkpoints, jit
once with the batch as an argument so the compiled program is reused::

  lam_fn = jax.jit(lambda p, batch, key: sharpax.hessian_top_eigenvalue(
      lambda q: loss(q, batch), p, key=key))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpax import _common

LossFn = Callable[[Any], jax.Array]


def _check_loss_fn(loss_fn: Any, owner: str) -> None:
    if loss_fn is None or not callable(loss_fn):
        raise TypeError(
            f"sharpax.{owner} needs `loss_fn(params) -> scalar loss` (close over the batch, "
            f"e.g. `lambda p: loss(p, batch)`); got loss_fn={loss_fn!r}."
        )


def _check_params(params: Any, owner: str) -> Any:
    """Validates params and returns them with every leaf as a jax array."""
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError(
            f"sharpax.{owner} needs params with at least one array leaf, got {params!r}."
        )
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"sharpax.{owner} needs floating-point params; got a leaf of dtype "
                f"{jnp.result_type(leaf)} and shape {jnp.shape(leaf)}."
            )
    return jax.tree.map(jnp.asarray, params)


def _check_key(key: Any, owner: str) -> None:
    """Accepts a typed key (``jax.random.key``) or a raw uint32[2] key (``PRNGKey``)."""
    hint = "e.g. `key=jax.random.key(0)` (or a raw `jax.random.PRNGKey(0)`)"
    if key is None:
        raise TypeError(f"sharpax.{owner} needs a PRNG key, {hint}; got key=None.")
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise TypeError(
                f"sharpax.{owner} needs a single PRNG key, got a key array of shape {shape}."
            )
        return
    if (
        isinstance(key, (jax.Array, np.ndarray))
        and np.dtype(dtype) == np.uint32
        and tuple(shape) == (2,)
    ):
        return
    described = (
        f"an array of dtype {dtype} and shape {tuple(shape)}"
        if dtype is not None and shape is not None
        else f"{key!r} of type {type(key).__name__}"
    )
    raise TypeError(
        f"sharpax.{owner} needs a PRNG key, {hint}; got {described}. An int seed is not a "
        "key: wrap it with jax.random.key(seed)."
    )


def _loss32(loss_fn: LossFn, params: Any) -> jax.Array:
    return jnp.asarray(loss_fn(params)).astype(jnp.float32)


def sam_sharpness(
    loss_fn: LossFn,
    params: Any,
    rho: float | jax.Array = 0.05,
    *,
    eps: float = 1e-12,
) -> jax.Array:
    r"""SAM sharpness: the loss increase after SAM's ascent step of radius ``rho``.

    Computes ``L(θ + ε) − L(θ)`` with ``ε = rho · g / (‖g‖₂ + eps)`` and
    ``g = ∇L(θ)``, the quantity SAM minimises the maximum of (Foret et al.
    2021, Eq. 1, with the first-order solution of the inner maximisation).
    The norm is the global L2 norm over the whole pytree, computed in float32.
    Evaluated on a mini-batch of ``m`` examples it is the m-sharpness of that
    batch; average it over batches for a data-set figure.

    Args:
      loss_fn: ``loss_fn(params) -> scalar`` (close over the batch).
      params: pytree of floating-point arrays, the point θ.
      rho: non-negative neighbourhood radius.
      eps: added to ``‖g‖`` so a zero gradient gives ``ε = 0`` and a
        sharpness of exactly 0 (no NaN).

    Returns:
      A float32 scalar ``L(θ + ε) − L(θ)`` (both losses cast to float32 before
      the subtraction). Usually ≥ 0; it can be negative far from a minimum or
      for a large ``rho``.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * w ** 2)
      >>> w = jnp.array([1.0, 0.0])  # gradient (4, 0): ε = (0.1, 0)
      >>> print(f"{float(sharpax.sam_sharpness(loss, w, rho=0.1)):.2f}")
      0.42

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021

      Keskar et al., `On Large-Batch Training for Deep Learning: Generalization
      Gap and Sharp Minima <https://arxiv.org/abs/1609.04836>`_, 2017
    """
    _check_loss_fn(loss_fn, "sam_sharpness")
    params = _check_params(params, "sam_sharpness")
    _common.check_non_negative("rho", rho, schedule=False)
    _common.check_non_negative("eps", eps, schedule=False)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    eps_tree = _common.perturbation(grads, params, rho, eps=eps)
    perturbed = _loss32(loss_fn, optax.apply_updates(params, eps_tree))
    return perturbed - jnp.asarray(loss).astype(jnp.float32)


def hessian_top_eigenvalue(
    loss_fn: LossFn,
    params: Any,
    *,
    num_iters: int = 20,
    key: jax.Array,
    tol: float | None = None,
    return_eigenvector: bool = False,
) -> jax.Array | tuple[jax.Array, Any]:
    r"""Largest-magnitude Hessian eigenvalue λmax by power iteration.

    Runs power iteration on Hessian-vector products ``Hv`` computed
    forward-over-reverse, ``jax.jvp(jax.grad(loss_fn), (params,), (v,))``,
    so the Hessian is never formed (memory ≈ two gradients). The start vector
    is standard Gaussian from ``key`` (one ``jax.random.split`` sub-key per
    leaf), normalised to unit global norm. Each iteration computes
    ``w = Hv``, the Rayleigh quotient ``λ = vᵀw`` and the next
    ``v = w / ‖w‖``, as in PyHessian (Yao et al. 2020).

    Power iteration converges to the eigenvalue of largest *magnitude*; the
    returned Rayleigh quotient keeps its sign, so at a saddle with a large
    negative curvature the result is negative. Convergence is geometric in
    ``|λ₂/λ₁|``: with no eigen-gap (e.g. eigenvalues ``+a`` and ``−a``) the
    estimate lies between them. Vector arithmetic (norms, dots) is in float32;
    the HVP itself runs in the params' dtype (the tangent is cast to each
    leaf's dtype), so bfloat16 params give a bfloat16-accurate estimate.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, twice differentiable (close over
        the batch).
      params: pytree of floating-point arrays where the Hessian is taken.
      num_iters: maximum number of Hessian-vector products (iterations).
      key: PRNG key for the random start vector.
      tol: if given, stop early once the relative change of the Rayleigh
        quotient, ``|λ − λ_prev| / (|λ_prev| + 1e-6)``, is below ``tol``
        (uses ``lax.while_loop``); if None, run exactly ``num_iters``
        iterations (``lax.fori_loop``).
      return_eigenvector: if True, also return the unit-norm eigenvector
        estimate ``v`` (a pytree like ``params`` with float32 leaves) whose
        Rayleigh quotient is the returned eigenvalue.

    Returns:
      A float32 scalar λmax, or ``(λmax, v)`` if ``return_eigenvector``. A zero
      Hessian gives 0.

    Examples:
      >>> import jax, jax.numpy as jnp, sharpax
      >>> loss = lambda p: 1.5 * jnp.sum(p["a"] ** 2) + 0.5 * jnp.sum(p["b"] ** 2)
      >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
      >>> lam = sharpax.hessian_top_eigenvalue(loss, params, key=jax.random.key(0))
      >>> print(f"{float(lam):.3f}")
      3.000

    References:
      Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
      <https://arxiv.org/abs/1912.07145>`_, 2020

      Keskar et al., `On Large-Batch Training for Deep Learning: Generalization
      Gap and Sharp Minima <https://arxiv.org/abs/1609.04836>`_, 2017
    """
    _check_loss_fn(loss_fn, "hessian_top_eigenvalue")
    params = _check_params(params, "hessian_top_eigenvalue")
    num_iters = _common.check_positive_int("num_iters", num_iters)
    _check_key(key, "hessian_top_eigenvalue")
    if tol is not None:
        _common.check_non_negative("tol", tol, schedule=False)

    grad_fn = jax.grad(loss_fn)

    # Not optax.second_order.hvp: it is deprecated (removed in optax 0.2.9) and takes a
    # raveled vector and a (params, inputs, targets) loss. This is the same product,
    # forward-over-reverse, on pytrees and any closed-over loss.
    def hvp(v: Any) -> Any:
        tangent = optax.tree.cast_like(v, params)
        hv = jax.jvp(grad_fn, (params,), (tangent,))[1]
        return optax.tree.cast(hv, jnp.float32)

    v0 = _normalize(optax.tree.random_like(key, params, jax.random.normal, dtype=jnp.float32))
    zero = jnp.zeros([], jnp.float32)

    # carry: (iteration, v for the next HVP, v of the latest λ, latest λ, previous λ)
    def step(carry):
        i, v, _, lam, _ = carry
        hv = hvp(v)
        new_lam = _common.vdot32(v, hv)
        hv_norm = _common.global_norm(hv)
        # Zero Hv (zero curvature along v): keep v rather than dividing by 0.
        scale = _common.safe_div(1.0, hv_norm)
        next_v = jax.tree.map(lambda x, y: jnp.where(hv_norm > 0, scale * x, y), hv, v)
        return i + 1, next_v, v, new_lam, lam

    init = (jnp.zeros([], jnp.int32), v0, v0, zero, zero)
    if tol is None:
        carry = jax.lax.fori_loop(0, num_iters, lambda _, c: step(c), init)
    else:

        def cond(carry):
            i, _, _, lam, prev = carry
            converged = jnp.abs(lam - prev) <= tol * (jnp.abs(prev) + 1e-6)
            return (i < num_iters) & ((i < 2) | ~converged)

        carry = jax.lax.while_loop(cond, step, init)
    _, _, eigvec, lam, _ = carry
    if return_eigenvector:
        return lam, eigvec
    return lam


def _normalize(tree: Any) -> Any:
    norm = _common.global_norm(tree)
    inv = _common.safe_div(1.0, norm)
    return jax.tree.map(lambda x: inv * x, tree)


def _direction(params: Any, key: jax.Array, relative: bool) -> Any:
    """One random direction: N(0, I) per leaf, optionally rescaled to each leaf's norm."""
    direction = optax.tree.random_like(key, params, jax.random.normal, dtype=jnp.float32)
    if not relative:
        return direction

    def rescale(d, w):
        w_norm = jnp.linalg.norm(jnp.ravel(w).astype(jnp.float32))
        return d * _common.safe_div(w_norm, jnp.linalg.norm(jnp.ravel(d)))

    return jax.tree.map(rescale, direction, params)


def loss_landscape(
    loss_fn: LossFn,
    params: Any,
    *,
    scales: Sequence[float] | jax.Array,
    num_directions: int,
    key: jax.Array,
    relative: bool = True,
) -> jax.Array:
    r"""Losses along random Gaussian directions: ``L(θ + s·d)`` for each direction and scale.

    For each of ``num_directions`` directions ``d`` and each scale ``s`` in
    ``scales``, evaluates ``loss_fn(θ + s·d)``. Each direction is standard
    Gaussian, drawn leaf by leaf: direction ``i`` uses
    ``jax.random.split(key, num_directions)[i]``, split again into one sub-key
    per leaf (in ``jax.tree.leaves`` order), and
    ``jax.random.normal(sub_key, leaf.shape, float32)``.

    With ``relative=True`` (layer-normalised, Li et al. 2018's filter
    normalisation at the granularity of a params leaf) each leaf's direction
    is rescaled so its norm equals that leaf's weight norm,
    ``d_l ← d_l · ‖w_l‖ / ‖d_l‖``; a scale ``s`` then moves every layer by
    ``s·‖w_l‖``, which makes landscapes comparable across networks whose
    weights differ in scale. Leaves of zero norm (e.g. zero-initialised
    biases) get no perturbation. SAF (Du et al. 2022, Fig. 4) plots the loss
    under such Gaussian perturbations; the seeds' sharpness probe uses
    ``s = 0.07``, i.e. noise of norm 0.07 of each layer's weight norm. With
    ``relative=False`` the perturbation is ``s·d`` with ``d ~ N(0, I)``, i.e.
    i.i.d. Gaussian noise of standard deviation ``s`` on every weight.

    Directions are processed one at a time with ``lax.map`` (and scales one at
    a time within a direction), so memory stays at about one extra copy of
    ``params`` whatever ``num_directions`` and ``len(scales)`` are.

    Args:
      loss_fn: ``loss_fn(params) -> scalar`` (close over the batch).
      params: pytree of floating-point arrays, the centre θ.
      scales: 1-D sequence or array of perturbation scales (may include 0 and
        negative values, e.g. ``jnp.linspace(-1, 1, 21)`` for a Li et al. plot
        or ``[0.0, 0.07]`` for the seeds' probe).
      num_directions: number of random directions (positive int).
      key: PRNG key from which the directions are drawn.
      relative: rescale each leaf's direction to that leaf's weight norm
        (default) or use raw ``N(0, I)`` noise.

    Returns:
      A float32 array of shape ``[num_directions, len(scales)]`` whose entry
      ``[i, j]`` is ``L(θ + scales[j]·d_i)``; a column with scale 0 equals
      ``L(θ)``.

    Examples:
      >>> import jax, jax.numpy as jnp, sharpax
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> params = {"w": jnp.array([3.0, 4.0])}  # ‖w‖ = 5, L(θ) = 25
      >>> losses = sharpax.loss_landscape(
      ...     loss, params, scales=[0.0, 0.1], num_directions=3,
      ...     key=jax.random.key(0))
      >>> losses.shape
      (3, 2)
      >>> print(losses[:, 0])
      [25. 25. 25.]

    References:
      Li et al., `Visualizing the Loss Landscape of Neural Nets
      <https://arxiv.org/abs/1712.09913>`_, 2018

      Keskar et al., `On Large-Batch Training for Deep Learning: Generalization
      Gap and Sharp Minima <https://arxiv.org/abs/1609.04836>`_, 2017

      Du et al., `Sharpness-Aware Training for Free
      <https://arxiv.org/abs/2205.14083>`_, 2022
    """
    _check_loss_fn(loss_fn, "loss_landscape")
    params = _check_params(params, "loss_landscape")
    num_directions = _common.check_positive_int("num_directions", num_directions)
    _check_key(key, "loss_landscape")
    scales = jnp.asarray(scales, jnp.float32)
    if scales.ndim != 1 or scales.shape[0] == 0:
        raise ValueError(
            f"scales must be a non-empty 1-D sequence of floats, got shape {scales.shape}."
        )

    def one_direction(k: jax.Array) -> jax.Array:
        d = _direction(params, k, relative)

        def one_scale(s: jax.Array) -> jax.Array:
            perturbed = jax.tree.map(
                lambda w, x: (w.astype(jnp.float32) + s * x).astype(w.dtype), params, d
            )
            return _loss32(loss_fn, perturbed)

        return jax.lax.map(one_scale, scales)

    return jax.lax.map(one_direction, jax.random.split(key, num_directions))
