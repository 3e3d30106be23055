"""SAF: Sharpness-Aware training for Free, a trajectory loss on a per-example logit buffer.

Every training example's logits are kept in a ring buffer indexed by its example id;
at epoch ``e`` a batch gets ``weight · mean_b τ² · KL(softmax(ref_b/τ) ‖ softmax(z_b/τ))``
with ``ref_b`` the logits the same example produced at epoch ``e − lag`` (Du et al.,
NeurIPS 2022). No second forward and backward pass, unlike SAM. The divergence is
:func:`sharpax.trajectory_kl`; MESA, the EMA-teacher variant, is in :mod:`sharpax.mesa`.

Examples:
  >>> import jax.numpy as jnp, sharpax
  >>> traj = sharpax.saf(num_examples=3, num_classes=2, lag=1, start_epoch=0)
  >>> term, state = traj.update(traj.init(), jnp.zeros((2, 2)), jnp.array([0, 2]), 0)
  >>> print(float(term), state.written_epoch[:, 0].tolist())
  0.0 [0, -1, 0]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sharpax import _common, _trajectory
from sharpax._saf_buffer import SAFState, _explicit_mesh, _SAFConfig, _update_core
from sharpax.trajectory import TrajectoryAux

# --------------------------------------------------------------------------------------
# State and public interface.


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


# --------------------------------------------------------------------------------------
# Argument checks and the buffer's creation.


def _check_saf_args(
    num_examples: Any,
    num_classes: Any,
    *,
    lag: Any,
    start_epoch: Any,
    end_epoch: Any,
    temperature: Any,
    weight: Any,
    dtype: Any,
    axis_name: str | None,
    debug_checks: Any,
) -> _SAFConfig:
    """Checks the arguments of :func:`saf` (trace-free, at construction)."""
    num_examples = _common.check_positive_int("num_examples", num_examples)
    num_classes = _common.check_positive_int("num_classes", num_classes)
    lag = _common.check_positive_int("lag", lag)
    start_epoch = _common.check_int("start_epoch", start_epoch, low=0)
    end_epoch = _trajectory.check_end_epoch(end_epoch, start_epoch, "saf")
    _trajectory.check_positive_float("temperature", temperature)
    _common.check_non_negative("weight", weight, schedule=False)
    if not isinstance(debug_checks, bool):
        raise TypeError(f"sharpax.saf: debug_checks must be a bool, got {debug_checks!r}.")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"sharpax.saf: dtype must be a floating dtype, got {dtype}.")
    return _SAFConfig(
        num_examples=num_examples,
        num_classes=num_classes,
        lag=lag,
        start_epoch=start_epoch,
        end_epoch=end_epoch,
        temperature=temperature,
        weight=weight,
        dtype=dtype,
        axis_name=axis_name,
        debug_checks=debug_checks,
    )


def _init_state(cfg: _SAFConfig, sharding: Any) -> SAFState:
    """The empty buffer (zeros, stamps -1), created with ``sharding`` if one is given."""
    n, slots, c = cfg.num_examples, cfg.slots, cfg.num_classes

    def make() -> SAFState:
        return SAFState(
            logits=jnp.zeros((n, slots, c), cfg.dtype),
            written_epoch=jnp.full((n, slots), -1, jnp.int32),
        )

    if sharding is None:
        return make()
    return jax.jit(make, out_shardings=sharding)()


def _check_update_args(
    cfg: _SAFConfig, state: Any, logits: Any, example_ids: Any, where: Any
) -> None:
    """Trace-time checks of ``update``'s arguments; concrete ids are checked on the host."""
    n, slots, c = cfg.num_examples, cfg.slots, cfg.num_classes
    if not isinstance(state, SAFState):
        raise TypeError(f"sharpax.saf: state must be the SAFState from init(), got {type(state)}.")
    if state.logits.shape != (n, slots, c):
        raise ValueError(
            f"sharpax.saf: state.logits has shape {state.logits.shape}, expected "
            f"{(n, slots, c)}; under pmap/shard_map the buffer must be replicated, not "
            "split (use jit with a NamedSharding to shard it)."
        )
    _trajectory.check_logits_2d(logits, c, "saf")
    b = jnp.shape(logits)[0]
    if jnp.shape(example_ids) != (b,):
        raise ValueError(
            f"sharpax.saf: example_ids must have shape ({b},), one id per row of logits "
            f"{jnp.shape(logits)}, got shape {jnp.shape(example_ids)}."
        )
    if not jnp.issubdtype(jnp.result_type(example_ids), jnp.integer):
        raise TypeError(
            f"sharpax.saf: example_ids must be integers, got dtype {jnp.result_type(example_ids)}."
        )
    if not _common.is_tracer(example_ids) and (where is None or not _common.is_tracer(where)):
        check_example_ids(
            np.asarray(example_ids), n, where=None if where is None else np.asarray(where)
        )


def _update(
    cfg: _SAFConfig,
    state: SAFState,
    logits: jax.Array,
    example_ids: jax.Array,
    epoch: int | jax.Array,
    where: jax.Array | None,
) -> tuple[jax.Array, SAFState]:
    """``update`` of :func:`saf`: checks, then :func:`_update_core` (under Explicit axes too)."""
    _check_update_args(cfg, state, logits, example_ids, where)
    epoch = _trajectory.as_epoch(epoch, "saf")
    mask = _trajectory.as_where(where, jnp.shape(logits)[0], "saf")
    ids = jnp.asarray(example_ids).astype(jnp.int32)
    core = functools.partial(_update_core, cfg)
    mesh = _explicit_mesh(state, logits, ids, mask)
    if mesh is None:
        return core(state, logits, ids, mask, epoch)
    # Explicit sharding (e.g. a jax.make_mesh mesh): run the gathers/scatters with
    # the compiler choosing collectives, keeping the state's own shardings.
    specs = (P(), jax.tree.map(lambda a: jax.typeof(a).sharding.spec, state))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(core, out_sharding=specs)(state, logits, ids, mask, epoch)


# --------------------------------------------------------------------------------------
# SAF.


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

    Precision: the buffer's ``dtype`` is independent of the model's. Logits
    are rounded to it once, when written (a bf16 buffer keeps 8 significant
    bits, a relative error of at most 2⁻⁸ on each reference logit; a buffer
    as wide as the logits stores them exactly); the reference is read back,
    converted to float32 and the KL and its gradient are float32 (the gradient
    then takes the logits' own dtype). A float16 buffer also works, but
    logits beyond its range (±65504) are stored as ±inf: a +inf reference
    logit gives a NaN term (reported, never hidden), a −inf one a class of
    reference probability 0.

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
      dtype: floating dtype of the buffer (``jnp.float32``, ``jnp.bfloat16``, or
        ``jnp.float16``; see "Precision" above).
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
    cfg = _check_saf_args(
        num_examples,
        num_classes,
        lag=lag,
        start_epoch=start_epoch,
        end_epoch=end_epoch,
        temperature=temperature,
        weight=weight,
        dtype=dtype,
        axis_name=axis_name,
        debug_checks=debug_checks,
    )

    def init_fn(sharding: Any = None) -> SAFState:
        return _init_state(cfg, sharding)

    def check_ids_fn(example_ids: Any, where: Any = None) -> None:
        check_example_ids(example_ids, cfg.num_examples, where=where)

    def update_fn(
        state: SAFState,
        logits: jax.Array,
        example_ids: jax.Array,
        epoch: int | jax.Array,
        *,
        where: jax.Array | None = None,
    ) -> tuple[jax.Array, SAFState]:
        return _update(cfg, state, logits, example_ids, epoch, where)

    return SAF(init=init_fn, update=update_fn, check_ids=check_ids_fn, nbytes=cfg.nbytes)


# --------------------------------------------------------------------------------------
# Loss combinator.


def with_saf(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]],
    traj: SAF,
    *,
    logits_fn: Callable[[Any], jax.Array] = _trajectory.default_logits,
    ids_fn: Callable[[Any], jax.Array] = _trajectory.default_ids,
    where_fn: Callable[[Any], jax.Array] | None = None,
) -> Callable[..., tuple[jax.Array, TrajectoryAux]]:
    """Adds the SAF term to ``loss_fn(params, batch) -> (loss, aux)``.

    Returns ``f(params, saf_state, batch, epoch) -> (loss + term,
    TrajectoryAux(aux, new_saf_state, term))``, ready for
    ``jax.value_and_grad(f, has_aux=True)``. The logits are read from the aux
    with ``logits_fn`` (default ``aux["logits"]``) and the example ids from the
    batch with ``ids_fn`` (default ``batch["id"]``, a ``KeyError`` naming ``ids_fn`` when the
    batch has no ``"id"``); ``where_fn(batch)``
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
      >>> batch = {"x": jnp.ones((2, 3)), "id": jnp.array([5, 1])}
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
