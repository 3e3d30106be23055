"""Verified, config-checked Orbax checkpoints for the trainer.

A checkpoint holds the whole train state (``ocp.args.StandardSave``) and a JSON
``meta`` item:

* ``position``: where the data stream stands: the next epoch, how many of its
  steps are done, and that partial epoch's metric sums (a checkpoint taken every
  ``config.checkpoint_every_steps`` steps or on SIGTERM sits mid-epoch);
* ``config``: the resolved config, flattened to dotted keys;
* ``versions``: sharpax, jax, jaxlib, optax, flax, orbax and Python;
* ``checksums``: two 32-bit checksums of every state leaf, computed on device
  (:func:`state_checksums`);
* ``digest``: a SHA-256 of everything above, so a flipped byte in ``meta`` is
  caught too.

Restoring (:meth:`Checkpointer.restore_latest`) verifies the digest and every
leaf's checksums. A checkpoint that fails (an Orbax error or a mismatch) is moved
to ``<workdir>/corrupt_checkpoints/`` with a warning and the next older one is
tried, so a damaged latest step never stops a run whose previous step is intact,
and no restore returns silently different values. A resume whose config differs
from the checkpoint's in any key that changes the computation raises
:class:`ConfigMismatch` listing the keys (``allow_changes`` lets named keys, or
``'*'`` all, differ); :data:`RESUME_INVARIANT_KEYS` may always differ.

Why our own checksums: Orbax (0.12) verifies no array contents on restore; a
flipped byte in a chunk that still decompresses restores silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import warnings
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Config keys that never change what is computed: where the data lives, how it is
# read (the batches are identical for any thread count), the run's label, and how
# often it checkpoints.
RESUME_INVARIANT_KEYS = frozenset(
    {"name", "data_dir", "data_threads", "in_memory", "checkpoint_every_steps"}
)
_PACKAGES = ("sharpax", "jax", "jaxlib", "optax", "flax", "orbax-checkpoint")


class ConfigMismatch(ValueError):
    """A resume whose config differs from the checkpoint's in keys that change the computation."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose contents do not match the checksums saved with it."""


class Preempted(Exception):
    """Raised after the state was checkpointed on SIGTERM (or a multi-host preemption notice)."""

    def __init__(self, step: int, directory: str):
        super().__init__(
            f"preempted: the train state at step {step} is saved in {directory}; rerun the "
            "same command to resume"
        )
        self.step = step


# ----------------------------------------------------------------------------- config


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved config as ``{'section.field': json_value}`` (tuples become lists)."""
    tree = json.loads(config.to_json_best_effort(sort_keys=True))

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                yield from walk(value, name + ".")
            else:
                yield name, value

    return dict(walk(tree, ""))


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], allow: Iterable[str] = ()
) -> list[str]:
    """Keys whose values differ (or exist on one side only), less the invariant and allowed ones.

    ``allow`` names keys or sections (``'vsam'`` allows every ``vsam.*``); ``'*'`` allows all.
    """
    allow = _allowed(allow)
    if "*" in allow:
        return []

    def allowed(key):
        parts = key.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        return bool(prefixes & (allow | RESUME_INVARIANT_KEYS))

    keys = sorted(set(saved) | set(current))
    return [
        k for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>") and not allowed(k)
    ]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ----------------------------------------------------------------------------- checksums


def _words(x: jax.Array) -> jax.Array:
    """The leaf's bits as a flat uint32 vector (each 8/16-bit element zero-extended)."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned)  # 64-bit: shape (n, 2)
    return jnp.ravel(bits).astype(jnp.uint32)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> jax.Array:
    """``(len(leaves), 2)`` uint32: two position-weighted sums of each leaf's words, mod 2**32.

    Both weights are odd, so changing any single word changes both sums (an odd
    number is invertible mod 2**32); modular sums are exact in any reduction
    order, so sharded leaves and any device count give the same value.
    """
    rows = []
    for leaf in leaves:
        w = _words(leaf)
        i = jnp.arange(w.size, dtype=jnp.uint32)
        a = jnp.sum(w * (2 * i + 1), dtype=jnp.uint32)
        b = jnp.sum((w ^ (w >> 16)) * (i * jnp.uint32(0x9E3779B1) | 1), dtype=jnp.uint32)
        rows.append(jnp.stack([a, b]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def state_checksums(state: Any) -> dict[str, list[int]]:
    """``{leaf path: [sum_a, sum_b]}`` of a (possibly sharded, multi-process) pytree of arrays."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    sums = np.asarray(jax.device_get(_checksums([leaf for _, leaf in paths_leaves])))
    return {
        jax.tree_util.keystr(path): [int(a), int(b)]
        for (path, _), (a, b) in zip(paths_leaves, sums)
    }


def _digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify(state: Any, meta: dict) -> None:
    """Raises :class:`CorruptCheckpoint` unless ``meta`` and ``state`` match their checksums."""
    if meta.get("digest") != _digest(meta):
        raise CorruptCheckpoint("its metadata does not match its digest")
    got, want = state_checksums(state), meta["checksums"]
    bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CorruptCheckpoint(f"{len(bad)} array(s) differ from their checksums: {shown}")


# ----------------------------------------------------------------------------- manager


class Checkpointer:
    """Saves and restores verified train states in ``<workdir>/checkpoints``.

    Also catches SIGTERM while it is open (single process): :meth:`preempted`
    turns true and the trainer saves and stops. With several processes it asks
    JAX's preemption sync point instead (all processes stop at the same step).
    """

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.workdir = workdir
        self.directory = os.path.join(workdir, "checkpoints")
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)
        self._sigterm = False
        self._previous_handler = None
        if jax.process_count() == 1:
            try:
                self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
            except ValueError:  # not the main thread: no handler, no SIGTERM checkpoint
                self._previous_handler = None

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._sigterm = True

    def preempted(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(self._manager.reached_preemption(step))
        return self._sigterm

    def save(self, step: int, state: Any, position: dict, config: ml_collections.ConfigDict):
        meta = {
            "position": position,
            "config": flat_config(config),
            "versions": versions(),
            "checksums": state_checksums(state),
        }
        meta["digest"] = _digest(meta)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore_latest(
        self,
        target: Any,
        config: ml_collections.ConfigDict,
        allow_changes: str | Iterable[str] = (),
    ) -> tuple[Any, dict, int] | None:
        """The newest intact checkpoint as ``(state, meta, step)``, or None when there is none.

        ``target``: the state's structure, concrete or ``jax.ShapeDtypeStruct``s
        with shardings. Raises :class:`ConfigMismatch` (before restoring any
        array) when the config differs; :class:`CorruptCheckpoint` when
        checkpoints exist but none is intact.
        """
        allow_changes = _allowed(allow_changes)
        failed = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
                if "digest" not in meta:  # written before checkpoints were verified
                    return self._restore_unverified(step, meta, target, allow_changes)
                if meta["digest"] != _digest(meta):
                    raise CorruptCheckpoint("its metadata does not match its digest")
                _check_config(meta, config, allow_changes, step)
                state = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
                )["state"]
                verify(state, meta)
            except ConfigMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: try older
                failed.append((step, f"{type(e).__name__}: {e}"))
                self._quarantine(step, failed[-1][1])
                continue
            _warn_versions(meta)
            return state, meta, step
        if failed:
            raise CorruptCheckpoint(
                f"no intact checkpoint in {self.directory}; every step failed: {failed} "
                f"(moved to {os.path.join(self.workdir, 'corrupt_checkpoints')})"
            )
        return None

    def _restore_unverified(self, step, meta, target, allow_changes):
        """A checkpoint of the old layout (``meta = {'next_epoch': e}``): no config, no checksums."""
        if "*" not in set(allow_changes):
            raise ConfigMismatch(
                f"checkpoint step {step} in {self.directory} holds no config and no checksums "
                "(written before resumes were checked); resume it only if the config is "
                "unchanged, with --allow_config_change='*' (train_and_evaluate(allow_changes='*'))"
            )
        warnings.warn(f"restoring checkpoint step {step} unverified (no checksums)", stacklevel=3)
        state = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
        position = {"next_epoch": int(meta["next_epoch"]), "steps_done": 0}
        return state, {"position": position}, step

    def _quarantine(self, step: int, why: str):
        """Moves a failed step out of the manager's directory (kept for inspection)."""
        dest = os.path.join(self.workdir, "corrupt_checkpoints", str(step))
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is damaged ({why[:300]}); moving it to "
            f"{dest} and trying the previous step",
            stacklevel=3,
        )
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.exists(dest):
                shutil.rmtree(dest)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        multihost_utils.sync_global_devices(f"sharpax_quarantine_{step}")
        self._manager.reload()

    def close(self):
        self._manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


def _allowed(allow_changes: str | Iterable[str]) -> set[str]:
    """``'a,b'`` or ``['a', 'b']`` -> ``{'a', 'b'}``."""
    if isinstance(allow_changes, str):
        allow_changes = allow_changes.split(",")
    return {k.strip() for k in allow_changes if k.strip()}


def _check_config(meta, config, allow_changes, step):
    saved, current = meta["config"], flat_config(config)
    changed = config_changes(saved, current, allow_changes)
    if changed:
        lines = "\n".join(
            f"  {k}: checkpoint {saved.get(k, '<absent>')!r} -> now {current.get(k, '<absent>')!r}"
            for k in changed
        )
        raise ConfigMismatch(
            f"the config differs from the one checkpoint step {step} was trained with:\n{lines}\n"
            "Use a new workdir, or allow these keys to change with "
            f"--allow_config_change={','.join(changed)} (train_and_evaluate(allow_changes=...))."
        )


def _warn_versions(meta):
    saved, now = meta.get("versions", {}), versions()
    diff = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if diff:
        warnings.warn(
            "resuming with other versions than the checkpoint was written with: "
            + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()),
            stacklevel=3,
        )
