"""Reuse rules: *what* :func:`sharpax.scheduled_sam` returns on the steps without a SAM pass.

A reuse rule is a :class:`ReuseRule`, a ``NamedTuple`` of pure functions over an
explicit state (a pytree of arrays):

* ``init(params)``: the initial state (e.g. a cache like the params);
* ``on_sam_step(grads, sam_grads, state, step)``: on a SAM step, given the
  clean gradient ``g`` and the SAM gradient ``g_s = grad_fn(w + ε)``, the
  update to return and the new state (what to cache);
* ``on_reuse_step(grads, state, step)``: on the other steps, the update to
  return from ``g`` and the state alone (no ``grad_fn``) and the new state.

``step`` is the step index (for hyperparameter schedules). Both step kinds
must return the same structure and dtypes (they are the two branches of a
``lax.cond`` on the on-device path). Rules here: :func:`plain` (plain ``g``:
SS-SAM, AE-SAM), :func:`orthogonal` (LookSAM's ``g_v``) and
:func:`decayed_psf` (vSAM's PSF).

Examples:
  >>> import jax.numpy as jnp, sharpax
  >>> rule = sharpax.reuse_rules.decayed_psf(decay=0.5, max_reuse=2)
  >>> g, g_s = jnp.array([1.0, 0.0]), jnp.array([1.0, 2.0])
  >>> state = rule.init(g)
  >>> out, state = rule.on_sam_step(g, g_s, state, 0)
  >>> for step in (1, 2, 3):
  ...     out, state = rule.on_reuse_step(g, state, step)
  ...     print(out.tolist())
  [1.0, 1.0]
  [1.0, 0.5]
  [1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpax import _common

_F32 = _common.F32


class ReuseRule(NamedTuple):
    """What a non-SAM step returns: pure functions over an explicit state (see the module doc).

    Attributes:
      init: ``params -> state``.
      on_sam_step: ``(grads, sam_grads, state, step) -> (updates, state)``.
      on_reuse_step: ``(grads, state, step) -> (updates, state)``.
    """

    init: Callable[[Any], Any]
    on_sam_step: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]
    on_reuse_step: Callable[[Any, Any, jax.Array], tuple[Any, Any]]


# --------------------------------------------------------------------------- plain


class PlainState(NamedTuple):
    """State of :func:`plain`: nothing is cached."""


def plain() -> ReuseRule:
    """SAM steps return ``g_s``, the others the plain gradient ``g`` (SS-SAM, AE-SAM).

    Returns:
      A :class:`ReuseRule` with an empty :class:`PlainState`.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> rule = sharpax.reuse_rules.plain()
      >>> out, _ = rule.on_reuse_step(jnp.ones(2), rule.init(jnp.ones(2)), 0)
      >>> print(out.tolist())
      [1.0, 1.0]
    """

    def on_sam_step(grads, sam_grads, state, step):
        del grads, step
        return sam_grads, state

    def on_reuse_step(grads, state, step):
        del step
        return grads, state

    return ReuseRule(lambda params: PlainState(), on_sam_step, on_reuse_step)


# --------------------------------------------------------------------------- LookSAM


class OrthogonalState(NamedTuple):
    """State of :func:`orthogonal` (LookSAM).

    Attributes:
      g_v: pytree like the params, the cached component of the last SAM
        gradient orthogonal to the clean gradient of that step (this
        device's, under data parallelism). Leaves are at least float32
        (float32 for bfloat16/float16 params), whatever the params' dtype.
      g_v_norm: float32 scalar, ``‖g_v‖₂`` (global over the pytree; this
        device's, under data parallelism), computed once at the SAM step so
        reuse steps need only ``‖g‖``.
    """

    g_v: optax.Updates
    g_v_norm: jax.Array


def _orthogonal_part(g_s: Any, g: Any, like: Any) -> Any:
    """``g_s − (<g_s, g> / ‖g‖²) · g`` in the dtypes of ``like`` (0 coefficient for a zero ``g``)."""
    coef = _common.safe_div(_common.vdot32(g_s, g), _common.vdot32(g, g))

    def orthogonal(s, gg, old):
        dtype = _common.at_least_f32(old.dtype)
        return s.astype(dtype) - coef.astype(dtype) * gg.astype(dtype)

    return optax.tree.cast_like(jax.tree.map(orthogonal, g_s, g, like), like)


def orthogonal(alpha: _common.ScalarOrSchedule = 0.7) -> ReuseRule:
    r"""LookSAM's reuse: add the cached part of ``g_s`` orthogonal to ``g``, rescaled to ``‖g‖``.

    On a SAM step it returns ``g_s`` and caches
    ``g_v = g_s − (<g_s, g> / ‖g‖²) · g``; on a reuse step it returns
    ``g + alpha · (‖g‖ / ‖g_v‖) · g_v``. Norms and inner products are global
    over the pytree and computed in float32. A zero ``g`` gives ``g_v = g_s``
    and a zero ``g_v`` adds nothing (no NaN).

    Args:
      alpha: weight of the reused direction, a float >= 0 or a schedule of the step.

    Returns:
      A :class:`ReuseRule` whose state is :class:`OrthogonalState` (one
      at-least-float32 copy of the params).

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> rule = sharpax.reuse_rules.orthogonal(alpha=1.0)
      >>> g, g_s = jnp.array([1.0, 0.0]), jnp.array([1.0, 3.0])
      >>> _, state = rule.on_sam_step(g, g_s, rule.init(g), 0)
      >>> print(state.g_v.tolist(), rule.on_reuse_step(g, state, 1)[0].tolist())
      [0.0, 3.0] [1.0, 1.0]

    References:
      Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, CVPR 2022
    """
    _common.check_non_negative("alpha", alpha)

    def init_fn(params: Any) -> OrthogonalState:
        return OrthogonalState(_common.zeros_f32_like(params), jnp.zeros([], _F32))

    def on_sam_step(grads, sam_grads, state, step):
        del step
        g_v = _orthogonal_part(sam_grads, grads, state.g_v)
        return sam_grads, OrthogonalState(g_v, _common.global_norm(g_v))

    def on_reuse_step(grads, state, step):
        _common.check_same_shapes(state.g_v, grads, "the cached g_v", "reuse_rules.orthogonal")
        alpha_t = _common.value_at(alpha, step)
        scale = alpha_t * _common.safe_div(_common.global_norm(grads), state.g_v_norm)
        out = jax.tree.map(
            lambda gg, v: (gg.astype(_F32) + scale * v.astype(_F32)).astype(gg.dtype),
            grads,
            state.g_v,
        )
        return out, state

    return ReuseRule(init_fn, on_sam_step, on_reuse_step)


# --------------------------------------------------------------------------- vSAM


class DecayedPSFState(NamedTuple):
    """State of :func:`decayed_psf` (vSAM).

    Attributes:
      psf: pytree like the params, cached PSF = g_s − g of the last SAM step
        (this device's, under data parallelism), with at least float32
        leaves whatever the params' dtype.
      reuse_weight: float32 scalar, weight of the cached PSF at the last
        reuse step (1 right after a SAM step).
      reuse_left: int32 scalar, reuse steps left before plain gradients.
    """

    psf: optax.Updates
    reuse_weight: jax.Array
    reuse_left: jax.Array


def decayed_psf(decay: float = 0.7, max_reuse: int = 6) -> ReuseRule:
    r"""vSAM's reuse: add the last PSF ``g_s − g`` with a weight that decays per step.

    On a SAM step it returns ``g_s``, caches ``psf = g_s − g`` (at least
    float32, so the small difference is not rounded to the params' precision)
    and resets the weight to 1. On each of the next ``max_reuse`` reuse steps
    the weight becomes ``w ← w · decay`` (0.7, 0.49, ...) and the step returns
    ``g + w · psf``; afterwards ``g + 0 · psf``, i.e. plain ``g``. Before any
    SAM step the cache is zero and the reuse step returns plain ``g``.

    Args:
      decay: weight decay per reuse step, in [0, 1].
      max_reuse: number of reuse steps after each SAM step (an int >= 0; an
        injected int32 scalar under ``optax.inject_hyperparams``).

    Returns:
      A :class:`ReuseRule` whose state is :class:`DecayedPSFState` (one
      at-least-float32 copy of the params).

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> rule = sharpax.reuse_rules.decayed_psf(decay=0.5, max_reuse=1)
      >>> g, g_s = jnp.array([1.0]), jnp.array([3.0])
      >>> _, state = rule.on_sam_step(g, g_s, rule.init(g), 0)
      >>> print(state.psf.tolist(), rule.on_reuse_step(g, state, 1)[0].tolist())
      [2.0] [2.0]

    References:
      Deng et al., `Effectively Estimating Gradient Sample Size to Speed Up
      Sharpness Aware Minimization <https://arxiv.org/abs/2403.08821>`_, 2024
    """
    _common.check_number("decay", decay, low=0.0, high=1.0)
    max_reuse = _common.check_int("max_reuse", max_reuse, low=0, static=False)

    def init_fn(params: Any) -> DecayedPSFState:
        # Every leaf its own buffer (no shared zeros), so a train state can be donated to jit.
        return DecayedPSFState(
            psf=_common.zeros_f32_like(params),
            reuse_weight=jnp.ones([], _F32),
            reuse_left=jnp.zeros([], jnp.int32),
        )

    def on_sam_step(grads, sam_grads, state, step):
        del step

        def difference(s, gg, old):
            dtype = _common.at_least_f32(old.dtype)
            return (s.astype(dtype) - gg.astype(dtype)).astype(old.dtype)

        psf = jax.tree.map(difference, sam_grads, grads, state.psf)
        # full_like: the outputs keep the inputs' varying axes (the lax.cond branches of
        # scheduled_sam must agree under shard_map).
        return sam_grads, DecayedPSFState(
            psf,
            jnp.full_like(state.reuse_weight, 1.0),
            jnp.full_like(state.reuse_left, max_reuse),
        )

    def on_reuse_step(grads, state, step):
        del step
        _common.check_same_shapes(state.psf, grads, "the cached PSF", "reuse_rules.decayed_psf")
        reusing = state.reuse_left > 0
        next_weight = (state.reuse_weight * decay).astype(_F32)
        w = jnp.where(reusing, next_weight, jnp.zeros([], _F32))

        def add_psf(gg, p):
            dtype = _common.at_least_f32(p.dtype)
            return (gg.astype(dtype) + w.astype(dtype) * p.astype(dtype)).astype(gg.dtype)

        out = jax.tree.map(add_psf, grads, state.psf)
        return out, DecayedPSFState(
            state.psf,
            jnp.where(reusing, next_weight, state.reuse_weight).astype(_F32),
            jnp.where(reusing, state.reuse_left - 1, state.reuse_left).astype(jnp.int32),
        )

    return ReuseRule(init_fn, on_sam_step, on_reuse_step)
