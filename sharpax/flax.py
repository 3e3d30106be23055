"""Flax integration: a Linen ``TrainState`` that passes ``grad_fn`` on, and an NNX ``grad_fn`` builder.

Flax is imported lazily, on first use of :class:`TrainState` or
:func:`nnx_grad_fn` (neither ``import sharpax`` nor ``import sharpax.flax``
imports it).

**Linen.** Flax's
``flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)``
forwards extra keyword arguments to ``.replace`` (the state's fields), not to
``tx.update``, so ``grad_fn`` never reaches :func:`sharpax.sam` and its
relatives. :class:`TrainState` is Flax's with one change: ``apply_gradients``
takes ``grad_fn``, ``sam_step`` and ``update_kwargs`` (e.g. ESAM's ``loss_fn``,
``batch``) and hands them to ``tx.update``; everything else is unchanged.

**NNX.** ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads,
grad_fn=...)`` already hands ``grad_fn`` to ``tx.update``; :func:`nnx_grad_fn`
builds it from the model and the loss so that the perturbed pass runs on a
copy: it keeps the clean pass's BatchNorm statistics and draws its own dropout
masks.

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

import jax
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


def _stream_tags(model: Any) -> list[str]:
    from flax import nnx

    tags = {node.key.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)}
    return sorted(tags)


def nnx_grad_fn(
    model: Any,
    loss_fn: Callable[..., Any],
    *args: Any,
    key: Any = None,
    wrt: Any = None,
    has_aux: bool = False,
    **kwargs: Any,
) -> Callable[[Any], Any]:
    """The ``grad_fn`` of a SAM-type transform for a Flax NNX model.

    Returns ``grad_fn(params)``: the gradient, with respect to ``params``, of
    ``loss_fn(copy, *args, **kwargs)``, where ``copy`` is ``model`` with its
    ``wrt`` variables set to ``params`` (the pure ``nnx.State`` that
    ``nnx.Optimizer.update`` passes to ``tx.update``, at ``w + ε``). The copy
    makes the perturbed pass side-effect free:

    * every state it writes (BatchNorm running statistics, RNG counters, any
      other ``Variable`` the forward updates) lands in the copy and is
      discarded, so ``model`` keeps what the clean pass wrote, as
      google-research/sam keeps the clean pass's batch statistics;
    * every random stream of the copy (``nnx.Dropout``'s) is reseeded with
      ``nnx.reseed`` from ``key`` (the ``i``-th stream name in sorted order from
      ``jax.random.fold_in(key, i)``), so the perturbed pass draws dropout masks
      independent of the clean pass's and leaves ``model``'s streams where the
      clean pass left them: the next step's clean masks are the ones it would
      draw without SAM. Pass a fresh ``key`` every step (e.g. from a stream of
      its own, ``sam_rngs = nnx.Rngs(sam=0)``; ``key=sam_rngs.sam()``).

    The model's mode is kept: call ``model.train()`` before the step, so both
    passes normalize with the batch's statistics and apply dropout. Dropout
    that takes ``rngs=`` at call time draws from whatever ``loss_fn`` passes.

    Args:
      model: the ``nnx.Module`` (inside ``nnx.jit`` as well as eagerly). Its
        state is read when ``nnx_grad_fn`` is called; only ``wrt`` is replaced.
      loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (or
        ``(scalar, aux)`` with ``has_aux=True``; ``aux`` is dropped): the same
        loss as the clean pass, on the same mini-batch.
      *args: positional arguments of ``loss_fn`` after the model (the batch).
      key: a JAX PRNG key (or an int seed) for the perturbed pass's random
        streams. Required if ``model`` holds any ``nnx.RngStream``.
      wrt: the ``nnx`` filter of the differentiated variables; the same as the
        optimizer's ``wrt``. Default ``nnx.Param``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      **kwargs: keyword arguments of ``loss_fn``.

    Returns:
      ``grad_fn(params) -> grads``, with ``grads`` structured as ``params``.

    Raises:
      ValueError: ``model`` has random streams and ``key`` is None.

    Example:
      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> from flax import nnx
      >>> from sharpax.flax import nnx_grad_fn
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.lin, self.bn = nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
      ...         self.drop = nnx.Dropout(0.5, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.drop(self.bn(self.lin(x)))
      >>> model = Net(nnx.Rngs(params=0, dropout=1))
      >>> optimizer = nnx.Optimizer(
      ...     model, optax.chain(sharpax.sam(0.05), optax.sgd(0.1)), wrt=nnx.Param)
      >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
      >>> x = jnp.ones((8, 3))
      >>> loss, grads = nnx.value_and_grad(loss_fn)(model, x)  # clean pass
      >>> grad_fn = nnx_grad_fn(model, loss_fn, x, key=jax.random.key(2))
      >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)  # perturbed pass on a copy
      >>> print(int(model.drop.rngs.count[...]), int(optimizer.step[...]))  # one clean draw
      1 1
    """
    from flax import nnx  # flax only when it is used

    wrt = nnx.Param if wrt is None else wrt
    tags = _stream_tags(model)
    if tags and key is None:
        raise ValueError(
            f"nnx_grad_fn: the model holds random streams {tags} (nnx.Dropout's), so the "
            "perturbed pass needs key= to draw its own masks; reusing the model's streams "
            "would repeat the clean pass's masks or consume the next step's. Pass a fresh key "
            "per step, e.g. key=sam_rngs.sam() with sam_rngs = nnx.Rngs(sam=0)."
        )
    if isinstance(key, int):
        key = jax.random.key(key)
    graphdef, _, rest = nnx.split(model, wrt, ...)
    rest = nnx.as_pure(rest)

    def loss_at(params):
        copy = nnx.merge(graphdef, params, rest, copy=True)
        if tags:
            seeds = {tag: jax.random.fold_in(key, i) for i, tag in enumerate(tags)}
            nnx.reseed(copy, policy="match_shape", **seeds)
        out = loss_fn(copy, *args, **kwargs)
        return out[0] if has_aux else out

    return jax.grad(loss_at)


def __getattr__(name: str) -> Any:
    if name == "TrainState":
        return _train_state_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
