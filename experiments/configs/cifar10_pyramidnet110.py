"""CIFAR10 x pyramidnet110_270; recipe and sources: ``base.cifar_config``.

  python -m experiments.train --config experiments/configs/cifar10_pyramidnet110.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/cifar10_pyramidnet110_saf
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    return base.cifar_config("cifar10", "pyramidnet110_270", arg)
