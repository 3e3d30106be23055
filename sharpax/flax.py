"""Flax Linen integration: a ``TrainState`` whose ``apply_gradients`` passes ``grad_fn`` to the optimizer.

Flax is imported lazily, on first use of :class:`TrainState` (neither
``import sharpax`` nor ``import sharpax.flax`` imports it). Flax's
``flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)``
forwards extra keyword arguments to ``.replace`` (the state's fields), not to
``tx.update``, so ``grad_fn`` never reaches :func:`sharpax.sam` and its
relatives. :class:`TrainState` is Flax's with one change: ``apply_gradients``
takes ``grad_fn``, ``sam_step`` and ``update_kwargs`` (e.g. ESAM's ``loss_fn``,
``batch``) and hands them to ``tx.update``; everything else is unchanged.

Example:
  >>> import jax, jax.numpy as jnp, optax, sharpax
  >>> from sharpax.flax import TrainState
  >>> loss = lambda p, x: jnp.sum((x * p["w"]) ** 2)
  >>> x = jnp.array([1.0, 2.0])
  >>> state = TrainState.create(
  ...     apply_fn=None, params={"w": jnp.ones(2)},
  ...     tx=optax.chain(sharpax.looksam(0.05, k=2), optax.sgd(0.1)))
  >>> for _ in range(3):
  ...     grads = jax.grad(loss)(state.params, x)
  ...     state = state.apply_gradients(grads=grads, grad_fn=lambda p: jax.grad(loss)(p, x))
  >>> print(int(state.step), int(sharpax.num_sam_steps(state.opt_state)))
  3 2
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optax


def _apply_gradients(
    self,
    *,
    grads: Any,
    grad_fn: Callable[[Any], Any] | None = None,
    sam_step: bool | None = None,
    update_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
):
    """One optimizer step: ``tx.update(grads, opt_state, params, grad_fn=, sam_step=, ...)``.

    Args:
      grads: the clean gradient at ``self.params``.
      grad_fn: the mini-batch's gradient function for SAM-type transforms
        (``lambda p: jax.grad(loss_fn)(p, batch)``), or None.
      sam_step: the static SAM/reuse decision of ``scheduled_sam`` presets
        (host dispatch), or None to decide on device.
      update_kwargs: other extra arguments of ``tx.update`` (ESAM's
        ``loss_fn``, ``batch``, ``losses``).
      **kwargs: fields to replace, as in Flax (e.g. ``batch_stats=``).

    Returns:
      The new state, with ``step`` incremented.
    """
    extra = dict(update_kwargs or {})
    if grad_fn is not None:
        extra["grad_fn"] = grad_fn
    if sam_step is not None:
        extra["sam_step"] = sam_step
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)


@functools.cache
def _train_state_class() -> type:
    from flax.training import train_state  # flax only when it is used

    return type(
        "TrainState",
        (train_state.TrainState,),
        {
            "__module__": __name__,
            "__doc__": "``flax.training.train_state.TrainState`` that can drive sharpax's "
            "transforms (``apply_gradients`` passes ``grad_fn`` / ``sam_step`` / "
            "``update_kwargs`` to ``tx.update``).",
            "apply_gradients": _apply_gradients,
        },
    )


def __getattr__(name: str) -> Any:
    if name == "TrainState":
        return _train_state_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
