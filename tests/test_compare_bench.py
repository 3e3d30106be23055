"""Smoke runs of the `compare` demo and the benchmark: every artefact is produced and sane."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import stats as st

from experiments import bench, compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def compile_cache(tmp_path):
    """compare's persistent compilation cache in tmp_path (the second seed reuses the first's
    compiled steps: about 40 % less time), switched off again afterwards."""
    yield str(tmp_path / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", None)


def test_compare_smoke_writes_every_artefact(tmp_path):
    # The command as a user runs it, in its own process on one CPU device: on this suite's 8
    # fake devices the same run takes 3x as long (the trainer's data parallelism is tested in
    # test_train.py and test_multiprocess.py).
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "experiments.compare", "--smoke", "--quiet",
           "--methods", "sgd,sam,vsam,saf", "--seeds", "0,1",
           "--compile_cache", str(tmp_path / "jax_cache"), "--out", str(out)]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "run 8/8 done" in p.stdout  # the progress line of --quiet
    for name in ("report.md", "metrics.json", "train_loss.png", "sharpness.png", "landscape.png",
                 "test_accuracy.png", "accuracy_vs_throughput.png", "gain_vs_cost.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    rows = {r["method"]: r for r in metrics["summary"]}
    assert set(rows) == {"sgd", "sam", "vsam", "saf"}
    assert rows["sgd"]["step_time_vs_sgd"] == 1.0 and rows["sgd"]["gain_vs_sgd"] == 0.0
    assert rows["sgd"]["sam_step_fraction"] == 0.0 and 0 < rows["vsam"]["sam_step_fraction"] <= 1
    assert rows["sam"]["gain_share"] == 1.0
    for r in rows.values():
        for key in ("test_acc_mean", "sharpness", "lambda_max", "final_train_loss"):
            assert np.isfinite(r[key]), (r["method"], key)
    assert rows["saf"]["extra_memory_mb"] > 0 and rows["sgd"]["extra_memory_mb"] == 0
    # Every run is kept with its method, seed and accuracy.
    runs = {(r["method"], r["seed"]): r["test_accuracy"] for r in metrics["runs"]}
    assert len(runs) == 8 and all(0.0 <= a <= 1.0 for a in runs.values())
    # The label noise of the config (MNIST-1D: 30 %), with its flip set.
    noise = metrics["env"]["label_noise"]
    assert noise["rate"] == 0.3 and noise["num_flipped"] == len(noise["flipped_ids"]) == 1200
    assert all(a != b for a, b in zip(noise["noisy_labels"], noise["clean_labels"]))
    report = (out / "report.md").read_text()
    header = report.split("\n| method |", 1)[1].split("\n", 1)[0]
    assert "gain" in header and "p (Welch" in header
    assert "| vsam |" in report and "gain_vs_cost.png" in report and "30 % symmetric" in report
    assert all((out / png).exists() for png in re.findall(r"\(([\w.]+\.png)\)", report))
    runs_tb = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert runs_tb == sorted(f"{m}_seed{k}" for m in ("sgd", "sam", "vsam", "saf") for k in (0, 1))
    # A smoke run says that its figures mean nothing, in the report and in the JSON.
    assert compare.SMOKE_NOTE in report and metrics["env"]["smoke"] is True
    assert all(any(d.glob("events.out.tfevents.*")) for d in (out / "tensorboard").iterdir())


def test_compare_clean_flag_turns_the_noise_off(tmp_path):
    assert compare.parse_args(["--clean"]).overrides == {"label_noise": 0.0}
    with pytest.raises(SystemExit, match="contradicts"):
        compare.main(["--clean", "--config.label_noise=0.2", "--out", str(tmp_path)])
    cfg = compare.make_config("sgd", 0, compare.parse_args(["--config.label_noise=0"]))
    assert cfg.label_noise == 0.0
    assert compare.make_config("sgd", 0, compare.parse_args([])).label_noise == 0.3


def test_compare_config_overrides_reach_every_methods_config():
    opts = compare.parse_args(
        ["--config.sam.rho=0.1", "--config.num_epochs=3", "--config.looksam.alpha=0.2",
         "--methods", "sgd,looksam,saf", "--seeds=4,5"]
    )
    assert opts.methods == ("sgd", "looksam", "saf") and opts.seeds == (4, 5)
    for m in opts.methods:
        cfg = compare.make_config(m, 5, opts)
        assert (cfg.method, cfg.seed, cfg.sam.rho, cfg.num_epochs) == (m, 5, 0.1, 3)
        assert cfg.looksam.alpha == 0.2
    # A fresh FlagValues per call: nothing of the previous command line is left.
    again = compare.parse_args([])
    assert again.overrides == {} and again.seeds == (0, 1, 2)
    assert compare.make_config("sam", 0, again).sam.rho == 0.05
    assert compare.parse_args(["--smoke"]).seeds == (0, 1)  # the smoke default


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config.method=sam"], "compare sets config.method from --methods"),
        (["--config.seed=3"], "compare sets config.seed from --seeds"),
        (["--methods", "sgd,nope"], "unknown method 'nope'"),
        (["--seeds", "0,x"], "--seeds='0,x'"),
        (["--config", "experiments/configs/mnist1d.py:sam"], "without ':<method>'"),
    ],
)
def test_compare_refuses_bad_command_lines_naming_the_flag(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        compare.parse_args(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "Unknown command line flag 'bogus'"),
        (["--config.sam.rhoo=0.1"], "no field"),
        (["--config.sam.rho=abc"], "could not convert string to float: 'abc'"),
        (["--config", "no/such/config.py"], "cannot load --config no/such/config.py"),
        # LSQ's bit width exists only in the quantized task's config.
        (["--config.model_kwargs.quant_bits=2"], "quant_bits"),
    ],
)
def test_compare_flag_errors_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_compare_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--methods" in out and "--config:" in out and "--[no]smoke" in out


def _fake_results(acc, times):
    return [
        {"method": m, "seed": s, "test_accuracy": a, "median_epoch_time_s": times[m][s],
         "images_per_sec": 1.0, "sam_step_fraction": 0.0, "final_train_loss": 0.0,
         "sharpness": 0.0, "lambda_max": 0.0, "extra_memory_bytes": 0}
        for m, accs in acc.items() for s, a in enumerate(accs)
    ]


def test_summary_statistics_against_scipy():
    acc = {"sgd": [0.70, 0.72, 0.71], "sam": [0.76, 0.75, 0.78], "saf": [0.73, 0.72, 0.75]}
    times = {"sgd": [1.0, 1.1, 0.9], "sam": [2.0, 2.3, 1.7], "saf": [1.1, 1.1, 1.0]}
    rows = {r["method"]: r for r in compare.summarize(_fake_results(acc, times), list(acc))}
    for m in ("sam", "saf"):
        ref = st.ttest_ind(acc[m], acc["sgd"], equal_var=False, alternative="greater")
        assert rows[m]["p_vs_sgd"] == pytest.approx(ref.pvalue, rel=1e-9)
        lo, hi = st.ttest_ind(acc[m], acc["sgd"], equal_var=False).confidence_interval(0.95)
        assert rows[m]["gain_vs_sgd_ci95"] == pytest.approx([lo, hi], abs=1e-12)
        ratios = np.asarray(times[m]) / np.asarray(times["sgd"])
        assert rows[m]["step_time_vs_sgd"] == pytest.approx(ratios.mean())
        lo, hi = st.t.interval(0.95, 2, loc=ratios.mean(), scale=st.sem(ratios))
        assert rows[m]["step_time_vs_sgd_ci95"] == pytest.approx([lo, hi])
        assert rows[m]["test_acc_ci95"] == pytest.approx(
            list(st.t.interval(0.95, 2, loc=np.mean(acc[m]), scale=st.sem(acc[m]))))
    share = (np.mean(acc["saf"]) - np.mean(acc["sgd"])) / (np.mean(acc["sam"]) - np.mean(acc["sgd"]))
    assert rows["saf"]["gain_share"] == pytest.approx(share)
    text = compare.verdict(list(rows.values()))
    assert "SAM beats SGD by" in text and "saf: keeps" in text


def test_verdict_says_when_sam_gain_is_not_significant():
    acc = {"sgd": [0.70, 0.75, 0.72], "sam": [0.71, 0.74, 0.73], "vsam": [0.70, 0.73, 0.72]}
    times = {m: [1.0, 1.0, 1.0] for m in acc}
    rows = compare.summarize(_fake_results(acc, times), list(acc))
    assert "not significant" in compare.verdict(rows)
    table = compare.table_markdown(rows)
    assert "−∞" in table  # the share's interval is unbounded, and shown so


def test_bench_smoke_runs_every_method(tmp_path, compile_cache, capsys):
    result = bench.main(["--smoke", "--compile_cache", compile_cache, "--out", str(tmp_path)])
    rows = result["results"]
    assert set(rows) == set(bench.METHODS)
    for m, r in rows.items():
        assert r["median_step_s"] > 0 and np.isfinite(r["throughput_vs_sgd"]), m
    assert rows["vsam"]["t_reuse_step_s"] > 0 and rows["vsam"]["t_sam_step_s"] > 0
    assert rows["saf"]["saf_buffer_bytes"] > 0
    assert any(f.startswith("bench_") for f in os.listdir(tmp_path))
    # Marked as meaningless, with no target beside its figures; a progress line per method.
    out = capsys.readouterr().out
    assert result["smoke"] is True and result["table"].startswith(bench.SMOKE_NOTE)
    assert "≥" not in result["table"] and "compiled saf (" in out and "round 2/2 done" in out
    assert not jax.config.values["jax_disable_most_optimizations"]  # restored on exit


def test_bench_flags_and_config_overrides():
    args = bench.parse_args(["--config.looksam.k=7", "--methods=sam,looksam", "--batch", "32"])
    assert args.methods == ["sgd", "sam", "looksam"] and args.batch == 32
    assert bench.make_config("looksam", args).looksam.k == 7
    assert bench.make_config("looksam", bench.parse_args([])).looksam.k == 5  # nothing leaks
    with pytest.raises(SystemExit, match="unknown methods"):
        bench.parse_args(["--methods", "sgd,nope"])
    with pytest.raises(SystemExit, match="--steps=0"):
        bench.parse_args(["--steps", "0"])


def test_quant_bits_override_sets_the_lsq_models_bits():
    opts = compare.parse_args(
        ["--config", "experiments/configs/mnist1d_lsq.py", "--config.model_kwargs.quant_bits=2"]
    )
    assert opts.task == "mnist1d_lsq"
    cfg = compare.make_config("vsam", 0, opts)
    assert cfg.model == "mnist1d_cnn_lsq" and cfg.model_kwargs.quant_bits == 2
