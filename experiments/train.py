r"""Training CLI: every sharpax method on any supported dataset, data parallel, resumable.

Usage::

  python -m experiments.train --config experiments/configs/mnist1d.py:sam \
      --workdir /tmp/mnist1d_sam
  python -m experiments.train --config experiments/configs/cifar10_resnet18.py \
      --config.method=saf --config.data_dir=$HOME/tensorflow_datasets --workdir runs/c10_saf

Configs are ``ml_collections`` files (``get_config()``); any field can be
overridden as ``--config.<field>=<value>``. Every epoch writes one JSON line to
``<workdir>/metrics.jsonl`` and an Orbax checkpoint holding the whole train
state (params, batch stats, optimizer state including the LookSAM/vSAM
schedule, PRNG key, SAF buffer or MESA EMA) plus the data position (the next
epoch); rerunning the same command resumes from the latest checkpoint.

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

import json
import os
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from experiments import input_pipeline, training

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
) -> list[dict]:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

    Args:
      config: a training config (see ``experiments/configs``).
      workdir: where checkpoints and ``metrics.jsonl`` live.
      stop_after_epochs: stop (as if killed) after this many epochs *of this
        call*; used to test resumption.
      mesh: a ``jax.sharding.Mesh`` with axis ``'data'`` (default: all devices).
      progress: show tqdm progress bars.

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
    state = training.init_state(s, training.init_sample(s, train_source))

    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )
    start_epoch = 0
    latest = manager.latest_step()
    if latest is not None:
        restored = manager.restore(
            latest,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()
            ),
        )
        state = restored["state"]
        start_epoch = int(restored["meta"]["next_epoch"])
        logging.info("resumed from %s at epoch %d", workdir, start_epoch)

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    rows = [r for r in _read_metrics(metrics_path) if r["epoch"] < start_epoch]
    num_sam_before = training.num_sam_steps(state, config.method)
    t_run = time.perf_counter()
    epochs_done = 0
    for epoch in range(start_epoch, config.num_epochs):
        batches = training.train_iter(config, train_source, epoch, s.steps_per_epoch)
        bar = tqdm(
            total=s.steps_per_epoch,
            desc=f"{config.method} epoch {epoch + 1}/{config.num_epochs}",
            disable=not progress or jax.process_index() != 0,
            leave=False,
        )
        t0 = time.perf_counter()

        def show(m: dict[str, Any]) -> None:
            elapsed = time.perf_counter() - t0
            bar.n = min(bar.n + 10, s.steps_per_epoch)
            bar.set_postfix(
                loss=f"{m['loss']:.3f}",
                acc=f"{m['accuracy']:.3f}",
                img_s=f"{bar.n * config.batch_size / max(elapsed, 1e-9):.0f}",
            )

        # No bar, no per-10-step host read of the metrics.
        state, train_metrics = training.run_train_epoch(
            s, state, batches, epoch, progress=None if bar.disable else show
        )
        jax.block_until_ready(state)
        train_time = time.perf_counter() - t0
        bar.close()
        test_metrics = training.evaluate(s, state, training.eval_iter(config, test_source))
        # The model EMA (MESA's teacher, or config.model_ema_horizon_epochs): what the SAF/MESA
        # authors report when their --model-ema is on.
        test_metrics |= training.evaluate_ema(s, state, training.eval_iter(config, test_source))
        num_sam = training.num_sam_steps(state, config.method)
        steps = train_metrics["train_steps"]
        row = {
            "epoch": epoch,
            "method": config.method,
            **train_metrics,
            **test_metrics,
            "images_per_sec": steps * config.batch_size / max(train_time, 1e-9),
            "sam_step_fraction": (num_sam - num_sam_before) / max(steps, 1),
            "train_time_s": train_time,
            "wall_time_s": time.perf_counter() - t_run,
        }
        num_sam_before = num_sam
        rows.append(row)
        _write_metrics(metrics_path, rows)
        manager.save(
            epoch + 1,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"next_epoch": epoch + 1})
            ),
        )
        manager.wait_until_finished()
        if jax.process_index() == 0:
            logging.info("epoch %d: %s", epoch, row)
            if progress:
                tqdm.write(
                    f"[{config.method}] epoch {epoch + 1}: train loss {row['train_loss']:.4f} "
                    f"test acc {row['test_accuracy']:.4f} ({row['images_per_sec']:.0f} img/s)"
                )
        epochs_done += 1
        if stop_after_epochs is not None and epochs_done >= stop_after_epochs:
            break
    manager.close()
    return rows


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
    initialize_distributed()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config experiments/configs/mnist1d.py:sam")
    workdir = _WORKDIR.value or os.path.join("runs", config.get("name", "train"))
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
