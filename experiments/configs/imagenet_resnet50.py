"""ImageNet-1k x resnet50: one row of SAF Table 1.

  python -m experiments.train --config experiments/configs/imagenet_resnet50.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/imagenet_resnet50_saf

Batch 4096, lr 1.4, 90 epochs, SGD momentum 0.9 (Du et al. 2022, Sec. 4.1);
cosine schedule, 3 warm-up epochs, label smoothing 0.1 (AngusDujw/SAF
SAF_train.py defaults); weight decay 1e-4 (AngusDujw/SAF run.sh). SAF buffer
in bfloat16 and sharded over the devices: 1.28M x 4 x 1000 x 2 B = 10 GB in
total instead of 20 GB per replica.
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    method, runlocal = base.parse_arg(arg)
    c = base.get_base_config()
    c.dataset = "imagenet2012"
    c.model = "resnet50"
    c.num_epochs = 90
    c.batch_size = 4096
    c.eval_batch_size = 1024
    c.learning_rate = 1.4
    c.warmup_epochs = 3
    c.weight_decay = 1e-4
    c.label_smoothing = 0.1
    c.in_memory = False
    c.data_threads = 16
    c.saf.dtype = "bfloat16"
    c.saf.shard_buffer = True
    return base.finalize(c, method, runlocal)
