"""CIFAR-10 with 30 % symmetric label noise, a small CNN: the longer benchmark beyond the demo.

  python -m experiments.compare --config experiments/configs/cifar10_cnn_noisy.py --config.data_dir=../shared/data/tfds \
      --seeds 0,1,2 --power_iters 0 --out runs/cifar10_cnn_noisy

Meant for any TFDS ``cifar10`` (the full set, or the 10 000 / 2 000 subset in
``../shared/data/tfds``); sized to run on a CPU in well under an hour for all
methods and three seeds. Our choice throughout, the same for every method: the
flax-examples CNN narrowed to conv16-conv32-dense128 (0.27 M parameters), no
augmentation (where SAM's gain is largest, Foret et al. 2021), 30 % of the
training labels flipped to a uniformly drawn other class (flip seed 0; the test
set is clean), 15 epochs, batch 128, SGD momentum 0.9, lr 0.05 cosine, weight
decay 5e-4, SAM rho 0.05; the methods' time constants mapped from their
200-epoch defaults by ``base.scale_to_run``.
"""

from experiments.configs import base


def get_config(arg: str | None = None):
    method, runlocal = base.parse_arg(arg)
    c = base.get_base_config()
    c.dataset = "cifar10"
    c.model = "mnist_cnn"
    c.model_kwargs.features = (16, 32)
    c.model_kwargs.hidden = 128
    c.label_noise = 0.3
    c.label_noise_seed = 0
    c.num_epochs = 15
    c.batch_size = 128
    c.eval_batch_size = 400
    c.learning_rate = 0.05
    c.weight_decay = 5e-4
    c.augment = False
    base.scale_to_run(c)
    return base.finalize(c, method, runlocal)
