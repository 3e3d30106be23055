"""The schedule protocol of :func:`sharpax.scheduled_sam` (private; public names in sharpax.schedules)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax


class StepInfo(NamedTuple):
    """What :func:`sharpax.scheduled_sam` tells a schedule after a step.

    Attributes:
      step: int32 scalar, index of the step just taken (0 for the first).
      did_sam: bool scalar, whether that step ran the SAM pass.
      grad_stats: the schedule's ``grad_stats`` of the step's clean gradient
        (``pmean``-ed), or None.
      sam_stats: the schedule's ``sam_stats`` of the step (``pmean``-ed) when it
        may have been a SAM step, zeros of the same structure otherwise, or
        None.
    """

    step: jax.Array
    did_sam: jax.Array
    grad_stats: Any
    sam_stats: Any


class Schedule(NamedTuple):
    """When to take a SAM step: pure functions over an explicit state (see the module doc).

    Attributes:
      init: ``params -> (state, due)``, the state and the decision for step 0.
      update: ``(state, StepInfo) -> (state, due)``, after each step: the new
        state and the decision for the next step.
      decide: ``(state, due, step, grad_stats) -> bool`` on device, or None to take
        ``due`` (the decision is then known on the host before the step).
      grad_stats: ``grads -> scalars`` on every step, or None.
      sam_stats: ``(grads, sam_grads, params) -> scalars`` on SAM steps, or None.
    """

    init: Callable[[Any], tuple[Any, jax.Array]]
    update: Callable[[Any, StepInfo], tuple[Any, jax.Array]]
    decide: Callable[[Any, jax.Array, jax.Array, Any], jax.Array] | None = None
    grad_stats: Callable[[Any], Any] | None = None
    sam_stats: Callable[[Any, Any, Any], Any] | None = None
