"""MNIST (TFDS `mnist`, from any --config.data_dir), small CNN; minutes on a CPU.

  python -m experiments.train --config experiments/configs/mnist.py:saf \
      --config.data_dir=../shared/data/tfds --workdir runs/mnist_saf

Our choice: 5 epochs, batch 128, lr 0.05, no augmentation; the methods' time
constants mapped from their 200-epoch defaults by ``base.scale_to_run`` (SAF/MESA
start at epoch 1, lag 1, MESA EMA horizon 0.1 epochs, vSAM warm-up 1 epoch,
window 20).
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    method, runlocal = base.parse_arg(arg)
    c = base.get_base_config()
    c.dataset = "mnist"
    c.model = "mnist_cnn"
    c.num_epochs = 5
    c.batch_size = 128
    c.eval_batch_size = 256
    c.learning_rate = 0.05
    c.augment = False
    base.scale_to_run(c)
    return base.finalize(c, method, runlocal)
