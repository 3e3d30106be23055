"""Real multi-process training: 2 processes x 2 CPU devices train like 1 process x 4 devices.

The worker processes (tests/multiprocess_worker.py) call ``jax.distributed.initialize``
on a local coordinator through the training CLI's flags and run
``train.train_and_evaluate``; each reads its own half of every global batch.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import input_pipeline, train, training

sys.path.insert(0, os.path.dirname(__file__))
from multiprocess_worker import config_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
# vSAM runs both of its compiled steps (SAM and reuse), so plain SAM adds no path of its own;
# SAF's sharded buffer and MESA's EMA teacher do.
METHODS = ("vsam", "saf", "mesa")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(name, workdir, logdir, *extra, timeout=300.0):
    """Starts the worker as processes 0 and 1 of a 2-process job; :func:`_wait` waits for them."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        # The resumed pair compiles what the first pair compiled: read it from disk.
        JAX_COMPILATION_CACHE_DIR=str(logdir / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    port = _free_port()
    procs = []
    for i in range(2):
        log = logdir / f"{name}_process{i}.log"
        args = [
            sys.executable, WORKER, f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={i}", f"--workdir={workdir}",
            "--methods=" + ",".join(METHODS), *extra,
        ]  # fmt: skip
        with open(log, "w") as f:
            proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        procs.append((proc, log))
    return procs, time.monotonic() + timeout


def _wait(pair):
    """Waits for both workers; fails with the output of one that failed (or timed out)."""
    procs, deadline = pair
    try:
        # One failed process leaves the other waiting in a collective: stop both.
        while any(p.poll() is None for p, _ in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p, _ in procs):
                break
            time.sleep(0.2)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(procs):
        if p.returncode != 0:
            with open(log) as f:
                tail = "".join(line for line in f if "[Gloo]" not in line)[-4000:]
            pytest.fail(f"worker process {i} exited with {p.returncode}:\n{tail}")


def _final_states(config, workdirs, mesh):
    """The latest checkpoint of each of ``workdirs`` restored onto ``mesh`` (in this process)."""
    source = input_pipeline.make_source("mnist1d", "train", mnist1d_args=config.mnist1d_args)
    target = training.init_state(training.setup(config, train_size=len(source), mesh=mesh))
    states = []
    for workdir in workdirs:
        mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
        try:
            out = mgr.restore(
                mgr.latest_step(),
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target)),
            )
        finally:
            mgr.close()
        states.append(jax.device_get(out["state"]))
    return states


def _read_rows(workdir):
    return train._read_metrics(os.path.join(workdir, "metrics.jsonl"))


def test_two_processes_with_a_resume_train_like_one_process(tmp_path):
    mp_dir, ref_dir = tmp_path / "two_processes", tmp_path / "one_process"
    # 2 processes x 2 devices: epoch 1, "killed", then fresh processes resume and finish.
    pair = _start_pair("first", mp_dir, tmp_path, "--stop_after_epochs=1")
    # Meanwhile the reference: this process, 4 of its devices, both epochs without a stop.
    mesh = training.make_mesh(jax.devices()[:4])
    ref_rows = {
        method: train.train_and_evaluate(
            config_for(method), str(ref_dir / method), mesh=mesh, progress=False
        )
        for method in METHODS
    }
    _wait(pair)
    first = {method: _read_rows(mp_dir / method) for method in METHODS}
    for method in METHODS:
        assert [r["epoch"] for r in first[method]] == [1], method
    _wait(_start_pair("resumed", mp_dir, tmp_path))
    for method in METHODS:
        config = config_for(method)
        rows = _read_rows(mp_dir / method)  # written by process 0 only
        assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows[method]] == [1, 2]
        # Resumed, not retrained: epoch 0's row (its timings too) is the first pair's.
        assert rows[0] == first[method][0], method
        for key in ("train_loss", "train_traj_term", "test_loss", "sam_step_fraction"):
            np.testing.assert_allclose(
                [r[key] for r in rows], [r[key] for r in ref_rows[method]], rtol=1e-6, atol=1e-6,
                err_msg=f"{method} {key}",
            )  # fmt: skip
        if method in ("saf", "mesa"):  # the trajectory terms are on in both epochs
            assert rows[1]["train_traj_term"] > 0.0, method
        got, want = _final_states(config, [mp_dir / method, ref_dir / method], mesh)
        assert int(got.step) == int(want.step) == 2 * config.max_steps_per_epoch
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=method),
            got,
            want,
        )


def test_init_sample_is_the_same_on_every_process(monkeypatch):
    # LSQ's step sizes are initialised on real inputs; the initial state is replicated,
    # so process 1 must see process 0's sample, not its own slice of a batch.
    from experiments.configs import mnist1d_lsq

    config = mnist1d_lsq.get_config("sgd")
    source = input_pipeline.make_source("mnist1d", "train", mnist1d_args=config.mnist1d_args)
    s = training.setup(config, train_size=len(source))
    first = training.init_sample(s, source, n=64)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    np.testing.assert_array_equal(training.init_sample(s, source, n=64), first)
    by_hand = np.stack([np.asarray(source[i]["image"], np.float32) for i in range(64)])
    np.testing.assert_array_equal(first, by_hand)
