"""MNIST-1D (Greydanus 2020, built offline by the `mnist1d` package), small 1-D conv net.

Finishes in minutes on a 2-core CPU; the `compare` demo uses it by default:

  python -m experiments.train --config experiments/configs/mnist1d.py:vsam --workdir runs/m1d_vsam

SAF/MESA start epochs and the lag are scaled to the short run (start 2, lag
1 over 20 epochs instead of 5 and 3 over 200); vSAM's window is scaled to the
62 steps of an epoch (window 20 instead of 50). Also chosen for the short run:
lr 0.05, batch 64, no augmentation, MESA decay 0.99 (0.9998 would barely move
the EMA in 1240 steps). Weight decay, momentum, cosine schedule and rho are the
CIFAR recipe's.
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    method, runlocal = base.parse_arg(arg)
    c = base.get_base_config()
    c.dataset = "mnist1d"
    c.model = "mnist1d_cnn"
    c.num_epochs = 20
    c.batch_size = 64
    c.eval_batch_size = 256
    c.learning_rate = 0.05
    c.weight_decay = 5e-4
    c.augment = False
    c.saf.start_epoch = 2
    c.saf.lag = 1
    c.mesa.start_epoch = 2
    c.mesa.decay = 0.99
    c.vsam.window = 20
    c = base.finalize(c, method, runlocal)
    if runlocal:
        c.eval_batch_size = 256
    return c
