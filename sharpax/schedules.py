"""Schedules: *when* :func:`sharpax.scheduled_sam` pays for SAM's second pass.

A schedule is a :class:`Schedule`, a ``NamedTuple`` of pure functions with an
explicit state (a pytree of arrays), in the spirit of
``optax.GradientTransformation``. :func:`sharpax.scheduled_sam` calls it once
per step:

1. ``grad_stats(grads)``: scalars the schedule wants from every step's clean
   gradient (e.g. ``‖g‖²`` for AE-SAM), or ``None``. Computed outside any
   branch and ``pmean``-ed over the transform's ``axis_name``.
2. ``decide(state, due, step, grad_stats)``: whether *this* step (index
   ``step``) is a SAM step, on device (the ``lax.cond`` path). ``due`` is the decision the schedule made
   at the previous step (``ScheduledSAMState.sam_due``). ``None`` means "take
   ``due``": the decision is known before the step's gradient, so a host can
   dispatch between two compiled step functions from ``sharpax.sam_due``.
3. ``sam_stats(grads, sam_grads, params)``: scalars from a SAM step (e.g.
   vSAM's ``‖g_s − g‖``), or ``None``; computed where the SAM pass may run and
   ``pmean``-ed; zeros on the steps where it did not run (never recorded).
4. ``update(state, info)``: the new state and the decision for the *next* step
   (``info`` is a :class:`StepInfo`: this step's index, whether it was a SAM
   step, and the two statistics).

``init(params)`` returns the initial state and the decision for step 0.

Schedules here: :func:`every_k` (LookSAM), :func:`variance_adaptive` (vSAM),
:func:`gradient_norm_adaptive` (AE-SAM), :func:`bernoulli` (SS-SAM / RST) and
the wrapper :func:`bounded` (a minimum and maximum fraction of SAM steps).
Any of them combines with any reuse rule of :mod:`sharpax.reuse_rules`.

Examples:
  >>> import jax.numpy as jnp, sharpax
  >>> schedule = sharpax.schedules.every_k(3)
  >>> state, due = schedule.init(jnp.zeros(2))
  >>> decisions = [bool(due)]
  >>> for step in range(5):
  ...     info = sharpax.schedules.StepInfo(jnp.int32(step), due, None, None)
  ...     state, due = schedule.update(state, info)
  ...     decisions.append(bool(due))
  >>> print(decisions)
  [True, False, False, True, False, False]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpax import _common
from sharpax._schedule import Schedule, StepInfo
from sharpax.ae_sam import GradientNormAdaptiveState, gradient_norm_adaptive
from sharpax.vsam import VarianceAdaptiveState, variance_adaptive

_F32 = _common.F32


# --------------------------------------------------------------------------- every k (LookSAM)


class EveryKState(NamedTuple):
    """State of :func:`every_k`: nothing (the decision is ``step % k == 0``)."""


def every_k(k: int = 5) -> Schedule:
    """A SAM step every ``k`` steps, the first step included (LookSAM's schedule).

    Step ``t`` is a SAM step iff ``t % k == 0``. It depends on the step index
    only, so the host knows every decision in advance.

    Args:
      k: an int >= 1; under ``optax.inject_hyperparams`` it may also be an
        injected int32 scalar.

    Returns:
      A :class:`Schedule` with an empty :class:`EveryKState`.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> state, due = sharpax.schedules.every_k(4).init(jnp.zeros(3))
      >>> print(bool(due))
      True

    References:
      Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, CVPR 2022
    """
    k = _common.check_int("k", k, low=1, static=False)

    def init_fn(params: Any) -> tuple[EveryKState, jax.Array]:
        del params
        return EveryKState(), jnp.ones([], bool)

    def update_fn(state: EveryKState, info: StepInfo) -> tuple[EveryKState, jax.Array]:
        return state, (optax.safe_increment(info.step) % k) == 0

    return Schedule(init_fn, update_fn)


# --------------------------------------------------------------------------- Bernoulli (SS-SAM / RST)


class BernoulliState(NamedTuple):
    """State of :func:`bernoulli`.

    Attributes:
      key: uint32 ``[2]`` PRNG key; step ``t`` draws ``U_t`` from ``fold_in(key, t)``.
    """

    key: jax.Array


def _bernoulli_due(key: jax.Array, probability: Any, step: jax.Array) -> jax.Array:
    u = jax.random.uniform(jax.random.fold_in(key, step), (), _F32)
    return u < _common.value_at(probability, step)


def bernoulli(probability: _common.ScalarOrSchedule = 0.5, *, seed: int = 0) -> Schedule:
    """SAM steps drawn at random: step ``t`` is one with probability ``p(t)`` (SS-SAM / RST).

    Step ``t`` is a SAM step iff ``U_t < p(t)`` with ``U_t`` uniform on [0, 1)
    from ``fold_in(key, t)``: independent Bernoulli trials, reproducible and
    resumable, and the same on every device (same ``seed``). The decision
    depends only on the step index, so the host knows it in advance.
    ``probability`` is a constant or any optax schedule of the step (e.g.
    :func:`ss_sam_probability`, ``optax.linear_schedule``); values outside
    [0, 1] act as 0 or 1.

    Args:
      probability: the SAM-step probability, a float in [0, 1] or a schedule.
      seed: seed of the PRNG key (an int >= 0).

    Returns:
      A :class:`Schedule` whose state is :class:`BernoulliState`.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> state, due = sharpax.schedules.bernoulli(1.0).init(jnp.zeros(2))
      >>> print(bool(due))
      True

    References:
      Zhao, Zhang and Hu, `SS-SAM: Stochastic Scheduled Sharpness-Aware
      Minimization for Efficiently Training Deep Neural Networks
      <https://arxiv.org/abs/2203.09962>`_, 2022 (also titled "Randomized
      Sharpness-Aware Training for Boosting Computational Efficiency in Deep
      Learning")
    """
    _common.check_number("probability", probability, low=0.0, high=1.0, schedule=True)
    seed = _common.check_int("seed", seed, low=0, static=False)

    def init_fn(params: Any) -> tuple[BernoulliState, jax.Array]:
        del params
        key = jax.random.PRNGKey(seed)
        return BernoulliState(key), _bernoulli_due(key, probability, jnp.zeros([], jnp.int32))

    def update_fn(state: BernoulliState, info: StepInfo) -> tuple[BernoulliState, jax.Array]:
        return state, _bernoulli_due(state.key, probability, optax.safe_increment(info.step))

    return Schedule(init_fn, update_fn)


# --------------------------------------------------------------------------- bounds


class BoundedState(NamedTuple):
    """State of :func:`bounded`.

    Attributes:
      inner: the wrapped schedule's state.
      inner_due: bool scalar, the wrapped schedule's own decision for the next
        step (before the bounds).
      sam_steps: int32 scalar, SAM steps taken so far.
    """

    inner: Any
    inner_due: jax.Array
    sam_steps: jax.Array


def _apply_bounds(due, step, sam_steps, min_fraction, max_fraction) -> jax.Array:
    """``due`` forced on / off so that after step ``step`` the SAM fraction is within the bounds."""
    total = (step + 1).astype(_F32)
    force = sam_steps < jnp.floor(min_fraction * total)
    forbid = sam_steps + 1 > jnp.floor(max_fraction * total)
    return (due | force) & ~forbid


def bounded(
    schedule: Schedule, *, min_fraction: float = 0.0, max_fraction: float = 1.0
) -> Schedule:
    """Keeps another schedule's fraction of SAM steps within ``[min_fraction, max_fraction]``.

    After the step with index ``t`` (``t + 1`` steps taken, ``s`` of them SAM
    steps) the step is forced to be a SAM step when ``s_before <
    floor(min_fraction · (t + 1))`` and forbidden when ``s_before + 1 >
    floor(max_fraction · (t + 1))`` (float32), so at every step the running
    fraction stays within the bounds (up to the floor). Otherwise the wrapped
    schedule decides, and it is told what was actually done (so vSAM's
    schedule, for example, re-plans its window from the SAM steps taken). Use
    it to give an adaptive schedule a compute budget (``max_fraction``) or a
    floor on SAM steps.

    Args:
      schedule: the :class:`Schedule` to bound.
      min_fraction: lowest running fraction of SAM steps, in [0, 1].
      max_fraction: highest running fraction, in [min_fraction, 1].

    Returns:
      A :class:`Schedule` whose state is :class:`BoundedState`.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> s = sharpax.schedules.bounded(sharpax.schedules.every_k(1), max_fraction=0.25)
      >>> state, due = s.init(jnp.zeros(2))
      >>> print(bool(due))  # 1 SAM step out of 1 would exceed 25 %
      False
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"bounded needs a sharpax.schedules.Schedule, got {schedule!r}.")
    _common.check_number("min_fraction", min_fraction, low=0.0, high=1.0)
    _common.check_number("max_fraction", max_fraction, low=0.0, high=1.0)
    if float(min_fraction) > float(max_fraction):
        raise ValueError(
            f"min_fraction must be <= max_fraction, got {min_fraction} > {max_fraction}."
        )
    clamp = functools.partial(_apply_bounds, min_fraction=min_fraction, max_fraction=max_fraction)

    def init_fn(params: Any) -> tuple[BoundedState, jax.Array]:
        inner, due = schedule.init(params)
        zero = jnp.zeros([], jnp.int32)
        return BoundedState(inner, due, zero), clamp(due, zero, zero)

    def update_fn(state: BoundedState, info: StepInfo) -> tuple[BoundedState, jax.Array]:
        inner, inner_due = schedule.update(state.inner, info)
        sam_steps = jnp.where(info.did_sam, optax.safe_increment(state.sam_steps), state.sam_steps)
        due = clamp(inner_due, optax.safe_increment(info.step), sam_steps)
        return BoundedState(inner, inner_due, sam_steps), due

    decide_fn = None
    if schedule.decide is not None:

        def decide_fn(state: BoundedState, due: jax.Array, step: jax.Array, grad_stats: Any):
            del due  # the bounded decision; the inner schedule decides from its own
            inner_due = schedule.decide(state.inner, state.inner_due, step, grad_stats)
            return clamp(inner_due, step, state.sam_steps)

    return Schedule(init_fn, update_fn, decide_fn, schedule.grad_stats, schedule.sam_stats)


# --------------------------------------------------------------------------- probability ramps


def probability_ramp(
    start: float, end: float, total_steps: int, *, shape: str = "linear"
) -> Callable[[jax.Array], jax.Array]:
    """A SAM-step probability going from ``start`` to ``end`` over ``total_steps`` (SS-SAM / RST).

    The shapes of the scheduling-function families SS-SAM / RST studies, with
    ``x = min(t / total_steps, 1)``:

    * ``'constant'``: ``start`` (``end`` is ignored and must equal it);
    * ``'linear'``: ``start + (end − start) · x``;
    * ``'cosine'`` (trigonometric): ``start + (end − start) · (1 − cos(π x)) / 2``;
    * ``'step'`` (piecewise): ``start`` for ``x < 1/2``, then ``end``.

    Args:
      start: probability at step 0, in [0, 1].
      end: probability from ``total_steps`` on, in [0, 1].
      total_steps: length of the ramp (an int >= 1).
      shape: one of ``'constant'``, ``'linear'``, ``'cosine'``, ``'step'``.

    Returns:
      A schedule ``step -> probability`` (float32) for :func:`bernoulli`.

    Examples:
      >>> import sharpax
      >>> p = sharpax.schedules.probability_ramp(0.2, 0.8, 100, shape='cosine')
      >>> print([round(float(p(t)), 3) for t in (0, 50, 100, 200)])
      [0.2, 0.5, 0.8, 0.8]
    """
    _common.check_number("start", start, low=0.0, high=1.0)
    _common.check_number("end", end, low=0.0, high=1.0)
    total_steps = _common.check_int("total_steps", total_steps, low=1)
    shapes = {
        "constant": lambda x: jnp.zeros_like(x),
        "linear": lambda x: x,
        "cosine": lambda x: (1 - jnp.cos(jnp.pi * x)) / 2,
        "step": lambda x: (x >= 0.5).astype(_F32),
    }
    if shape not in shapes:
        raise ValueError(f"shape must be one of {sorted(shapes)}, got {shape!r}.")
    if shape == "constant" and float(start) != float(end):
        raise ValueError(f"a 'constant' ramp needs start == end, got {start} and {end}.")
    ramp = shapes[shape]

    def probability(step: jax.Array) -> jax.Array:
        x = jnp.clip(jnp.asarray(step, _F32) / total_steps, 0.0, 1.0)
        return (start + (end - start) * ramp(x)).astype(_F32)

    return probability


__all__ = (
    "BernoulliState",
    "BoundedState",
    "EveryKState",
    "GradientNormAdaptiveState",
    "Schedule",
    "StepInfo",
    "VarianceAdaptiveState",
    "bernoulli",
    "bounded",
    "every_k",
    "gradient_norm_adaptive",
    "probability_ramp",
    "variance_adaptive",
)
