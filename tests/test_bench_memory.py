"""Smoke run of the start-up memory benchmark: the new init holds one copy of the state, the old one more."""

import json

from experiments import bench_memory


def test_bench_memory_new_init_holds_at_least_half_a_state_less_than_the_old(tmp_path):
    result = bench_memory.main(
        ["--rows", "65536", "--phases", "init_old,init_new", "--out", str(tmp_path)]
    )
    rows = {r["phase"]: r for r in result["rows"]}
    state = rows["init_new"]["state_bytes"]
    assert state == rows["init_old"]["state_bytes"] > 65536 * 4 * 1000 * 2  # the bf16 buffer
    assert rows["init_new"]["buffer_shards"] == 8 and rows["init_new"]["buffer_dtype"] == "bfloat16"
    # Each holds the state at its peak; the old init also a full eager copy of the buffer.
    # (At this size XLA's compilation, ~0.1 GiB of host memory, is ~0.2 of the state.)
    assert 0.9 * state <= rows["init_new"]["peak"] < 1.5 * state
    assert rows["init_old"]["peak"] - rows["init_new"]["peak"] > 0.5 * state
    with open(tmp_path / "bench_memory_65536.json") as f:
        assert json.load(f)["table"] == result["table"]
    assert (tmp_path / "bench_memory_65536.md").read_text().strip() == result["table"]


def test_bench_memory_flags_follow_the_cli_convention(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        bench_memory.main(["--help"])
    assert e.value.code == 0 and "--rows" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench_memory.main(["--rowz=3"])
    assert e.value.code == 2 and "rowz" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown phases"):
        bench_memory.main(["--phases=init_new,warp"])
    with pytest.raises(SystemExit, match="--rows=0: must be >= 1"):
        bench_memory.main(["--rows=0"])
    args = bench_memory.parse_args(["--rows", "100", "--phases=step"])
    assert (args.rows, bench_memory._phases(args), args.devices) == (100, ["step"], 8)
