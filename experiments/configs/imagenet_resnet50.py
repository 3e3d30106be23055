"""ImageNet-1k x resnet50; recipe and sources: ``base.imagenet_resnet_config``.

  python -m experiments.train --config experiments/configs/imagenet_resnet50.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/imagenet_resnet50_saf
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    return base.imagenet_resnet_config("resnet50", arg)
