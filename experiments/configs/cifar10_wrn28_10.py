"""CIFAR10 x wrn28_10: one row of SAF Table 1 / vSAM Table 1.

  python -m experiments.train --config experiments/configs/cifar10_wrn28_10.py:saf \
      --config.data_dir=$TFDS_DATA_DIR --workdir runs/cifar10_wrn28_10_saf

Batch 128, 200 epochs, SGD(momentum 0.9), lr 0.1 cosine, weight decay 5e-4,
SAM rho 0.05, pad-4 crop + flip: the common SAM CIFAR recipe (Foret et al.
2021; the SAF paper defers its CIFAR recipe to an appendix we could not read,
so this is our choice, not a transcription). SAF tau=5, lag 3, E_start 5,
lambda 0.3; MESA lambda 0.8 (Du et al. 2022, Sec. 4.1, "for all the
experiments"); MESA decay 0.9998 (AngusDujw/SAF MESA_train.py default).
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    method, runlocal = base.parse_arg(arg)
    c = base.get_base_config()
    c.dataset = "cifar10"
    c.model = "wrn28_10"
    c.vsam.warmup_steps = 3 * (50_000 // c.batch_size)  # ajiaaa/vSAM: 3 epochs of full SAM
    return base.finalize(c, method, runlocal)
