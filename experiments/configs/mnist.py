"""MNIST (TFDS `mnist`, from any --config.data_dir), small CNN; minutes on a CPU.

  python -m experiments.train --config experiments/configs/mnist.py:saf \
      --config.data_dir=../shared/data/tfds --workdir runs/mnist_saf
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
    c.saf.start_epoch = 1
    c.saf.lag = 1
    c.mesa.start_epoch = 1
    c.mesa.decay = 0.999
    c.vsam.window = 50
    return base.finalize(c, method, runlocal)
