"""SAM and ASAM as a gradient transformation that sits first in an optax chain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sharpax import _common


class SAMState(NamedTuple):
    """State of :func:`sam`.

    Attributes:
      count: int32 scalar, number of ``update`` calls (optimizer steps) so far;
        a ``rho`` schedule is evaluated at this count.
      num_sam_steps: int32 scalar, number of full two-pass (ascent + perturbed
        gradient) steps taken. Equal to ``count`` for plain SAM; LookSAM and vSAM
        use the same field for the steps on which they paid for the second pass.
    """

    count: jax.Array
    num_sam_steps: jax.Array


def sam(
    rho: _common.ScalarOrSchedule = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    axis_name: str | None = None,
    adaptive_mask: Any | Callable[[optax.Params], Any] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-Aware Minimization: maps the clean gradient to the SAM gradient.

    Given the gradient ``g`` of the mini-batch loss at ``w``, SAM ascends to
    ``w + ε`` with ``ε = rho · g / (‖g‖₂ + eps)`` (global L2 norm over the whole
    pytree) and returns the gradient of the *same* mini-batch loss there,
    ``grad_fn(w + ε)``. With ``adaptive=True`` it is ASAM:
    ``T = |w| + eta`` and ``ε = rho · T² g / (‖T g‖₂ + eps)``; ``adaptive_mask``
    restricts the scaling to some leaves (``T = 1`` elsewhere). Deviation: by
    default every leaf is scaled, whereas the ASAM authors' code
    (SamsungLabs/ASAM ``asam.py``) scales only the parameters whose name
    contains ``'weight'`` (conv and linear kernels and BatchNorm scales; biases
    and BatchNorm offsets are perturbed unscaled) and its CIFAR example runs with
    ``eta = 0``; pass ``adaptive_mask`` to reproduce that.

    Put it **first** in a chain; whatever follows (momentum, weight decay,
    learning rate) sees the SAM gradient::

      optax.chain(sharpax.sam(0.05), optax.sgd(0.1, momentum=0.9))

    ``update(grads, state, params, *, grad_fn)`` needs ``grad_fn(params) ->
    grads``, the gradient function of the mini-batch that produced ``grads``.
    Transforms placed *before* ``sam`` in a chain change only the ascent
    direction (e.g. clipping the gradient before ``sam`` clips ``g`` used for
    ``ε``); the returned SAM gradient is always the raw ``grad_fn`` output.

    Data parallel (``pmap`` / ``shard_map``): pass each device's own gradient
    and a per-device ``grad_fn``. With ``axis_name=None`` each device ascends
    along its own gradient (m-sharpness with m = per-device batch, the
    google-research/sam default). With ``axis_name='batch'`` the ascent gradient
    is ``pmean``-ed first so all devices share one ``ε`` (with the output
    averaged, single-device SAM on the global batch). In both cases the returned
    SAM gradient is the device's own, *not* averaged: average it yourself, as you
    would average gradients for any optax optimizer, right after this transform
    with :func:`pmean_updates` (the recipe shared with :func:`sharpax.looksam`
    and :func:`sharpax.vsam`)::

      optax.chain(sharpax.sam(0.05, axis_name='batch'),
                  sharpax.pmean_updates('batch'), optax.sgd(0.1))

    For ``sam`` alone, averaging inside ``grad_fn``
    (``lambda p: jax.lax.pmean(jax.grad(loss)(p, b), 'batch')``) is the same.
    Under ``jax.shard_map`` with the default ``check_vma=True``, ``jax.grad`` of
    a per-device loss with respect to replicated params is already summed over
    the mesh; use ``check_vma=False`` (pmap semantics) or make the params
    device-varying with ``jax.lax.pcast(params, axis, to='varying')`` to get
    per-device gradients.

    Gradient accumulation: use ``optax.chain(sharpax.sam(rho),
    optax.MultiSteps(opt, k).gradient_transformation())`` with ``grad_fn``
    built for each micro-batch: every micro-batch then gets its own SAM
    gradient and ``MultiSteps`` averages them. Wrapping the whole chain instead,
    ``optax.MultiSteps(optax.chain(sharpax.sam(rho), opt), k)``, perturbs along
    the running mean of the micro-batch gradients and keeps only the last
    micro-batch's perturbed gradient: that is not SAM on the large batch.

    Args:
      rho: neighbourhood radius, a non-negative float or an optax schedule of
        the step count (``state.count``). Works under
        ``optax.inject_hyperparams``.
      adaptive: if True, ASAM's scale-invariant neighbourhood.
      eta: ASAM's offset in ``T = |w| + eta``.
      adaptive_mask: ASAM only: a pytree of Python bools with the structure of
        the params, or a function ``params -> mask``; leaves marked False get
        ``T = 1``. None (default): every leaf is scaled.
      eps: non-negative, added to the norm so a zero gradient gives ``ε = 0``
        (no NaN).
      axis_name: mapped axis over which to average the ascent gradient, or
        None for per-device ascent.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is
      :class:`SAMState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sharpax
      >>> loss = lambda w, x: jnp.sum((x * w) ** 2)
      >>> x = jnp.array([1.0, 2.0])
      >>> params = jnp.array([1.0, -1.0])
      >>> opt = optax.chain(sharpax.sam(0.05), optax.sgd(0.1))
      >>> state = opt.init(params)
      >>> grads = jax.grad(loss)(params, x)
      >>> updates, state = opt.update(
      ...     grads, state, params, grad_fn=lambda p: jax.grad(loss)(p, x))
      >>> params = optax.apply_updates(params, updates)
      >>> print(int(state[0].num_sam_steps))
      1

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021

      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks
      <https://arxiv.org/abs/2102.11600>`_, 2021
    """
    _common.check_non_negative("rho", rho)
    _common.check_non_negative("eta", eta, schedule=False)
    _common.check_non_negative("eps", eps, schedule=False)
    if adaptive_mask is not None and not adaptive:
        raise ValueError("sharpax.sam: adaptive_mask applies to ASAM only; pass adaptive=True.")

    def init_fn(params: optax.Params) -> SAMState:
        del params
        # Two distinct buffers, so a train state can be donated to jit.
        return SAMState(count=jnp.zeros([], jnp.int32), num_sam_steps=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: SAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMState]:
        del extra_args
        _common.require_grad_fn(grad_fn, "sam")
        _common.require_params(params, "sam")
        sam_grads = _common.sam_gradient(
            updates,
            params,
            grad_fn,
            _common.value_at(rho, state.count),
            adaptive=adaptive,
            eta=eta,
            eps=eps,
            axis_name=axis_name,
            adaptive_mask=_common.resolve_mask(adaptive_mask, params, "sam", "adaptive_mask"),
        )
        return sam_grads, SAMState(
            count=optax.safe_increment(state.count),
            num_sam_steps=optax.safe_increment(state.num_sam_steps),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pmean_updates(axis_name: str) -> optax.GradientTransformation:
    r"""Averages the updates over a mapped axis: ``jax.lax.pmean(updates, axis_name)``.

    The data-parallel companion of :func:`sam`, :func:`sharpax.looksam` and
    :func:`sharpax.vsam`, which return each device's own gradient: put it right
    after them, before anything that is not linear in the gradient (momentum
    and Adam statistics, clipping), so every device applies the same update::

      optax.chain(sharpax.looksam(0.05, k=5, axis_name='batch'),
                  sharpax.pmean_updates('batch'),
                  optax.sgd(0.1, momentum=0.9))

    Use it inside ``jax.pmap`` / ``jax.shard_map`` over ``axis_name``. It has
    no state.

    Args:
      axis_name: the mapped axis to average over.

    Returns:
      An ``optax.GradientTransformation`` with an empty state.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sharpax.sam import pmean_updates
      >>> tx = pmean_updates('i')
      >>> out = jax.pmap(lambda u: tx.update(u, tx.init(u))[0], axis_name='i')(
      ...     jnp.arange(jax.local_device_count(), dtype=jnp.float32)[:, None])
      >>> bool((out == out[0]).all())
      True
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"axis_name must be the name of a mapped axis, got {axis_name!r}.")

    def init_fn(params: optax.Params) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        del params
        return jax.lax.pmean(updates, axis_name), state

    return optax.GradientTransformation(init_fn, update_fn)
