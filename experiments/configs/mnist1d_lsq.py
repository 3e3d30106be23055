"""MNIST-1D x the demo's 1-D CNN, LSQ-quantized (4 bits by default): QAT with any method.

  python -m experiments.train --config experiments/configs/mnist1d_lsq.py:vsam \
      --config.model_kwargs.quant_bits=2 --workdir runs/m1d_lsq2_vsam
  python -m experiments.compare --config experiments/configs/mnist1d_lsq.py --methods sgd,sam,vsam

The demo's task and recipe (``mnist1d.py``: 30 % label noise, 64 channels, 20
epochs) with the second and third convolutions quantized by LSQ (Esser et al.
2020; ``experiments.lsq``): weights and input activations at ``quant_bits``
bits, the first conv and the head in full precision. Trained from scratch (the
LSQ paper fine-tunes a full-precision model: our choice, to keep it one run).
"""

from experiments.configs import mnist1d


def get_config(arg: str | None = None):
    c = mnist1d.get_config(arg)
    c.model = "mnist1d_cnn_lsq"
    c.model_kwargs.quant_bits = 4
    c.name = c.name.replace("mnist1d_cnn", "mnist1d_cnn_lsq")
    return c
