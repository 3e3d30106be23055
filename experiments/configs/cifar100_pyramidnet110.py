"""CIFAR100 x pyramidnet110_270; recipe and sources: ``base.cifar_config``.

  python -m experiments.train --config experiments/configs/cifar100_pyramidnet110.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/cifar100_pyramidnet110_saf
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    return base.cifar_config("cifar100", "pyramidnet110_270", arg)
