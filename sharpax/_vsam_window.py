"""vSAM's window arithmetic (private): statistics buffers, rate update and per-window plan.

Used by :func:`sharpax.schedules.variance_adaptive`; see :func:`sharpax.vsam` for the
rule and every deviation from the authors' code.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpax import _common

_F32 = _common.F32


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


def masked_norm(tree: Any, mask: Any) -> jax.Array:
    """Global float32 L2 norm of the leaves of ``tree`` where ``mask`` is True (None: all)."""
    if mask is None:
        return _common.global_norm(tree)
    sq = jax.tree.map(
        lambda x, m: jnp.sum(jnp.square(x.astype(_F32))) if m else jnp.zeros([], _F32),
        tree,
        mask,
    )
    return jnp.sqrt(sum(jax.tree.leaves(sq), jnp.zeros([], _F32)))


def _window_schedule(c, taken, base_rate, quota, history, num_sam, ratios, vars_, key, config):
    """vSAM's schedule fields for step index ``c`` (the next step).

    ``config = (warmup_steps, s_r, s_v, max_count)``; ``window`` is the buffers' length.
    ``taken`` / ``history`` describe the current window up to step ``c - 1``.
    Returns ``(sam_due, fields)`` with ``fields`` the schedule part of
    :class:`VarianceAdaptiveState`.
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
    return plan[pos], {
        "sam_rate": jnp.where(in_warmup, 1.0, quota / window).astype(_F32),
        "base_rate": base_rate,
        "quota": quota,
        "taken": taken.astype(jnp.int32),
        "window_pos": pos.astype(jnp.int32),
        "plan": plan,
    }


@functools.partial(jax.jit, static_argnames=("window",))
def _initial_window_schedule(seed, config, *, window):
    """PRNG key and schedule of step 0 (jitted: much faster than op-by-op on first use)."""
    key = jax.random.PRNGKey(seed)
    zero = jnp.zeros([], jnp.int32)
    buf = jnp.zeros([window], _F32)
    due, fields = _window_schedule(
        zero, zero, jnp.ones([], _F32), zero, jnp.zeros([window], bool), zero, buf, buf, key, config
    )
    return key, due, fields


def _check_window(window: Any, blocks: Any, max_rate: Any) -> tuple[int, int, Any]:
    """Validates vSAM's window arguments; returns ``(window, blocks, max_count)``."""
    window = _common.check_int("window", window, low=2)
    blocks = _common.check_int("blocks", blocks, low=1)
    if window % blocks or window // blocks < 2:
        raise ValueError(
            f"window must be a multiple of blocks with at least 2 entries per block (the "
            f"unbiased variance of a block needs 2); got window={window}, blocks={blocks}."
        )
    _common.check_number("max_rate", max_rate, low=0.0, high=1.0, low_open=True)
    if isinstance(max_rate, (int, float, np.number)):
        if int(window * float(max_rate)) < 1:
            raise ValueError(
                f"floor(window * max_rate) must be >= 1 (at least one SAM step per window); got "
                f"window={window}, max_rate={max_rate}."
            )
        return window, blocks, float(int(window * float(max_rate)))  # the authors' int(K * max_p)
    # An array, e.g. under optax.inject_hyperparams.
    return window, blocks, jnp.maximum(jnp.floor(window * jnp.asarray(max_rate, _F32)), 1.0)


def _record(state: Any, did: jax.Array, n: jax.Array, r: jax.Array, blocks):
    """The statistics buffers after a step (only a SAM step records n, r and, once full, v)."""

    def shift(buf, x):
        return jnp.concatenate([buf[1:], x[None]])

    window = state.psf_norms.shape[0]
    num = jnp.where(did, optax.safe_increment(state.num_recorded), state.num_recorded)
    norms = jnp.where(did, shift(state.psf_norms, n), state.psf_norms)
    ratios = jnp.where(did, shift(state.psf_ratios, r), state.psf_ratios)
    v_due = did & (num >= window)
    vars_ = jnp.where(v_due, shift(state.psf_vars, _block_variance(norms, blocks)), state.psf_vars)
    return num, norms, ratios, vars_
