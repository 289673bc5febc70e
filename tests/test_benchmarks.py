"""The benchmark script runs end to end on the tiny model (timings are printed, never asserted)."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_overhead.py"


def test_merge_overhead_runs_on_the_tiny_model(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    out = tmp_path / "rows.json"
    main(["--models", "tiny", "--tasks", "2", "--pairs", "1", "--min-time", "0", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["model"] == "tiny" and row["tasks"] == 2
    assert row["merged"]["held_model_units"] == pytest.approx(3.0, abs=0.02)  # base + 2 task vectors
    assert row["merged"]["coefficients"][0] == 2
    paired = row["paired"]
    for key in ("ref_seconds", "merged_seconds", "merge_seconds", "ratio"):
        assert paired[key] > 0
    assert paired["ratio_min"] <= paired["ratio"] <= paired["ratio_max"]
    assert row["reference"]["peak_rss_mb"] > 0 and row["merged"]["peak_rss_mb"] > 0
    assert " tiny | 2 " in capsys.readouterr().out



def test_pool_memory_benchmark_runs_and_the_pool_holds_one_tensor_at_a_time(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT.parent / "pool_memory.py"))["main"]
    rows = main(["--sizes", "2,3", "--no-naive", "--json", str(tmp_path / "pool.json")])
    assert [r["size"] for r in rows] == [2, 3]
    assert rows[0]["pool_peak_live_mb"] == rows[1]["pool_peak_live_mb"] < rows[0]["candidate_mb"]
    assert rows[1]["pool_read_mb"] > rows[0]["pool_read_mb"]  # the larger pool was read in full
    assert "pool (memory-mapped) | 3 " in capsys.readouterr().out


def test_t3_throughput_benchmark_runs_on_the_tiny_zoo(tmp_path):
    main = runpy.run_path(str(SCRIPT.parent / "t3_throughput.py"))["main"]
    out = main(["--zoo", "tiny", "--inputs", "32", "--batch-size", "16", "--rounds", "1", "--json", str(tmp_path / "t3.json")])
    assert set(out["rows"]) == {"fixed merged checkpoint", "T3_B (per batch)", "T3 (per input)"}
    assert all(r["inputs_per_second"] > 0 for r in out["rows"].values())
    assert json.loads((tmp_path / "t3.json").read_text())["inputs"] == 32
