r"""Training CLI: every sharpax method on any supported dataset, data parallel, resumable.

Usage::

  python -m experiments.train --config experiments/configs/mnist1d.py:sam \
      --workdir /tmp/mnist1d_sam
  python -m experiments.train --config experiments/configs/cifar10_resnet18.py \
      --config.method=saf --config.data_dir=$HOME/tensorflow_datasets --workdir runs/c10_saf

Configs are ``ml_collections`` files (``get_config()``); any field can be
overridden as ``--config.<field>=<value>``. The resolved config is printed and
saved to ``<workdir>/config.json``. Every epoch writes one JSON line to
``<workdir>/metrics.jsonl`` and to TensorBoard event files in
``<workdir>/tensorboard`` (``experiments/metric_writers.py``), and an Orbax checkpoint holding the whole train
state (params, batch stats, optimizer state including the LookSAM/vSAM
schedule, PRNG key, SAF buffer or MESA EMA), the data position, the config,
the versions and checksums of every array (``experiments/checkpointing.py``).
``--config.checkpoint_every_steps=N`` also checkpoints every N steps, and
SIGTERM (a pre-empted job) checkpoints the current step and exits with 143.

Rerunning the same command resumes from the newest intact checkpoint: a
checkpoint whose arrays do not match their checksums is moved to
``<workdir>/corrupt_checkpoints/`` with a warning and the previous one is used.
Resuming with a config that differs in a key that changes the computation is
refused with the differing keys listed; ``--allow_config_change=key1,key2``
(or ``'*'``) allows it. A run whose loss or update turns non-finite stops
with an error naming the step (exit code 1); its last finite checkpoint stays.

Multi-host (``docs/multihost.md``): pass ``--distributed`` to call
``jax.distributed.initialize()`` with cluster auto-detection (SLURM, Open MPI,
TPU pods), or ``--coordinator_address=host:port --num_processes=N
--process_id=i`` on each process elsewhere (e.g. 2 local processes)::

  python -m experiments.train --config experiments/configs/mnist1d.py:sam \
      --workdir /shared/m1d_sam --coordinator_address=127.0.0.1:12355 \
      --num_processes=2 --process_id=0   # and --process_id=1 in a second shell

Each process reads its own slice of every global batch; the workdir must be
on a filesystem all processes share (checkpoints are written by all of them).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging as std_logging
import os
import time
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from experiments import checkpointing, input_pipeline, metric_writers, precision, training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize(): with only this flag the cluster (SLURM, Open MPI, "
    "TPU pods, ...) is auto-detected; see docs/multihost.md.",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0's coordinator, for jax.distributed.initialize (implies "
    "--distributed; default: auto-detected).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (implies --distributed; default: auto-detected)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "This process's index in [0, num_processes) (implies --distributed; default: auto-detected).",
)
_ORBAX_INFO = flags.DEFINE_bool("orbax_info", False, "Keep Orbax's INFO log lines.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_string(
    "allow_config_change",
    "",
    "Resume although these config keys (comma-separated; sections too, '*' for all) differ "
    "from the checkpoint's.",
)


def _read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_metrics(path: str, rows: list[dict]) -> None:
    """Replaces ``path`` with ``rows`` (one JSON line each); only process 0 writes.

    Every process holds the same rows (the metrics are global means); several
    processes writing the same file (and its ``.tmp``) on a shared filesystem
    would race, and one's ``os.replace`` could find the other's file gone.
    """
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_after_epochs: int | None = None,
    mesh=None,
    progress: bool = True,
    allow_changes: str | Iterable[str] = (),
) -> list[dict]:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

    Args:
      config: a training config (see ``experiments/configs``).
      workdir: where checkpoints and ``metrics.jsonl`` live.
      stop_after_epochs: stop (as if killed) after this many epochs *of this
        call*; used to test resumption.
      mesh: a ``jax.sharding.Mesh`` with axis ``'data'`` (default: all devices).
      progress: show tqdm progress bars.
      allow_changes: config keys (or sections) allowed to differ from the
        checkpoint's when resuming, ``'*'`` for all; any other difference in a
        key that changes the computation raises ``checkpointing.ConfigMismatch``.

    Raises:
      checkpointing.Preempted: after SIGTERM, once the state is checkpointed.
      checkpointing.ConfigMismatch: resuming with a changed config.
      checkpointing.CorruptCheckpoint: checkpoints exist but none is intact.
      FloatingPointError: the run diverged (the last finite checkpoint is kept).

    Returns:
      The per-epoch metrics rows of the whole run (also those of earlier,
      resumed-from calls).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    info = input_pipeline.get_dataset_info(config.dataset)
    train_source, test_source = (
        input_pipeline.make_source(
            config.dataset,
            split,
            config.get("data_dir"),
            in_memory=config.get("in_memory", False),
            mnist1d_args=config.get("mnist1d_args"),
        )
        for split in (info.train_split, info.eval_split)
    )
    if config.get("label_noise", 0.0):
        noisy = input_pipeline.symmetric_label_noise(
            train_source, config.label_noise, info.num_classes, config.label_noise_seed
        )
        train_source = noisy.source
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "label_noise.json"), "w") as f:
                json.dump(
                    {
                        "rate": config.label_noise,
                        "seed": config.label_noise_seed,
                        "flipped_ids": noisy.flipped_ids.tolist(),
                        "noisy_labels": noisy.noisy_labels.tolist(),
                        "clean_labels": noisy.clean_labels.tolist(),
                    },
                    f,
                )
    s = training.setup(config, train_size=len(train_source), mesh=mesh)
    ckpt = checkpointing.Checkpointer(workdir)
    writer = metric_writers.TensorBoardWriter(os.path.join(workdir, "tensorboard"))
    try:
        return _train_loop(
            s, ckpt, writer, train_source, test_source, workdir,
            stop_after_epochs=stop_after_epochs, progress=progress, allow_changes=allow_changes,
        )  # fmt: skip
    finally:
        writer.close()
        ckpt.close()


def _resume(s, ckpt, train_source, allow_changes, progress):
    """The newest intact checkpoint's state and data position, or a fresh state.

    The restore target is abstract (shapes, dtypes, shardings): a resume never
    builds a concrete state first (that doubled the start-up peak).
    """
    restored = ckpt.restore_latest(training.abstract_state(s), s.config, allow_changes)
    if restored is None:
        state = training.init_state(s, training.init_sample(s, train_source))
        return state, {"next_epoch": 0, "steps_done": 0}
    state, meta, step = restored
    position = meta["position"]
    message = (
        f"resumed from {ckpt.directory} step {step}: epoch {position['next_epoch'] + 1}, "
        f"{position['steps_done']} of its {s.steps_per_epoch} steps done"
    )
    logging.info(message)
    if progress and jax.process_index() == 0:
        tqdm.write(message)
    return state, position


def _save_config(config, workdir):
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(
                {"config": checkpointing.flat_config(config), "versions": checkpointing.versions()},
                f,
                indent=1,
            )


@dataclasses.dataclass
class _Epoch:
    """Where one epoch stands; a mid-epoch checkpoint saves it (its ``position``)."""

    epoch: int
    steps_done: int = 0
    sums: dict | None = None  # training.add_metrics sums of the steps done
    train_time_s: float = 0.0  # the timed steps: all but the process's first
    timed_steps: int = 0
    first_step_s: float = 0.0  # the process's first step, compilation included
    num_sam_before: int = 0
    skipped_before: int = 0  # float16 loss scaling: steps skipped before the epoch

    def position(self) -> dict:
        return {"next_epoch": self.epoch, **dataclasses.asdict(self)}

    @classmethod
    def resume(cls, position: dict, num_sam_before: int, skipped_before: int) -> _Epoch:
        if not position["steps_done"]:
            return cls(
                position["next_epoch"], num_sam_before=num_sam_before, skipped_before=skipped_before
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in position.items() if k in fields})


def _chunk(s, ep: _Epoch, every: int, step: int, compiled: bool) -> int:
    """Steps to run before the next host stop: the first step alone (compilation, timed apart),
    then up to the next multiple of ``every`` global steps (a checkpoint) or the epoch's end."""
    left = s.steps_per_epoch - ep.steps_done
    if not compiled:
        return 1
    return min(left, every - step % every) if every else left


def _run_epoch(s, state, ckpt, ep: _Epoch, batches, bar, compiled: list[bool]):
    """Trains the rest of ``ep``; returns the state and whether the job was pre-empted."""
    every = s.config.get("checkpoint_every_steps", 0)
    while ep.steps_done < s.steps_per_epoch:
        step = int(jax.device_get(state.step))
        t0 = time.perf_counter()
        state, host = training.run_train_steps(
            s,
            state,
            itertools.islice(batches, _chunk(s, ep, every, step, compiled[0])),
            ep.epoch,
            progress=None if bar.disable else _show(bar, s.config, t0, s.steps_per_epoch),
            stop=ckpt.preempted,
        )
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
        if not host:
            raise RuntimeError(
                f"the training data ran out after {ep.steps_done} of epoch {ep.epoch + 1}'s "
                f"{s.steps_per_epoch} steps"
            )
        if compiled[0]:
            ep.train_time_s += dt
            ep.timed_steps += len(host)
        else:
            ep.first_step_s, compiled[0] = dt, True
        ep.sums = training.add_metrics(ep.sums, host)
        ep.steps_done += len(host)
        bar.n = ep.steps_done
        step += len(host)
        preempted = ckpt.preempted(step)
        if ep.steps_done < s.steps_per_epoch and (preempted or (every and step % every == 0)):
            ckpt.save(step, state, ep.position(), s.config)  # a mid-epoch checkpoint
        if preempted:
            return state, True
    return state, False


def _train_loop(
    s,
    ckpt,
    writer,
    train_source,
    test_source,
    workdir,
    *,
    stop_after_epochs,
    progress,
    allow_changes,
):
    config = s.config
    state, position = _resume(s, ckpt, train_source, allow_changes, progress)
    _save_config(config, workdir)
    writer.write_hparams(checkpointing.flat_config(config))
    start_epoch = position["next_epoch"]
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    # Rows number epochs from 1 (as the console does): the finished ones are 1..start_epoch.
    rows = [r for r in _read_metrics(metrics_path) if r["epoch"] <= start_epoch]
    t_run = time.perf_counter()
    compiled = [False]
    for epoch in range(start_epoch, config.num_epochs):
        num_sam = training.num_sam_steps(state, config.method)
        skipped = precision.skipped_steps(state.opt_state) or 0  # None without loss scaling
        ep = (
            _Epoch.resume(position, num_sam, skipped)
            if epoch == start_epoch
            else _Epoch(epoch, num_sam_before=num_sam, skipped_before=skipped)
        )
        batches = training.train_iter(
            config, train_source, epoch, s.steps_per_epoch, start_step=ep.steps_done
        )
        # tqdm, not clu.periodic_actions.ReportProgress: that module imports
        # clu.metric_writers and with it TensorFlow (see experiments/metric_writers.py).
        bar = tqdm(
            total=s.steps_per_epoch,
            initial=ep.steps_done,
            desc=f"{config.method} epoch {epoch + 1}/{config.num_epochs}",
            disable=not progress or jax.process_index() != 0,
            leave=False,
        )
        state, preempted = _run_epoch(s, state, ckpt, ep, batches, bar, compiled)
        bar.close()
        step = int(jax.device_get(state.step))
        if preempted and ep.steps_done < s.steps_per_epoch:
            raise checkpointing.Preempted(step, ckpt.directory)
        rows.append(_epoch_row(s, state, test_source, ep, t_run))
        _write_metrics(metrics_path, rows)
        writer.write_scalars(step, {k: v for k, v in rows[-1].items() if k != "method"})
        writer.flush()
        ckpt.save(step, state, {"next_epoch": epoch + 1, "steps_done": 0}, config)
        _report_epoch(config, rows[-1], progress)
        if preempted or ckpt.preempted(step):
            raise checkpointing.Preempted(step, ckpt.directory)
        if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
            break
    else:
        _report_run(config, rows, progress)
    return rows


def _report_epoch(config, row, progress):
    if jax.process_index() != 0:
        return
    logging.info("epoch %d: %s", row["epoch"], row)
    if progress:
        tqdm.write(
            f"[{config.method}] epoch {row['epoch']}/{config.num_epochs}: train loss "
            f"{row['train_loss']:.4f} test acc {row['test_accuracy']:.4f} "
            f"({row['images_per_sec']:.0f} img/s)"
        )


def _report_run(config, rows, progress):
    """The end-of-run summary line."""
    if jax.process_index() != 0 or not rows:
        return
    best = max(rows, key=lambda r: r["test_accuracy"])
    first = sum(r.get("first_step_s", 0.0) for r in rows)
    line = (
        f"[{config.method}] done: {len(rows)} epochs, final test acc {rows[-1]['test_accuracy']:.4f} "
        f"(best {best['test_accuracy']:.4f} in epoch {best['epoch']}), train time "
        f"{sum(r['train_time_s'] for r in rows):.1f} s (first step incl. compilation {first:.1f} s), "
        f"median {np.median([r['images_per_sec'] for r in rows]):.0f} img/s"
    )
    logging.info("%s", line)
    if progress:
        tqdm.write(line)


def _show(bar, config, t0, steps_per_epoch):
    n0 = bar.n

    def show(m: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - t0
        bar.n = min(bar.n + 10, steps_per_epoch)
        bar.set_postfix(
            loss=f"{m['loss']:.3f}",
            acc=f"{m['accuracy']:.3f}",
            img_s=f"{(bar.n - n0) * config.batch_size / max(elapsed, 1e-9):.0f}",
        )

    return show


def _epoch_row(s, state, test_source, ep: _Epoch, t_run):
    config = s.config
    test_metrics = training.evaluate(s, state, training.eval_iter(config, test_source))
    # The model EMA (MESA's teacher, or config.model_ema_horizon_epochs): what the SAF/MESA
    # authors report when their --model-ema is on.
    test_metrics |= training.evaluate_ema(s, state, training.eval_iter(config, test_source))
    num_sam = training.num_sam_steps(state, config.method)
    train_metrics = training.epoch_metrics(ep.sums)
    train_metrics |= precision.loss_scale_metrics(state.opt_state, ep.skipped_before)
    steps = train_metrics["train_steps"]
    # Throughput without compilation: the process's first step is timed apart.
    timed = (ep.timed_steps, ep.train_time_s) if ep.timed_steps else (steps, ep.first_step_s)
    return {
        "epoch": ep.epoch + 1,
        "method": config.method,
        **train_metrics,
        **test_metrics,
        "images_per_sec": timed[0] * config.batch_size / max(timed[1], 1e-9),
        "sam_step_fraction": (num_sam - ep.num_sam_before) / max(steps, 1),
        "train_time_s": ep.train_time_s + ep.first_step_s,
        "first_step_s": ep.first_step_s,
        "wall_time_s": time.perf_counter() - t_run,
    }


class _QuietOrbax(std_logging.Filter):
    """Drops Orbax's INFO/DEBUG records (over 90 % of a run's log lines); warnings stay."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (
            record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname
        )


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` from the flags; a no-op without any of them.

    Unset flags are left to JAX's cluster auto-detection (SLURM, Open MPI, TPU
    pods); on a cluster it cannot detect, pass all three. On CPU the processes'
    collectives use gloo (``jax_cpu_collectives_implementation``, JAX's default).
    """
    explicit = {
        "coordinator_address": _COORDINATOR_ADDRESS.value,
        "num_processes": _NUM_PROCESSES.value,
        "process_id": _PROCESS_ID.value,
    }
    if not _DISTRIBUTED.value and all(v is None for v in explicit.values()):
        return
    jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})
    logging.info(
        "process %d of %d: %d local devices of %d",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip


def main(argv):
    del argv
    if not _ORBAX_INFO.value:
        logging.get_absl_handler().addFilter(_QuietOrbax())
    initialize_distributed()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError(
            "--config is required, e.g. --config experiments/configs/mnist1d.py:sam"
        )
    workdir = _WORKDIR.value or os.path.join("runs", config.get("name", "train"))
    if jax.process_index() == 0:
        print(f"config (also in {os.path.join(workdir, 'config.json')}):\n{config}", flush=True)
    try:
        train_and_evaluate(config, workdir, allow_changes=_ALLOW_CONFIG_CHANGE.value)
    except checkpointing.Preempted as e:
        logging.warning("%s", e)
        print(e, flush=True)
        raise SystemExit(143) from None  # 128 + SIGTERM, as if the signal had ended the job


if __name__ == "__main__":
    app.run(main)
