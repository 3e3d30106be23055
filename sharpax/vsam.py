"""vSAM: SAM steps on an adaptively sampled subset, the PSF reused in between."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpax import _common, reuse_rules
from sharpax._schedule import Schedule, StepInfo
from sharpax._vsam_window import (
    _check_window,
    _initial_window_schedule,
    _record,
    _window_schedule,
    masked_norm,
)
from sharpax.scheduled import _build

_F32 = _common.F32


# --------------------------------------------------------------------------- vSAM


class VarianceAdaptiveState(NamedTuple):
    """State of :func:`variance_adaptive` (vSAM's schedule); all leaves arrays.

    Attributes:
      sam_rate: float32 scalar, fraction of the current window's steps that
        are SAM steps (``quota / window``); 1.0 during warm-up.
      base_rate: float32 scalar, the authors' ``base_sr``: expected SAM steps
        per window, in ``[1, floor(window · max_rate)]``; starts at 1.
      quota: int32 scalar, ``floor(base_rate)`` fixed at the window start: the
        number of SAM steps of the current window (0 during warm-up).
      taken: int32 scalar, SAM steps already taken in the current window.
      window_pos: int32 scalar, index in ``plan`` of the next step. During
        warm-up it is set so that ``plan[window_pos:]`` covers the remaining
        warm-up steps (at most ``window`` of them).
      plan: bool ``[window]``; ``plan[:window_pos]`` are the decisions taken so
        far in the current window, ``plan[window_pos:]`` the planned ones for
        the rest of it (exact if the caller follows ``sam_due``).
      num_recorded: int32 scalar, SAM steps recorded in the buffers so far.
      num_skipped: int32 scalar, SAM steps whose ``n`` or ``r`` was not finite:
        taken, but not recorded, so the rate stays finite and SAM steps go on.
      psf_norms: float32 ``[window]``, n = ‖psf‖ of the last ``window`` SAM
        steps, oldest first (the last ``min(num_recorded, window)`` entries are
        valid).
      psf_ratios: float32 ``[window]``, r = ‖psf‖ / ‖g‖, same layout.
      psf_vars: float32 ``[window]``, v = sorted-block variance of
        ``psf_norms``, recorded once ``psf_norms`` is full (the last
        ``num_recorded - window + 1`` entries, at most ``window``, are valid).
      key: uint32 ``[2]`` PRNG key; the uniforms of window ``j`` are drawn from
        ``fold_in(key, j)``.
    """

    sam_rate: jax.Array
    base_rate: jax.Array
    quota: jax.Array
    taken: jax.Array
    window_pos: jax.Array
    plan: jax.Array
    num_recorded: jax.Array
    num_skipped: jax.Array
    psf_norms: jax.Array
    psf_ratios: jax.Array
    psf_vars: jax.Array
    key: jax.Array


def variance_adaptive(
    *,
    window: int = 50,
    blocks: int = 5,
    max_rate: float = 0.8,
    sensitivity: tuple[float, float] = (0.13, 0.13),
    warmup_steps: int = 0,
    stat_mask: Any | Callable[[optax.Params], Any] = None,
    seed: int = 0,
) -> Schedule:
    """vSAM's schedule: a SAM-step rate per window driven by the PSF's statistics.

    On each SAM step it records ``n = ‖psf‖`` and ``r = ‖psf‖ / ‖g‖`` with
    ``psf = g_s − g`` (norms over the ``stat_mask`` leaves) and, once the
    n-buffer is full, ``v`` = mean over ``blocks`` blocks of the sorted
    n-buffer of each block's unbiased variance. The first ``warmup_steps``
    steps are SAM steps; then, at each window start, ``base_rate ←
    clip(base_rate · (1 + s₁·dr + s₂·dv), 1, floor(window · max_rate))`` with
    ``dr`` / ``dv`` the mean relative change of the r / v buffers, and the
    window gets exactly ``floor(base_rate)`` SAM steps, placed by uniform draws
    (see :func:`sharpax.vsam`, which documents the rule and every deviation
    from the authors' code). Decisions are planned on device a window ahead
    (``state.plan``), so the host knows them in advance.

    Args:
      window: steps per window and length of the statistics buffers (static int >= 2).
      blocks: blocks of the sorted n-buffer for ``v``; must divide ``window``
        with at least 2 entries per block (static int).
      max_rate: at most ``floor(window · max_rate)`` SAM steps per window.
      sensitivity: ``(s₁, s₂)``, gains of the r and v relative changes.
      warmup_steps: number of initial steps that are all SAM steps.
      stat_mask: which leaves enter ``n`` and ``r``: a pytree of Python bools
        like the params, a callable ``params -> mask``, or None for all.
      seed: seed of the schedule's PRNG key (same on every device).

    Returns:
      A :class:`Schedule` whose state is :class:`VarianceAdaptiveState`.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> schedule = sharpax.schedules.variance_adaptive(window=10, blocks=5)
      >>> state, due = schedule.init(jnp.zeros(3))
      >>> print(int(state.quota), state.plan.shape)
      1 (10,)

    References:
      Deng et al., `Effectively Estimating Gradient Sample Size to Speed Up
      Sharpness Aware Minimization <https://arxiv.org/abs/2403.08821>`_, 2024
    """
    window, blocks, max_count = _check_window(window, blocks, max_rate)
    if not (isinstance(sensitivity, (tuple, list)) and len(sensitivity) == 2):
        raise ValueError(f"sensitivity must be a pair (s1, s2), got {sensitivity!r}.")
    s_r, s_v = sensitivity
    _common.check_number("sensitivity[0]", s_r)
    _common.check_number("sensitivity[1]", s_v)
    warmup_steps = _common.check_int("warmup_steps", warmup_steps, low=0, static=False)
    seed = _common.check_int("seed", seed, low=0, static=False)
    config = (warmup_steps, s_r, s_v, max_count)

    def init_fn(params: Any) -> tuple[VarianceAdaptiveState, jax.Array]:
        del params
        key, due, fields = _initial_window_schedule(seed, config, window=window)
        # Every leaf its own buffer (no shared zeros), so a train state can be donated to jit.
        buffers = {f: jnp.zeros([window], _F32) for f in ("psf_norms", "psf_ratios", "psf_vars")}
        return VarianceAdaptiveState(
            num_recorded=jnp.zeros([], jnp.int32),
            num_skipped=jnp.zeros([], jnp.int32),
            key=key,
            **buffers,
            **fields,
        ), due

    def sam_stats_fn(grads: Any, sam_grads: Any, params: Any) -> tuple[jax.Array, jax.Array]:
        mask = _common.resolve_mask(stat_mask, params, "vsam", "stat_mask")

        def difference(s, gg, p):
            dtype = _common.at_least_f32(jnp.result_type(p))
            return s.astype(dtype) - gg.astype(dtype)

        n = masked_norm(jax.tree.map(difference, sam_grads, grads, params), mask)
        return n, _common.safe_div(n, masked_norm(grads, mask))

    def update_fn(state: VarianceAdaptiveState, info: StepInfo):
        did = info.did_sam
        n, r = info.sam_stats
        # A SAM step whose statistics are not finite is taken but not recorded (one NaN
        # would make base_rate NaN for good and stop the SAM steps); it is counted instead.
        finite = jnp.isfinite(n) & jnp.isfinite(r)
        num, norms, ratios, vars_ = _record(state, did & finite, n, r, blocks)
        skipped = jnp.where(did & ~finite, optax.safe_increment(state.num_skipped),
                            state.num_skipped)  # fmt: skip
        in_window = info.step >= warmup_steps
        taken = state.taken + (did & in_window).astype(jnp.int32)
        history = jnp.where(in_window, state.plan.at[state.window_pos].set(did), state.plan)
        due, fields = _window_schedule(
            optax.safe_increment(info.step), taken, state.base_rate, state.quota, history,
            num, ratios, vars_, state.key, config,
        )  # fmt: skip
        new_state = VarianceAdaptiveState(
            num_recorded=num, num_skipped=skipped, psf_norms=norms, psf_ratios=ratios,
            psf_vars=vars_, key=state.key, **fields,
        )  # fmt: skip
        return new_state, due

    return Schedule(init_fn, update_fn, sam_stats=sam_stats_fn)


def vsam(
    rho: _common.ScalarOrSchedule = 0.05,
    *,
    window: int = 50,
    blocks: int = 5,
    max_rate: float = 0.8,
    sensitivity: tuple[float, float] = (0.13, 0.13),
    reuse_decay: float = 0.7,
    max_reuse: int = 6,
    warmup_steps: int = 0,
    stat_mask: Any | Callable[[optax.Params], Any] = None,
    seed: int = 0,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""vSAM: SAM steps on an adaptively sampled subset, the PSF reused in between.

    The SAM gradient splits as ``g_s = g + PSF``, where the *projected second
    order face* ``PSF = g_s − g ≈ rho · H g / ‖g‖`` changes slowly. vSAM pays for
    ``g_s`` only on sampled steps and reuses the cached PSF on the others. It is
    :func:`sharpax.scheduled_sam` with :func:`sharpax.schedules.variance_adaptive`
    and :func:`sharpax.reuse_rules.decayed_psf`.

    * **SAM step**: ``g_s = grad_fn(w + ε)``, ``ε = rho · g / (‖g‖₂ + eps)``
      (ascent as in :func:`sharpax.sam`); cache ``psf = g_s − g``; reset the
      reuse weight to 1; record ``n = ‖psf‖`` and ``r = ‖psf‖ / ‖g‖`` (norms
      over the leaves selected by ``stat_mask``) into buffers of the last
      ``window`` SAM steps and, once the n-buffer is full, ``v`` = mean over
      ``blocks`` equal blocks of the *sorted* n-buffer of each block's unbiased
      variance into a third. Returns ``g_s``.
    * **Reuse step**: for the ``max_reuse`` steps after a SAM step the weight
      becomes ``w ← w · reuse_decay`` (0.7, 0.49, ...) and the step returns
      ``g + w · psf``; afterwards plain ``g``. ``grad_fn`` is not run.
    * **Schedule**: the first ``warmup_steps`` steps are SAM steps. Then steps
      are grouped in windows of ``window`` steps. At each window start
      ``dr`` / ``dv`` = mean relative change between consecutive valid entries
      of the r / v buffers, clipped to [−1, 1];
      ``base_rate ← clip(base_rate · (1 + s₁·dr + s₂·dv), 1, floor(window ·
      max_rate))`` (``base_rate`` starts at 1); quota ``q = floor(base_rate)``
      and ``p = base_rate / window``. Step ``i`` of the window is a SAM step if
      ``(taken < q and U_i < p) or (window − i ≤ q − taken)``: exactly ``q`` SAM
      steps per window. ``U`` comes from ``fold_in(state.key, window_index)``,
      so decisions are deterministic, on device, and the whole window is
      planned at its start (``state.plan``).

    ``update(grads, state, params, *, grad_fn, sam_step=None)``: with
    ``sam_step=None`` the step branches on device (``jax.lax.cond`` on
    ``state.sam_due``). With a static ``sam_step=True``/``False`` no conditional
    is traced and ``False`` never calls ``grad_fn`` (``grad_fn`` and ``params``
    may then be omitted): compile one step function for each and pick by
    :func:`sam_due` (or read :func:`upcoming_sam_steps` once per window). A
    ``sam_step`` that differs from ``state.sam_due`` is honoured: the counters,
    the PSF cache and the statistics reflect what was done, and the rest of
    the window is re-planned from the SAM steps actually ``taken`` (a skipped
    SAM step is made up later in the window if the steps left allow it; an
    extra one lowers the remaining count), so the quota is met whenever the
    caller follows ``sam_due`` from some point of the window on.

    Statistics: ``n`` and ``r`` are computed on every step that may be a SAM
    step, i.e. every step of the ``lax.cond`` path (``sam_step=None``) and
    every ``sam_step=True`` step, outside the branches (two norms, plus a
    ``pmean`` of two scalars under ``axis_name``; this keeps collectives out of
    the conditional), and are *stored* only on SAM steps. ``sam_step=False``
    steps skip them.

    The cached PSF is kept in at least float32 (float32 for bfloat16 / float16
    params, like MESA's EMA; one float32 copy of the params), so the small
    difference ``g_s − g`` is not rounded to the params' precision.

    Data parallel: pass each device's own gradient and a per-device
    ``grad_fn`` (no ``pmean`` inside it) and average the output right after
    the transform with :func:`sharpax.pmean_updates` (see :func:`sharpax.sam`).
    ``axis_name`` averages the ascent gradient exactly as in
    :func:`sharpax.sam` *and* ``pmean``-s the statistics ``n`` and ``r``, so
    every device holds the same buffers, rate and key and takes the same
    decisions (required when ``grad_fn`` contains collectives, or for the
    two-function path). Each device caches its own ``psf_i = g_s,i − g_i``.
    Since both step kinds are linear in ``(g, psf)``, the averaged output,
    ``mean_i (g_i + w · psf_i) = mean_i g_i + w · mean_i psf_i``, is exactly
    single-device vSAM on the global batch for the same decisions (with
    ``axis_name``; without it, the ascent and the PSF are per device,
    m-sharpness). The statistics, however, are device means of per-device
    norms (``n = mean_i ‖psf_i‖``, ``r = mean_i ‖psf_i‖ / ‖g_i‖``), not norms
    of the global-batch PSF, so the rate and the decisions can differ from a
    single-device run on the global batch. Without ``axis_name`` each device
    follows its own statistics and the decisions may diverge across devices.
    For exactly the single-device computation, schedule included, pass
    ``pmean``-ed gradients and ``pmean`` inside ``grad_fn`` instead (every
    device then holds the same ``g``, ``g_s`` and ``psf``; same communication
    cost, no per-device ascent).

    Deviations from the authors' code (ajiaaa/vSAM):

    * Windows are exactly ``window`` steps long from the end of warm-up, and
      the rate update, quota and plan are computed at every window start
      including the first. (Their window counter starts at 1 and their
      SAM-step counter carries 1 over from warm-up, so their first post
      warm-up window is 49 steps with no SAM step.)
    * Exactly ``max_reuse`` reuse steps, counted with an integer; theirs
      compares floats (``w > 0.7**6``), which may give one more. In
      particular ``reuse_decay=1`` gives ``max_reuse`` reuse steps of weight 1
      here, and none at all in theirs (``1 > 1**6`` is false); with
      ``reuse_decay=0`` both add nothing.
    * Zero-safe statistics: ``r = 0`` when ``‖g‖ = 0``; relative changes use
      only valid consecutive pairs with a positive denominator (theirs divide
      by the zero-initialised buffer entries, NaN until buffers fill); no pair
      gives a change of 0.
    * ``v`` is recorded only once the n-buffer holds ``window`` real values
      (theirs sorts a zero-padded buffer). ``window`` must be a multiple of
      ``blocks`` with blocks of at least 2 entries (theirs drops the
      remainder; a 1-entry block has no unbiased variance).
    * The reuse step before any SAM step returns plain ``g`` (theirs fails).
    * ``U < p`` with a JAX key instead of Python's ``random.random() >= 1 − p``
      (same distribution); per-window keys make runs reproducible/resumable.
    * Statistics over ``stat_mask`` leaves (default: all) instead of the last
      ``last_layer`` parameter tensors; warm-up in steps instead of epochs (3);
      ``axis_name`` averaging (their code is single-device); the ``sam_step``
      override (their schedule is internal).

    Args:
      rho: neighbourhood radius, a non-negative float or a schedule of ``count``.
      window: steps per window; also the length of the statistics buffers.
        Static int (``static_args`` under ``optax.inject_hyperparams``).
      blocks: number of equal blocks of the sorted n-buffer for ``v``; must
        divide ``window`` with at least 2 entries per block. Static int.
      max_rate: the rate is capped at ``floor(window · max_rate)`` SAM steps
        per window; in (0, 1] with ``floor(window · max_rate) >= 1``.
      sensitivity: ``(s₁, s₂)``, gains of the r and v relative changes.
      reuse_decay: reuse weight decay in [0, 1].
      max_reuse: number of reuse steps after each SAM step (int >= 0).
      warmup_steps: number of initial steps that are all SAM steps.
      stat_mask: which leaves enter ``n`` and ``r``: a pytree of Python bools
        with the params' structure, a callable ``params -> mask``, or None for
        all leaves.
      seed: seed of the PRNG key of the schedule (same on every device).
      eps: added to ``‖g‖`` in ``ε`` so a zero gradient gives ``ε = 0``.
      axis_name: mapped axis for the ascent gradient and the statistics.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`sharpax.ScheduledSAMState` with a
      :class:`sharpax.schedules.VarianceAdaptiveState` (``state.schedule``:
      rate, plan, statistics, key) and a
      :class:`sharpax.reuse_rules.DecayedPSFState` (``state.reuse``: the PSF
      and its weight).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> loss = lambda w, x: jnp.sum((x * w) ** 2)
      >>> x, params = jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0])
      >>> opt = optax.chain(sharpax.vsam(0.05, window=10, blocks=5), optax.sgd(0.01))
      >>> state = opt.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     grads = jax.grad(loss)(params, x)
      ...     updates, state = opt.update(
      ...         grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x))
      ...     return optax.apply_updates(params, updates), state
      >>> for _ in range(20):
      ...     params, state = step(params, state)
      >>> print(int(sharpax.num_sam_steps(state)))  # one SAM step per window
      2

    References:
      Deng et al., `Effectively Estimating Gradient Sample Size to Speed Up
      Sharpness Aware Minimization <https://arxiv.org/abs/2403.08821>`_, 2024
      (code: https://github.com/ajiaaa/vSAM)
    """
    _common.check_non_negative("rho", rho)
    _common.check_number("reuse_decay", reuse_decay, low=0.0, high=1.0)
    schedule = variance_adaptive(
        window=window,
        blocks=blocks,
        max_rate=max_rate,
        sensitivity=sensitivity,
        warmup_steps=warmup_steps,
        stat_mask=stat_mask,
        seed=seed,
    )
    reuse = reuse_rules.decayed_psf(reuse_decay, max_reuse)
    return _build(rho, schedule, reuse, eps=eps, axis_name=axis_name, owner="vsam")
