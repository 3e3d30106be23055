"""Model zoo for the sharpax experiments, written in Flax Linen.

Why Linen rather than NNX: a Linen model is a pure function,
``model.apply(variables, x, train=...)``, of an explicit variables dict with a
``'params'`` collection and (for BatchNorm models) a ``'batch_stats'``
collection. That is exactly what the sharpness-aware methods need: SAM-style
optimizers evaluate the gradient twice per step, at ``params`` and at
``params + eps``, through a ``grad_fn(params)`` closure, which is a plain
``jax.grad`` of a pure loss with no module state to split and merge. The same
plain pytrees go straight through ``jax.jit``, ``NamedSharding`` and Orbax
checkpoints, and the ``batch_stats`` update stays explicit (returned by
:func:`apply_model`, never mutated behind the step's back).

Every model is called as ``model.apply(variables, x, train=bool)``; inputs are
NHWC images (``(B, L)`` or ``(B, L, 1)`` sequences for MNIST-1D), outputs are
float32 logits ``(B, num_classes)`` whatever the compute ``dtype``. Parameters
are float32 unless a model's ``param_dtype`` says otherwise (applied by
:func:`init_model`; layers cast them to ``dtype`` to compute); batch
statistics are always float32. BatchNorm uses batch statistics when ``train=True`` (call
with ``mutable=['batch_stats']``, or use :func:`apply_model`) and the running
averages when ``train=False``. Dropout, where a model has it, is off by default;
with ``dropout_rate > 0`` and ``train=True`` pass ``rngs={'dropout': key}``.

Use :func:`get_model` to build a model by name, :func:`init_model` to
initialise it and :func:`apply_model` for a forward pass that also returns the
updated BatchNorm statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Variables = Mapping[str, Any]

# Kaiming-normal (fan_out, gain 2) for convolutions, as torchvision's ResNet and
# google-research/sam's models (`utils.conv_kernel_init_fn`) use.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch BatchNorm defaults (momentum 0.1 == flax momentum 0.9, eps 1e-5), as in
# the reference PyTorch implementations the papers' numbers come from.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric spatial padding, as PyTorch's ``padding=p`` (flax 'SAME' is asymmetric at s2)."""
    return ((p, p), (p, p))


def _batch_norm(train: bool, dtype: Dtype, **kwargs: Any) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPSILON,
        dtype=dtype,
        **kwargs,
    )


def _logits(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# --------------------------------------------------------------------------------------------------
# ResNet (He et al. 2016), CIFAR or ImageNet stem.
# --------------------------------------------------------------------------------------------------


def _conv_factory(quant_bits: int | None) -> Any:
    """``nn.Conv``, or with ``quant_bits`` its LSQ-quantized variant (:mod:`experiments.lsq`)."""
    if quant_bits is None:
        return nn.Conv
    from experiments import lsq  # only the quantized models need it

    return lsq.quantized_conv(quant_bits)


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv - BN - ReLU - 3x3 conv - BN, plus shortcut, ReLU."""

    filters: int
    strides: int = 1
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    quant_bits: int | None = None  # LSQ bit width of every conv (inputs and kernels), or None

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = _conv_factory(self.quant_bits)
        conv = functools.partial(conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        s = (self.strides, self.strides)
        y = conv(self.filters, (3, 3), s, padding=_pad(1))(x)
        y = nn.relu(_batch_norm(train, self.dtype)(y))
        y = conv(self.filters, (3, 3), padding=_pad(1))(y)
        last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = _batch_norm(train, self.dtype, scale_init=last_init)(y)
        if self.strides != 1 or x.shape[-1] != self.filters:
            x = conv(self.filters, (1, 1), s, name="proj_conv")(x)
            x = _batch_norm(train, self.dtype, name="proj_bn")(x)
        return nn.relu(x + y)


class BottleneckBlock(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 - 3x3 (strided) - 1x1 (4x filters), as torchvision."""

    filters: int
    strides: int = 1
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    quant_bits: int | None = None  # LSQ bit width of every conv (inputs and kernels), or None

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = _conv_factory(self.quant_bits)
        conv = functools.partial(conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        s = (self.strides, self.strides)
        out = self.filters * self.expansion
        y = conv(self.filters, (1, 1))(x)
        y = nn.relu(_batch_norm(train, self.dtype)(y))
        y = conv(self.filters, (3, 3), s, padding=_pad(1))(y)
        y = nn.relu(_batch_norm(train, self.dtype)(y))
        y = conv(out, (1, 1))(y)
        last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = _batch_norm(train, self.dtype, scale_init=last_init)(y)
        if self.strides != 1 or x.shape[-1] != out:
            x = conv(out, (1, 1), s, name="proj_conv")(x)
            x = _batch_norm(train, self.dtype, name="proj_bn")(x)
        return nn.relu(x + y)


_RESNET_BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
    """ResNet with a CIFAR (3x3 conv, no max-pool) or ImageNet (7x7/2 conv + 3x3/2 max-pool) stem.

    Attributes:
      stage_sizes: number of blocks in each of the (usually 4) stages.
      block: ``'basic'`` (ResNet-18/34) or ``'bottleneck'`` (ResNet-50/101/152, v1.5).
      num_classes: size of the output layer.
      num_filters: channels of the first stage (doubled at each later stage).
      stem: ``'imagenet'`` for 224x224 inputs or ``'cifar'`` for 32x32 inputs
        (the kuangliu/pytorch-cifar ResNet-18 used by SAM, SAF and vSAM).
      zero_init_residual: initialise each block's last BN scale to zero
        (Goyal et al. 2017); off by default, as in torchvision.
      dtype: compute dtype (activations and matmuls).
      param_dtype: dtype the params are stored in (:func:`init_model` casts
        the float32 initialisation to it).
      quant_bits: None, or the LSQ bit width (:mod:`experiments.lsq`) of every
        conv in the blocks (inputs and kernels); the stem and the head stay in
        full precision.

    References:
      He et al, `Deep Residual Learning for Image Recognition
      <https://arxiv.org/abs/1512.03385>`_, 2016
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    num_classes: int = 1000
    num_filters: int = 64
    stem: str = "imagenet"
    zero_init_residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant_bits: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.block not in _RESNET_BLOCKS:
            raise ValueError(f"block must be one of {sorted(_RESNET_BLOCKS)}, got {self.block!r}.")
        block_cls = _RESNET_BLOCKS[self.block]
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = nn.Conv(
                self.num_filters,
                (7, 7),
                (2, 2),
                padding=_pad(3),
                use_bias=False,
                dtype=self.dtype,
                kernel_init=_conv_init,
                name="stem_conv",
            )(x)
            x = nn.relu(_batch_norm(train, self.dtype, name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(1))
        elif self.stem == "cifar":
            x = nn.Conv(
                self.num_filters,
                (3, 3),
                padding=_pad(1),
                use_bias=False,
                dtype=self.dtype,
                kernel_init=_conv_init,
                name="stem_conv",
            )(x)
            x = nn.relu(_batch_norm(train, self.dtype, name="stem_bn")(x))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}.")
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = block_cls(
                    self.num_filters * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    dtype=self.dtype,
                    quant_bits=self.quant_bits,
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


# --------------------------------------------------------------------------------------------------
# WideResNet (Zagoruyko & Komodakis 2016).
# --------------------------------------------------------------------------------------------------


class WideResNetBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus shortcut."""

    channels: int
    strides: int = 1
    dropout_rate: float = 0.0
    shortcut: str = "conv"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        s = (self.strides, self.strides)
        changes_shape = self.strides != 1 or x.shape[-1] != self.channels
        act = nn.relu(_batch_norm(train, self.dtype)(x))
        # Which input the shortcut sees follows each reference: with 'conv'
        # (Zagoruyko & Komodakis) every shape-changing block projects the
        # pre-activated input; with 'pad' (google-research/sam) only the first block
        # of the network does ("activate_before_residual"), the strided ones pad
        # the raw input. Identity blocks always add the raw input.
        pre_activated = self.shortcut == "conv" or self.strides == 1
        residual = act if changes_shape and pre_activated else x
        y = conv(self.channels, (3, 3), s, padding=_pad(1))(act)
        y = nn.relu(_batch_norm(train, self.dtype)(y))
        if self.dropout_rate > 0:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = conv(self.channels, (3, 3), padding=_pad(1))(y)
        if changes_shape:
            if self.shortcut == "conv":
                residual = conv(self.channels, (1, 1), s, name="proj_conv")(residual)
            else:
                residual = _pad_shortcut(residual, self.strides, self.channels)
        return y + residual


def _pad_shortcut(x: jax.Array, strides: int, channels: int) -> jax.Array:
    """Parameter-free shortcut: 2x2 average pool when strided, then zero-pad the channels."""
    if strides != 1:
        x = nn.avg_pool(x, (strides, strides), strides=(strides, strides))
    extra = channels - x.shape[-1]
    if extra < 0:
        raise ValueError(f"a padded shortcut cannot reduce channels ({x.shape[-1]} -> {channels}).")
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs: 3 groups of (depth - 4) / 6 pre-activation blocks.

    Attributes:
      depth: total depth; ``(depth - 4) % 6 == 0`` (28 for WRN-28-10).
      width: channel multiplier k; group widths are 16k, 32k, 64k.
      num_classes: size of the output layer.
      dropout_rate: dropout between the two convolutions of each block (0 in SAM).
      shortcut: ``'conv'`` for 1x1-conv projection shortcuts (the paper and the
        PyTorch code used by vSAM/SAF; 36.5M parameters for WRN-28-10) or
        ``'pad'`` for average-pool + zero-pad shortcuts (google-research/sam's
        ``wide_resnet.py``, which follows the AutoAugment code; 36.2M).
      dtype: compute dtype (activations and matmuls).
      param_dtype: dtype the params are stored in (:func:`init_model` casts
        the float32 initialisation to it).

    References:
      Zagoruyko & Komodakis, `Wide Residual Networks <https://arxiv.org/abs/1605.07146>`_, 2016
    """

    depth: int = 28
    width: int = 10
    num_classes: int = 10
    dropout_rate: float = 0.0
    shortcut: str = "conv"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 (n >= 1), got {self.depth}.")
        if self.shortcut not in ("conv", "pad"):
            raise ValueError(f"shortcut must be 'conv' or 'pad', got {self.shortcut!r}.")
        blocks = (self.depth - 4) // 6
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(
            16,
            (3, 3),
            padding=_pad(1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_conv_init,
            name="stem_conv",
        )(x)
        for i, channels in enumerate((16 * self.width, 32 * self.width, 64 * self.width)):
            for j in range(blocks):
                x = WideResNetBlock(
                    channels,
                    strides=2 if i > 0 and j == 0 else 1,
                    dropout_rate=self.dropout_rate,
                    shortcut=self.shortcut,
                    dtype=self.dtype,
                )(x, train)
        x = nn.relu(_batch_norm(train, self.dtype, name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


# --------------------------------------------------------------------------------------------------
# PyramidNet (Han et al. 2017), basic blocks, additive widening.
# --------------------------------------------------------------------------------------------------


class PyramidBlock(nn.Module):
    """PyramidNet basic block: BN-conv3x3-BN-ReLU-conv3x3-BN, plus zero-padded shortcut."""

    channels: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=_conv_init)
        y = _batch_norm(train, self.dtype)(x)
        y = conv(self.channels, (3, 3), (self.strides, self.strides), padding=_pad(1))(y)
        y = nn.relu(_batch_norm(train, self.dtype)(y))
        y = conv(self.channels, (3, 3), padding=_pad(1))(y)
        y = _batch_norm(train, self.dtype)(y)
        return y + _pad_shortcut(x, self.strides, self.channels)


def pyramidnet_channels(depth: int, alpha: float) -> list[int]:
    """Output channels of each basic block of PyramidNet-``depth`` with widening factor ``alpha``.

    The width grows by ``alpha / N`` per block over the ``N = 3 (depth - 2) / 6``
    blocks, from 16, rounded as in the authors' code (``int(round(.))``).
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"PyramidNet (basic blocks) depth must be 6n + 2 (n >= 1), got {depth}.")
    num_blocks = 3 * ((depth - 2) // 6)
    add_rate = alpha / num_blocks
    return [round(16 + add_rate * (i + 1)) for i in range(num_blocks)]


class PyramidNet(nn.Module):
    """PyramidNet with basic blocks for 32x32 inputs (PyramidNet-110, alpha=270: 28.5M params).

    Attributes:
      depth: total depth, ``6n + 2`` (110: 18 blocks per group).
      alpha: total width increase over the network (270).
      num_classes: size of the output layer.
      dtype: compute dtype (activations and matmuls).
      param_dtype: dtype the params are stored in (:func:`init_model` casts
        the float32 initialisation to it).

    References:
      Han et al, `Deep Pyramidal Residual Networks <https://arxiv.org/abs/1610.02915>`_, 2017
    """

    depth: int = 110
    alpha: float = 270
    num_classes: int = 10
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = pyramidnet_channels(self.depth, self.alpha)
        per_group = len(channels) // 3
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(
            16,
            (3, 3),
            padding=_pad(1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_conv_init,
            name="stem_conv",
        )(x)
        x = _batch_norm(train, self.dtype, name="stem_bn")(x)
        for b, c in enumerate(channels):
            strides = 2 if b > 0 and b % per_group == 0 else 1
            x = PyramidBlock(c, strides=strides, dtype=self.dtype)(x, train)
        x = nn.relu(_batch_norm(train, self.dtype, name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


# --------------------------------------------------------------------------------------------------
# Vision Transformer (Dosovitskiy et al. 2021), class token.
# --------------------------------------------------------------------------------------------------


class _MlpBlock(nn.Module):
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(1e-6),
        )
        y = nn.gelu(dense(self.mlp_dim)(x))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = dense(x.shape[-1])(y)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class _EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            deterministic=True,
        )(y)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
        return x + _MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype)(y, train)


class ViT(nn.Module):
    """Vision Transformer with a class token and learned position embeddings (ViT-S/32 defaults).

    Attributes:
      num_classes: size of the output layer (zero-initialised, as in big_vision).
      patch_size: side of the square patches (32 for ``/32``).
      hidden_size: token width (384 for ``S``).
      depth: number of encoder blocks (12).
      num_heads: attention heads (6).
      mlp_dim: hidden width of the MLP blocks (1536).
      dropout_rate: dropout after attention and in the MLP (0 by default).
      dtype: compute dtype (activations and matmuls).
      param_dtype: dtype the params are stored in (:func:`init_model` casts
        the float32 initialisation to it).

    The position embedding has one entry per patch plus the class token, so its
    shape is fixed by the input size used at init (224x224: 7x7 + 1 = 50).

    References:
      Dosovitskiy et al, `An Image is Worth 16x16 Words
      <https://arxiv.org/abs/2010.11929>`_, 2021
    """

    num_classes: int = 1000
    patch_size: int = 32
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})."
            )
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"image size {x.shape[1:3]} is not a multiple of patch_size {p}.")
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(
            self.hidden_size, (p, p), (p, p), padding="VALID", dtype=self.dtype, name="embedding"
        )(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c)), x], axis=1)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c), jnp.float32
        )
        x = x + pos.astype(self.dtype)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for i in range(self.depth):
            x = _EncoderBlock(
                self.num_heads, self.mlp_dim, self.dropout_rate, self.dtype, name=f"block_{i}"
            )(x, train)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="final_ln")(x[:, 0])
        head = nn.Dense(
            self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="head"
        )
        return _logits(head(x))


# --------------------------------------------------------------------------------------------------
# Small models: MNIST (28x28x1) and MNIST-1D (length 40).
# --------------------------------------------------------------------------------------------------


class MnistCNN(nn.Module):
    """The flax ``examples/mnist`` CNN: conv32-pool-conv64-pool-dense256-dense (824k params).

    ``features`` and ``hidden`` change the two convs' channels and the hidden
    layer's width (e.g. ``features=(16, 32), hidden=128`` for a CPU-sized CIFAR
    net). ``dtype`` / ``param_dtype``: compute and stored-params dtypes, as in
    :class:`ResNet`.
    """

    num_classes: int = 10
    features: Sequence[int] = (32, 64)
    hidden: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # No BatchNorm or dropout.
        x = jnp.asarray(x, self.dtype)
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3, 3), dtype=self.dtype)(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


def _as_sequence(x: jax.Array) -> jax.Array:
    """(B, L) or (B, L, 1) -> (B, L, 1)."""
    if x.ndim == 2:
        return x[..., None]
    if x.ndim == 3:
        return x
    raise ValueError(f"expected inputs of shape (B, L) or (B, L, C), got {x.shape}.")


class Mnist1dCNN(nn.Module):
    """The MNIST-1D baseline CNN (Greydanus 2020): 3 strided 1-D convs of 25 channels + linear.

    Kernel sizes 5, 3, 3, stride 2, padding 1, ReLU; for length-40 inputs the
    flattened features are 5 x 25 = 125 and the model has 5,210 parameters.
    ``dtype`` / ``param_dtype`` as in :class:`ResNet`.

    References:
      Greydanus, `Scaling down Deep Learning <https://arxiv.org/abs/2011.14439>`_, 2020
    """

    num_classes: int = 10
    channels: int = 25
    kernel_sizes: Sequence[int] = (5, 3, 3)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quant_bits: int | None = None  # LSQ bits of every conv but the first (the head stays float)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = jnp.asarray(_as_sequence(x), self.dtype)
        for i, k in enumerate(self.kernel_sizes):
            conv = nn.Conv if i == 0 else _conv_factory(self.quant_bits)
            x = conv(self.channels, (k,), (2,), padding=((1, 1),), dtype=self.dtype)(x)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs (MNIST-1D baseline: 2 x 100 hidden).

    ``dtype`` / ``param_dtype`` as in :class:`ResNet`.
    """

    num_classes: int = 10
    hidden_sizes: Sequence[int] = (100, 100)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
        for h in self.hidden_sizes:
            x = nn.relu(nn.Dense(h, dtype=self.dtype)(x))
        return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


# --------------------------------------------------------------------------------------------------
# Registry and helpers.
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    "resnet152": functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block="bottleneck"),
    "wrn28_10": functools.partial(WideResNet, depth=28, width=10),
    "pyramidnet110_270": functools.partial(PyramidNet, depth=110, alpha=270),
    "vit_s32": functools.partial(
        ViT, patch_size=32, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536
    ),
    "vit_s16": functools.partial(
        ViT, patch_size=16, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536
    ),
    "vit_b32": functools.partial(
        ViT, patch_size=32, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072
    ),
    "mnist_cnn": MnistCNN,
    "mnist1d_cnn": Mnist1dCNN,
    # LSQ quantization-aware variants (experiments.lsq); bits via model_kwargs.quant_bits.
    "resnet18_lsq": functools.partial(
        ResNet, stage_sizes=(2, 2, 2, 2), block="basic", quant_bits=4
    ),
    "mnist1d_cnn_lsq": functools.partial(Mnist1dCNN, quant_bits=4),
    "mnist1d_mlp": functools.partial(MLP, hidden_sizes=(100, 100)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds a model of the zoo by name.

    Args:
      name: one of :data:`MODEL_NAMES`: ``'resnet18'``, ``'resnet34'``,
        ``'resnet50'``, ``'resnet101'``, ``'resnet152'``, ``'wrn28_10'``,
        ``'pyramidnet110_270'``, ``'vit_s32'``, ``'vit_s16'``, ``'vit_b32'``,
        ``'mnist_cnn'``, ``'mnist1d_cnn'``, ``'mnist1d_mlp'``, and the LSQ-quantized
        ``'resnet18_lsq'``, ``'mnist1d_cnn_lsq'`` (``quant_bits=``; see
        :mod:`experiments.lsq`; initialise them with ``init_model(..., sample=)``).
      num_classes: number of output logits.
      **kwargs: overrides of the model's attributes, e.g. ``stem='cifar'`` for
        a ResNet on 32x32 images (the ResNet default is ``'imagenet'``),
        ``dtype=jnp.bfloat16``, ``depth=16, width=8`` for a WRN-16-8,
        ``dropout_rate=0.1``.

    Returns:
      An unbound Linen module; call ``model.apply(variables, x, train=...)``.

    Example:
      >>> from experiments import models
      >>> model = models.get_model('resnet18', num_classes=10, stem='cifar')
      >>> model.stem, model.num_classes
      ('cifar', 10)
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}.")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    try:
        return _REGISTRY[name](num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise TypeError(f"bad keyword argument for model {name!r}: {e}") from e


def init_model(
    model: nn.Module, rng: jax.Array, input_shape: Sequence[int], sample: Any = None
) -> dict[str, Any]:
    """Initialises ``model`` for inputs of per-example shape ``input_shape``.

    Args:
      model: a module from :func:`get_model`.
      rng: a PRNG key.
      input_shape: shape of ONE example, without the batch dimension, e.g.
        ``(32, 32, 3)`` or ``(40,)`` (as ``get_dataset_info(name).input_shape``).
      sample: optional batch of real inputs to initialise on (zeros otherwise);
        required by the LSQ models (``*_lsq``), whose activation step sizes
        start from the data.

    Returns:
      The variables dict: ``{'params': ...}`` plus ``'batch_stats'`` for models
      with BatchNorm. Params are in the model's ``param_dtype`` (float32 by
      default: ``model.init`` itself always creates float32 ones), batch
      statistics in float32.

    Example:
      >>> import jax
      >>> from experiments import models
      >>> model = models.get_model('mnist1d_mlp', num_classes=10)
      >>> variables = models.init_model(model, jax.random.key(0), (40,))
      >>> sorted(variables), models.count_params(variables)
      (['params'], 15210)
    """
    if any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be positive, got {tuple(input_shape)}.")
    if getattr(model, "quant_bits", None) is not None:
        if sample is None or not np.any(np.asarray(sample)):
            raise ValueError(
                "an LSQ-quantized model initialises its activation step sizes from data "
                "(2 mean|x| / sqrt(Q_P), Esser et al. 2020): pass sample= a batch of real inputs."
            )
    x = jnp.zeros((1, *input_shape), jnp.float32) if sample is None else jnp.asarray(sample)
    if x.shape[1:] != tuple(input_shape):
        raise ValueError(f"sample has per-example shape {x.shape[1:]}, not {tuple(input_shape)}.")
    variables = dict(_jitted_init(model)(rng, x))
    param_dtype = jnp.dtype(getattr(model, "param_dtype", jnp.float32))
    if param_dtype != jnp.float32:  # rounded once from the float32 initialisation
        variables["params"] = jax.tree.map(
            lambda p: p.astype(param_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
            variables["params"],
        )
    return variables


def _jitted_init(model: nn.Module) -> Callable:
    """``jit(model.init)``, one per distinct model (modules are hashable frozen dataclasses),
    so initialising equal models again (a second seed, a test) reuses the compiled init."""
    try:
        return _cached_init(model)
    except TypeError:  # an unhashable attribute (e.g. a list): compile anew
        return jax.jit(functools.partial(model.init, train=False))


@functools.lru_cache(maxsize=32)
def _cached_init(model: nn.Module) -> Callable:
    return jax.jit(functools.partial(model.init, train=False))


def apply_model(
    model: nn.Module,
    variables: Variables,
    x: jax.Array,
    *,
    train: bool,
    rngs: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, Any]]:
    """Forward pass that returns the logits and the (possibly updated) non-parameter state.

    Args:
      model: a module from :func:`get_model`.
      variables: ``{'params': ..., ['batch_stats': ...]}``.
      x: a batch of inputs.
      train: use batch statistics (and update them) and enable dropout.
      rngs: PRNG keys by stream, e.g. ``{'dropout': key}``; only needed for
        models with ``dropout_rate > 0`` when ``train=True``.

    Returns:
      ``(logits, state)``: float32 logits ``(B, num_classes)`` and the variables
      other than ``'params'`` (``{'batch_stats': ...}`` updated from this batch
      when ``train=True``; unchanged when ``train=False``; ``{}`` for models
      without BatchNorm).
    """
    state = {k: v for k, v in variables.items() if k != "params"}
    if train and state:
        logits, new_state = model.apply(variables, x, train=True, rngs=rngs, mutable=list(state))
        return logits, dict(new_state)
    return model.apply(variables, x, train=train, rngs=rngs), state


def count_params(tree: Any) -> int:
    """Number of scalars in ``tree['params']`` if it is a variables dict, else in ``tree``.

    Works on arrays and on ``jax.ShapeDtypeStruct`` leaves (from
    ``jax.eval_shape``), so large models can be counted without allocating them.
    """
    if isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    # Not optax.tree.size: it calls jnp.size, which jax 0.10 deprecates for ShapeDtypeStruct
    # leaves ("in a future JAX release this will be an error"), and abstract leaves are the
    # point here.
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def param_order(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, ...]]:
    """Paths of the model's parameter tensors in the order the layers create them.

    ``jax.tree`` flattens dicts in sorted-key order (``BasicBlock_10`` before
    ``BasicBlock_2``, ``head`` before ``stem_conv``), which is not the layer
    order; Flax builds its ``params`` dict in creation order, i.e. the order of
    the forward pass, as PyTorch's ``model.parameters()`` follows registration
    order. The order is read at trace time under ``jax.eval_shape`` (nothing is
    allocated).

    Example:
      >>> from experiments import models
      >>> model = models.get_model('mnist1d_mlp', num_classes=10)
      >>> models.param_order(model, (40,))[-2:]
      [('head', 'kernel'), ('head', 'bias')]
    """
    order: list[tuple[str, ...]] = []

    def walk(tree: Mapping, prefix: tuple[str, ...]) -> None:
        for k, v in tree.items():
            if isinstance(v, Mapping):
                walk(v, (*prefix, k))
            else:
                order.append((*prefix, k))

    def init(rng, x):
        variables = model.init(rng, x, train=False)
        walk(variables["params"], ())  # trace time: dicts still in creation order
        return variables

    jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, *input_shape), jnp.float32))
    return order


def _path_keys(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def last_tensors_mask(
    model: nn.Module, input_shape: Sequence[int], num_tensors: int
) -> Callable[[Any], Any]:
    """``params -> mask`` marking the last ``num_tensors`` parameter tensors in layer order.

    vSAM's statistics in the authors' code (``train_vsam.py --last_layer 10``)
    use the last 10 tensors of ``model.parameters()``; for the CIFAR ResNet-18
    these are the last block's two convs and BatchNorms, the shortcut
    BatchNorm before it and the classifier. Pass the result as
    ``sharpax.vsam(stat_mask=...)``.
    """
    order = param_order(model, input_shape)
    if not 0 < num_tensors <= len(order):
        raise ValueError(
            f"num_tensors must be in [1, {len(order)}] (the model's parameter tensors), "
            f"got {num_tensors}."
        )
    chosen = set(order[-num_tensors:])

    def mask_fn(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: _path_keys(path) in chosen, params
        )

    return mask_fn


# Parameters the ASAM authors' code rescales: those whose PyTorch name contains 'weight'
# (conv / linear kernels, normalisation scales, embedding tables); in Flax: these leaf names.
ASAM_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def asam_weights_mask(params: Any) -> Any:
    """``params -> mask``: True on the leaves the ASAM authors scale (``ASAM_WEIGHT_LEAVES``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _path_keys(path)[-1] in ASAM_WEIGHT_LEAVES, params
    )
