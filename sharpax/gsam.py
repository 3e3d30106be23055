"""GSAM: SAM's gradient minus a multiple of the clean gradient's part orthogonal to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpax import _common

_F32 = _common.F32


class GSAMState(NamedTuple):
    """State of :func:`gsam`.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far (``rho`` and
        ``alpha`` schedules are evaluated at it).
      num_sam_steps: int32 scalar, steps that ran the perturbed pass (all of them).
    """

    count: jax.Array
    num_sam_steps: jax.Array


def _orthogonal_to(x: Any, direction: Any) -> Any:
    """float32 ``x − (<x, d> / ‖d‖²) · d``; with ``d = 0`` it is ``x`` (nothing to project on)."""
    coef = _common.safe_div(_common.vdot32(x, direction), _common.vdot32(direction, direction))
    return jax.tree.map(lambda a, d: a.astype(_F32) - coef * d.astype(_F32), x, direction)


def _scaled_perturbation(ascent: Any, params: Any, rho: Any, eps: Any) -> Any:
    """The authors' adaptive ε = rho · |w| ⊙ g / (‖g‖ + eps) (the norm of g, not of |w| ⊙ g)."""
    norm = _common.global_norm(ascent)
    scale = jnp.where(norm > 0, rho / (jnp.where(norm > 0, norm, 1.0) + eps), 0.0)
    return jax.tree.map(
        lambda g, w: (scale * jnp.abs(w.astype(_F32)) * g.astype(_F32)).astype(w.dtype),
        ascent,
        params,
    )


def gsam(
    rho: _common.ScalarOrSchedule = 0.05,
    *,
    alpha: _common.ScalarOrSchedule,
    adaptive: bool = False,
    minimize_fp: bool = True,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GSAM: descend the perturbed loss, and the surrogate gap along ``g``'s orthogonal part.

    With ``g`` the clean gradient and ``g_s = grad_fn(w + ε)``,
    ``ε = rho · g / (‖g‖₂ + eps)`` exactly as :func:`sharpax.sam`, the update
    direction is::

      g_⊥ = g − (<g, g_s> / ‖g_s‖²) · g_s        # g's component orthogonal to g_s
      d   = g_s − alpha · g_⊥

    (``minimize_fp=False``, the authors' "min(f, h)" variant:
    ``d = g + alpha · (g_s − (<g_s, g> / ‖g‖²) · g)``). ``alpha = 0`` is
    :func:`sharpax.sam` exactly (tested bit for bit). Inner products are global
    over the pytree and in float32; a zero ``g_s`` gives ``g_⊥ = g`` (no NaN).
    ``rho`` follows the learning rate in the paper: pass
    :func:`gsam_rho_schedule`. Same protocol as :func:`sharpax.sam`: first in a
    chain, ``update(grads, state, params, *, grad_fn)``, same data-parallel
    recipe (the projection then uses each device's ``g`` and ``g_s``, as in
    the authors' code, and :func:`sharpax.pmean_updates` averages ``d``).

    Deviations from the authors' code (google-research/big_vision,
    ``trainers/proj/gsam/gsam.py``): their projection divides by ``‖g_s‖``
    with no guard (NaN for a zero ``g_s``); their ascent is always per device
    (here ``axis_name`` may share it, as in :func:`sharpax.sam`); the optional
    ``adaptive=True`` is theirs (``ε = rho · |w| ⊙ g / (‖g‖ + eps)``, not
    ASAM's normalisation).

    Args:
      rho: neighbourhood radius, a float >= 0 or a schedule of the step (see
        :func:`gsam_rho_schedule`).
      alpha: weight of the orthogonal term, a float >= 0 or a schedule (the
        paper: 0.01 for ResNets on ImageNet, 0.4 to 1.0 for ViTs).
      adaptive: scale the ascent by ``|w|`` as the authors' code does.
      minimize_fp: True for the paper's direction, False for the "min(f, h)" one.
      eps: added to ``‖g‖`` in ``ε``.
      axis_name: mapped axis over which to average the ascent gradient, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`GSAMState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> loss = lambda w: jnp.sum(jnp.array([1.0, 10.0]) * w ** 2)
      >>> opt = optax.chain(sharpax.gsam(0.1, alpha=0.5), optax.sgd(0.01))
      >>> params = jnp.array([1.0, 1.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jax.grad(loss)(params), state, params,
      ...                             grad_fn=jax.grad(loss))
      >>> print([round(float(u), 4) for u in updates])
      [-0.0194, -0.22]

    References:
      Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware Training
      <https://arxiv.org/abs/2203.08065>`_, ICLR 2022 (code:
      https://github.com/google-research/big_vision, ``proj/gsam``)
    """
    _common.check_non_negative("rho", rho)
    _common.check_non_negative("alpha", alpha)
    _common.check_non_negative("eps", eps, schedule=False)
    for name, flag in (("adaptive", adaptive), ("minimize_fp", minimize_fp)):
        if not isinstance(flag, bool):
            raise TypeError(f"sharpax.gsam: {name} must be a bool, got {flag!r}.")

    def init_fn(params: optax.Params) -> GSAMState:
        del params
        return GSAMState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del extra_args
        _common.require_grad_fn(grad_fn, "gsam")
        _common.require_params(params, "gsam")
        rho_t = _common.value_at(rho, state.count)
        alpha_t = _common.value_at(alpha, state.count)
        if adaptive:
            ascent = _common.maybe_pmean(updates, axis_name)
            eps_tree = _scaled_perturbation(ascent, params, rho_t, eps)
            g_s = grad_fn(optax.apply_updates(params, eps_tree))
            _common.check_same_shapes(g_s, updates, "grad_fn's output", "gsam")
            g_s = optax.tree.cast_like(g_s, updates)
        else:
            g_s = _common.sam_gradient(
                updates, params, grad_fn, rho_t, eps=eps, axis_name=axis_name, owner="gsam"
            )
        if minimize_fp:
            g_perp = _orthogonal_to(updates, g_s)
            out = jax.tree.map(lambda s, p: s.astype(_F32) - alpha_t * p, g_s, g_perp)
        else:
            s_perp = _orthogonal_to(g_s, updates)
            out = jax.tree.map(lambda g, p: g.astype(_F32) + alpha_t * p, updates, s_perp)
        new_state = GSAMState(
            optax.safe_increment(state.count), optax.safe_increment(state.num_sam_steps)
        )
        return optax.tree.cast_like(out, updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gsam_rho_schedule(
    learning_rate: _common.ScalarOrSchedule,
    *,
    rho_max: float,
    rho_min: float,
    lr_max: float,
    lr_min: float,
) -> Callable[[jax.Array], jax.Array]:
    """GSAM's radius tied to the learning rate: linear in ``lr_t`` from ``rho_min`` to ``rho_max``.

    ``rho_t = rho_min + (rho_max − rho_min) · (lr_t − lr_min) / (lr_max − lr_min)``
    (``rho_max`` when ``lr_max == lr_min``), not clipped, as in the authors'
    code (during warm-up from 0 it dips slightly below ``rho_min``).

    Args:
      learning_rate: the learning rate, a float or an optax schedule of the step.
      rho_max: radius at ``lr_max`` (the paper: 0.04 for ResNets, 0.6 for ViTs).
      rho_min: radius at ``lr_min``.
      lr_max: the schedule's peak learning rate.
      lr_min: its final learning rate.

    Returns:
      A schedule ``step -> rho`` (float32) for :func:`gsam`'s ``rho``.

    Examples:
      >>> import optax, sharpax
      >>> lr = optax.linear_schedule(1.0, 0.0, 100)
      >>> rho = sharpax.gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02, lr_max=1.0, lr_min=0.0)
      >>> print([round(float(rho(t)), 4) for t in (0, 50, 100)])
      [0.04, 0.03, 0.02]
    """
    for name, value in (("rho_max", rho_max), ("rho_min", rho_min)):
        _common.check_number(name, value, low=0.0, schedule=False)
    for name, value in (("lr_max", lr_max), ("lr_min", lr_min)):
        _common.check_number(name, value, schedule=False)
    _common.check_number("learning_rate", learning_rate, schedule=True)
    span = float(lr_max) - float(lr_min)

    def rho(step: jax.Array) -> jax.Array:
        if span == 0:
            return jnp.asarray(rho_max, _F32)
        lr = jnp.asarray(_common.value_at(learning_rate, step), _F32)
        return (rho_min + (rho_max - rho_min) * (lr - lr_min) / span).astype(_F32)

    return rho
