"""ImageNet-1k x resnet101; recipe and sources: ``base.imagenet_resnet_config``.

  python -m experiments.train --config experiments/configs/imagenet_resnet101.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/imagenet_resnet101_saf
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    return base.imagenet_resnet_config("resnet101", arg)
