"""Smoke runs of the `compare` demo and the benchmark: every artefact is produced and sane."""

import json
import os

import jax
import numpy as np
import pytest
from scipy import stats as st

from experiments import bench, compare


@pytest.fixture
def compile_cache(tmp_path):
    """compare's persistent compilation cache in tmp_path (the second seed reuses the first's
    compiled steps: about 40 % less time), switched off again afterwards."""
    yield str(tmp_path / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", None)


def test_compare_smoke_writes_every_artefact(tmp_path, compile_cache):
    out = tmp_path / "cmp"
    result = compare.main(
        ["--smoke", "--quiet", "--methods", "sgd,sam,vsam,saf", "--seeds", "0,1",
         "--compile_cache", compile_cache, "--out", str(out)]
    )
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
    assert result["files"] and all(os.path.exists(f) for f in result["files"])
    runs_tb = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert runs_tb == sorted(f"{m}_seed{k}" for m in ("sgd", "sam", "vsam", "saf") for k in (0, 1))
    assert all(any(d.glob("events.out.tfevents.*")) for d in (out / "tensorboard").iterdir())


def test_compare_clean_flag_turns_the_noise_off(tmp_path):
    args = compare.parse_args(["--clean"])
    assert args.clean
    with pytest.raises(SystemExit, match="contradicts"):
        compare.main(["--clean", "--label_noise", "0.2", "--out", str(tmp_path)])
    cfg = compare.make_config("sgd", 0, compare.parse_args(["--label_noise", "0"]))
    assert cfg.label_noise == 0.0
    assert compare.make_config("sgd", 0, compare.parse_args([])).label_noise == 0.3


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


def test_bench_smoke_runs_every_method(tmp_path):
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    rows = result["results"]
    assert set(rows) == set(bench.METHODS)
    for m, r in rows.items():
        assert r["median_step_s"] > 0 and np.isfinite(r["throughput_vs_sgd"]), m
    assert rows["vsam"]["t_reuse_step_s"] > 0 and rows["vsam"]["t_sam_step_s"] > 0
    assert rows["saf"]["saf_buffer_bytes"] > 0
    assert any(f.startswith("bench_") for f in os.listdir(tmp_path))


def test_quant_bits_flag_sets_the_lsq_models_bits_and_refuses_float_models():
    cfg = compare.make_config(
        "vsam", 0, compare.parse_args(["--dataset", "mnist1d_lsq", "--quant_bits", "2"])
    )
    assert cfg.model == "mnist1d_cnn_lsq" and cfg.model_kwargs.quant_bits == 2
    with pytest.raises(SystemExit, match="not quantized"):
        compare.make_config("sgd", 0, compare.parse_args(["--quant_bits", "2"]))
