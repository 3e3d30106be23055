"""Trajectory losses (Du et al., NeurIPS 2022): the per-example KL shared by SAF and MESA.

SAF and MESA both add ``weight · mean_b τ² · KL(softmax(ref_b/τ) ‖ softmax(logits_b/τ))``
to the training loss, where the reference logits ``ref`` come either from the same
example ``lag`` epochs ago (SAF, a ring buffer indexed by example id) or from an
exponential moving average of the model (MESA). Neither needs a second forward
and backward pass, unlike SAM.

The methods live in one module each: :mod:`sharpax.saf` (``SAFState``, ``SAF``,
``saf``, ``check_example_ids``, ``with_saf``) and :mod:`sharpax.mesa` (``MESAState``,
``MESA``, ``mesa``, ``with_mesa``). This module keeps what both share: the
divergence :func:`trajectory_kl` and :class:`TrajectoryAux`, the aux output of
:func:`~sharpax.with_saf` and :func:`~sharpax.with_mesa`; their private helpers
(epoch, mask and logits checks, default readers) are in ``sharpax._trajectory``.
All names are also exported at the top level (``sharpax.saf``, ``sharpax.mesa``, ...).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sharpax import _trajectory

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
    _trajectory.check_positive_float("temperature", temperature)
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
    # p == 0 (e.g. a -inf reference logit) contributes 0, not 0 * inf = NaN; a NaN
    # reference (p NaN) gives a NaN KL: reported, never counted as 0.
    kl = jnp.sum(jnp.where(p == 0, 0.0, p * (log_p - log_q)), axis=-1)
    return tau * tau * kl


# --------------------------------------------------------------------------------------
# The aux output of the loss combinators.


class TrajectoryAux(NamedTuple):
    """Aux output of the losses built by :func:`~sharpax.with_saf` and :func:`~sharpax.with_mesa`.

    Attributes:
      aux: the wrapped ``loss_fn``'s own aux, unchanged.
      state: the new :class:`~sharpax.SAFState` (SAF) or the unchanged
        :class:`~sharpax.MESAState` (MESA: its EMA is updated after the optimizer step).
      term: the trajectory term that was added to the loss (for logging).
    """

    aux: Any
    state: Any
    term: jax.Array
