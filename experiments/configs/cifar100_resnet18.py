"""CIFAR100 x resnet18; recipe and sources: ``base.cifar_config``.

  python -m experiments.train --config experiments/configs/cifar100_resnet18.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/cifar100_resnet18_saf
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    return base.cifar_config("cifar100", "resnet18", arg)
