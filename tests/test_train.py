"""End-to-end tests of experiments/: every method through the CLI's entry point, resume, data parallel."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import input_pipeline, train, training
from experiments.configs import base, mnist1d

ALL_METHODS = training.METHODS


def tiny_config(method: str, **overrides):
    c = mnist1d.get_config(method)
    c.num_epochs = 1
    c.batch_size = 32
    c.eval_batch_size = 256
    c.max_steps_per_epoch = 5
    c.saf.start_epoch = 0
    c.mesa.start_epoch = 0
    c.mesa.ema_horizon_epochs = 1.0  # at least a step even at 2 steps per epoch
    c.vsam.warmup_epochs = 0
    c.looksam.k = 2
    c.vsam.window = 4
    c.vsam.blocks = 2
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _timeless(rows):
    drop = {"images_per_sec", "train_time_s", "first_step_s", "wall_time_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_runs_one_epoch_through_the_cli_entry_point(method, tmp_path):
    config = tiny_config(method)
    rows = train.train_and_evaluate(config, str(tmp_path), progress=False)
    assert len(rows) == 1
    row = rows[0]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_sec"):
        assert np.isfinite(row[key]), (key, row)
    assert 0.0 <= row["test_accuracy"] <= 1.0
    assert row["train_steps"] == 5
    expected_fraction = {
        "sgd": 0.0, "saf": 0.0, "mesa": 0.0, "msam": 0.0, "sam": 1.0, "asam": 1.0, "looksam": 3 / 5,
    }  # fmt: skip
    if method in expected_fraction:  # LookSAM k=2: steps 0, 2, 4 are SAM steps.
        assert row["sam_step_fraction"] == pytest.approx(expected_fraction[method])
    else:  # vSAM (warm-up 0, window 4), AE-SAM, SS-SAM: some SAM steps, at most all of them.
        assert 0.0 < row["sam_step_fraction"] <= 1.0
    if method == "saf":  # lag 1: no references exist in the first epoch yet
        assert row["train_traj_term"] == 0.0
    if method == "mesa":  # start_epoch 0: KL to the (lagging) EMA teacher
        assert row["train_traj_term"] > 0.0
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.readline())["method"] == method
    assert os.listdir(tmp_path / "checkpoints")
    if method == "sam":  # TensorBoard: the epoch's scalars at its last global step, and the config
        values = [(e.step, v) for e in _read_events(tmp_path / "tensorboard") for v in e.summary.value]
        (acc,) = [(step, v.simple_value) for step, v in values if v.tag == "test_accuracy"]
        assert acc == (5, pytest.approx(row["test_accuracy"]))
        (text,) = [v for _, v in values if v.tag.startswith("config")]
        assert b"| method | 'sam' |" in text.tensor.string_val[0]


def _read_events(logdir):
    """TensorBoard event files read by hand (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            events.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
            i += 12 + n + 4
    return events


def test_config_strings_and_bad_method():
    c = mnist1d.get_config("vsam,runlocal")
    assert c.method == "vsam" and c.num_epochs == 1
    with pytest.raises(ValueError, match="unknown method"):
        base.parse_arg("adam")


@pytest.mark.parametrize("method", ["vsam", "saf", "mesa", "vsam_fp16"])
def test_resume_gives_identical_params_and_metrics(method, tmp_path):
    config = tiny_config(method.removesuffix("_fp16"), num_epochs=2, max_steps_per_epoch=4)
    config.saf.lag = 1
    if method.endswith("_fp16"):  # float16 with a loss scale that overflows, then regrows
        config.precision.compute_dtype = "float16"
        config.precision.loss_scale_init = 2.0**40
        config.precision.loss_scale_period = 2
    straight = train.train_and_evaluate(config, str(tmp_path / "straight"), progress=False)
    if method.endswith("_fp16"):  # the scale's state (skips, good-step count) crosses the resume
        assert straight[0]["train_skipped_steps"] > 0 and "loss_scale" in straight[1]
    first = train.train_and_evaluate(
        config, str(tmp_path / "resumed"), progress=False, stop_after_epochs=1
    )
    assert len(first) == 1  # "killed" after one epoch
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"), progress=False)
    assert _timeless(resumed) == _timeless(straight)

    def final_state(workdir):
        s = training.setup(config, train_size=len(input_pipeline.make_source("mnist1d", "train")))
        import orbax.checkpoint as ocp

        mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
        target = training.init_state(s)
        out = mgr.restore(
            mgr.latest_step(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target)),
        )
        mgr.close()
        return out["state"]

    a = final_state(str(tmp_path / "straight"))
    b = final_state(str(tmp_path / "resumed"))
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_train_steps_have_no_effects(method):
    # A jaxpr effect (e.g. a checkify check) makes JAX dispatch every call of the
    # jitted step through its Python path: milliseconds per step on a GPU.
    config = tiny_config(method)
    s = training.setup(config, train_size=64)
    state = training.init_state(s)
    rng = np.random.default_rng(0)
    batch = training.put_batch(
        s,
        {
            "image": rng.normal(size=(32, *s.input_shape)).astype(np.float32),
            "label": rng.integers(0, s.num_classes, 32).astype(np.int32),
            "id": np.arange(32, dtype=np.int32),
        },
    )
    kinds = [True, False] if method in ("looksam", "vsam") else [None]
    for sam_step in kinds:
        traced = s.train_step.trace(state, batch, jnp.asarray(0), sam_step=sam_step)
        assert traced.jaxpr.effects == set(), (method, sam_step, traced.jaxpr.effects)


def test_mesa_skips_the_teacher_forward_before_start_epoch():
    config = tiny_config("mesa")
    config.mesa.start_epoch = 1
    s = training.setup(config, train_size=64)
    rng = np.random.default_rng(0)
    batch = training.put_batch(
        s,
        {
            "image": rng.normal(size=(32, *s.input_shape)).astype(np.float32),
            "label": rng.integers(0, s.num_classes, 32).astype(np.int32),
            "id": np.arange(32, dtype=np.int32),
        },
    )
    epoch0 = jnp.asarray(0)
    state = training.init_state(s)

    def num_convs(teacher):
        jaxpr = s.train_step.trace(state, batch, epoch0, sam_step=None, teacher=teacher).jaxpr
        return str(jaxpr).count("conv_general_dilated")

    assert num_convs(False) < num_convs(True)
    # Before start_epoch both step functions give the same result (the term is 0).
    with_teacher, m1 = s.train_step(training.init_state(s), batch, epoch0, sam_step=None)
    without, m2 = s.train_step(training.init_state(s), batch, epoch0, sam_step=None, teacher=False)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(with_teacher), jax.device_get(without))
    assert float(m1["traj_term"]) == float(m2["traj_term"]) == 0.0
    # The epoch loop picks the teacher-less step exactly before start_epoch.
    calls = []
    step = s.train_step
    s.train_step = lambda *a, **kw: calls.append(kw["teacher"]) or step(*a, **kw)
    for epoch in (0, 1):
        state, _ = training.run_train_epoch(s, state, [jax.device_get(batch)] * 2, epoch)
    assert calls == [False, False, True, True]


@pytest.mark.parametrize("method", ["looksam", "vsam"])
def test_sam_step_reuses_every_donated_state_buffer(method):
    # The SAM step overwrites the cached direction without reading it; unless the
    # step is jitted with keep_unused=True, jit drops those donated inputs and the
    # outputs get fresh buffers on every SAM step (1.4x slower SAM steps on an H100).
    config = tiny_config(method)
    s = training.setup(config, train_size=64)
    state = training.init_state(s)
    batch = training.put_batch(
        s,
        {
            "image": np.zeros((32, *s.input_shape), np.float32),
            "label": np.zeros(32, np.int32),
            "id": np.arange(32, dtype=np.int32),
        },
    )
    num_leaves = len(jax.tree.leaves(state))
    for sam_step in (True, False):
        hlo = s.train_step.lower(state, batch, jnp.asarray(0), sam_step=sam_step).compile()
        header = hlo.as_text().split("\n", 1)[0]
        assert header.count("may-alias") + header.count("must-alias") == num_leaves, sam_step


@pytest.mark.parametrize("method", ["sam", "vsam", "saf", "mesa"])
def test_eight_device_step_equals_one_device_step(method):
    config = tiny_config(method)
    if method == "saf":
        config.saf.shard_buffer = True  # the buffer sharded along the example axis on 8 devices
    source = input_pipeline.make_source("mnist1d", "train")
    devices = jax.devices()
    assert len(devices) == 8
    runs = {}
    for n in (1, 8):
        s = training.setup(config, train_size=len(source), mesh=training.make_mesh(devices[:n]))
        state = training.init_state(s)
        losses = []
        for epoch in range(2):
            for batch in training.train_iter(config, source, epoch, 3):
                sam_step = training.next_sam_step(s, state)
                state, m = s.train_step(
                    state, training.put_batch(s, batch), jnp.asarray(epoch), sam_step=sam_step
                )
                losses.append(float(m["loss"]) + float(m["traj_term"]))
        runs[n] = (jax.device_get(state), losses)
    np.testing.assert_allclose(runs[1][1], runs[8][1], rtol=2e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
        runs[1][0].params,
        runs[8][0].params,
    )
    if method == "saf":
        np.testing.assert_allclose(
            runs[1][0].traj.logits, runs[8][0].traj.logits, rtol=1e-4, atol=1e-5
        )


def test_cifar_pipeline_trains_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    from experiments.configs import cifar10_resnet18

    config = cifar10_resnet18.get_config("saf,runlocal")
    config.model = "mnist_cnn"  # a tiny model; ResNet shapes are covered in test_models.py
    config.model_kwargs = type(config.model_kwargs)()
    config.saf.start_epoch = 0
    config.data_dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        rows = train.train_and_evaluate(config, str(tmp_path / "work"), progress=False)
    assert np.isfinite(rows[0]["train_loss"]) and rows[0]["train_steps"] == 2


def test_sharded_saf_buffer_pads_rows_but_ids_are_checked_against_the_true_size():
    # 4001 examples on 8 devices: the sharded buffer gets 4008 rows (ImageNet's
    # 1 281 167 is not divisible by 8 either), but ids 4001..4007 stay invalid.
    config = tiny_config("saf")
    config.saf.shard_buffer = True
    s = training.setup(config, train_size=4001, mesh=training.make_mesh(jax.devices()))
    state = training.init_state(s)
    assert state.traj.logits.shape[0] == 4008
    assert state.traj.logits.sharding.spec[0] == "data"
    source = input_pipeline.make_source("mnist1d", "train")
    batch = next(iter(training.train_iter(config, source, 0, 1)))
    state, _ = training.run_train_epoch(s, state, [batch], 0)
    bad = dict(batch, id=np.where(np.arange(len(batch["id"])) == 3, 4003, batch["id"]).astype(np.int32))
    with pytest.raises(ValueError, match="4003"):
        training.run_train_epoch(s, state, [bad], 0)


def test_a_diverging_run_stops_with_an_error_naming_the_epoch(tmp_path):
    config = tiny_config("sgd", learning_rate=1e30)
    with pytest.raises(FloatingPointError, match="diverged"):
        train.train_and_evaluate(config, str(tmp_path), progress=False)


def test_a_finite_loss_with_an_overflowing_update_stops_naming_the_step(tmp_path):
    # lr 1e38: the first step's loss is finite, its update is not (float32 overflow).
    config = tiny_config("sam", learning_rate=1e38)
    with pytest.raises(FloatingPointError, match=r"update_norm inf at step 1 \(step 1 of epoch 1\)"):
        train.train_and_evaluate(config, str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def test_the_divergence_message_names_the_global_step_of_a_later_epoch():
    config = tiny_config("sgd")
    s = training.setup(config, train_size=64)
    state = training.init_state(s)
    epoch = jnp.asarray(0, jnp.int32)
    assert s.steps_per_epoch == 2
    for t in range(2):  # epoch 1 (0-based 0)
        state, _ = s.train_step(state, _synthetic_batch(s, t), epoch, sam_step=None)
    bad = dict(jax.device_get(_synthetic_batch(s, 9)))
    bad["image"] = np.full_like(bad["image"], np.nan)
    good = jax.device_get(_synthetic_batch(s, 8))
    with pytest.raises(FloatingPointError, match=r"loss nan.* at step 4 \(step 2 of epoch 2\)"):
        training.run_train_epoch(s, state, [good, bad], 1)


def _synthetic_batch(s, seed=0):
    rng = np.random.default_rng(seed)
    return training.put_batch(
        s,
        {
            "image": rng.normal(size=(32, *s.input_shape)).astype(np.float32),
            "label": rng.integers(0, s.num_classes, 32).astype(np.int32),
            "id": np.arange(32, dtype=np.int32),
        },
    )


def test_msam_with_rho_zero_trains_like_sgd_and_is_evaluated_unperturbed():
    """The trainer's MSAM: rho = 0 is its SGD; with rho > 0 it evaluates at w = w̃ + f·v."""
    epoch = jnp.asarray(0, jnp.int32)
    runs = {}
    for method, rho in (("sgd", None), ("msam", 0.0), ("msam", 0.5)):
        config = tiny_config(method, weight_decay=1e-3)
        if rho is not None:
            config.msam.rho = rho
        s = training.setup(config, train_size=64)
        state = training.init_state(s)
        for t in range(4):
            state, _ = s.train_step(state, _synthetic_batch(s, t), epoch, sam_step=None)
        runs[(method, rho)] = (s, state)
    _, sgd = runs[("sgd", None)]
    _, msam0 = runs[("msam", 0.0)]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sgd.params, msam0.params
    )
    s, state = runs[("msam", 0.5)]
    (msam_state,) = [
        x
        for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "perturbation_scale"))
        if hasattr(x, "perturbation_scale")
    ]
    f = float(msam_state.perturbation_scale)
    evaluated = training.evaluation_state(s, state).params
    by_hand = jax.tree.map(lambda w, v: np.asarray(w) + f * np.asarray(v), state.params, msam_state.momentum)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), evaluated, by_hand)
    shift = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(evaluated), jax.tree.leaves(state.params)))
    np.testing.assert_allclose(np.sqrt(shift), 0.5, rtol=1e-4)  # the perturbation has norm rho


@pytest.mark.parametrize(
    "field,value",
    [
        ("learning_rate", -0.1),
        ("learning_rate", float("nan")),
        ("momentum", 2.0),
        ("weight_decay", -1e-4),
        ("num_epochs", 0),
        ("batch_size", 0),
        ("label_smoothing", 1.0),
    ],
)
def test_hyperparameters_that_cannot_train_are_refused_before_anything_is_built(field, value):
    config = tiny_config("sam", **{field: value})
    with pytest.raises(ValueError, match=field):
        training.setup(config, train_size=64)


def test_a_run_that_diverges_on_resume_keeps_the_last_finite_checkpoint(tmp_path):
    config = tiny_config("sgd", num_epochs=3)
    train.train_and_evaluate(config, str(tmp_path), progress=False, stop_after_epochs=1)
    saved = sorted(os.listdir(tmp_path / "checkpoints"))
    config.learning_rate = 1e30  # the resumed epoch diverges
    with pytest.raises(FloatingPointError, match="diverged"):
        train.train_and_evaluate(config, str(tmp_path), progress=False, allow_changes="learning_rate")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == saved  # nothing written or deleted
    config.learning_rate = 0.05
    rows = train.train_and_evaluate(config, str(tmp_path), progress=False, stop_after_epochs=1)
    assert np.isfinite(rows[-1]["train_loss"]) and rows[-1]["epoch"] == 2  # resumed: the 2nd epoch


def test_evaluate_matches_numpy_over_a_padded_last_batch():
    # 100 examples in batches of 32 (the mesh's 8 fake devices divide it): the last batch
    # has 28 padding rows, which must not count. Reference: NumPy float64 cross-entropy and
    # argmax accuracy over the 100 real examples, from the same model's logits.
    config = tiny_config("sgd", eval_batch_size=32)
    s = training.setup(config, train_size=64)
    state = training.init_state(s)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, *s.input_shape)).astype(np.float32)
    y = rng.integers(0, s.num_classes, 100).astype(np.int32)
    batches = []
    for i in range(0, 100, 32):
        n = min(32, 100 - i)
        pad = 32 - n
        batches.append({
            "image": np.concatenate([x[i:i + n], np.zeros((pad, *s.input_shape), np.float32)]),
            "label": np.concatenate([y[i:i + n], np.zeros(pad, np.int32)]),
            "mask": np.arange(32) < n,
        })
    got = training.evaluate(s, state, iter(batches))
    variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    logits = np.asarray(s.model.apply(variables, x, train=False), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    assert got["test_loss"] == pytest.approx(-logp[np.arange(100), y].mean(), rel=1e-5)
    assert got["test_accuracy"] == pytest.approx((logits.argmax(-1) == y).mean(), abs=1e-7)
    with pytest.raises(ValueError, match="no batches"):
        training.evaluate(s, state, iter([]))


def test_quiet_orbax_filter_drops_only_orbax_info_and_debug():
    import logging

    def record(level, path):
        return logging.LogRecord("absl", level, path, 1, "msg", None, None)

    orbax = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
    ours = os.path.join(os.sep, "repo", "experiments", "train.py")
    f = train._QuietOrbax()
    assert not f.filter(record(logging.INFO, orbax))
    assert not f.filter(record(logging.DEBUG, orbax))
    assert f.filter(record(logging.WARNING, orbax))  # Orbax's warnings stay
    assert f.filter(record(logging.INFO, ours))  # e.g. "resumed from ..."


def test_train_cli_prints_and_saves_the_config_and_keeps_orbax_quiet(tmp_path):
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "experiments.train", "--config",
           "experiments/configs/mnist1d.py:sgd,runlocal", "--config.learning_rate=0.05",
           "--workdir", str(tmp_path)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"config (also in {tmp_path / 'config.json'}):" in p.stdout
    assert "learning_rate: 0.05" in p.stdout and "method: sgd" in p.stdout
    assert re.search(r"\[sgd\] done: 1 epochs, final test acc \d\.\d{4}", p.stdout + p.stderr)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["learning_rate"] == 0.05 and saved["config"]["method"] == "sgd"
    # absl's INFO records ("I<mmdd> <time> <thread> <file>:<line>] ..."; a tqdm bar may precede
    # one on its line) reach stderr, ours included; none comes from Orbax's modules (with
    # --orbax_info the same run logs about 60, from checkpoint_manager.py, atomicity.py, ...).
    files = re.findall(r"I\d{4} [\d:.]+ \d+ ([\w.]+):\d+\]", p.stderr)
    assert "train.py" in files, p.stderr[-2000:]
    ours = {"train.py", "training.py", "checkpointing.py", "input_pipeline.py"}
    assert set(files) <= ours | {"xla_bridge.py"}, files  # xla_bridge: JAX's backend probe
    assert os.listdir(tmp_path / "checkpoints")  # Orbax did write
