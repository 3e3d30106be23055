"""CIFAR10 x ResNet-18, the vSAM authors' recipe; sources: ``base.vsam_cifar_config``.

  python -m experiments.train --config experiments/configs/vsam_cifar10_resnet18.py:vsam \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/vsam_cifar10_resnet18_vsam
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    return base.vsam_cifar_config("cifar10", "resnet18", arg)
