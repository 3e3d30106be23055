"""Smoke runs of the `compare` demo and the benchmark: every artefact is produced and sane."""

import json
import os

import numpy as np

from experiments import bench, compare


def test_compare_smoke_writes_every_artefact(tmp_path):
    out = tmp_path / "cmp"
    result = compare.main(
        ["--smoke", "--quiet", "--methods", "sgd,vsam,saf,mesa", "--out", str(out)]
    )
    for name in ("report.md", "metrics.json", "train_loss.png", "sharpness.png", "landscape.png",
                 "accuracy_vs_throughput.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    rows = {r["method"]: r for r in metrics["summary"]}
    assert set(rows) == {"sgd", "vsam", "saf", "mesa"}
    assert rows["sgd"]["throughput_vs_sgd"] == 1.0
    assert rows["sgd"]["sam_step_fraction"] == 0.0 and 0 < rows["vsam"]["sam_step_fraction"] <= 1
    for r in rows.values():
        for key in ("test_acc_mean", "sharpness", "lambda_max", "final_train_loss"):
            assert np.isfinite(r[key]), (r["method"], key)
    assert rows["saf"]["extra_memory_mb"] > 0 and rows["sgd"]["extra_memory_mb"] == 0
    report = (out / "report.md").read_text()
    assert "| vsam |" in report and "landscape.png" in report
    assert result["files"] and all(os.path.exists(f) for f in result["files"])


def test_bench_smoke_runs_every_method(tmp_path):
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    rows = result["results"]
    assert set(rows) == set(bench.METHODS)
    for m, r in rows.items():
        assert r["median_step_s"] > 0 and np.isfinite(r["throughput_vs_sgd"]), m
    assert rows["vsam"]["t_reuse_step_s"] > 0 and rows["vsam"]["t_sam_step_s"] > 0
    assert rows["saf"]["saf_buffer_bytes"] > 0
    assert any(f.startswith("bench_") for f in os.listdir(tmp_path))
