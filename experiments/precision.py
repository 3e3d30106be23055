"""Mixed precision for the trainer: compute and param dtypes, float16 dynamic loss scaling.

``config.precision`` (defaults in ``configs/base.py``):

* ``compute_dtype``: the models' ``dtype``, in which activations and matmuls run
  (``'float32'``, ``'bfloat16'`` or ``'float16'``); logits and losses are float32.
* ``param_dtype``: the dtype the params are stored and updated in. With half
  params the momentum of SGD (and AdamW's first moment) is kept in float32,
  like every sharpax state (MESA's EMA, LookSAM's / vSAM's caches, MSAM's
  momentum: at least float32 whatever the params).
* ``loss_scale``: ``'auto'`` (dynamic when either dtype is float16, none
  otherwise: bfloat16 has float32's range), ``'dynamic'`` or ``'none'``;
  ``loss_scale_init`` / ``loss_scale_period`` / ``loss_scale_factor``:
  ``2**15`` / 2000 / 2 (jmp's and PyTorch AMP's defaults).

Dynamic loss scaling covers every gradient a step takes: the clean pass, SAM's
perturbed pass (``grad_fn``) and ESAM's data-selection gradient. The loss
function itself is wrapped (:func:`scaled_backward`): its value is unchanged,
its backward pass runs on cotangents multiplied by the scale ``S`` (so small
float16 gradients do not flush to zero) and the params' cotangents are divided
by ``S`` where they leave the loss, in float32 before they are rounded to the
params' dtype. No sharpax transform ever sees a scaled gradient, so LookSAM's
and vSAM's cached directions, AE-SAM's and vSAM's statistics and MSAM's
momentum stay valid when ``S`` changes.

A step whose gradients or update are not finite (an overflow of the scaled
backward pass, in the clean or the perturbed pass) is *skipped*
(:func:`dynamic_loss_scale`): zero update, the optimizer state (counters,
caches, momentum) left as it was, ``S`` halved; it is counted
(``skipped_steps``), not treated as divergence. After ``period`` finite steps
in a row ``S`` doubles. At the smallest scale (1) nothing is skipped any more:
a non-finite update then reaches the trainer's divergence check
(``training._check_finite``), as does a non-finite loss at any scale (loss
scaling cannot help a forward pass that overflows).

A skipped step leaves every counter where it was, the learning-rate schedule's
and the SAM schedule's too, so it is as if the step had not been taken (as with
``optax.apply_if_finite``). LookSAM's and vSAM's host dispatch
(``training.next_sam_step``) does not see the skip, which only the epoch's one
device read reports: after a skip, the host serves the rest of its queued plan one
step ahead of the device's schedule. Nothing is corrupted (a ``sam_step`` that
differs from ``sam_due`` is honoured and the state records what was done), and the
plan is read again from the device when the queue runs out (vSAM: at the end of
the window; LookSAM: after ``k`` steps), from where host and device agree again.
``--config.dispatch=cond`` decides on the device and follows the schedule exactly.

Why hand-written (two small pieces): optax has ``apply_if_finite`` but no loss
scale, and it tests only the incoming gradient and runs the inner update inside
a ``lax.cond`` (an overflow of SAM's perturbed pass would pass unseen, and a
gradient inside a conditional is many times slower on XLA:CPU). ``jmp`` (0.0.4,
last released January 2023) has the scale arithmetic but not the skip, and
scales the loss value, which the SAM transforms would then see through
``grad_fn``; its ``DynamicLossScale`` also drops ``min_loss_scale`` when
unflattened. The arithmetic is a few lines; a dependency is not worth it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_LOSS_SCALES = ("auto", "dynamic", "none")


def _dtype(config: ml_collections.ConfigDict, field: str) -> Any:
    name = config.get("precision", {}).get(field, "float32")
    if name not in DTYPES:
        raise ValueError(f"precision.{field} must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    return _dtype(config, "compute_dtype")


def param_dtype(config: ml_collections.ConfigDict) -> Any:
    return _dtype(config, "param_dtype")


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """``config.model_kwargs`` with the compute and param dtypes (a conflicting
    ``model_kwargs.dtype`` raises: one place says what the model computes in)."""
    kwargs = dict(config.get("model_kwargs", {}))
    dtype = compute_dtype(config)
    if "dtype" in kwargs and jnp.dtype(kwargs["dtype"]) != jnp.dtype(dtype):
        raise ValueError(
            f"model_kwargs.dtype = {kwargs['dtype']!r} contradicts precision.compute_dtype = "
            f"{jnp.dtype(dtype).name!r}: set precision.compute_dtype only."
        )
    return kwargs | {"dtype": dtype, "param_dtype": param_dtype(config)}


def state_dtype(config: ml_collections.ConfigDict) -> Any:
    """The base optimizer's accumulator dtype: float32 for half params, else theirs (None)."""
    return jnp.float32 if jnp.finfo(param_dtype(config)).bits < 32 else None


def uses_loss_scaling(config: ml_collections.ConfigDict) -> bool:
    p = config.get("precision", {})
    mode = p.get("loss_scale", "auto")
    if mode not in _LOSS_SCALES:
        raise ValueError(f"precision.loss_scale must be one of {_LOSS_SCALES}, got {mode!r}.")
    if mode == "auto":
        return jnp.float16 in (compute_dtype(config), param_dtype(config))
    return mode == "dynamic"


# ----------------------------------------------------------------------------- the backward pass


@jax.custom_vjp
def _scale_cotangent(tree: Any, factor: jax.Array) -> Any:
    """The identity, whose backward pass multiplies the cotangents by ``factor`` (in float32)."""
    del factor
    return tree


def _scale_fwd(tree, factor):
    return tree, factor


def _scale_bwd(factor, cotangent):
    def scale(c):
        if c.dtype == jax.dtypes.float0:
            return c
        return (c.astype(jnp.float32) * factor).astype(c.dtype)

    return jax.tree.map(scale, cotangent), jnp.zeros_like(factor)


_scale_cotangent.defvjp(_scale_fwd, _scale_bwd)


def scaled_backward(fn: Callable, scale: jax.Array | None) -> Callable:
    """``fn(params, *args)`` with the same value and gradient, its backward pass run at ``scale``.

    Every output's cotangent is multiplied by ``scale`` where it enters ``fn`` and
    the params' cotangent divided by it where it leaves, so any gradient taken
    through the result (of the loss, of a trajectory term added to the logits, of
    per-example losses) is the true one, while inside ``fn`` it is ``scale`` times
    larger. ``scale=None``: ``fn`` itself.
    """
    if scale is None:
        return fn

    def wrapped(params, *args):
        inv = (1.0 / scale).astype(jnp.float32)
        out = fn(_scale_cotangent(params, inv), *args)
        return _scale_cotangent(out, jnp.asarray(scale, jnp.float32))

    return wrapped


# ----------------------------------------------------------------------------- the optimizer


class LossScaleState(NamedTuple):
    """State of :func:`dynamic_loss_scale`.

    Attributes:
      loss_scale: float32 scalar ``S``, the scale of the next step's backward pass.
      good_steps: int32 scalar, finite steps since ``S`` last changed.
      skipped_steps: int32 scalar, steps skipped so far (non-finite at ``S > min_scale``).
      inner_state: the wrapped optimizer's state.
    """

    loss_scale: jax.Array
    good_steps: jax.Array
    skipped_steps: jax.Array
    inner_state: Any


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.asarray(leaves)) if leaves else jnp.asarray(True)


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    init_scale: float = 2.0**15,
    period: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Skips the steps whose gradients or update are not finite, and adapts the loss scale.

    ``inner`` gets true (unscaled) gradients, and any ``grad_fn`` is passed on as
    is: the scale is applied inside the loss (:func:`scaled_backward` with
    :func:`loss_scale` of this state). The inner update always runs (no
    conditional); on a non-finite step with ``S > min_scale`` its result is
    discarded by a select: zero updates, the previous inner state, ``S / factor``.
    A finite step counts towards ``period``, after which ``S · factor`` (if finite).
    """
    inner = optax.with_extra_args_support(inner)
    for name, value, low in (("init_scale", init_scale, 1.0), ("factor", factor, 1.0)):
        if not (np.isfinite(value) and value >= low):
            raise ValueError(f"loss scaling: {name} must be finite and >= {low}, got {value}.")
    if not (isinstance(period, int) and period >= 1):
        raise ValueError(f"loss scaling: period must be an int >= 1, got {period!r}.")

    def init_fn(params):
        return LossScaleState(
            jnp.asarray(init_scale, jnp.float32),
            jnp.zeros([], jnp.int32),
            jnp.zeros([], jnp.int32),
            inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        finite = _all_finite(updates) & _all_finite(new_updates)
        skip = ~finite & (state.loss_scale > min_scale)
        out = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        inner_state = jax.tree.map(
            lambda new, old: jnp.where(skip, old, new), new_inner, state.inner_state
        )
        good = jnp.where(finite, optax.safe_increment(state.good_steps), 0)
        grow = good >= period
        grown = state.loss_scale * factor
        scale = jnp.where(
            finite,
            jnp.where(grow & jnp.isfinite(grown), grown, state.loss_scale),
            jnp.maximum(state.loss_scale / factor, min_scale),
        )
        return out, LossScaleState(
            loss_scale=scale.astype(jnp.float32),
            good_steps=jnp.where(grow, 0, good).astype(jnp.int32),
            skipped_steps=jnp.where(
                skip, optax.safe_increment(state.skipped_steps), state.skipped_steps
            ),
            inner_state=inner_state,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def with_loss_scaling(
    config: ml_collections.ConfigDict, tx: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``tx`` wrapped in :func:`dynamic_loss_scale` when the config asks for it, else ``tx``."""
    if not uses_loss_scaling(config):
        return tx
    p = config.precision
    return dynamic_loss_scale(
        tx,
        init_scale=float(p.get("loss_scale_init", 2.0**15)),
        period=int(p.get("loss_scale_period", 2000)),
        factor=float(p.get("loss_scale_factor", 2.0)),
    )


def loss_scale(opt_state: Any) -> jax.Array | None:
    """The current loss scale ``S`` of a :func:`with_loss_scaling` state, or None (no scaling)."""
    return opt_state.loss_scale if isinstance(opt_state, LossScaleState) else None


def skipped_steps(opt_state: Any) -> int | None:
    """Steps skipped so far (a host read), or None without loss scaling."""
    if not isinstance(opt_state, LossScaleState):
        return None
    return int(jax.device_get(opt_state.skipped_steps))


def loss_scale_metrics(opt_state: Any, skipped_before: int) -> dict:
    """``train_skipped_steps`` (since ``skipped_before``) and ``loss_scale``; {} without scaling."""
    skipped = skipped_steps(opt_state)
    if skipped is None:
        return {}
    scale = float(jax.device_get(loss_scale(opt_state)))
    return {"train_skipped_steps": skipped - skipped_before, "loss_scale": scale}
