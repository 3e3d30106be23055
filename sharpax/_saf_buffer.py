"""SAF's buffer and per-step math (private): state, reference gather, term, buffer write.

Used by :func:`sharpax.saf`; every rule and deviation is documented there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from sharpax import _trajectory
from sharpax.trajectory import trajectory_kl


class SAFState(NamedTuple):
    """State of :func:`saf`: a ring buffer of past logits, one row per example.

    Attributes:
      logits: ``(num_examples, lag + 1, num_classes)`` array in the buffer dtype;
        slot ``e mod (lag + 1)`` of row ``i`` holds the logits example ``i``
        produced the last time it was seen in an epoch ``≡ e (mod lag + 1)``.
      written_epoch: ``(num_examples, lag + 1)`` int32, the epoch at which each
        slot was written, ``-1`` if never written. Only slots stamped with
        exactly ``epoch − lag`` are used as references.
    """

    logits: jax.Array
    written_epoch: jax.Array


class _SAFConfig(NamedTuple):
    """The checked arguments of :func:`saf` (private), passed to the module-level helpers."""

    num_examples: int
    num_classes: int
    lag: int
    start_epoch: int
    end_epoch: int | None
    temperature: Any
    weight: Any
    dtype: np.dtype
    axis_name: str | None
    debug_checks: bool

    @property
    def slots(self) -> int:
        """Slots per example in the ring buffer: ``lag + 1``."""
        return self.lag + 1

    @property
    def nbytes(self) -> int:
        """Bytes of the state: the logits buffer plus the int32 epoch stamps."""
        n, slots = self.num_examples, self.slots
        return n * slots * self.num_classes * self.dtype.itemsize + n * slots * 4


# --------------------------------------------------------------------------------------
# Data-parallel helpers.


def _explicit_mesh(*trees: Any) -> Any:
    """The abstract mesh of the first leaf sharded along an Explicit mesh axis, or None."""
    for leaf in jax.tree.leaves(trees):
        sharding = getattr(jax.typeof(leaf), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or getattr(mesh, "empty", True):
            continue
        if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types) and any(
            s is not None for s in sharding.spec
        ):
            return mesh
    return None


def _gather_invariant(x: jax.Array, axis_name: str) -> jax.Array:
    """Concatenation of ``x`` over ``axis_name`` (device order), replicated.

    Built from ``psum`` of a zero array holding this device's block, so the result
    is exact (adding zeros), works under both ``pmap`` and ``shard_map`` and is
    typed as replicated (invariant) under ``shard_map``'s ``check_vma``.
    """
    n = jax.lax.axis_size(axis_name)
    b = x.shape[0]
    full = jnp.zeros((n * b,) + x.shape[1:], x.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, x, jax.lax.axis_index(axis_name) * b, 0)
    return jax.lax.psum(full, axis_name)


def _last_occurrence(keys: jax.Array) -> jax.Array:
    """True at the last position of each distinct key (deterministic dedup)."""
    order = jnp.argsort(keys, stable=True)
    sorted_keys = keys[order]
    is_last_sorted = jnp.append(sorted_keys[1:] != sorted_keys[:-1], True)
    return jnp.zeros_like(is_last_sorted).at[order].set(is_last_sorted)


# --------------------------------------------------------------------------------------
# The update, in steps: read the references, gather the writes, the term, the write.


def _debug_check_ids(cfg: _SAFConfig, ids: jax.Array, mask: jax.Array, in_range: jax.Array) -> None:
    """In-jit id check, reported under ``checkify`` (opt-in: see :func:`saf`)."""
    n = cfg.num_examples
    bad = mask & ~in_range
    checkify.debug_check(
        ~jnp.any(bad),
        f"sharpax.saf: example ids must lie in [0, num_examples={n}); got {{}} out-of-range "
        "id(s) in this batch, whose ids span [{}, {}]. Ids are never clamped or dropped.",
        jnp.sum(bad.astype(jnp.int32)),
        jnp.min(jnp.where(mask, ids, n)),
        jnp.max(jnp.where(mask, ids, -1)),
    )


def _gather_references(
    cfg: _SAFConfig,
    state: SAFState,
    logits: jax.Array,
    ids: jax.Array,
    mask: jax.Array,
    in_range: jax.Array,
    epoch: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Sum of the KL to the references written at ``epoch - lag``, and their count.

    Only slots stamped with exactly ``epoch - lag`` count (never-written slots carry the
    stamp -1, stale ones an older epoch); masked and out-of-range rows never do.
    """
    slots = cfg.slots
    ref_epoch = epoch - cfg.lag
    safe_ids = jnp.where(in_range, ids, 0)
    read_slot = jnp.mod(ref_epoch, slots)
    ref = state.logits[safe_ids, read_slot]
    stamp = state.written_epoch[safe_ids, read_slot]
    # ref_epoch >= 0 matters: never-written slots carry the stamp -1.
    valid = mask & in_range & (stamp == ref_epoch) & (ref_epoch >= 0)
    kl = trajectory_kl(logits, ref, cfg.temperature)
    local_num = jnp.sum(jnp.where(valid, kl, 0.0))
    local_cnt = jnp.sum(valid.astype(jnp.int32))
    return local_num, local_cnt


def _gather_writes(
    cfg: _SAFConfig, logits: jax.Array, ids: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The (logits, ids, mask) to write: this device's, or all devices' under ``axis_name``."""
    w_logits = jax.lax.stop_gradient(jnp.asarray(logits)).astype(cfg.dtype)
    w_ids, w_mask = ids, mask
    if cfg.axis_name is not None:
        w_logits = _gather_invariant(w_logits, cfg.axis_name)
        w_ids = _gather_invariant(w_ids, cfg.axis_name)
        w_mask = _gather_invariant(w_mask.astype(jnp.int32), cfg.axis_name).astype(bool)
    return w_logits, w_ids, w_mask


def _mean_term(
    cfg: _SAFConfig, local_num: jax.Array, local_cnt: jax.Array, epoch: jax.Array
) -> jax.Array:
    """``weight`` times the global mean KL over valid entries, 0 outside the active epochs."""
    weight, axis_name = cfg.weight, cfg.axis_name
    if axis_name is None:
        denom = jnp.maximum(local_cnt, 1).astype(jnp.float32)
        term = weight * local_num / denom
    else:
        n_dev = jax.lax.axis_size(axis_name)
        global_num = jax.lax.psum(jax.lax.stop_gradient(local_num), axis_name)
        denom = jnp.maximum(jax.lax.psum(local_cnt, axis_name), 1).astype(jnp.float32)
        # Value: the full-batch term. Gradient: n_dev x this device's share, so
        # that pmean over devices gives the full-batch gradient.
        share = weight * n_dev * local_num / denom
        term = share + jax.lax.stop_gradient(weight * global_num / denom - share)
    return jnp.where(_trajectory.term_active(epoch, cfg.start_epoch, cfg.end_epoch), term, 0.0)


def _poison_bad_ids(
    term: jax.Array, any_bad: jax.Array, logits: jax.Array, mask: jax.Array
) -> jax.Array:
    """NaN in the value and the gradient of every used logit if any id is bad."""
    # A bad id anywhere in the (global) batch poisons the value *and* the gradient
    # of every used logit, whatever the epoch: NaN · sum = NaN with d/dz = NaN.
    # Otherwise the added 0 · sum is exactly 0 (value and gradient).
    poison = jnp.where(any_bad, jnp.nan, 0.0).astype(jnp.float32)
    used = jnp.where(mask[:, None], jnp.asarray(logits).astype(jnp.float32), 0.0)
    return term + poison * jnp.sum(used)


def _write_buffer(
    cfg: _SAFConfig,
    state: SAFState,
    w_logits: jax.Array,
    w_ids: jax.Array,
    w_mask: jax.Array,
    w_in_range: jax.Array,
    any_bad: jax.Array,
    epoch: jax.Array,
) -> SAFState:
    """Writes this epoch's logits to slot ``epoch mod (lag + 1)``, stamped with ``epoch``.

    The last occurrence of a repeated id wins; all or nothing: a bad id anywhere in the
    batch writes nothing at all.
    """
    n = cfg.num_examples
    ok = w_mask & w_in_range
    keys = jnp.where(ok, w_ids, n)
    write = ok & _last_occurrence(keys) & ~any_bad
    idx = jnp.where(write, w_ids, n)  # n: out of range, dropped
    write_slot = jnp.mod(epoch, cfg.slots)
    return SAFState(
        logits=state.logits.at[idx, write_slot].set(w_logits, mode="drop"),
        written_epoch=state.written_epoch.at[idx, write_slot].set(
            jnp.broadcast_to(epoch, idx.shape), mode="drop"
        ),
    )


def _update_core(
    cfg: _SAFConfig,
    state: SAFState,
    logits: jax.Array,
    ids: jax.Array,
    mask: jax.Array,
    epoch: jax.Array,
) -> tuple[jax.Array, SAFState]:
    """``(term, new_state)`` from checked arrays: int32 ``ids``, bool ``mask``, int32 ``epoch``."""
    n = cfg.num_examples
    in_range = (ids >= 0) & (ids < n)
    if cfg.debug_checks:
        _debug_check_ids(cfg, ids, mask, in_range)
    local_num, local_cnt = _gather_references(cfg, state, logits, ids, mask, in_range, epoch)
    w_logits, w_ids, w_mask = _gather_writes(cfg, logits, ids, mask)
    w_in_range = (w_ids >= 0) & (w_ids < n)
    any_bad = jnp.any(w_mask & ~w_in_range)
    term = _mean_term(cfg, local_num, local_cnt, epoch)
    term = _poison_bad_ids(term, any_bad, logits, mask)
    new_state = _write_buffer(cfg, state, w_logits, w_ids, w_mask, w_in_range, any_bad, epoch)
    return term, new_state
