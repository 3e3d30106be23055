"""CIFAR10 x resnet18; recipe and sources: ``base.cifar_config``.

  python -m experiments.train --config experiments/configs/cifar10_resnet18.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/cifar10_resnet18_saf
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    return base.cifar_config("cifar10", "resnet18", arg)
