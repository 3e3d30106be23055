"""AE-SAM: SAM steps where the gradient norm is high for its running statistics."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpax import _common, reuse_rules
from sharpax._schedule import Schedule, StepInfo
from sharpax.scheduled import _build

_F32 = _common.F32


# --------------------------------------------------------------------------- AE-SAM


class GradientNormAdaptiveState(NamedTuple):
    """State of :func:`gradient_norm_adaptive` (AE-SAM's schedule).

    Attributes:
      mean: float32 scalar, EMA ``μ`` of ``‖g‖²`` (starts at 0).
      var: float32 scalar, EMA ``σ²`` of ``(‖g‖² − μ)²`` (starts at ``e⁻¹⁰``).
      last_sq_norm: float32 scalar, ``‖g‖²`` of the last step (0 before the first).
    """

    mean: jax.Array
    var: jax.Array
    last_sq_norm: jax.Array


def _ema_stats(state: GradientNormAdaptiveState, sq_norm: jax.Array, decay: float):
    """AE-SAM's EMAs after one more ``‖g‖²``: the mean first, the variance around the new mean."""
    mean = decay * state.mean + (1 - decay) * sq_norm
    var = decay * state.var + (1 - decay) * jnp.square(sq_norm - mean)
    return mean.astype(_F32), var.astype(_F32)


def _threshold(step: jax.Array, total_steps: int, start: float, end: float) -> jax.Array:
    """``c_t``: linear from ``start`` at step 0 to ``end`` at ``total_steps`` (then constant)."""
    frac = jnp.clip(jnp.asarray(step, _F32) / total_steps, 0.0, 1.0)
    return frac * end + (1 - frac) * start


def gradient_norm_adaptive(
    *,
    total_steps: int,
    decay: float = 0.9,
    threshold_start: float = 1.0,
    threshold_end: float = -1.0,
    lagged: bool = False,
) -> Schedule:
    r"""AE-SAM's schedule: a SAM step when ``‖g‖²`` is high for its running statistics.

    Every step updates EMAs of ``s_t = ‖g_t‖²`` (the clean gradient's squared
    global norm), the mean first and the variance around the new mean::

      μ_t = δ μ_{t-1} + (1 − δ) s_t,     σ²_t = δ σ²_{t-1} + (1 − δ) (s_t − μ_t)²

    with ``μ_{-1} = 0``, ``σ²_{-1} = e⁻¹⁰``, and step ``t`` is a SAM step iff
    ``s_t ≥ μ_t + c_t σ_t``, ``c_t = (t/T) λ₁ + (1 − t/T) λ₂`` going linearly
    from ``threshold_start`` (λ₂) to ``threshold_end`` (λ₁) over ``T =
    total_steps``. With λ₁ < λ₂ the threshold falls, so SAM steps become more
    frequent later in training (about half the steps with the defaults).

    The decision needs the step's own gradient, so it is taken on device
    (``decide``; the ``lax.cond`` path of :func:`sharpax.scheduled_sam`).
    ``sam_due`` holds the *lagged* decision ``s_t ≥ μ_t + c_{t+1} σ_t`` (the
    last step's norm tested against the next threshold); with
    ``lagged=True`` the schedule uses it, so the host knows each decision in
    advance (two-function dispatch) at the price of deciding one step late.

    Under data parallelism (``axis_name`` in the transform) ``s_t`` is the
    device mean of per-device ``‖g_i‖²``, not the squared norm of the
    global-batch gradient (pass ``pmean``-ed gradients for that).

    Deviations: the authors' code was not available; the rule, its order and
    the defaults (δ = 0.9, λ₁ = −1, λ₂ = 1, ``σ²_{-1} = e⁻¹⁰``) follow our
    reading of the paper's Algorithm 1. ``lagged`` is ours.

    Args:
      total_steps: ``T``, the number of training steps (an int >= 1).
      decay: ``δ``, the EMAs' decay, in [0, 1).
      threshold_start: ``c_0`` (the paper's λ₂).
      threshold_end: ``c_T`` (the paper's λ₁).
      lagged: decide step ``t`` from ``s_{t-1}`` (host-known) instead of ``s_t``.

    Returns:
      A :class:`Schedule` whose state is :class:`GradientNormAdaptiveState`.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> schedule = sharpax.schedules.gradient_norm_adaptive(total_steps=100)
      >>> state, due = schedule.init(jnp.zeros(2))
      >>> print(bool(schedule.decide(state, due, jnp.int32(0), jnp.float32(4.0))))
      True

    References:
      Jiang, Yang, Zhang and Kwok, `An Adaptive Policy to Employ
      Sharpness-Aware Minimization <https://arxiv.org/abs/2304.14647>`_, ICLR 2023
    """
    total_steps = _common.check_int("total_steps", total_steps, low=1)
    _common.check_number("decay", decay, low=0.0, high=1.0)
    if float(decay) >= 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}.")
    _common.check_number("threshold_start", threshold_start)
    _common.check_number("threshold_end", threshold_end)
    if not isinstance(lagged, bool):
        raise TypeError(f"lagged must be a bool, got {lagged!r}.")
    threshold = functools.partial(
        _threshold, total_steps=total_steps, start=threshold_start, end=threshold_end
    )

    def init_fn(params: Any) -> tuple[GradientNormAdaptiveState, jax.Array]:
        del params
        zero = jnp.zeros([], _F32)
        return GradientNormAdaptiveState(zero, jnp.full([], np.exp(-10.0), _F32), zero), \
            jnp.ones([], bool)  # fmt: skip

    def grad_stats_fn(grads: Any) -> jax.Array:
        return _common.vdot32(grads, grads)

    def decide_fn(state, due, step, sq_norm) -> jax.Array:
        del due
        mean, var = _ema_stats(state, sq_norm, decay)
        return sq_norm >= mean + threshold(step) * jnp.sqrt(var)

    def update_fn(state: GradientNormAdaptiveState, info: StepInfo):
        mean, var = _ema_stats(state, info.grad_stats, decay)
        next_step = optax.safe_increment(info.step)
        due = info.grad_stats >= mean + threshold(next_step) * jnp.sqrt(var)
        return GradientNormAdaptiveState(mean, var, info.grad_stats.astype(_F32)), due

    return Schedule(init_fn, update_fn, None if lagged else decide_fn, grad_stats=grad_stats_fn)


def ae_sam(
    rho: _common.ScalarOrSchedule = 0.05,
    *,
    total_steps: int,
    decay: float = 0.9,
    threshold_start: float = 1.0,
    threshold_end: float = -1.0,
    lookahead_alpha: _common.ScalarOrSchedule | None = None,
    lagged: bool = False,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AE-SAM (and AE-LookSAM): SAM when ``‖g‖²`` exceeds its EMA mean by ``c_t`` EMA stds.

    :func:`sharpax.scheduled_sam` with
    :func:`sharpax.schedules.gradient_norm_adaptive` (see it for the rule, its
    defaults and what is ours) and, on the other steps, plain SGD gradients
    (:func:`sharpax.reuse_rules.plain`), or with ``lookahead_alpha`` set,
    LookSAM's reuse (:func:`sharpax.reuse_rules.orthogonal`): the paper's
    AE-LookSAM. The SAM step's ascent is exactly :func:`sharpax.sam`'s.

    The decision uses the step's own ``‖g‖``, so use the on-device path
    (``update(..., sam_step=None)``, one compiled step with ``lax.cond``), or
    ``lagged=True`` to decide each step from the previous step's ``‖g‖`` and
    dispatch two compiled steps from the host with :func:`sharpax.sam_due`.

    Args:
      rho: neighbourhood radius, a non-negative float or a schedule of ``count``.
      total_steps: number of training steps ``T`` of the threshold schedule.
      decay: ``δ``, the decay of the EMAs of ``‖g‖²``.
      threshold_start: ``c_0`` (the paper's λ₂).
      threshold_end: ``c_T`` (the paper's λ₁).
      lookahead_alpha: None for AE-SAM; LookSAM's ``alpha`` for AE-LookSAM.
      lagged: decide from the previous step's ``‖g‖`` (host-known decisions).
      eps: added to ``‖g‖`` in ``ε`` so a zero gradient gives ``ε = 0``.
      axis_name: mapped axis for the ascent gradient and ``‖g‖²``, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`sharpax.ScheduledSAMState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> loss = lambda w, x: jnp.sum((x * w) ** 2)
      >>> x, params = jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0])
      >>> opt = optax.chain(sharpax.ae_sam(0.05, total_steps=8), optax.sgd(0.05))
      >>> state = opt.init(params)
      >>> for _ in range(8):
      ...     grads = jax.grad(loss)(params, x)
      ...     updates, state = opt.update(
      ...         grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x))
      ...     params = optax.apply_updates(params, updates)
      >>> print(int(sharpax.num_sam_steps(state)))  # SAM steps out of 8
      4

    References:
      Jiang, Yang, Zhang and Kwok, `An Adaptive Policy to Employ
      Sharpness-Aware Minimization <https://arxiv.org/abs/2304.14647>`_, ICLR 2023
    """
    schedule = gradient_norm_adaptive(
        total_steps=total_steps,
        decay=decay,
        threshold_start=threshold_start,
        threshold_end=threshold_end,
        lagged=lagged,
    )
    if lookahead_alpha is None:
        reuse = reuse_rules.plain()
    else:
        reuse = reuse_rules.orthogonal(lookahead_alpha)
    return _build(rho, schedule, reuse, eps=eps, axis_name=axis_name, owner="ae_sam")
