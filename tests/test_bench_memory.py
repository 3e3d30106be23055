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
