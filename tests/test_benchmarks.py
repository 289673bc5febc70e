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

