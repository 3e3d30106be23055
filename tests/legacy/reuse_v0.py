"""FROZEN COPY of sharpax at commit 7d33171 (before the schedules x reuse-rules refactor).

Old-versus-new tests compare the refactored library against this code on fixed problems
(bit for bit, decisions included). Never edit it; delete it once those tests are retired.
"""
# ruff: noqa
"""LookSAM and vSAM: pay for SAM's second pass on some steps, reuse its direction on the others.

Both transforms sit first in an optax chain, like :func:`sharpax.sam`, and take
the same ``grad_fn`` / ``axis_name`` arguments. On a *SAM step* they compute the
perturbed gradient ``g_s = grad_fn(w + ε)`` (two forward-backward passes in
all) and cache a direction derived from it; on a *reuse step* they combine the
fresh gradient ``g`` with the cached direction and never run ``grad_fn`` (one
forward-backward pass).

``update(grads, state, params, *, grad_fn, sam_step=None)``:

* ``sam_step=None``: the transform reads its own schedule (``state.sam_due``)
  and branches on device with ``jax.lax.cond``; ``grad_fn`` is traced only
  inside the SAM branch. One compiled step function, fine on GPU/TPU.
* ``sam_step=True`` / ``False`` (a static Python bool): the caller has decided;
  no conditional is traced and with ``False`` ``grad_fn`` is not even called.
  Compile two step functions and pick one per step on the host from
  ``sharpax.sam_due(opt_state)`` (the schedule's decision for the *next* step).
  On XLA:CPU a gradient inside a ``lax.cond`` branch can be many times slower
  than outside one, so this two-function path is the fast one there.

The state always advances the schedule, so both paths give the same trajectory.

Donation: the ``sam_step=True`` step function overwrites the cached direction
without reading it, so ``jax.jit`` prunes that input. When you donate the
state, jit that step with ``keep_unused=True`` as well
(``jax.jit(step, donate_argnums=..., keep_unused=True)``); otherwise each SAM
step writes the cache to fresh buffers rather than the donated ones (on an
H100, a ResNet-18 SAM step of LookSAM took 10.1 ms instead of 7.2 ms).

Data parallel (``pmap`` / ``shard_map``), the recipe shared with
:func:`sharpax.sam`: pass each device's own gradient and a per-device
``grad_fn`` (no ``pmean`` inside it), and average the transform's *output*
right after it with :func:`sharpax.pmean_updates`::

  optax.chain(sharpax.vsam(0.05, axis_name='batch'),
              sharpax.pmean_updates('batch'), optax.sgd(0.1, momentum=0.9))

The cached direction (LookSAM's ``g_v``, vSAM's PSF) is then each device's own,
computed from that device's clean and SAM gradients. See each transform's
docstring for when the averaged output equals a single-device run on the global
batch.
"""


import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from legacy import common_v0 as _common

_F32 = _common.F32


# --------------------------------------------------------------------------- shared helpers


def _check_sam_step(sam_step: Any, owner: str) -> None:
    if sam_step is not None and not isinstance(sam_step, bool):
        raise TypeError(
            f"sharpax.{owner}: sam_step must be None (decide on device from state.sam_due "
            "with lax.cond) or a static Python bool (True: SAM step, False: reuse step; no "
            f"conditional is traced); got {sam_step!r} of type {type(sam_step).__name__}. "
            "To dispatch from the host, call a step function compiled for "
            "`bool(sharpax.sam_due(opt_state))`; a traced value cannot select the program."
        )


def _branch(sam_step, pred, sam_branch, reuse_branch, operand):
    """lax.cond on ``pred`` when ``sam_step`` is None, else the static branch only."""
    if sam_step is None:
        return jax.lax.cond(pred, sam_branch, reuse_branch, operand)
    return sam_branch(operand) if sam_step else reuse_branch(operand)


def _did_sam(sam_step, state) -> jax.Array:
    return state.sam_due if sam_step is None else jnp.asarray(sam_step)


# --------------------------------------------------------------------------- LookSAM


class LookSAMState(NamedTuple):
    """State of :func:`looksam`.

    Attributes:
      count: int32 scalar, number of ``update`` calls so far (``rho`` and
        ``alpha`` schedules are evaluated at it).
      num_sam_steps: int32 scalar, number of steps on which ``grad_fn`` was
        run (the second, perturbed forward-backward pass).
      sam_due: bool scalar, the schedule's decision for the *next* step:
        ``count % k == 0``.
      g_v: pytree like the params, the cached component of the last SAM
        gradient orthogonal to the clean gradient of that step (this
        device's, under data parallelism). Leaves are at least float32
        (float32 for bfloat16/float16 params), whatever the params' dtype.
      g_v_norm: float32 scalar, ``‖g_v‖₂`` (global over the pytree; this
        device's, under data parallelism), computed once at the SAM step so
        reuse steps need only ``‖g‖``.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> state = sharpax.looksam(k=3).init(jnp.zeros(2))
      >>> print(bool(state.sam_due), int(state.num_sam_steps))
      True 0
    """

    count: jax.Array
    num_sam_steps: jax.Array
    sam_due: jax.Array
    g_v: optax.Updates
    g_v_norm: jax.Array


def looksam(
    rho: _common.ScalarOrSchedule = 0.05,
    *,
    k: int = 5,
    alpha: _common.ScalarOrSchedule = 0.7,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: a SAM step every ``k`` steps, its orthogonal part reused in between.

    On steps with ``count % k == 0`` (SAM steps) it returns the SAM gradient
    ``g_s = grad_fn(w + ε)``, ``ε = rho · g / (‖g‖₂ + eps)`` exactly as
    :func:`sharpax.sam`, and caches the part of ``g_s`` orthogonal to the clean
    gradient ``g``::

      g_v = g_s - (<g_s, g> / ‖g‖²) · g

    On the other steps it returns ``g + alpha · (‖g‖ / ‖g_v‖) · g_v`` without
    calling ``grad_fn``. Norms and inner products are global over the pytree
    and computed in float32. With ``k=1`` it is :func:`sharpax.sam`. Zero
    gradients give no NaN: a zero ``g`` gives ``g_v = g_s`` and a zero ``g_v``
    adds nothing.

    ``update(grads, state, params, *, grad_fn, sam_step=None)``: with
    ``sam_step=None`` the step branches on device (``jax.lax.cond`` on
    ``state.sam_due``); with a static ``sam_step=True``/``False`` no conditional
    is traced and ``False`` never calls ``grad_fn`` (``grad_fn`` and ``params``
    may then be omitted). A ``sam_step`` different from ``state.sam_due`` is
    honoured (``num_sam_steps`` and ``g_v`` reflect what was done) and the
    schedule stays ``count % k == 0``.

    The cached ``g_v`` is kept in at least float32 (float32 for bfloat16 /
    float16 params, like MESA's EMA): one float32 copy of the params.

    Data parallel: pass each device's own gradient and a per-device
    ``grad_fn`` (no ``pmean`` inside it) and average the output right after
    the transform with :func:`sharpax.pmean_updates` (see :func:`sharpax.sam`).
    ``axis_name`` averages the ascent gradient exactly as in
    :func:`sharpax.sam`; ``g`` in the projection, ``g_s`` and so ``g_v`` are
    the device's own. On SAM steps the averaged output is the SAM gradient of
    the global batch (with ``axis_name``) or the mean of per-device SAM
    gradients (``axis_name=None``, m-sharpness). On reuse steps each device
    applies LookSAM to its own gradient: the output is
    ``mean_i (g_i + alpha · (‖g_i‖ / ‖g_v,i‖) · g_v,i)``, which is *not*
    single-device LookSAM on the global batch (the projection and the
    ``‖g‖ / ‖g_v‖`` scaling are nonlinear). For exactly the single-device
    computation on the global batch, pass ``pmean``-ed gradients and
    ``pmean`` inside ``grad_fn`` instead (every device then holds the same
    ``g``, ``g_s`` and ``g_v``, at the same communication cost, but without
    per-device ascent). The schedule depends only on ``count``, so all
    devices agree.

    Args:
      rho: neighbourhood radius, a non-negative float or a schedule of ``count``.
      k: a SAM step every ``k`` steps (the first step is one). An int >= 1;
        under ``optax.inject_hyperparams`` it may also be an injected int32
        scalar.
      alpha: weight of the reused direction, a float or a schedule of ``count``.
      eps: added to ``‖g‖`` in ``ε`` so a zero gradient gives ``ε = 0``.
      axis_name: mapped axis over which to average the ascent gradient, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`LookSAMState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> loss = lambda w, x: jnp.sum((x * w) ** 2)
      >>> x, params = jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0])
      >>> opt = optax.chain(sharpax.looksam(0.05, k=2), optax.sgd(0.1))
      >>> state = opt.init(params)
      >>> for _ in range(3):
      ...     grads = jax.grad(loss)(params, x)
      ...     updates, state = opt.update(
      ...         grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x))
      ...     params = optax.apply_updates(params, updates)
      >>> print(int(sharpax.num_sam_steps(state)), bool(sharpax.sam_due(state)))
      2 False

    References:
      Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, CVPR 2022
    """
    _common.check_non_negative("rho", rho)
    _common.check_non_negative("alpha", alpha)
    _common.check_non_negative("eps", eps, schedule=False)
    k = _common.check_int("k", k, low=1, static=False)

    def init_fn(params: optax.Params) -> LookSAMState:
        # Every leaf its own buffer, so a train state can be donated to jit.
        return LookSAMState(
            count=jnp.zeros([], jnp.int32),
            num_sam_steps=jnp.zeros([], jnp.int32),
            sam_due=jnp.ones([], bool),
            g_v=_common.zeros_f32_like(params),
            g_v_norm=jnp.zeros([], _F32),
        )

    def update_fn(
        updates: optax.Updates,
        state: LookSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: Any = None,
        sam_step: bool | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, LookSAMState]:
        del extra_args
        _check_sam_step(sam_step, "looksam")
        if sam_step is not False:
            _common.require_grad_fn(grad_fn, "looksam")
            _common.require_params(params, "looksam")
        rho_t = _common.value_at(rho, state.count)
        alpha_t = _common.value_at(alpha, state.count)

        def sam_branch(operand):
            g, g_v_old, _ = operand
            g_s = _common.sam_gradient(g, params, grad_fn, rho_t, eps=eps, axis_name=axis_name)
            coef = _common.safe_div(_common.vdot32(g_s, g), _common.vdot32(g, g))

            def orthogonal(s, gg, old):
                dtype = _common.at_least_f32(old.dtype)
                return s.astype(dtype) - coef.astype(dtype) * gg.astype(dtype)

            g_v = optax.tree.cast_like(jax.tree.map(orthogonal, g_s, g, g_v_old), g_v_old)
            return g_s, g_v, _common.global_norm(g_v)

        def reuse_branch(operand):
            g, g_v, g_v_norm = operand
            scale = alpha_t * _common.safe_div(_common.global_norm(g), g_v_norm)
            out = jax.tree.map(
                lambda gg, v: (gg.astype(_F32) + scale * v.astype(_F32)).astype(gg.dtype), g, g_v
            )
            return out, g_v, g_v_norm

        did = _did_sam(sam_step, state)
        new_updates, g_v, g_v_norm = _branch(
            sam_step,
            state.sam_due,
            sam_branch,
            reuse_branch,
            (updates, state.g_v, state.g_v_norm),
        )
        count = optax.safe_increment(state.count)
        return new_updates, LookSAMState(
            count=count,
            num_sam_steps=jnp.where(
                did, optax.safe_increment(state.num_sam_steps), state.num_sam_steps
            ),
            sam_due=(count % k) == 0,
            g_v=g_v,
            g_v_norm=g_v_norm,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------- vSAM


class VSAMState(NamedTuple):
    """State of :func:`vsam`. All leaves are arrays (jit/pmap/checkpoint friendly).

    Attributes:
      count: int32 scalar, number of ``update`` calls so far.
      num_sam_steps: int32 scalar, number of steps on which ``grad_fn`` was
        run. Also the number of entries recorded in the statistics buffers.
      sam_due: bool scalar, the schedule's decision for the *next* step.
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
      reuse_weight: float32 scalar, weight of the cached PSF at the last
        reuse step (1 right after a SAM step).
      reuse_left: int32 scalar, reuse steps left before plain gradients.
      psf: pytree like the params, cached PSF = g_s − g of the last SAM step
        (this device's, under data parallelism), with at least float32
        leaves whatever the params' dtype.
      psf_norms: float32 ``[window]``, n = ‖psf‖ of the last ``window`` SAM
        steps, oldest first (only the last ``min(num_sam_steps, window)``
        entries are valid).
      psf_ratios: float32 ``[window]``, r = ‖psf‖ / ‖g‖, same layout.
      psf_vars: float32 ``[window]``, v = sorted-block variance of
        ``psf_norms``, recorded once ``psf_norms`` is full (the last
        ``num_sam_steps - window + 1`` entries, at most ``window``, are valid).
      key: uint32 ``[2]`` PRNG key; the uniforms of window ``j`` are drawn from
        ``fold_in(key, j)``.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> state = sharpax.vsam(window=10, blocks=5).init({'w': jnp.zeros(3)})
      >>> print(state.plan.shape, int(state.quota), f"{float(state.sam_rate):.2f}")
      (10,) 1 0.10
    """

    count: jax.Array
    num_sam_steps: jax.Array
    sam_due: jax.Array
    sam_rate: jax.Array
    base_rate: jax.Array
    quota: jax.Array
    taken: jax.Array
    window_pos: jax.Array
    plan: jax.Array
    reuse_weight: jax.Array
    reuse_left: jax.Array
    psf: optax.Updates
    psf_norms: jax.Array
    psf_ratios: jax.Array
    psf_vars: jax.Array
    key: jax.Array


def _mean_relative_change(buf: jax.Array, num_valid: jax.Array) -> jax.Array:
    """clip(mean_i (x[i+1] - x[i]) / x[i], -1, 1) over the valid consecutive pairs.

    ``buf`` is oldest-first with its last ``num_valid`` entries valid. Pairs
    whose denominator is 0 are left out; with no pair left the change is 0.
    """
    w = buf.shape[0]
    a, b = buf[:-1], buf[1:]
    ok = (jnp.arange(w - 1) >= w - num_valid) & (a > 0)
    rel = jnp.where(ok, (b - a) / jnp.where(ok, a, 1), 0)
    return jnp.clip(_common.safe_div(jnp.sum(rel), jnp.sum(ok).astype(_F32)), -1.0, 1.0)


def _block_variance(norms: jax.Array, blocks: int) -> jax.Array:
    """Mean over ``blocks`` equal blocks of the sorted buffer of each block's unbiased variance."""
    return jnp.mean(jnp.var(jnp.sort(norms).reshape(blocks, -1), axis=1, ddof=1))


def _plan_window(u, pos, taken, quota, prob):
    """Decisions for steps ``pos..W-1`` of a window (False before ``pos``).

    Vectorised form of the sequential rule: step ``i`` is a SAM step iff
    ``(t_i < quota and u[i] < prob) or (W - i <= quota - t_i)``, with ``t_pos =
    taken`` and ``t`` counting SAM steps. Before the first forced step the
    random acceptances are the first ``quota - taken`` indices with
    ``u < prob``; from the first forced step on every step is forced.
    """
    w = u.shape[0]
    i = jnp.arange(w)
    live = i >= pos
    hit = live & (u < prob)
    before = jnp.cumsum(hit) - hit  # hits strictly before i, counted from pos
    t = taken + jnp.minimum(before, jnp.maximum(quota - taken, 0))
    accept = hit & (t < quota)
    forced = live & (w - i <= quota - t)
    first_forced = jnp.where(jnp.any(forced), jnp.argmax(forced), w)
    return live & ((accept & (i < first_forced)) | (i >= first_forced))


def _masked_norm(tree: Any, mask: Any) -> jax.Array:
    if mask is None:
        return _common.global_norm(tree)
    sq = jax.tree.map(
        lambda x, m: jnp.sum(jnp.square(x.astype(_F32))) if m else jnp.zeros([], _F32),
        tree,
        mask,
    )
    return jnp.sqrt(sum(jax.tree.leaves(sq), jnp.zeros([], _F32)))


def _resolve_mask(stat_mask: Any, params: Any) -> Any:
    return _common.resolve_mask(stat_mask, params, "vsam", "stat_mask")


def _schedule(c, taken, base_rate, quota, history, num_sam, ratios, vars_, key, config):
    """vSAM's schedule fields for step index ``c`` (the next step).

    ``config = (warmup_steps, s_r, s_v, max_count)``; ``window`` is the buffers' length.
    ``taken`` / ``history`` describe the current window up to step ``c - 1``.
    """
    warmup_steps, s_r, s_v, max_count = config
    window = ratios.shape[0]
    c = jnp.asarray(c, jnp.int32)
    in_warmup = c < warmup_steps
    t = jnp.maximum(c - warmup_steps, 0)
    pos = jnp.where(in_warmup, jnp.maximum(window - (warmup_steps - c), 0), t % window)
    start = ~in_warmup & (pos == 0)
    dr = _mean_relative_change(ratios, jnp.minimum(num_sam, window))
    dv = _mean_relative_change(vars_, jnp.clip(num_sam - window + 1, 0, window))
    new_rate = jnp.clip(base_rate * (1 + s_r * dr + s_v * dv), 1.0, max_count)
    base_rate = jnp.where(start, new_rate, base_rate).astype(_F32)
    quota = jnp.where(start, jnp.floor(base_rate).astype(jnp.int32), quota)
    taken = jnp.where(start | in_warmup, 0, taken)
    u = jax.random.uniform(jax.random.fold_in(key, t // window), (window,))
    fresh = _plan_window(u, pos, taken, quota, base_rate / window)
    plan = jnp.where(start, fresh, jnp.where(jnp.arange(window) < pos, history, fresh))
    plan = jnp.where(in_warmup, True, plan)
    return {
        "sam_due": plan[pos],
        "sam_rate": jnp.where(in_warmup, 1.0, quota / window).astype(_F32),
        "base_rate": base_rate,
        "quota": quota,
        "taken": taken.astype(jnp.int32),
        "window_pos": pos.astype(jnp.int32),
        "plan": plan,
    }


@functools.partial(jax.jit, static_argnames=("window",))
def _initial_schedule(seed, config, *, window):
    """PRNG key and schedule of step 0 (jitted: much faster than op-by-op on first use)."""
    key = jax.random.PRNGKey(seed)
    zero = jnp.zeros([], jnp.int32)
    buf = jnp.zeros([window], _F32)
    return key, _schedule(
        zero, zero, jnp.ones([], _F32), zero, jnp.zeros([window], bool), zero, buf, buf, key, config
    )


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
    ``g_s`` only on sampled steps and reuses the cached PSF on the others.

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
      :class:`VSAMState`.

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
    _common.check_non_negative("eps", eps, schedule=False)
    window = _common.check_int("window", window, low=2)
    blocks = _common.check_int("blocks", blocks, low=1)
    if window % blocks or window // blocks < 2:
        raise ValueError(
            f"window must be a multiple of blocks with at least 2 entries per block (the "
            f"unbiased variance of a block needs 2); got window={window}, blocks={blocks}."
        )
    _common.check_number("max_rate", max_rate, low=0.0, high=1.0, low_open=True)
    concrete_max_rate = isinstance(max_rate, (int, float, np.number))
    if concrete_max_rate and int(window * float(max_rate)) < 1:
        raise ValueError(
            f"floor(window * max_rate) must be >= 1 (at least one SAM step per window); got "
            f"window={window}, max_rate={max_rate}."
        )
    if not (isinstance(sensitivity, (tuple, list)) and len(sensitivity) == 2):
        raise ValueError(f"sensitivity must be a pair (s1, s2), got {sensitivity!r}.")
    s_r, s_v = sensitivity
    _common.check_number("sensitivity[0]", s_r)
    _common.check_number("sensitivity[1]", s_v)
    _common.check_number("reuse_decay", reuse_decay, low=0.0, high=1.0)
    max_reuse = _common.check_int("max_reuse", max_reuse, low=0, static=False)
    warmup_steps = _common.check_int("warmup_steps", warmup_steps, low=0, static=False)
    seed = _common.check_int("seed", seed, low=0, static=False)
    if concrete_max_rate:
        max_count = float(int(window * float(max_rate)))  # the authors' int(K * max_p)
    else:  # an array, e.g. under optax.inject_hyperparams
        max_count = jnp.maximum(jnp.floor(window * jnp.asarray(max_rate, _F32)), 1.0)

    config = (warmup_steps, s_r, s_v, max_count)

    def init_fn(params: optax.Params) -> VSAMState:
        key, sched = _initial_schedule(seed, config, window=window)
        # Every leaf its own buffer (no shared zeros), so a train state can be donated to jit.
        return VSAMState(
            count=jnp.zeros([], jnp.int32),
            num_sam_steps=jnp.zeros([], jnp.int32),
            reuse_weight=jnp.ones([], _F32),
            reuse_left=jnp.zeros([], jnp.int32),
            psf=_common.zeros_f32_like(params),
            psf_norms=jnp.zeros([window], _F32),
            psf_ratios=jnp.zeros([window], _F32),
            psf_vars=jnp.zeros([window], _F32),
            key=key,
            **sched,
        )

    def update_fn(
        updates: optax.Updates,
        state: VSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: Any = None,
        sam_step: bool | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, VSAMState]:
        del extra_args
        _check_sam_step(sam_step, "vsam")
        mask = None
        if sam_step is not False:
            _common.require_grad_fn(grad_fn, "vsam")
            _common.require_params(params, "vsam")
            mask = _resolve_mask(stat_mask, params)
        rho_t = _common.value_at(rho, state.count)
        zero = jnp.zeros([], _F32)

        reusing = state.reuse_left > 0
        next_weight = (state.reuse_weight * reuse_decay).astype(_F32)
        weight = jnp.where(reusing, next_weight, zero)

        def sam_branch(operand):
            g, psf_old, _ = operand
            g_s = _common.sam_gradient(g, params, grad_fn, rho_t, eps=eps, axis_name=axis_name)

            def difference(s, gg, old):
                dtype = _common.at_least_f32(old.dtype)
                return (s.astype(dtype) - gg.astype(dtype)).astype(old.dtype)

            return g_s, jax.tree.map(difference, g_s, g, psf_old)

        def reuse_branch(operand):
            g, psf, w = operand

            def add_psf(gg, p):
                dtype = _common.at_least_f32(p.dtype)
                return (gg.astype(dtype) + w.astype(dtype) * p.astype(dtype)).astype(gg.dtype)

            return jax.tree.map(add_psf, g, psf), psf

        did = _did_sam(sam_step, state)
        new_updates, psf = _branch(
            sam_step, state.sam_due, sam_branch, reuse_branch, (updates, state.psf, weight)
        )
        if sam_step is False:
            n = r = zero  # not recorded
        else:
            # Outside the branches (cheap: two norms), so that under shard_map the branch
            # outputs keep the variance of their inputs and the pmean is not inside a cond.
            n = _masked_norm(psf, mask)
            r = _common.safe_div(n, _masked_norm(updates, mask))
            n, r = _common.maybe_pmean((n, r), axis_name)

        # Statistics (only a SAM step records).
        def shift(buf, x):
            return jnp.concatenate([buf[1:], x[None]])

        num_sam = jnp.where(did, optax.safe_increment(state.num_sam_steps), state.num_sam_steps)
        norms = jnp.where(did, shift(state.psf_norms, n), state.psf_norms)
        ratios = jnp.where(did, shift(state.psf_ratios, r), state.psf_ratios)
        v_due = did & (num_sam >= window)
        vars_ = jnp.where(
            v_due, shift(state.psf_vars, _block_variance(norms, blocks)), state.psf_vars
        )

        # Reuse weight: reset by a SAM step, decayed by a reuse step.
        reuse_weight = jnp.where(did, 1.0, jnp.where(reusing, next_weight, state.reuse_weight))
        reuse_left = jnp.where(
            did,
            jnp.asarray(max_reuse, jnp.int32),
            jnp.where(reusing, state.reuse_left - 1, state.reuse_left),
        )

        # Schedule: record what this step did, then decide the next step.
        in_window = state.count >= warmup_steps
        taken = state.taken + (did & in_window).astype(jnp.int32)
        history = jnp.where(in_window, state.plan.at[state.window_pos].set(did), state.plan)
        count = optax.safe_increment(state.count)
        sched = _schedule(
            count,
            taken,
            state.base_rate,
            state.quota,
            history,
            num_sam,
            ratios,
            vars_,
            state.key,
            config,
        )
        return new_updates, VSAMState(
            count=count,
            num_sam_steps=num_sam,
            reuse_weight=reuse_weight.astype(_F32),
            reuse_left=reuse_left.astype(jnp.int32),
            psf=psf,
            psf_norms=norms,
            psf_ratios=ratios,
            psf_vars=vars_,
            key=state.key,
            **sched,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
            "that tracks it (num_sam_steps: sam/looksam/vsam; sam_due: looksam/vsam; "
            "sam_rate and the plan: vsam)."
        )
    return value


def num_sam_steps(opt_state: Any) -> jax.Array:
    """Number of steps that ran the second (perturbed) pass, read from any nesting.

    Works on the state of :func:`sharpax.sam`, :func:`looksam` or :func:`vsam`,
    also nested in ``optax.chain`` / ``optax.inject_hyperparams`` (via
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
      opt_state: an optimizer state containing a :func:`looksam` or
        :func:`vsam` state, nested anywhere.

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
      opt_state: an optimizer state containing a :func:`vsam` state, nested
        anywhere.

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
    again. For vSAM it is ``plan[window_pos:]`` (during warm-up, the remaining
    warm-up steps, at most ``window``); it stays exact as long as the caller
    follows it. For LookSAM (which has no plan) it is ``[sam_due]``. Under
    ``pmap`` replica 0 is read (sliced on device, then one device-to-host
    transfer).

    Args:
      opt_state: an optimizer state containing a :func:`looksam` or
        :func:`vsam` state, nested anywhere.

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
    if plan is None:  # LookSAM: no plan, just the next decision
        return np.asarray(jax.device_get(replica0(due))).reshape(1)
    pos, plan = jax.device_get((replica0(_field(opt_state, "window_pos")), replica0(plan)))
    return np.asarray(plan)[int(pos) :]
