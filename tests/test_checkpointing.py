"""experiments/checkpointing.py: checked resumes, verified checkpoints, SIGTERM and every-N-step saves."""

import json
import os
import shutil
import signal
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_train import _timeless, tiny_config

from experiments import checkpointing, input_pipeline, train, training

# ----------------------------------------------------------------------------- checksums


def _reference_checksums(x: np.ndarray) -> list[int]:
    """The two sums of checkpointing._checksums, written with numpy's uint64 (independent)."""
    x = np.ravel(np.asarray(x))
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    if x.dtype.itemsize == 8:
        words = x.view(np.uint32).astype(np.uint64)
    else:
        words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(
            np.uint64
        )
    i = np.arange(words.size, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    a = int(np.sum((words * (2 * i + 1)) & mask) & mask)
    wb = words ^ (words >> np.uint64(16))
    mult = ((i * np.uint64(0x9E3779B1)) & mask) | np.uint64(1)
    b = int(np.sum((wb * mult) & mask) & mask)
    return [a, b]


def test_checksums_match_a_numpy_reference_for_every_dtype():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.normal(size=(7, 5)).astype(np.float32),
        "bf16": jnp.asarray(rng.normal(size=(33,)), jnp.bfloat16),
        "f16": rng.normal(size=(4, 4)).astype(np.float16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(50,), dtype=np.int32),
        "u32": rng.integers(0, 2**32 - 1, size=(3,), dtype=np.uint32),
        "u8": rng.integers(0, 255, size=(9,), dtype=np.uint8),
        "bool": rng.random(11) < 0.5,
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 3), np.float32),
    }
    got = checkpointing.state_checksums(jax.tree.map(jnp.asarray, tree))
    for name, x in tree.items():
        assert got[f"['{name}']"] == _reference_checksums(np.asarray(x)), name


def test_any_single_changed_word_changes_both_checksums_and_sharding_does_not():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    base_sums = checkpointing.state_checksums({"x": jnp.asarray(x)})["['x']"]
    for _ in range(50):
        y = x.copy().reshape(-1).view(np.uint32)
        y[rng.integers(y.size)] ^= np.uint32(1 << int(rng.integers(32)))  # one flipped bit
        sums = checkpointing.state_checksums(
            {"x": jnp.asarray(y.view(np.float32).reshape(x.shape))}
        )
        assert sums["['x']"][0] != base_sums[0] and sums["['x']"][1] != base_sums[1]
    mesh = training.make_mesh(jax.devices())
    sharded = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data")))
    assert len(jax.devices()) == 8 and len(sharded.sharding.device_set) == 8
    assert checkpointing.state_checksums({"x": sharded})["['x']"] == base_sums


def test_verify_names_the_leaf_whose_values_changed():
    state = {"params": {"w": jnp.ones(4), "b": jnp.zeros(2)}, "step": jnp.asarray(3)}
    meta = {
        "position": {},
        "config": {},
        "versions": {},
        "checksums": checkpointing.state_checksums(state),
    }
    meta["digest"] = checkpointing._digest(meta)
    checkpointing.verify(state, meta)  # intact: no error
    changed = {**state, "params": {"w": jnp.ones(4).at[2].set(1.0 + 2**-20), "b": jnp.zeros(2)}}
    with pytest.raises(checkpointing.CorruptCheckpoint, match=r"\['params'\]\['w'\]"):
        checkpointing.verify(changed, meta)
    meta["position"] = {"next_epoch": 7}  # a changed byte in the metadata itself
    with pytest.raises(checkpointing.CorruptCheckpoint, match="digest"):
        checkpointing.verify(state, meta)


# ----------------------------------------------------------------------------- config checks


def test_config_changes_lists_keys_ignores_invariant_ones_and_honours_allow():
    a = checkpointing.flat_config(tiny_config("sam"))
    c = tiny_config("asam")
    c.sam.rho = 0.1
    c.data_threads = 4  # invariant: reading threads never change the batches
    c.data_dir = "/elsewhere"
    b = checkpointing.flat_config(c)
    assert checkpointing.config_changes(a, b) == ["method", "sam.rho"]
    assert checkpointing.config_changes(a, b, allow="method") == ["sam.rho"]
    assert checkpointing.config_changes(a, b, allow=["method", "sam"]) == []
    assert checkpointing.config_changes(a, b, allow="*") == []
    assert "vsam.sensitivity" in a and isinstance(a["vsam.sensitivity"], list)


def test_resuming_with_a_changed_config_is_refused_listing_the_keys(tmp_path):
    config = tiny_config("saf", num_epochs=2, max_steps_per_epoch=2)
    train.train_and_evaluate(config, str(tmp_path), progress=False, stop_after_epochs=1)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["method"] == "saf" and saved["versions"]["jax"] == jax.__version__
    changed = tiny_config("saf", num_epochs=2, max_steps_per_epoch=2, learning_rate=0.2)
    changed.saf.dtype = "bfloat16"
    with pytest.raises(checkpointing.ConfigMismatch) as err:
        train.train_and_evaluate(changed, str(tmp_path), progress=False)
    assert "learning_rate: checkpoint 0.05 -> now 0.2" in str(err.value)
    assert "saf.dtype: checkpoint 'float32' -> now 'bfloat16'" in str(err.value)
    assert "--allow_config_change=learning_rate,saf.dtype" in str(err.value)
    # An invariant key may change; the unchanged config resumes and finishes.
    config.data_threads = 2
    rows = train.train_and_evaluate(config, str(tmp_path), progress=False)
    assert [r["epoch"] for r in rows] == [1, 2]


def test_a_checkpoint_of_the_old_layout_needs_an_explicit_override(tmp_path):
    config = tiny_config("sgd", num_epochs=2, max_steps_per_epoch=2)
    s = training.setup(config, train_size=len(input_pipeline.make_source("mnist1d", "train")))
    state = training.init_state(s)
    mgr = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    mgr.save(1, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"next_epoch": 1})
    ))  # fmt: skip
    mgr.wait_until_finished()
    mgr.close()
    with pytest.raises(checkpointing.ConfigMismatch, match="no config and no checksums"):
        train.train_and_evaluate(config, str(tmp_path), progress=False)
    with pytest.warns(UserWarning, match="unverified"):
        rows = train.train_and_evaluate(config, str(tmp_path), progress=False, allow_changes="*")
    assert [r["epoch"] for r in rows] == [2]


# ----------------------------------------------------------------------------- corruption


def _two_checkpoints(tmp_path, method="sgd"):
    config = tiny_config(method, num_epochs=3, max_steps_per_epoch=2)
    work = tmp_path / "work"
    train.train_and_evaluate(config, str(work), progress=False, stop_after_epochs=2)
    steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert steps == [2, 4]
    return config, work


def _restore(config, workdir, target):
    ckpt = checkpointing.Checkpointer(str(workdir))
    try:
        return ckpt.restore_latest(target, config)
    finally:
        ckpt.close()


def test_no_flipped_byte_of_the_latest_checkpoint_restores_silently_different_values(tmp_path):
    """The issue's trial: one byte of the latest step changed, 40 times; Orbax alone restored
    silently wrong values in 9 of 40. Now each restore is the latest step's exact values (the
    byte was not used) or, with a warning, the previous step's."""
    config, work = _two_checkpoints(tmp_path)
    s = training.setup(config, train_size=len(input_pipeline.make_source("mnist1d", "train")))
    target = training.abstract_state(s)
    pristine = tmp_path / "pristine"
    shutil.copytree(work, pristine)
    latest = _restore(config, work, target)
    shutil.rmtree(work / "checkpoints" / "4")
    previous = _restore(config, work, target)
    assert (latest[2], previous[2]) == (4, 2)
    step_dir = pristine / "checkpoints" / "4"
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size]
    sizes = np.array([p.stat().st_size for p in files], float)
    rng = np.random.default_rng(0)
    outcomes = {"latest": 0, "previous": 0}
    for trial in range(40):
        trial_dir = tmp_path / f"trial{trial}"
        shutil.copytree(pristine, trial_dir)
        victim = trial_dir / files[rng.choice(len(files), p=sizes / sizes.sum())].relative_to(
            pristine
        )
        data = bytearray(victim.read_bytes())
        data[rng.integers(len(data))] ^= int(rng.integers(1, 256))  # one byte, another value
        victim.write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state, _, step = _restore(config, trial_dir, target)
        expected = latest if step == 4 else previous
        assert step in (2, 4)
        jax.tree.map(np.testing.assert_array_equal, state, expected[0])
        if step == 2:
            assert any("damaged" in str(w.message) for w in caught)
            assert (trial_dir / "corrupt_checkpoints" / "4").is_dir()
        outcomes["latest" if step == 4 else "previous"] += 1
        shutil.rmtree(trial_dir)
    assert outcomes["previous"] >= 10, outcomes  # most flipped bytes are caught, none slip through


def test_when_no_checkpoint_is_intact_the_run_stops_instead_of_starting_over(tmp_path):
    config, work = _two_checkpoints(tmp_path)
    for step in ("2", "4"):
        for p in (work / "checkpoints" / step).rglob("*"):
            if p.is_file() and p.stat().st_size > 100:
                p.write_bytes(bytes(p.stat().st_size))  # zeroed
    with pytest.warns(UserWarning, match="damaged"):
        with pytest.raises(checkpointing.CorruptCheckpoint, match="no intact checkpoint"):
            train.train_and_evaluate(config, str(work), progress=False)


def test_sigterm_checkpoints_mid_epoch_and_the_resumed_run_is_identical(tmp_path, monkeypatch):
    config = tiny_config("vsam", num_epochs=2, max_steps_per_epoch=4)
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"), progress=False)
    real_iter = training.train_iter
    handler_before = signal.getsignal(signal.SIGTERM)

    def iter_with_sigterm(config, source, epoch, steps, start_step=0):
        for i, batch in enumerate(real_iter(config, source, epoch, steps, start_step)):
            if (epoch, start_step + i) == (1, 2):  # SIGTERM arrives while step 3 of epoch 2 runs
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(training, "train_iter", iter_with_sigterm)
    with pytest.raises(checkpointing.Preempted, match="step 7"):
        train.train_and_evaluate(config, str(tmp_path / "resumed"), progress=False)
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["4", "7"]
    monkeypatch.setattr(training, "train_iter", real_iter)
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"), progress=False)
    assert _timeless(resumed) == _timeless(straight)
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the trainer's handler is gone
    _assert_same_final_state(config, tmp_path / "straight", tmp_path / "resumed")


def test_every_n_steps_checkpoints_let_a_crashed_run_resume_mid_epoch(tmp_path, monkeypatch):
    config = tiny_config("saf", num_epochs=2, max_steps_per_epoch=4, checkpoint_every_steps=3)
    config.saf.lag = 1
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"), progress=False)
    real_iter = training.train_iter

    def crashing_iter(config, source, epoch, steps, start_step=0):
        for i, batch in enumerate(real_iter(config, source, epoch, steps, start_step)):
            if (epoch, start_step + i) == (1, 3):  # killed before global step 8
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(training, "train_iter", crashing_iter)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path / "resumed"), progress=False)
    # Global steps 3 and 6 (mid-epoch) and 4 (end of epoch 1); two kept.
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["4", "6"]
    monkeypatch.setattr(training, "train_iter", real_iter)
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"), progress=False)
    assert _timeless(resumed) == _timeless(straight)
    _assert_same_final_state(config, tmp_path / "straight", tmp_path / "resumed")


def _assert_same_final_state(config, a, b):
    s = training.setup(config, train_size=len(input_pipeline.make_source("mnist1d", "train")))
    target = training.abstract_state(s)
    sa, sb = _restore(config, a, target), _restore(config, b, target)
    assert sa[2] == sb[2]
    jax.tree.map(np.testing.assert_array_equal, sa[0], sb[0])
