"""CIFAR100 x wrn28_10; recipe and sources: ``base.cifar_config``.

  python -m experiments.train --config experiments/configs/cifar100_wrn28_10.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/cifar100_wrn28_10_saf
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    return base.cifar_config("cifar100", "wrn28_10", arg)
