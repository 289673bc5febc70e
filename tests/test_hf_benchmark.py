"""``benchmarks/causal_lm_step.py`` end to end on a tiny Llama (the numbers are not asserted):
both modes run in their own process, the merged step reaches the coefficients, the table and
the JSON record have one row per mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "causal_lm_step.py"


def test_causal_lm_step_benchmark_runs_both_modes_on_a_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--tasks", "2", "--hidden", "16", "--intermediate", "32",
                          "--layers", "2", "--heads", "2", "--vocab", "50", "--length", "8", "--steps", "1",
                          "--json", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| plain |" in run.stdout and "| merged |" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["plain", "merged"]
    assert rows[0]["parameters"] == rows[1]["parameters"] > 0
    assert all(r["step_s"] > 0 and r["peak_rss_mb"] >= r["rss_after_setup_mb"] for r in rows)
    assert rows[0]["tokens_per_step"] == 2 * 2 * 8
