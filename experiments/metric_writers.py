"""TensorBoard event files for the trainer and ``compare`` (clu's ``MetricWriter`` interface).

``clu.metric_writers`` would be the first choice, but importing it imports
TensorFlow (``clu/metric_writers/summary_writer.py`` -> ``tf.summary``; clu
0.0.12), a dependency of several hundred MB that nothing else here needs. This
module writes the same TensorBoard event files with ``tensorboardX`` (numpy and
protobuf only) behind clu's method names and signatures for what the trainer
writes (``write_scalars(step, scalars)``, ``write_hparams(hparams)``,
``flush()``, ``close()``).

View them with ``tensorboard --logdir <workdir>/tensorboard``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax


class TensorBoardWriter:
    """Scalars and hyperparameters as TensorBoard event files in ``logdir``.

    Only process 0 writes (as clu's ``create_default_writer(just_logging=...)``
    is used on multi-host jobs); on the others every method is a no-op.
    Non-numeric values are skipped; a non-finite scalar is written as it is
    (TensorBoard shows NaN), never dropped.
    """

    def __init__(self, logdir: str):
        self.logdir = logdir
        self._writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 - only where it writes

            self._writer = SummaryWriter(logdir=logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in scalars.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(key, float(value), global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes the (flat) config as text: TensorBoard's hparams plugin wants a metric too."""
        if self._writer is None:
            return
        lines = [f"| {k} | {_fmt(v)} |" for k, v in sorted(hparams.items())]
        self._writer.add_text("config", "| key | value |\n|---|---|\n" + "\n".join(lines), 0)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _fmt(v: Any) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return repr(v)
