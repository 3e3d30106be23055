"""SAM on some steps: any schedule of :mod:`sharpax.schedules` with any rule of :mod:`sharpax.reuse_rules`.

:func:`scheduled_sam` sits first in an optax chain, like :func:`sharpax.sam`,
and takes the same ``grad_fn`` / ``axis_name`` arguments. On a *SAM step* it
computes the perturbed gradient ``g_s = grad_fn(w + ε)`` (two forward-backward
passes in all) and hands ``g`` and ``g_s`` to the reuse rule; on a *reuse
step* the rule combines the fresh gradient ``g`` with what it cached and
``grad_fn`` is never run (one forward-backward pass). The schedule says which
steps are SAM steps. :func:`sharpax.looksam`, :func:`sharpax.vsam`,
:func:`sharpax.ae_sam` and :func:`sharpax.ss_sam` are presets of it.

``update(grads, state, params, *, grad_fn, sam_step=None)``:

* ``sam_step=None``: the transform decides on device (the schedule's
  ``decide``, by default ``state.sam_due``) and branches with
  ``jax.lax.cond``; ``grad_fn`` is traced only inside the SAM branch. One
  compiled step function, fine on GPU/TPU.
* ``sam_step=True`` / ``False`` (a static Python bool): the caller has decided;
  no conditional is traced and with ``False`` ``grad_fn`` is not even called.
  Compile two step functions and pick one per step on the host from
  ``sharpax.sam_due(opt_state)`` (or :func:`upcoming_sam_steps`). On XLA:CPU a
  gradient inside a ``lax.cond`` branch can be many times slower than outside
  one, so this two-function path is the fast one there. It follows the
  schedule exactly when the decision is known before the step's gradient
  (every schedule here except :func:`sharpax.schedules.gradient_norm_adaptive`,
  which needs the step's ``‖g‖``).

A ``sam_step`` different from ``state.sam_due`` is honoured: the counters, the
cache and the statistics reflect what was done, and the schedule is told.

Donation: a ``sam_step=True`` step function of a rule that overwrites its
cache without reading it (LookSAM's, vSAM's) lets ``jax.jit`` prune that input.
When you donate the state, jit that step with ``keep_unused=True`` as well
(``jax.jit(step, donate_argnums=..., keep_unused=True)``); otherwise each SAM
step writes the cache to fresh buffers rather than the donated ones (on an
H100, a ResNet-18 SAM step of LookSAM took 10.1 ms instead of 7.2 ms).

Data parallel (``pmap`` / ``shard_map``), the recipe shared with
:func:`sharpax.sam`: pass each device's own gradient and a per-device
``grad_fn`` (no ``pmean`` inside it), and average the transform's *output*
right after it with :func:`sharpax.pmean_updates`::

  optax.chain(sharpax.vsam(0.05, axis_name='batch'),
              sharpax.pmean_updates('batch'), optax.sgd(0.1, momentum=0.9))

``axis_name`` averages the ascent gradient (one ``ε`` on all devices) and the
schedule's statistics, so every device takes the same decisions. Caches are
each device's own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpax import _common
from sharpax._schedule import Schedule, StepInfo
from sharpax.reuse_rules import ReuseRule


class ScheduledSAMState(NamedTuple):
    """State of :func:`scheduled_sam` (and of its presets). All leaves are arrays.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far (``rho`` and the
        rules' schedules are evaluated at it).
      num_sam_steps: int32 scalar, number of steps on which ``grad_fn`` was
        run (the second, perturbed forward-backward pass).
      sam_due: bool scalar, the schedule's decision for the *next* step (for
        :func:`sharpax.schedules.gradient_norm_adaptive`, the decision its
        statistics so far give; the step's own ``‖g‖`` may change it).
      schedule: the schedule's state (e.g.
        :class:`sharpax.schedules.VarianceAdaptiveState`).
      reuse: the reuse rule's state (e.g.
        :class:`sharpax.reuse_rules.OrthogonalState`).

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> state = sharpax.looksam(k=3).init(jnp.zeros(2))
      >>> print(bool(state.sam_due), int(state.num_sam_steps), state.reuse.g_v.shape)
      True 0 (2,)
    """

    count: jax.Array
    num_sam_steps: jax.Array
    sam_due: jax.Array
    schedule: Any
    reuse: Any


def check_sam_step(sam_step: Any, owner: str) -> None:
    """``sam_step`` must be None or a static Python bool (a TypeError that says why)."""
    if sam_step is not None and not isinstance(sam_step, bool):
        raise TypeError(
            f"sharpax.{owner}: sam_step must be None (decide on device from state.sam_due "
            "with lax.cond) or a static Python bool (True: SAM step, False: reuse step; no "
            f"conditional is traced); got {sam_step!r} of type {type(sam_step).__name__}. "
            "To dispatch from the host, call a step function compiled for "
            "`bool(sharpax.sam_due(opt_state))`; a traced value cannot select the program."
        )


def _zero_stats(stats_fn: Any, grads: Any, params: Any) -> Any:
    """Zeros shaped like the schedule's SAM-step statistics (for steps without a SAM pass)."""
    if stats_fn is None:
        return None
    like = params if params is not None else grads
    shapes = jax.eval_shape(stats_fn, grads, grads, like)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _build(
    rho: _common.ScalarOrSchedule,
    schedule: Schedule,
    reuse: ReuseRule,
    *,
    eps: float,
    axis_name: str | None,
    owner: str,
) -> optax.GradientTransformationExtraArgs:
    """:func:`scheduled_sam` with the name used in error messages (``owner``)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"sharpax.{owner}: schedule must be a sharpax.schedules.Schedule, got "
                        f"{schedule!r}.")  # fmt: skip
    if not isinstance(reuse, ReuseRule):
        raise TypeError(f"sharpax.{owner}: reuse must be a sharpax.reuse_rules.ReuseRule, got "
                        f"{reuse!r}.")  # fmt: skip
    _common.check_non_negative("rho", rho)
    _common.check_non_negative("eps", eps, schedule=False)
    stats_fn = schedule.sam_stats

    def init_fn(params: optax.Params) -> ScheduledSAMState:
        sched_state, due = schedule.init(params)
        return ScheduledSAMState(
            count=jnp.zeros([], jnp.int32),
            num_sam_steps=jnp.zeros([], jnp.int32),
            sam_due=jnp.asarray(due, bool),
            schedule=sched_state,
            reuse=reuse.init(params),
        )

    def update_fn(
        updates: optax.Updates,
        state: ScheduledSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: Any = None,
        sam_step: bool | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScheduledSAMState]:
        del extra_args
        check_sam_step(sam_step, owner)
        if sam_step is not False:
            _common.require_grad_fn(grad_fn, owner)
            _common.require_params(params, owner)
        step = state.count
        rho_t = _common.value_at(rho, step)
        grad_stats = None
        if schedule.grad_stats is not None:
            grad_stats = _common.maybe_pmean(schedule.grad_stats(updates), axis_name)

        def sam_branch(operand):
            g, cache = operand
            g_s = _common.sam_gradient(
                g, params, grad_fn, rho_t, eps=eps, axis_name=axis_name, owner=owner
            )
            out, cache = reuse.on_sam_step(g, g_s, cache, step)
            return out, cache, None if stats_fn is None else stats_fn(g, g_s, params)

        def reuse_branch(operand):
            g, cache = operand
            out, cache = reuse.on_reuse_step(g, cache, step)
            # Never recorded; computed from g (as if g_s = g) on the lax.cond path so both
            # branches' outputs vary over the mapped axes alike (shard_map).
            if sam_step is None and stats_fn is not None:
                return out, cache, stats_fn(g, g, params)
            return out, cache, _zero_stats(stats_fn, g, params)

        operand = (updates, state.reuse)
        if sam_step is None:
            did = state.sam_due
            if schedule.decide is not None:
                did = schedule.decide(state.schedule, state.sam_due, step, grad_stats)
            new_updates, cache, sam_stats = jax.lax.cond(did, sam_branch, reuse_branch, operand)
        else:
            did = jnp.asarray(sam_step)
            new_updates, cache, sam_stats = (sam_branch if sam_step else reuse_branch)(operand)
        if sam_step is not False:
            # Outside the branches, so that under shard_map the pmean is not inside a cond.
            sam_stats = _common.maybe_pmean(sam_stats, axis_name)
        sched_state, due = schedule.update(
            state.schedule, StepInfo(step, did, grad_stats, sam_stats)
        )
        num_sam = jnp.where(did, optax.safe_increment(state.num_sam_steps), state.num_sam_steps)
        return new_updates, ScheduledSAMState(
            count=optax.safe_increment(step),
            num_sam_steps=num_sam,
            sam_due=jnp.asarray(due, bool),
            schedule=sched_state,
            reuse=cache,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scheduled_sam(
    rho: _common.ScalarOrSchedule = 0.05,
    *,
    schedule: Schedule,
    reuse: ReuseRule,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SAM on the steps a schedule picks; a reuse rule fills in the others.

    On a SAM step it computes ``g_s = grad_fn(w + ε)`` with
    ``ε = rho · g / (‖g‖₂ + eps)`` exactly as :func:`sharpax.sam` and returns
    what ``reuse.on_sam_step`` makes of ``(g, g_s)`` (``g_s`` for every rule
    here); on the other steps it returns ``reuse.on_reuse_step(g)``. See the
    module docstring for the on-device (``sam_step=None``) and host-dispatch
    (static ``sam_step``) paths, donation and data parallelism.

    Args:
      rho: neighbourhood radius, a non-negative float or a schedule of ``count``.
      schedule: a :class:`sharpax.schedules.Schedule` (when to take SAM steps).
      reuse: a :class:`sharpax.reuse_rules.ReuseRule` (what the other steps return).
      eps: added to ``‖g‖`` in ``ε`` so a zero gradient gives ``ε = 0``.
      axis_name: mapped axis over which to average the ascent gradient and the
        schedule's statistics, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`ScheduledSAMState`.

    Examples:
      AE-SAM's schedule with vSAM's PSF reuse, a combination no paper ran:

      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> loss = lambda w, x: jnp.sum((x * w) ** 2)
      >>> x, params = jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0])
      >>> opt = optax.chain(
      ...     sharpax.scheduled_sam(
      ...         0.05,
      ...         schedule=sharpax.schedules.gradient_norm_adaptive(total_steps=40),
      ...         reuse=sharpax.reuse_rules.decayed_psf(decay=0.7, max_reuse=6)),
      ...     optax.sgd(0.01))
      >>> state = opt.init(params)
      >>> for _ in range(40):
      ...     grads = jax.grad(loss)(params, x)
      ...     updates, state = opt.update(
      ...         grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x))
      ...     params = optax.apply_updates(params, updates)
      >>> print(int(sharpax.num_sam_steps(state)))  # SAM steps out of 40
      14
    """
    return _build(rho, schedule, reuse, eps=eps, axis_name=axis_name, owner="scheduled_sam")


# --------------------------------------------------------------------------- state readers


def _field(opt_state: Any, name: str) -> Any:
    try:
        value = optax.tree_utils.tree_get(opt_state, name)
    except KeyError as err:
        raise KeyError(
            f"several `{name}` fields in this optimizer state (more than one sharpax "
            f"transform?); read them with optax.tree_utils.tree_get_all_with_path: {err}"
        ) from None
    if value is None:
        raise ValueError(
            f"no `{name}` field in this optimizer state: it holds no sharpax transform "
            "that tracks it (num_sam_steps: sam and every scheduled_sam preset; sam_due: "
            "scheduled_sam and its presets; sam_rate and the plan: vsam's schedule)."
        )
    # Flax NNX's nnx.Optimizer.opt_state holds each leaf in a Variable: read its array
    # (duck-typed, so that the core does not import flax).
    get_value = getattr(value, "get_value", None)
    if callable(get_value) and not isinstance(value, (jax.Array, np.ndarray)):
        value = get_value()
    return value


def num_sam_steps(opt_state: Any) -> jax.Array:
    """Number of steps that ran the second (perturbed) pass, read from any nesting.

    Works on the state of :func:`sharpax.sam` or of :func:`scheduled_sam` and
    its presets (:func:`sharpax.looksam`, :func:`sharpax.vsam`, ...), also
    nested in ``optax.chain`` / ``optax.inject_hyperparams`` (via
    ``optax.tree_utils.tree_get``). Under ``pmap`` the value keeps the leading
    device axis.

    Args:
      opt_state: an optimizer state containing exactly one sharpax state.

    Returns:
      The int32 ``num_sam_steps`` array.

    Examples:
      >>> import jax.numpy as jnp, optax, sharpax
      >>> opt = optax.chain(sharpax.looksam(k=2), optax.sgd(0.1))
      >>> print(int(sharpax.num_sam_steps(opt.init(jnp.zeros(2)))))
      0
    """
    return _field(opt_state, "num_sam_steps")


def sam_due(opt_state: Any) -> jax.Array:
    """Whether the schedule makes the *next* step a SAM step (bool array).

    Use it to dispatch between two compiled step functions
    (``sam_step=True`` / ``False``): ``bool(sharpax.sam_due(state))`` (under
    ``pmap`` take replica 0, e.g. ``bool(sharpax.sam_due(state)[0])``; replicas
    agree when ``axis_name`` is set).

    Args:
      opt_state: an optimizer state containing a :func:`scheduled_sam` state
        (any preset), nested anywhere (a Flax ``nnx.Optimizer.opt_state`` too).

    Returns:
      The bool ``sam_due`` array.

    Examples:
      >>> import jax.numpy as jnp, optax, sharpax
      >>> opt = optax.chain(sharpax.vsam(window=10, blocks=5, warmup_steps=3),
      ...                   optax.sgd(0.1))
      >>> print(bool(sharpax.sam_due(opt.init(jnp.zeros(2)))))
      True
    """
    return _field(opt_state, "sam_due")


def sam_rate(opt_state: Any) -> jax.Array:
    """vSAM's current fraction of SAM steps (``quota / window``; 1.0 in warm-up).

    Args:
      opt_state: an optimizer state containing a
        :func:`sharpax.schedules.variance_adaptive` schedule state (e.g. of
        :func:`sharpax.vsam`), nested anywhere (a Flax ``nnx.Optimizer.opt_state`` too).

    Returns:
      The float32 ``sam_rate`` array.

    Examples:
      >>> import jax.numpy as jnp, optax, sharpax
      >>> opt = optax.chain(sharpax.vsam(window=10, blocks=5), optax.sgd(0.1))
      >>> print(f"{float(sharpax.sam_rate(opt.init(jnp.zeros(2)))):.2f}")
      0.10
    """
    return _field(opt_state, "sam_rate")


def upcoming_sam_steps(opt_state: Any) -> np.ndarray:
    """Host-side decisions for the next steps, up to the end of vSAM's current window.

    One device-to-host read per window instead of one per step: run the
    returned decisions with the two compiled step functions, then call it
    again. For vSAM's schedule it is ``plan[window_pos:]`` (during warm-up,
    the remaining warm-up steps, at most ``window``); it stays exact as long
    as the caller follows it. For the other schedules (no plan) it is
    ``[sam_due]``. Under ``pmap`` replica 0 is read (sliced on device, then
    one device-to-host transfer).

    Args:
      opt_state: an optimizer state containing a :func:`scheduled_sam` state
        (any preset), nested anywhere (a Flax ``nnx.Optimizer.opt_state`` too).

    Returns:
      A non-empty 1-D NumPy bool array; element ``i`` says whether step
      ``count + i`` is a SAM step.

    Examples:
      >>> import jax.numpy as jnp, optax, sharpax
      >>> opt = optax.chain(sharpax.vsam(window=10, blocks=5, warmup_steps=3),
      ...                   optax.sgd(0.1))
      >>> print(sharpax.upcoming_sam_steps(opt.init(jnp.zeros(2))))
      [ True  True  True]
    """
    due = sam_due(opt_state)
    # Replica 0 of a pmapped state, sliced on device; then a single transfer.
    lead = (0,) * np.ndim(due)

    def replica0(x: Any) -> Any:
        return x[lead] if lead else x

    plan = optax.tree_utils.tree_get(opt_state, "plan")
    if plan is None or optax.tree_utils.tree_get(opt_state, "inner_due") is not None:
        # No plan, or a plan that bounds may override: just the next decision.
        return np.asarray(jax.device_get(replica0(due))).reshape(1)
    pos, plan = jax.device_get((replica0(_field(opt_state, "window_pos")), replica0(plan)))
    return np.asarray(plan)[int(pos) :]
