"""CIFAR10 x LSQ-quantized ResNet-18 (2/3/4 bits), the vSAM authors' recipe: vSAM's QAT claim.

  python -m experiments.train --config experiments/configs/vsam_cifar10_resnet18_lsq.py:vsam \
      --config.model_kwargs.quant_bits=3 --config.data_dir=$TFDS_DATA_DIR \
      --workdir runs/vsam_cifar10_resnet18_lsq3_vsam

``base.vsam_cifar_config`` (sources in docs/configs.md) on ``resnet18_lsq``: every
conv of the residual blocks quantized by LSQ (``experiments.lsq``), the stem and
the head in full precision. The vSAM paper's LSQ setting (bits, schedule,
whether it fine-tunes) could not be read; 4 bits and training from scratch are
our choice.
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    c = base.vsam_cifar_config("cifar10", "resnet18_lsq", arg)
    c.model_kwargs.quant_bits = 4
    return c
