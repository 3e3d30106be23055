"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020) for quantization-aware training.

* :func:`lsq_quantize` is the quantizer ``v̂ = round(clip(v / s, −Q_N, Q_P)) · s`` with
  the paper's gradients: straight-through for ``v`` inside the range (0 outside) and
  ``∂v̂/∂s = round(v/s) − v/s`` inside, ``−Q_N`` / ``Q_P`` at the clipped ends, the
  step's gradient scaled by ``1 / sqrt(N · Q_P)``.
* :class:`LSQConvGeneral` and :class:`LSQDotGeneral` plug into Flax's ``nn.Conv``
  (``conv_general_dilated_cls``) and ``nn.Dense`` (``dot_general_cls``): they quantize
  the layer's input activations (unsigned by default: the inputs follow a ReLU) and its
  kernel (signed), each with its own learned step size (params ``act_step`` and
  ``weight_step`` in the layer's scope).
* :func:`quantized_conv` / :func:`quantized_dense` build such layers; the model zoo's
  ``*_lsq`` models (``models.get_model('resnet18_lsq', quant_bits=4)``) quantize every
  layer but the first and the last, which stay in full precision.

Step sizes start at ``2 · mean|v| / sqrt(Q_P)`` (the paper's rule): the weights' from
the initial weights, the activations' from the batch ``models.init_model`` is given
(``sample=``), which is why LSQ models must be initialised on real data.

Deviations from the paper: the first and last layers are in full precision (the paper
quantizes them to 8 bits); training runs from scratch in the trainer (the paper
fine-tunes a full-precision model); ``N`` of an activation quantizer is the number of
features of one example.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from experiments import lsq
  >>> x = jnp.array([-1.0, 0.26, 0.9, 5.0])
  >>> print(lsq.lsq_quantize(x, 0.5, bits=2, signed=True).tolist())
  [-1.0, 0.5, 0.5, 0.5]
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: ``(2^(b−1), 2^(b−1) − 1)`` signed, ``(0, 2^b − 1)`` unsigned."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}.")
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lsq(x: jax.Array, s: jax.Array, q_n: int, q_p: int, grad_scale: float) -> jax.Array:
    return _lsq_fwd(x, s, q_n, q_p, grad_scale)[0]


def _lsq_fwd(x, s, q_n, q_p, grad_scale):
    v = x.astype(jnp.float32) / s
    return (jnp.round(jnp.clip(v, -q_n, q_p)) * s).astype(x.dtype), (v, s)


def _lsq_bwd(q_n, q_p, grad_scale, residuals, cotangent):
    v, s = residuals
    ct = cotangent.astype(jnp.float32)
    inside = (v > -q_n) & (v < q_p)
    dx = jnp.where(inside, ct, 0.0).astype(cotangent.dtype)
    ds_each = jnp.where(inside, jnp.round(v) - v, jnp.where(v <= -q_n, -float(q_n), float(q_p)))
    ds = (jnp.sum(ct * ds_each) * grad_scale).reshape(jnp.shape(s)).astype(s.dtype)
    return dx, ds


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_quantize(
    x: jax.Array, step_size: Any, *, bits: int, signed: bool, num_elements: int | None = None
) -> jax.Array:
    """LSQ's quantizer ``round(clip(x / s, −Q_N, Q_P)) · s`` with the paper's gradients.

    Args:
      x: the values (weights or activations), any shape and float dtype.
      step_size: ``s``, a positive scalar (a learned parameter).
      bits: bit width ``b`` (2 to 16).
      signed: signed range ``[−2^(b−1), 2^(b−1) − 1]`` (weights) or unsigned
        ``[0, 2^b − 1]`` (activations after a ReLU).
      num_elements: ``N`` of the step's gradient scale ``1 / sqrt(N · Q_P)``;
        default ``x.size`` (the paper: the layer's weights, or its features).

    Returns:
      The quantized values, in ``x``'s dtype. ``d/dx`` is 1 where
      ``−Q_N < x/s < Q_P`` and 0 elsewhere; ``d/ds`` is summed over ``x`` and
      scaled by ``1 / sqrt(N · Q_P)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from experiments import lsq
      >>> f = lambda s: lsq.lsq_quantize(jnp.array([0.3, 9.0]), s, bits=3, signed=False).sum()
      >>> print(round(float(jax.grad(f)(jnp.float32(1.0))), 4))  # (round(.3) - .3 + 7) / sqrt(2 * 7)
      1.7907
    """
    q_n, q_p = quant_range(bits, signed)
    n = int(x.size if num_elements is None else num_elements)
    if n < 1:
        raise ValueError(f"num_elements must be >= 1, got {n}.")
    s = jnp.asarray(step_size, jnp.float32)
    return _lsq(x, s, q_n, q_p, 1.0 / math.sqrt(n * q_p))


def initial_step(v: jax.Array, bits: int, signed: bool) -> jax.Array:
    """The paper's initial step size ``2 · mean|v| / sqrt(Q_P)`` (float32 scalar)."""
    _, q_p = quant_range(bits, signed)
    return 2.0 * jnp.mean(jnp.abs(v.astype(jnp.float32))) / math.sqrt(q_p)


class _Quantizers(nn.Module):
    """The two quantizers of a layer: its input activations and its kernel."""

    bits: int = 4
    act_signed: bool = False

    def quantize(self, lhs: jax.Array, rhs: jax.Array) -> tuple[jax.Array, jax.Array]:
        s_a = self.param("act_step", lambda _: initial_step(lhs, self.bits, self.act_signed))
        s_w = self.param("weight_step", lambda _: initial_step(rhs, self.bits, True))
        per_example = max(1, lhs.size // max(lhs.shape[0], 1))
        lhs = lsq_quantize(
            lhs, s_a, bits=self.bits, signed=self.act_signed, num_elements=per_example
        )
        return lhs, lsq_quantize(rhs, s_w, bits=self.bits, signed=True)


class LSQConvGeneral(_Quantizers):
    """``lax.conv_general_dilated`` on LSQ-quantized inputs and kernel (``nn.Conv``'s ``conv_general_dilated_cls``)."""

    @nn.compact
    def __call__(self, lhs, rhs, *args, **kwargs):
        lhs, rhs = self.quantize(lhs, rhs)
        return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


class LSQDotGeneral(_Quantizers):
    """``lax.dot_general`` on LSQ-quantized inputs and kernel (``nn.Dense``'s ``dot_general_cls``)."""

    @nn.compact
    def __call__(self, lhs, rhs, *args, **kwargs):
        lhs, rhs = self.quantize(lhs, rhs)
        return jax.lax.dot_general(lhs, rhs, *args, **kwargs)


def quantized_conv(bits: int, act_signed: bool = False, **conv_kwargs: Any) -> Any:
    """An ``nn.Conv`` factory whose layers quantize inputs and kernel with LSQ at ``bits`` bits."""
    quant_range(bits, act_signed)  # validates
    cls = functools.partial(LSQConvGeneral, bits=bits, act_signed=act_signed)
    return functools.partial(nn.Conv, conv_general_dilated_cls=cls, **conv_kwargs)


def quantized_dense(bits: int, act_signed: bool = False, **dense_kwargs: Any) -> Any:
    """An ``nn.Dense`` factory whose layers quantize inputs and kernel with LSQ at ``bits`` bits."""
    quant_range(bits, act_signed)
    cls = functools.partial(LSQDotGeneral, bits=bits, act_signed=act_signed)
    return functools.partial(nn.Dense, dot_general_cls=cls, **dense_kwargs)
