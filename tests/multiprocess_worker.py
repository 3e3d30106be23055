"""One process of a multi-process CPU training run (started by tests/test_multiprocess.py).

Run as a script, one per process, with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
and ``JAX_PLATFORMS=cpu`` set by the caller::

  python tests/multiprocess_worker.py --coordinator_address=127.0.0.1:PORT \
      --num_processes=2 --process_id=0 --workdir=DIR --methods=sam,vsam,saf,mesa \
      [--stop_after_epochs=1]

Each process calls ``jax.distributed.initialize`` through the training CLI's own
flags (``experiments.train.initialize_distributed``; CPU collectives: gloo, JAX's
default) and then ``experiments.train.train_and_evaluate`` for every method in
``DIR/<method>``, in the same order on every process; each process reads its
own slice of every global batch. ``config_for`` is the config both this run and
the test's single-process reference train.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

from experiments import train


def config_for(method: str):
    """A tiny MNIST-1D config: 2 epochs of 4 steps, global batch 32, every trajectory term on."""
    from experiments.configs import mnist1d

    c = mnist1d.get_config(method)
    c.num_epochs = 2
    c.batch_size = 32
    c.eval_batch_size = 1000  # 4 eval steps over the 4000 test examples
    c.max_steps_per_epoch = 4
    c.saf.start_epoch = 0
    c.saf.lag = 1
    c.saf.shard_buffer = True  # the buffer sharded along the example axis, across processes
    c.mesa.start_epoch = 0
    c.mesa.ema_horizon_epochs = 1.0
    c.vsam.warmup_epochs = 0
    c.vsam.window = 4
    c.vsam.blocks = 2
    return c


def main(argv) -> None:
    del argv
    train.initialize_distributed()  # the CLI's own flags: --coordinator_address etc.
    FLAGS = flags.FLAGS
    if jax.process_count() != FLAGS.num_processes or jax.device_count() == jax.local_device_count():
        raise RuntimeError(
            f"process {jax.process_index()} of {jax.process_count()} (wanted {FLAGS.num_processes})"
            f" sees {jax.local_device_count()} of {jax.device_count()} devices"
        )
    for method in FLAGS.methods:
        train.train_and_evaluate(
            config_for(method),
            os.path.join(FLAGS.workdir, method),
            stop_after_epochs=FLAGS.stop_after_epochs,
            progress=False,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    # Defined only when run as a script: the test imports config_for from here.
    flags.DEFINE_list("methods", None, "Methods to train, in this order.")
    flags.DEFINE_integer("stop_after_epochs", None, "Stop after this many epochs (as if killed).")
    app.run(main)
