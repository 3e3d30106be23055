"""Helpers shared by SAF and MESA (private): argument checks and default readers.

Used by :mod:`sharpax.trajectory`, :mod:`sharpax.saf` and :mod:`sharpax.mesa`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sharpax import _common

# --------------------------------------------------------------------------------------
# Validation helpers.


def check_positive_float(name: str, value: Any) -> None:
    _common.check_number(name, value, low=0.0, low_open=True)


def as_epoch(epoch: Any, owner: str) -> jax.Array:
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


def check_end_epoch(end_epoch: Any, start_epoch: int, owner: str) -> int | None:
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


def term_active(epoch: jax.Array, start_epoch: int, end_epoch: int | None) -> jax.Array:
    """``start_epoch <= epoch < end_epoch`` (no upper bound for ``end_epoch=None``)."""
    active = epoch >= start_epoch
    return active if end_epoch is None else active & (epoch < end_epoch)


def check_logits_2d(logits: Any, num_classes: int | None, owner: str) -> None:
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


def as_where(where: Any, batch: int, owner: str) -> jax.Array:
    if where is None:
        return jnp.ones((batch,), bool)
    if jnp.shape(where) != (batch,):
        raise ValueError(
            f"sharpax.{owner}: where must be a boolean mask of shape ({batch},) (one entry per "
            f"example of the batch), got shape {jnp.shape(where)}."
        )
    return jnp.asarray(where).astype(bool)


# --------------------------------------------------------------------------------------
# Default readers of the loss combinators (with_saf, with_mesa).


def default_logits(aux: Any) -> jax.Array:
    return aux["logits"]


def default_ids(batch: Any) -> jax.Array:
    """``batch["id"]`` (as ``experiments/``' pipelines name it), or a KeyError naming ``ids_fn``."""
    try:
        return batch["id"]
    except (KeyError, TypeError, IndexError):
        keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise KeyError(
            "sharpax.with_saf reads each example's id with ids_fn, by default "
            f"batch['id'], which this batch lacks (it has {keys}); pass e.g. "
            "ids_fn=lambda batch: batch['example_id']."
        ) from None
