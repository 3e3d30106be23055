"""MESA: Memory-Efficient Sharpness-Aware training, a trajectory loss on an EMA teacher.

The reference logits of SAF's trajectory loss come from an exponential moving average
of the model evaluated on the current batch instead of a per-example buffer (Du et
al., NeurIPS 2022): ``weight · mean_b τ² · KL(softmax(ema_b/τ) ‖ softmax(z_b/τ))``. No
second forward and backward pass through the trained model, unlike SAM, and no
``N·(lag+1)·C`` buffer, unlike SAF (:mod:`sharpax.saf`). The divergence is
:func:`sharpax.trajectory_kl`.

Examples:
  >>> import jax.numpy as jnp, sharpax
  >>> teacher = sharpax.mesa(0.9, start_epoch=1)
  >>> z = jnp.array([[1.0, 0.0]])
  >>> print(float(teacher.loss(z, z, 0)), teacher.active(0), teacher.active(1))
  0.0 False True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharpax import _common, _trajectory
from sharpax.trajectory import TrajectoryAux, trajectory_kl

# --------------------------------------------------------------------------------------
# State and public interface.


class MESAState(NamedTuple):
    """State of :func:`mesa`.

    Attributes:
      ema: exponential moving average of the model variables (same pytree).
        Floating leaves are kept in at least float32 (float32 for bfloat16 /
        float16 variables; float64 stays float64) and updated in that dtype.
        A bf16 EMA with decay 0.9998 would never move: its step ``(1 − decay)
        · (v − ema)`` rounds away unless it exceeds half a bf16 unit in the
        last place of ``ema`` (at least ``2⁻⁹·|ema|``), i.e. unless ``|v − ema|``
        is about ten times ``|ema|``. Integer and boolean leaves are copies of
        the latest variables.
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


# --------------------------------------------------------------------------------------
# The EMA and the loss.


def _ema_copy(v: Any) -> jax.Array:
    """A new array holding ``v``; floating leaves in at least float32."""
    # Always a new buffer (astype to the same dtype would return the caller's
    # own array): the EMA must not alias the variables (donation, in-place reuse).
    dtype = jnp.result_type(v)
    if jnp.issubdtype(dtype, jnp.inexact):
        dtype = _common.at_least_f32(dtype)
    return jnp.array(v, dtype=dtype, copy=True)


def _ema_step(d: jax.Array, e: jax.Array, v: Any) -> jax.Array:
    """``d·e + (1 − d)·v`` for a floating EMA leaf ``e``; a copy of ``v`` otherwise."""
    if jnp.issubdtype(e.dtype, jnp.inexact):
        # Not optax.incremental_update: it computes (1 − d)·v + d·e, and under jit XLA
        # fuses the two products in the other order (measured: 5e-6 apart after 300
        # float32 steps at d = 0.9998). This keeps the authors' (timm ModelEma) operand
        # order, ema·decay + (1 − decay)·model, and the numerics checked against them.
        d_e = d.astype(e.dtype)
        return d_e * e + (1 - d_e) * jnp.asarray(v).astype(e.dtype)
    return jnp.array(v, dtype=e.dtype, copy=True)  # a copy, never the caller's array


def _ema_update(decay: _common.ScalarOrSchedule, state: MESAState, variables: Any) -> MESAState:
    """``update`` of :func:`mesa`: one EMA step towards ``variables``, ``count + 1``."""
    if jax.tree.structure(state.ema) != jax.tree.structure(variables):
        raise ValueError(
            "sharpax.mesa: variables must have the pytree structure given to init(); got "
            f"{jax.tree.structure(variables)}, expected {jax.tree.structure(state.ema)}."
        )
    d = jnp.asarray(_common.value_at(decay, state.count), jnp.float32)
    return MESAState(
        ema=jax.tree.map(lambda e, v: _ema_step(d, e, v), state.ema, variables),
        count=optax.safe_increment(state.count),
    )


def _mesa_loss(
    start_epoch: int,
    end_epoch: int | None,
    temperature: Any,
    weight: Any,
    logits: jax.Array,
    ema_logits: jax.Array,
    epoch: int | jax.Array,
    where: jax.Array | None,
) -> jax.Array:
    """``loss`` of :func:`mesa`: the masked mean trajectory KL, gated by the epoch."""
    _trajectory.check_logits_2d(logits, None, "mesa")
    if jnp.shape(ema_logits) != jnp.shape(logits):
        raise ValueError(
            "sharpax.mesa: ema_logits must have the shape of logits "
            f"{jnp.shape(logits)}, got {jnp.shape(ema_logits)}."
        )
    epoch = _trajectory.as_epoch(epoch, "mesa")
    mask = _trajectory.as_where(where, jnp.shape(logits)[0], "mesa")
    kl = trajectory_kl(logits, ema_logits, temperature)
    num = jnp.sum(jnp.where(mask, kl, 0.0))
    cnt = jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1).astype(jnp.float32)
    active = _trajectory.term_active(epoch, start_epoch, end_epoch)
    return jnp.where(active, weight * num / cnt, 0.0)


# --------------------------------------------------------------------------------------
# MESA.


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

    Precision: the EMA is float32 for half-precision variables (see
    :class:`MESAState`), so it costs twice the bytes of bf16 params, and the
    teacher runs on these float32 variables (a model with a half-precision
    compute dtype casts them as it does its own params). ``loss`` converts
    both logits to float32 (:func:`sharpax.trajectory_kl`).

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
    end_epoch = _trajectory.check_end_epoch(end_epoch, start_epoch, "mesa")
    _trajectory.check_positive_float("temperature", temperature)
    _common.check_non_negative("weight", weight, schedule=False)

    def init_fn(variables: Any) -> MESAState:
        return MESAState(ema=jax.tree.map(_ema_copy, variables), count=jnp.zeros([], jnp.int32))

    def update_fn(state: MESAState, variables: Any) -> MESAState:
        return _ema_update(decay, state, variables)

    def loss_fn(
        logits: jax.Array,
        ema_logits: jax.Array,
        epoch: int | jax.Array,
        *,
        where: jax.Array | None = None,
    ) -> jax.Array:
        return _mesa_loss(
            start_epoch, end_epoch, temperature, weight, logits, ema_logits, epoch, where
        )

    return MESA(
        init=init_fn, update=update_fn, loss=loss_fn, start_epoch=start_epoch, end_epoch=end_epoch
    )


# --------------------------------------------------------------------------------------
# Loss combinator.


def with_mesa(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]],
    teacher: MESA,
    teacher_fn: Callable[[Any, Any], jax.Array],
    *,
    logits_fn: Callable[[Any], jax.Array] = _trajectory.default_logits,
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

        _trajectory.as_epoch(epoch, "with_mesa")  # validates
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
