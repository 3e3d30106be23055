r"""Training CLI: every sharpax method on any supported dataset, data parallel, resumable.

Usage::

  python -m experiments.train --config experiments/configs/mnist1d.py:sam \
      --workdir /tmp/mnist1d_sam
  python -m experiments.train --config experiments/configs/cifar10_resnet18.py \
      --config.method=saf --config.data_dir=$HOME/tensorflow_datasets --workdir runs/c10_saf

Configs are ``ml_collections`` files (``get_config()``); any field can be
overridden as ``--config.<field>=<value>``. The resolved config is printed and
saved to ``<workdir>/config.json``. Every epoch writes one JSON line to
``<workdir>/metrics.jsonl`` and an Orbax checkpoint holding the whole train
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

Multi-host: pass ``--distributed`` to call ``jax.distributed.initialize()``
(cluster auto-detection); each process reads its own slice of every batch.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from experiments import checkpointing, input_pipeline, training

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
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
    state = training.init_state(s, training.init_sample(s, train_source))
    ckpt = checkpointing.Checkpointer(workdir)
    try:
        return _train_loop(
            s, state, ckpt, train_source, test_source, workdir,
            stop_after_epochs=stop_after_epochs, progress=progress, allow_changes=allow_changes,
        )  # fmt: skip
    finally:
        ckpt.close()


def _resume(s, state, ckpt, workdir, allow_changes, progress):
    """The newest intact checkpoint's state and data position (or the fresh ones)."""
    restored = ckpt.restore_latest(state, s.config, allow_changes)
    if restored is None:
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


def _epoch_chunks(s, done: int, every: int, global_step: int):
    """Steps to run before the next mid-epoch checkpoint (every ``every`` global steps; 0: none)."""
    left = s.steps_per_epoch - done
    return min(left, every - global_step % every) if every else left


def _train_loop(
    s, state, ckpt, train_source, test_source, workdir, *, stop_after_epochs, progress, allow_changes
):
    config = s.config
    state, position = _resume(s, state, ckpt, workdir, allow_changes, progress)
    _save_config(config, workdir)
    start_epoch = position["next_epoch"]
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    rows = [r for r in _read_metrics(metrics_path) if r["epoch"] < start_epoch]
    every = config.get("checkpoint_every_steps", 0)
    t_run = time.perf_counter()
    epochs_done = 0
    for epoch in range(start_epoch, config.num_epochs):
        mid = epoch == start_epoch and position["steps_done"] > 0
        done = position["steps_done"] if mid else 0
        sums = position["sums"] if mid else None
        train_time = position["train_time_s"] if mid else 0.0
        num_sam_before = (
            position["num_sam_before"] if mid else training.num_sam_steps(state, config.method)
        )
        batches = training.train_iter(
            config, train_source, epoch, s.steps_per_epoch, start_step=done
        )
        bar = tqdm(
            total=s.steps_per_epoch,
            initial=done,
            desc=f"{config.method} epoch {epoch + 1}/{config.num_epochs}",
            disable=not progress or jax.process_index() != 0,
            leave=False,
        )
        preempted = False
        while done < s.steps_per_epoch and not preempted:
            step = int(jax.device_get(state.step))
            chunk = _epoch_chunks(s, done, every, step)
            t0 = time.perf_counter()
            state, host = training.run_train_steps(
                s,
                state,
                itertools.islice(batches, chunk),
                epoch,
                progress=None if bar.disable else _show(bar, config, t0, s.steps_per_epoch),
                stop=ckpt.preempted,
            )
            jax.block_until_ready(state)
            train_time += time.perf_counter() - t0
            if not host:
                raise RuntimeError(
                    f"the training data ran out after {done} of epoch {epoch + 1}'s "
                    f"{s.steps_per_epoch} steps"
                )
            sums = training.add_metrics(sums, host)
            done += len(host)
            preempted = ckpt.preempted(step + len(host))
            if done < s.steps_per_epoch:  # a mid-epoch checkpoint: every N steps or SIGTERM
                position = {
                    "next_epoch": epoch, "steps_done": done, "sums": sums,
                    "train_time_s": train_time, "num_sam_before": num_sam_before,
                }  # fmt: skip
                ckpt.save(step + len(host), state, position, config)
        bar.close()
        if preempted and done < s.steps_per_epoch:
            raise checkpointing.Preempted(int(jax.device_get(state.step)), ckpt.directory)
        row = _epoch_row(s, state, test_source, epoch, sums, train_time, num_sam_before, t_run)
        rows.append(row)
        _write_metrics(metrics_path, rows)
        ckpt.save(
            int(jax.device_get(state.step)),
            state,
            {"next_epoch": epoch + 1, "steps_done": 0},
            config,
        )
        if jax.process_index() == 0:
            logging.info("epoch %d: %s", epoch, row)
            if progress:
                tqdm.write(
                    f"[{config.method}] epoch {epoch + 1}: train loss {row['train_loss']:.4f} "
                    f"test acc {row['test_accuracy']:.4f} ({row['images_per_sec']:.0f} img/s)"
                )
        if preempted or ckpt.preempted(int(jax.device_get(state.step))):
            raise checkpointing.Preempted(int(jax.device_get(state.step)), ckpt.directory)
        epochs_done += 1
        if stop_after_epochs is not None and epochs_done >= stop_after_epochs:
            break
    return rows


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


def _epoch_row(s, state, test_source, epoch, sums, train_time, num_sam_before, t_run):
    config = s.config
    test_metrics = training.evaluate(s, state, training.eval_iter(config, test_source))
    # The model EMA (MESA's teacher, or config.model_ema_horizon_epochs): what the SAF/MESA
    # authors report when their --model-ema is on.
    test_metrics |= training.evaluate_ema(s, state, training.eval_iter(config, test_source))
    num_sam = training.num_sam_steps(state, config.method)
    train_metrics = training.epoch_metrics(sums)
    steps = train_metrics["train_steps"]
    return {
        "epoch": epoch,
        "method": config.method,
        **train_metrics,
        **test_metrics,
        "images_per_sec": steps * config.batch_size / max(train_time, 1e-9),
        "sam_step_fraction": (num_sam - num_sam_before) / max(steps, 1),
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_run,
    }


def main(argv):
    del argv
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config experiments/configs/mnist1d.py:sam")
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
