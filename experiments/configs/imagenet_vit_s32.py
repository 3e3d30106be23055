"""ImageNet-1k x ViT-S/32 with AdamW: one row of SAF Table 1.

  python -m experiments.train --config experiments/configs/imagenet_vit_s32.py:mesa \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/vit_s32_mesa

300 epochs, AdamW (b1 0.9, b2 0.999) (Du et al. 2022, Sec. 4.1). The SAF paper
defers the rest to its appendix; we use the ViT-SAM recipe of Chen et al.
2022 ("When Vision Transformers Outperform ResNets without Pretraining or
Strong Data Augmentations"): batch 4096, lr 3e-3, weight decay 0.3, 10k warm-up
steps (~32 epochs), gradient clipping at norm 1, cosine decay.
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    method, runlocal = base.parse_arg(arg)
    c = base.get_base_config()
    c.dataset = "imagenet2012"
    c.model = "vit_s32"
    c.num_epochs = 300
    c.batch_size = 4096
    c.eval_batch_size = 1024
    c.optimizer = "adamw"
    c.learning_rate = 3e-3
    c.warmup_epochs = 32
    c.weight_decay = 0.3
    c.grad_clip = 1.0
    c.label_smoothing = 0.0
    c.in_memory = False
    c.data_threads = 16
    c.saf.dtype = "bfloat16"
    c.saf.shard_buffer = True
    c.gsam.update(dict(rho_max=0.6, rho_min=0.0, alpha=0.4))  # GSAM paper Table 4, ViT-S/32
    return base.finalize(c, method, runlocal)
