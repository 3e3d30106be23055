"""ImageNet-1k x resnet152; recipe and sources: ``base.imagenet_resnet_config``.

  python -m experiments.train --config experiments/configs/imagenet_resnet152.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/imagenet_resnet152_saf
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    return base.imagenet_resnet_config("resnet152", arg)
