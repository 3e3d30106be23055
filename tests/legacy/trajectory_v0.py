"""FROZEN COPY of sharpax at commit 7d33171 (before the schedules x reuse-rules refactor).

Old-versus-new tests compare the refactored library against this code on fixed problems
(bit for bit, decisions included). Never edit it; delete it once those tests are retired.
"""
# ruff: noqa
"""SAF and MESA: trajectory losses from a per-example logit buffer or an EMA teacher.

Both add ``weight · mean_b τ² · KL(softmax(ref_b/τ) ‖ softmax(logits_b/τ))`` to the
training loss, where the reference logits ``ref`` come either from the same
example ``lag`` epochs ago (SAF, a ring buffer indexed by example id) or from an
exponential moving average of the model (MESA). Neither needs a second forward
and backward pass, unlike SAM.
"""


from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify
from jax.sharding import PartitionSpec as P

from legacy import common_v0 as _common

# --------------------------------------------------------------------------------------
# Validation helpers (private).


def _check_positive_float(name: str, value: Any) -> None:
    _common.check_number(name, value, low=0.0, low_open=True)


def _as_epoch(epoch: Any, owner: str) -> jax.Array:
    """Epoch as an int32 scalar; Python ints are checked to be >= 0."""
    if isinstance(epoch, (bool, np.bool_)):
        raise TypeError(f"sharpax.{owner}: epoch must be an int, got {epoch!r}.")
    if isinstance(epoch, (int, np.integer)):
        if epoch < 0:
            raise ValueError(f"sharpax.{owner}: epoch counts from 0, got {epoch}.")
        return jnp.asarray(epoch, jnp.int32)
    shape, dtype = jnp.shape(epoch), jnp.result_type(epoch)
    if shape != () or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"sharpax.{owner}: epoch must be an integer scalar (Python int or int32 array "
            f"of shape ()), got dtype {dtype} and shape {shape}."
        )
    return jnp.asarray(epoch).astype(jnp.int32)


def _check_end_epoch(end_epoch: Any, start_epoch: int, owner: str) -> int | None:
    """``None`` (the term never ends) or an int epoch after ``start_epoch``."""
    if end_epoch is None:
        return None
    end_epoch = _common.check_int("end_epoch", end_epoch, low=0)
    if end_epoch <= start_epoch:
        raise ValueError(
            f"sharpax.{owner}: end_epoch ({end_epoch}) must be greater than start_epoch "
            f"({start_epoch}), or None for a term that never ends."
        )
    return end_epoch


def _term_active(epoch: jax.Array, start_epoch: int, end_epoch: int | None) -> jax.Array:
    """``start_epoch <= epoch < end_epoch`` (no upper bound for ``end_epoch=None``)."""
    active = epoch >= start_epoch
    return active if end_epoch is None else active & (epoch < end_epoch)


def _check_logits_2d(logits: Any, num_classes: int | None, owner: str):
    shape = jnp.shape(logits)
    if len(shape) != 2:
        raise ValueError(
            f"sharpax.{owner}: logits must have shape (batch, num_classes), got shape {shape}."
        )
    if num_classes is not None and shape[1] != num_classes:
        raise ValueError(
            f"sharpax.{owner}: logits must have shape (batch, {num_classes}) "
            f"(num_classes={num_classes}), got shape {shape}."
        )


def _as_where(where: Any, batch: int, owner: str) -> jax.Array:
    if where is None:
        return jnp.ones((batch,), bool)
    if jnp.shape(where) != (batch,):
        raise ValueError(
            f"sharpax.{owner}: where must be a boolean mask of shape ({batch},) (one entry per "
            f"example of the batch), got shape {jnp.shape(where)}."
        )
    return jnp.asarray(where).astype(bool)


# --------------------------------------------------------------------------------------
# The per-example divergence.


def trajectory_kl(
    logits: jax.Array, ref_logits: jax.Array, temperature: float | jax.Array = 5.0
) -> jax.Array:
    r"""Per-example ``τ² · KL(softmax(ref_logits/τ) ‖ softmax(logits/τ))``.

    This is the trajectory loss of SAF and MESA in the form of the official code
    (``F.kl_div(log_softmax(logits/τ), softmax(ref/τ)) · τ²``): the reference
    distribution comes first, and the result is multiplied by ``τ²`` so that its
    gradient, ``τ · (softmax(logits/τ) − softmax(ref_logits/τ))``, keeps the scale
    of a cross-entropy gradient as ``τ`` grows (Hinton et al.'s distillation
    convention). The paper's equations omit the ``τ²`` factor; with the paper's
    defaults (``τ = 5``) that is a factor 25 on the loss weight.

    ``ref_logits`` are constants (wrapped in ``stop_gradient``). Both inputs are
    converted to float32 (so bf16 logits are fine) and the result is float32.

    Args:
      logits: ``(..., num_classes)`` logits of the model being trained.
      ref_logits: reference logits of the same shape (past or teacher logits).
      temperature: softmax temperature ``τ > 0``.

    Returns:
      float32 array of shape ``logits.shape[:-1]`` (``[B]`` for ``[B, C]`` inputs),
      summed over the class axis.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> x = jnp.array([[1.0, 2.0, 3.0]])
      >>> print(sharpax.trajectory_kl(x, x).tolist())
      [0.0]

    References:
      Du et al., `Sharpness-Aware Training for Free
      <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022
    """
    _check_positive_float("temperature", temperature)
    if jnp.shape(logits) != jnp.shape(ref_logits):
        raise ValueError(
            "sharpax.trajectory_kl: logits and ref_logits must have the same shape, got "
            f"{jnp.shape(logits)} and {jnp.shape(ref_logits)}."
        )
    if jnp.ndim(logits) < 1:
        raise ValueError("sharpax.trajectory_kl: logits need a class axis, got a scalar.")
    tau = jnp.asarray(temperature, jnp.float32)
    log_q = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32) / tau, axis=-1)
    ref = jax.lax.stop_gradient(jnp.asarray(ref_logits)).astype(jnp.float32)
    log_p = jax.nn.log_softmax(ref / tau, axis=-1)
    p = jnp.exp(log_p)
    # p == 0 (e.g. a -inf reference logit) contributes 0, not 0 * inf = NaN.
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
    return tau * tau * kl


# --------------------------------------------------------------------------------------
# SAF.


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


class SAF(NamedTuple):
    """What :func:`saf` returns (functions in the style of an optax transform).

    Attributes:
      init: ``init(sharding=None) -> SAFState``. With a ``jax.sharding.Sharding``
        (e.g. ``NamedSharding(mesh, P('data'))``) the buffer is created directly
        with that sharding, never materialised whole on one device.
      update: ``update(state, logits, example_ids, epoch, *, where=None) ->
        (term, new_state)``; see :func:`saf`.
      check_ids: ``check_ids(example_ids, where=None)``, host-side (NumPy) check
        that raises ``ValueError`` naming any id outside ``[0, num_examples)``.
      nbytes: bytes of the state (logits buffer plus int32 epoch stamps), on one
        device if replicated; divide by the number of shards if sharded.
    """

    init: Callable[..., SAFState]
    update: Callable[..., tuple[jax.Array, SAFState]]
    check_ids: Callable[..., None]
    nbytes: int


def check_example_ids(example_ids: Any, num_examples: int, *, where: Any = None) -> None:
    """Raises ``ValueError`` unless every example id lies in ``[0, num_examples)``.

    A host-side (NumPy) check, cheap enough to run on every batch before it is
    sent to the device: O(batch) work, no compilation. Use it at the host
    boundary of the training loop (it syncs if given a device array).

    Args:
      example_ids: integer array of example ids (any shape).
      num_examples: size of the dataset the ids index.
      where: optional boolean mask of the same shape; ids where it is False
        (padding) are not checked.

    Raises:
      TypeError: if the ids are not integers.
      ValueError: naming the offending ids and their positions.

    Examples:
      >>> import numpy as np, sharpax
      >>> sharpax.check_example_ids(np.array([0, 3, 9]), 10)
      >>> try:
      ...     sharpax.check_example_ids(np.array([0, -1, 10]), 10)
      ... except ValueError as e:
      ...     print(str(e)[:52])
      example ids must be integers in [0, num_examples=10)
    """
    num_examples = _common.check_positive_int("num_examples", num_examples)
    ids = np.asarray(example_ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"example ids must be integers, got dtype {ids.dtype}.")
    bad = (ids < 0) | (ids >= num_examples)
    if where is not None:
        mask = np.asarray(where).astype(bool)
        if mask.shape != ids.shape:
            raise ValueError(
                f"where must have the shape of the example ids {ids.shape}, got {mask.shape}."
            )
        bad &= mask
    if bad.any():
        positions = np.argwhere(bad)[:5]
        values = ids[bad][:5]
        raise ValueError(
            f"example ids must be integers in [0, num_examples={num_examples}); got "
            f"{int(bad.sum())} out-of-range id(s), e.g. {values.tolist()} at positions "
            f"{[tuple(p) if len(p) > 1 else int(p[0]) for p in positions.tolist()]}. "
            "Ids are never clamped or dropped: fix the data pipeline so each example carries "
            "its index in the training set, or mask padding with `where`."
        )


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


def saf(
    num_examples: int,
    num_classes: int,
    *,
    lag: int = 3,
    start_epoch: int = 5,
    end_epoch: int | None = None,
    temperature: float = 5.0,
    weight: float = 0.3,
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
    debug_checks: bool = False,
) -> SAF:
    r"""Sharpness-Aware training for Free (SAF): a trajectory loss on past logits.

    Every training example's logits are stored in a ring buffer indexed by its
    example id. At epoch ``e`` (counted from 0), a batch with logits ``z`` and ids
    ``i`` gets the extra loss

      ``term = weight · mean_b trajectory_kl(z_b, buffer[i_b, epoch e − lag], τ)``

    where the mean runs over the examples whose buffer entry was actually written
    at epoch ``e − lag`` (never-written or stale entries are *excluded*, never
    treated as zero logits; no such entry gives ``term = 0``), and ``term = 0``
    while ``e < start_epoch`` and, if ``end_epoch`` is set, from ``e >= end_epoch``
    on. ``e >= start_epoch`` with ``e`` from 0 is the paper's ``e > E_start`` with
    ``e`` from 1, and the authors' ``epoch > kl_start_epoch`` with ``epoch`` from 0
    is ``start_epoch = kl_start_epoch + 1``. The buffer is written in every epoch,
    active or not. Then the batch's logits
    (``stop_gradient``) are written to slot ``e mod (lag + 1)`` of their rows,
    stamped with ``e``. If an id occurs twice in a batch, its last occurrence is
    stored.

    ``update(state, logits, example_ids, epoch, *, where=None) -> (term,
    new_state)`` works inside ``jax.value_and_grad(..., has_aux=True)`` with
    ``new_state`` as (part of) the aux; ``epoch`` may be a Python int or a traced
    int32 scalar (no recompilation per epoch). ``where`` masks padding examples:
    they are neither read nor written and their ids are not checked. See
    :func:`with_saf` to add the term to an existing loss function.

    Example ids: ids outside ``[0, num_examples)`` are an error, never clamped or
    dropped silently. (1) ``check_ids`` / :func:`check_example_ids` raise a
    ``ValueError`` naming them on the host; run it on every batch before the step
    (cost O(batch)). ``update`` (and so :func:`with_saf`) runs it itself whenever
    the ids (and ``where``) are concrete, e.g. outside ``jit``. (2) Inside
    ``update``, with ``debug_checks=True``, a ``checkify.debug_check`` reports
    them when the step is wrapped in ``jax.experimental.checkify.checkify``. It
    is off by default because the check gives the jitted step a checkify effect,
    and a jitted function with effects is dispatched through JAX's Python path on
    every call instead of its C++ fast path (measured: SAF's ResNet-18 step on
    an H100 ran at 0.48x SGD's speed with it and 1.01x without; see
    BENCHMARKS.md).
    (3) Without either (an unchecked jitted step), a batch with any bad id
    (under ``axis_name``: on any device) is all-or-nothing: *nothing* of the batch is written (the buffer is unchanged,
    valid ids included), and both the returned ``term`` and its gradient with
    respect to every (unmasked) logit are NaN, on all devices and whatever the
    epoch, so the loss and the update show it. Masked (``where=False``) rows are
    never checked, read or written.

    Memory: ``nbytes = N·(lag+1)·C·itemsize(dtype) + N·(lag+1)·4`` (the int32
    stamps). ``dtype=jnp.bfloat16`` halves the logits part; the KL is computed
    in float32 either way.

    Data parallel:

    * ``axis_name=None`` under ``jax.jit`` with sharded arrays (global view): the
      buffer may be sharded along the example axis, e.g.
      ``saf.init(sharding=NamedSharding(mesh, P('data')))``; results equal the
      single-device ones.
    * ``axis_name='batch'`` under ``pmap`` / ``shard_map``: each device passes its
      own part of the batch and a *replicated* buffer. The (ids, logits, where)
      of all devices are gathered before writing, so buffers stay identical on all
      devices. The returned ``term`` is the full-batch term (global mean over valid
      entries), the same on every device, and its gradient is this device's share
      scaled so that ``pmean`` of the per-device gradients (the usual data-parallel
      recipe, as for a per-device mean cross-entropy) equals the single-device
      gradient on the full batch. Under ``shard_map`` put the state in ``P()``.

    Args:
      num_examples: ``N``, the number of training examples (ids lie in ``[0, N)``).
      num_classes: ``C``, the logits' last dimension.
      lag: ``E̅`` in the paper; the reference is the example's logits from ``lag``
        epochs earlier. The buffer keeps ``lag + 1`` slots.
      start_epoch: first epoch (from 0) with a non-zero term.
      end_epoch: first epoch (from 0) at which the term is 0 again (the
        authors' ``--kl_end_epoch``); None (default): the term never ends.
      temperature: ``τ`` of :func:`trajectory_kl`.
      weight: ``λ``, the multiplier of the mean trajectory KL.
      dtype: floating dtype of the buffer (``jnp.float32`` or ``jnp.bfloat16``).
      axis_name: mapped axis of ``pmap`` / ``shard_map`` for data parallelism, or
        None.
      debug_checks: if True, ``update`` also checks the ids inside ``jit`` with
        ``checkify.debug_check`` (reported when the step is wrapped in
        ``checkify.checkify``; slows every dispatch of the jitted step, see (2)
        above). The host check and the NaN poisoning apply either way.

    Returns:
      A :class:`SAF` ``(init, update, check_ids, nbytes)``; the state is
      :class:`SAFState`.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> traj = sharpax.saf(num_examples=4, num_classes=3, lag=1, start_epoch=1)
      >>> state = traj.init()
      >>> ids = jnp.array([2, 0])
      >>> z0 = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> term, state = traj.update(state, z0, ids, 0)   # before start_epoch
      >>> term, state = traj.update(state, 2 * z0, ids, 1)
      >>> print(round(float(term), 4))
      0.0358
      >>> traj.nbytes  # 4 * 2 * 3 * 4 bytes of logits + 4 * 2 * 4 of stamps
      128

    References:
      Du et al., `Sharpness-Aware Training for Free
      <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022
    """
    num_examples = _common.check_positive_int("num_examples", num_examples)
    num_classes = _common.check_positive_int("num_classes", num_classes)
    lag = _common.check_positive_int("lag", lag)
    start_epoch = _common.check_int("start_epoch", start_epoch, low=0)
    end_epoch = _check_end_epoch(end_epoch, start_epoch, "saf")
    _check_positive_float("temperature", temperature)
    _common.check_non_negative("weight", weight, schedule=False)
    if not isinstance(debug_checks, bool):
        raise TypeError(f"sharpax.saf: debug_checks must be a bool, got {debug_checks!r}.")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"sharpax.saf: dtype must be a floating dtype, got {dtype}.")
    n, c, slots = num_examples, num_classes, lag + 1
    nbytes = n * slots * c * dtype.itemsize + n * slots * 4

    def init_fn(sharding: Any = None) -> SAFState:
        def make() -> SAFState:
            return SAFState(
                logits=jnp.zeros((n, slots, c), dtype),
                written_epoch=jnp.full((n, slots), -1, jnp.int32),
            )

        if sharding is None:
            return make()
        return jax.jit(make, out_shardings=sharding)()

    def check_ids_fn(example_ids: Any, where: Any = None) -> None:
        check_example_ids(example_ids, n, where=where)

    def update_fn(
        state: SAFState,
        logits: jax.Array,
        example_ids: jax.Array,
        epoch: int | jax.Array,
        *,
        where: jax.Array | None = None,
    ) -> tuple[jax.Array, SAFState]:
        # ---- trace-time checks.
        if not isinstance(state, SAFState):
            raise TypeError(
                f"sharpax.saf: state must be the SAFState from init(), got {type(state)}."
            )
        if state.logits.shape != (n, slots, c):
            raise ValueError(
                f"sharpax.saf: state.logits has shape {state.logits.shape}, expected "
                f"{(n, slots, c)}; under pmap/shard_map the buffer must be replicated, not "
                "split (use jit with a NamedSharding to shard it)."
            )
        _check_logits_2d(logits, c, "saf")
        b = jnp.shape(logits)[0]
        if jnp.shape(example_ids) != (b,):
            raise ValueError(
                f"sharpax.saf: example_ids must have shape ({b},), one id per row of logits "
                f"{jnp.shape(logits)}, got shape {jnp.shape(example_ids)}."
            )
        if not jnp.issubdtype(jnp.result_type(example_ids), jnp.integer):
            raise TypeError(
                "sharpax.saf: example_ids must be integers, got dtype "
                f"{jnp.result_type(example_ids)}."
            )
        if not _common.is_tracer(example_ids) and (where is None or not _common.is_tracer(where)):
            check_ids_fn(np.asarray(example_ids), None if where is None else np.asarray(where))
        epoch = _as_epoch(epoch, "saf")
        mask = _as_where(where, b, "saf")
        ids = jnp.asarray(example_ids).astype(jnp.int32)
        mesh = _explicit_mesh(state, logits, ids, mask)
        if mesh is None:
            return update_core(state, logits, ids, mask, epoch)
        # Explicit sharding (e.g. a jax.make_mesh mesh): run the gathers/scatters with
        # the compiler choosing collectives, keeping the state's own shardings.
        specs = (P(), jax.tree.map(lambda a: jax.typeof(a).sharding.spec, state))
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.sharding.auto_axes(update_core, out_sharding=specs)(
                state, logits, ids, mask, epoch
            )

    def update_core(
        state: SAFState, logits: jax.Array, ids: jax.Array, mask: jax.Array, epoch: jax.Array
    ) -> tuple[jax.Array, SAFState]:
        in_range = (ids >= 0) & (ids < n)
        if debug_checks:  # in-jit id check, reported under checkify (opt-in: see docstring)
            bad = mask & ~in_range
            checkify.debug_check(
                ~jnp.any(bad),
                f"sharpax.saf: example ids must lie in [0, num_examples={n}); got {{}} out-of-range "
                "id(s) in this batch, whose ids span [{}, {}]. Ids are never clamped or dropped.",
                jnp.sum(bad.astype(jnp.int32)),
                jnp.min(jnp.where(mask, ids, n)),
                jnp.max(jnp.where(mask, ids, -1)),
            )

        # ---- read the references written at epoch - lag.
        ref_epoch = epoch - lag
        safe_ids = jnp.where(in_range, ids, 0)
        read_slot = jnp.mod(ref_epoch, slots)
        ref = state.logits[safe_ids, read_slot]
        stamp = state.written_epoch[safe_ids, read_slot]
        # ref_epoch >= 0 matters: never-written slots carry the stamp -1.
        valid = mask & in_range & (stamp == ref_epoch) & (ref_epoch >= 0)
        kl = trajectory_kl(logits, ref, temperature)
        local_num = jnp.sum(jnp.where(valid, kl, 0.0))
        local_cnt = jnp.sum(valid.astype(jnp.int32))

        # ---- gather what every device writes (and whether any id is bad).
        w_logits = jax.lax.stop_gradient(jnp.asarray(logits)).astype(dtype)
        w_ids, w_mask = ids, mask
        if axis_name is not None:
            w_logits = _gather_invariant(w_logits, axis_name)
            w_ids = _gather_invariant(w_ids, axis_name)
            w_mask = _gather_invariant(w_mask.astype(jnp.int32), axis_name).astype(bool)
        w_in_range = (w_ids >= 0) & (w_ids < n)
        any_bad = jnp.any(w_mask & ~w_in_range)

        # ---- the term: global mean over valid entries.
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
        term = jnp.where(_term_active(epoch, start_epoch, end_epoch), term, 0.0)
        # A bad id anywhere in the (global) batch poisons the value *and* the gradient
        # of every used logit, whatever the epoch: NaN · sum = NaN with d/dz = NaN.
        # Otherwise the added 0 · sum is exactly 0 (value and gradient).
        poison = jnp.where(any_bad, jnp.nan, 0.0).astype(jnp.float32)
        used = jnp.where(mask[:, None], jnp.asarray(logits).astype(jnp.float32), 0.0)
        term = term + poison * jnp.sum(used)

        # ---- write this epoch's logits (slot epoch mod (lag+1)), last occurrence wins;
        # all or nothing: a bad id anywhere in the batch writes nothing at all.
        ok = w_mask & w_in_range
        keys = jnp.where(ok, w_ids, n)
        write = ok & _last_occurrence(keys) & ~any_bad
        idx = jnp.where(write, w_ids, n)  # n: out of range, dropped
        write_slot = jnp.mod(epoch, slots)
        new_state = SAFState(
            logits=state.logits.at[idx, write_slot].set(w_logits, mode="drop"),
            written_epoch=state.written_epoch.at[idx, write_slot].set(
                jnp.broadcast_to(epoch, idx.shape), mode="drop"
            ),
        )
        return term, new_state

    return SAF(init=init_fn, update=update_fn, check_ids=check_ids_fn, nbytes=nbytes)


# --------------------------------------------------------------------------------------
# MESA.


class MESAState(NamedTuple):
    """State of :func:`mesa`.

    Attributes:
      ema: exponential moving average of the model variables (same pytree).
        Floating leaves are kept in at least float32 (a bf16 EMA with decay
        0.9998 would never move); integer and boolean leaves are copies of the
        latest variables.
      count: int32 scalar, number of ``update`` calls; a ``decay`` schedule is
        evaluated at it.
    """

    ema: Any
    count: jax.Array


class MESA(NamedTuple):
    """What :func:`mesa` returns.

    Attributes:
      init: ``init(variables) -> MESAState``.
      update: ``update(state, variables) -> MESAState``, after each optimizer step.
      loss: ``loss(logits, ema_logits, epoch, *, where=None) -> term``.
      start_epoch: the ``start_epoch`` given to :func:`mesa` (:func:`with_mesa`
        skips the teacher's forward pass for a Python int epoch before it).
      end_epoch: the ``end_epoch`` given to :func:`mesa` (None: never ends;
        :func:`with_mesa` skips the teacher from it on, for a Python int epoch).
    """

    init: Callable[[Any], MESAState]
    update: Callable[[MESAState, Any], MESAState]
    loss: Callable[..., jax.Array]
    start_epoch: int
    end_epoch: int | None = None

    def active(self, epoch: int) -> bool:
        """Whether the term is non-zero at Python int ``epoch`` (the teacher must run)."""
        return self.start_epoch <= epoch and (self.end_epoch is None or epoch < self.end_epoch)


def mesa(
    decay: _common.ScalarOrSchedule = 0.9998,
    *,
    start_epoch: int = 5,
    end_epoch: int | None = None,
    temperature: float = 5.0,
    weight: float = 0.8,
) -> MESA:
    r"""Memory-Efficient Sharpness-Aware training (MESA): an EMA teacher's trajectory loss.

    SAF's buffer costs ``N·(lag+1)·C`` numbers (≈ 20 GB in float32 on ImageNet);
    MESA replaces the past logits by those of an exponential moving average of
    the model, computed on the current batch:

      ``term = weight · mean_b trajectory_kl(logits_b, ema_logits_b, τ)``

    for epochs ``start_epoch <= e < end_epoch`` (from 0; no upper bound for
    ``end_epoch=None``) and 0 otherwise.

    * ``init(variables)`` copies the model variables: pass *all* of them (params
      and non-trainable state such as batch statistics, e.g. a Flax ``variables``
      dict) so the teacher can run in eval mode. Floating leaves are stored in at
      least float32.
    * ``update(state, variables)``, after each optimizer step with the new
      variables: ``ema ← decay·ema + (1 − decay)·variables`` for every floating
      leaf (params and batch statistics, as timm's ``ModelEmaV2``), integer and
      boolean leaves are copied, and ``count`` is incremented. No bias
      correction and no warm-up: the EMA starts from the initial variables.
    * ``loss(logits, ema_logits, epoch, *, where=None)``: the term above;
      ``ema_logits`` are constants (``stop_gradient``); ``where`` masks padding.
      Compute ``ema_logits`` with the EMA variables in eval mode; see
      :func:`with_mesa`.

    Data parallel: replicated params give a replicated EMA; ``loss`` is a
    per-device mean like a per-device cross-entropy.

    Args:
      decay: EMA decay in ``[0, 1]``, or a schedule of ``state.count``.
      start_epoch: first epoch (from 0) with a non-zero term.
      end_epoch: first epoch (from 0) at which the term is 0 again; None
        (default): never ends.
      temperature: ``τ`` of :func:`trajectory_kl`.
      weight: ``λ``, the multiplier of the mean trajectory KL.

    Returns:
      A :class:`MESA` ``(init, update, loss)``; the state is :class:`MESAState`.

    Examples:
      >>> import jax.numpy as jnp, sharpax
      >>> teacher = sharpax.mesa(0.5, start_epoch=0)
      >>> state = teacher.init({"w": jnp.array([0.0])})
      >>> state = teacher.update(state, {"w": jnp.array([2.0])})
      >>> print(state.ema["w"].tolist(), int(state.count))
      [1.0] 1

    References:
      Du et al., `Sharpness-Aware Training for Free
      <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022
    """
    _common.check_number("decay", decay, low=0.0, high=1.0, schedule=True)
    start_epoch = _common.check_int("start_epoch", start_epoch, low=0)
    end_epoch = _check_end_epoch(end_epoch, start_epoch, "mesa")
    _check_positive_float("temperature", temperature)
    _common.check_non_negative("weight", weight, schedule=False)

    def init_fn(variables: Any) -> MESAState:
        def copy(v: Any) -> jax.Array:
            # Always a new buffer (astype to the same dtype would return the caller's
            # own array): the EMA must not alias the variables (donation, in-place reuse).
            dtype = jnp.result_type(v)
            if jnp.issubdtype(dtype, jnp.inexact):
                dtype = _common.at_least_f32(dtype)
            return jnp.array(v, dtype=dtype, copy=True)

        return MESAState(ema=jax.tree.map(copy, variables), count=jnp.zeros([], jnp.int32))

    def update_fn(state: MESAState, variables: Any) -> MESAState:
        if jax.tree.structure(state.ema) != jax.tree.structure(variables):
            raise ValueError(
                "sharpax.mesa: variables must have the pytree structure given to init(); got "
                f"{jax.tree.structure(variables)}, expected {jax.tree.structure(state.ema)}."
            )
        d = jnp.asarray(_common.value_at(decay, state.count), jnp.float32)

        def step(e: jax.Array, v: Any) -> jax.Array:
            if jnp.issubdtype(e.dtype, jnp.inexact):
                d_e = d.astype(e.dtype)
                return d_e * e + (1 - d_e) * jnp.asarray(v).astype(e.dtype)
            return jnp.array(v, dtype=e.dtype, copy=True)  # a copy, never the caller's array

        return MESAState(
            ema=jax.tree.map(step, state.ema, variables),
            count=optax.safe_increment(state.count),
        )

    def loss_fn(
        logits: jax.Array,
        ema_logits: jax.Array,
        epoch: int | jax.Array,
        *,
        where: jax.Array | None = None,
    ) -> jax.Array:
        _check_logits_2d(logits, None, "mesa")
        if jnp.shape(ema_logits) != jnp.shape(logits):
            raise ValueError(
                "sharpax.mesa: ema_logits must have the shape of logits "
                f"{jnp.shape(logits)}, got {jnp.shape(ema_logits)}."
            )
        epoch = _as_epoch(epoch, "mesa")
        mask = _as_where(where, jnp.shape(logits)[0], "mesa")
        kl = trajectory_kl(logits, ema_logits, temperature)
        num = jnp.sum(jnp.where(mask, kl, 0.0))
        cnt = jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1).astype(jnp.float32)
        return jnp.where(_term_active(epoch, start_epoch, end_epoch), weight * num / cnt, 0.0)

    return MESA(
        init=init_fn, update=update_fn, loss=loss_fn, start_epoch=start_epoch, end_epoch=end_epoch
    )


# --------------------------------------------------------------------------------------
# Loss combinators.


class TrajectoryAux(NamedTuple):
    """Aux output of the losses built by :func:`with_saf` and :func:`with_mesa`.

    Attributes:
      aux: the wrapped ``loss_fn``'s own aux, unchanged.
      state: the new :class:`SAFState` (SAF) or the unchanged :class:`MESAState`
        (MESA: its EMA is updated after the optimizer step).
      term: the trajectory term that was added to the loss (for logging).
    """

    aux: Any
    state: Any
    term: jax.Array


def _default_logits(aux: Any) -> jax.Array:
    return aux["logits"]


def _default_ids(batch: Any) -> jax.Array:
    return batch["example_id"]


def with_saf(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]],
    traj: SAF,
    *,
    logits_fn: Callable[[Any], jax.Array] = _default_logits,
    ids_fn: Callable[[Any], jax.Array] = _default_ids,
    where_fn: Callable[[Any], jax.Array] | None = None,
) -> Callable[..., tuple[jax.Array, TrajectoryAux]]:
    """Adds the SAF term to ``loss_fn(params, batch) -> (loss, aux)``.

    Returns ``f(params, saf_state, batch, epoch) -> (loss + term,
    TrajectoryAux(aux, new_saf_state, term))``, ready for
    ``jax.value_and_grad(f, has_aux=True)``. The logits are read from the aux
    with ``logits_fn`` (default ``aux["logits"]``) and the example ids from the
    batch with ``ids_fn`` (default ``batch["example_id"]``); ``where_fn(batch)``
    optionally gives the padding mask. When the ids (and mask) are concrete, not
    traced, they are checked on the host (:func:`check_example_ids`, in
    ``ValueError`` naming a bad id); traced ids follow :func:`saf`'s in-jit rules
    (checkify with ``debug_checks=True``, else NaN term and gradient with nothing
    written).

    With :func:`sharpax.sam`: keep the state returned by the clean pass (the
    ``value_and_grad`` above) and discard anything a perturbed pass returns, so
    the buffer is written once per step, with the clean logits. Either
    ``grad_fn = lambda p: jax.grad(f, has_aux=True)(p, saf_state, batch,
    epoch)[0]`` (the SAM gradient of loss + term, reading the same references) or
    ``grad_fn`` of the plain ``loss_fn`` (perturb the task loss only) is valid.

    Args:
      loss_fn: the task loss, ``(params, batch) -> (loss, aux)``.
      traj: the object returned by :func:`saf`.
      logits_fn: ``aux -> logits`` of shape ``(batch, num_classes)``.
      ids_fn: ``batch -> example_ids`` of shape ``(batch,)``.
      where_fn: optional ``batch -> bool mask`` of real (non-padding) examples.

    Returns:
      The wrapped loss function.

    Examples:
      >>> import jax, jax.numpy as jnp, sharpax
      >>> def loss_fn(w, batch):
      ...     logits = batch["x"] @ w
      ...     return jnp.mean(logits ** 2), {"logits": logits}
      >>> traj = sharpax.saf(num_examples=8, num_classes=2, lag=1, start_epoch=0)
      >>> f = sharpax.with_saf(loss_fn, traj)
      >>> batch = {"x": jnp.ones((2, 3)), "example_id": jnp.array([5, 1])}
      >>> (loss, out), grads = jax.value_and_grad(f, has_aux=True)(
      ...     jnp.ones((3, 2)), traj.init(), batch, 0)
      >>> print(out.state.written_epoch[5].tolist(), float(out.term))
      [0, -1] 0.0
    """
    if not isinstance(traj, SAF):
        raise TypeError(f"sharpax.with_saf: traj must come from sharpax.saf, got {type(traj)}.")

    def wrapped(
        params: Any, state: SAFState, batch: Any, epoch: int | jax.Array
    ) -> tuple[jax.Array, TrajectoryAux]:
        ids = ids_fn(batch)
        where = None if where_fn is None else where_fn(batch)
        loss, aux = loss_fn(params, batch)  # traj.update checks concrete ids on the host
        term, new_state = traj.update(state, logits_fn(aux), ids, epoch, where=where)
        return loss + term, TrajectoryAux(aux=aux, state=new_state, term=term)

    return wrapped


def with_mesa(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]],
    teacher: MESA,
    teacher_fn: Callable[[Any, Any], jax.Array],
    *,
    logits_fn: Callable[[Any], jax.Array] = _default_logits,
    where_fn: Callable[[Any], jax.Array] | None = None,
) -> Callable[..., tuple[jax.Array, TrajectoryAux]]:
    """Adds the MESA term to ``loss_fn(params, batch) -> (loss, aux)``.

    Returns ``f(params, mesa_state, batch, epoch) -> (loss + term,
    TrajectoryAux(aux, mesa_state, term))``. The teacher logits are
    ``teacher_fn(mesa_state.ema, batch)`` under ``stop_gradient``; evaluate the
    model in eval mode there (e.g. Flax ``model.apply(ema, x, train=False)``).
    The state comes back unchanged: call ``mesa.update(state, new_variables)``
    after the optimizer step. With a Python int ``epoch`` below ``start_epoch``
    or from ``end_epoch`` on (a static argument of the jitted step) the teacher's
    forward pass is skipped, since the term is 0 there. With a traced ``epoch``
    the teacher always runs and
    the term is gated by ``epoch >= start_epoch`` (no ``lax.cond``: a forward pass
    inside a conditional is much slower on XLA:CPU); pass the epoch as a static
    Python int, or switch step functions at ``start_epoch``, to save the pass.

    Args:
      loss_fn: the task loss, ``(params, batch) -> (loss, aux)``.
      teacher: the object returned by :func:`mesa`.
      teacher_fn: ``(ema_variables, batch) -> logits`` of the EMA model.
      logits_fn: ``aux -> logits`` (default ``aux["logits"]``).
      where_fn: optional ``batch -> bool mask`` of real (non-padding) examples.

    Returns:
      The wrapped loss function.

    Examples:
      >>> import jax, jax.numpy as jnp, sharpax
      >>> def loss_fn(w, batch):
      ...     logits = batch["x"] @ w
      ...     return jnp.mean(logits ** 2), {"logits": logits}
      >>> teacher = sharpax.mesa(0.9, start_epoch=0)
      >>> f = sharpax.with_mesa(loss_fn, teacher, lambda ema, b: b["x"] @ ema)
      >>> w = jnp.ones((3, 2))
      >>> (loss, out), grads = jax.value_and_grad(f, has_aux=True)(
      ...     w, teacher.init(w), {"x": jnp.ones((2, 3))}, 0)
      >>> print(float(out.term))
      0.0
    """
    if not isinstance(teacher, MESA):
        raise TypeError(
            f"sharpax.with_mesa: teacher must come from sharpax.mesa, got {type(teacher)}."
        )
    if not callable(teacher_fn):
        raise TypeError(
            "sharpax.with_mesa: teacher_fn must be a function (ema_variables, batch) -> "
            f"logits, got {teacher_fn!r}."
        )

    def wrapped(
        params: Any, state: MESAState, batch: Any, epoch: int | jax.Array
    ) -> tuple[jax.Array, TrajectoryAux]:
        loss, aux = loss_fn(params, batch)
        logits = logits_fn(aux)

        _as_epoch(epoch, "with_mesa")  # validates
        if isinstance(epoch, (int, np.integer)) and not teacher.active(int(epoch)):
            # A Python epoch outside [start_epoch, end_epoch): the term is 0, skip the teacher.
            ema_logits = jnp.zeros_like(logits)
        else:
            # A traced epoch always runs the teacher (the term gates it): a forward pass
            # inside lax.cond would run much slower on XLA:CPU.
            ema_logits = jax.lax.stop_gradient(teacher_fn(state.ema, batch))
        where = None if where_fn is None else where_fn(batch)
        term = teacher.loss(logits, ema_logits, epoch, where=where)
        return loss + term, TrajectoryAux(aux=aux, state=state, term=term)

    return wrapped
