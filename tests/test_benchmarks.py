"""The benchmark script runs end to end on the tiny model (timings are printed, never asserted)."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_overhead.py"


@pytest.mark.parametrize("per_task", [False, True])
def test_merge_overhead_runs_on_the_tiny_model(tmp_path, capsys, per_task):
    main = runpy.run_path(str(SCRIPT))["main"]
    out = tmp_path / "rows.json"
    main(["--models", "tiny", "--tasks", "2", "--pairs", "1", "--min-time", "0", "--json", str(out)]
         + (["--per-task"] if per_task else []))
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



def test_merge_granularity_benchmark_runs_on_the_tiny_model(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT.with_name("merge_granularity.py")))["main"]
    out = tmp_path / "rows.json"
    main(["--model", "tiny", "--tasks", "2", "--repeats", "2", "--threads", "1",
          "--granularities", "layer,partition:3:random", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["granularity"] for r in rows] == ["layer", "partition:3:random"]
    assert rows[1]["groups"] > rows[0]["groups"] > 1
    for r in rows:
        assert 0 < r["seconds_min"] <= r["seconds"] <= r["seconds_max"] and r["repeats"] == 2
        assert r["peak_rss_mb"] >= r["held_rss_mb"] > 0
    assert "partition:3:random" in capsys.readouterr().out


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


def _vs_fusionbench():
    return runpy.run_path(str(SCRIPT.parent / "vs_fusionbench.py"))


def test_vs_fusionbench_ours_side_merges_what_the_hand_computation_gives(tmp_path):
    """adamerge's worker of the side-by-side benchmark on the tiny case: the dumped step-0 merge
    equals base + 0.3 Σ τ computed here by hand, and the record has one time per step."""
    import torch
    from safetensors.torch import load_file

    bench = _vs_fusionbench()
    spec = bench["CASES"]["tiny"] | {"seed": 0, "name": "tiny", "check": True, "options": {"micro_batch": 2}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "ours.json"
    assert bench["main"](["--worker", "ours", "--spec", str(tmp_path / "spec.json"), "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert len(rec["steps_s"]) == spec["warmup"] + spec["timed"] and rec["step_s"] > 0
    assert rec["peak_mb"] >= rec["start_rss_mb"] > 0 and rec["options"]["micro_batch"] == 2
    assert torch.isfinite(torch.tensor(rec["step0_loss"]))
    case = bench["build_case"](spec)
    dumped = load_file(out.as_posix() + ".weights.safetensors")
    params = dict(case["model"].named_parameters())
    assert sorted(dumped) == sorted(params)
    for k, v in dumped.items():
        hand = case["base"][k] + 0.3 * sum(e[k] - case["base"][k] for e in case["experts"])
        assert (v - hand).abs().max() <= 1e-6, k


def _peer_python():
    import os

    path = Path(os.environ.get("FUSIONBENCH_PYTHON", SCRIPT.parents[1] / ".venv-fusionbench" / "bin" / "python"))
    return path if path.exists() else None


@pytest.mark.skipif(_peer_python() is None, reason="FusionBench's environment (.venv-fusionbench) is not installed")
def test_vs_fusionbench_against_the_peer_on_the_tiny_case(tmp_path):
    """Where FusionBench's environment exists: the same merged weights, and the JSON of the issue."""
    out = tmp_path / "vs.json"
    assert _vs_fusionbench()["main"](["--cases", "tiny", "--rounds", "1", "--peer-python", str(_peer_python()),
                                       "--json", str(out)]) == 0
    case = json.loads(out.read_text())["cases"]["tiny"]
    for key in ("ours_step_s", "peer_step_s", "speedup", "ours_peak_mb", "peer_peak_mb", "memory_ratio", "max_abs_weight_diff"):
        assert case[key] >= 0, key
    assert case["max_abs_weight_diff"] <= 1e-6
    assert abs(case["step0_loss"]["ours"] - case["step0_loss"]["peer"]) < 1e-5


def test_sharding_arithmetic_from_measured_sizes(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT.parent / "sharding_arithmetic.py"))["main"]
    out = tmp_path / "shard.json"
    assert main(["--model", "ViT-B-32", "--tasks", "2,20", "--ranks", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["measured"]
    assert m["parameters"] == 87_849_216 and m["tensors"] == 152 and m["saved_bytes_per_image"] > 0
    big = res["rows"]["20"]
    # sharding by parameter holds a quarter of the task vectors per rank, at the price of moving
    # about three model sizes per step; replicated ranks move only the coefficient gradients
    assert big["by_parameter"]["held_gib"] < big["by_task"]["held_gib"] < big["replicated"]["held_gib"]
    assert big["replicated"]["sent_gib"] < 1e-3 < big["by_parameter"]["sent_gib"] < big["by_task"]["sent_gib"]
    assert "by_parameter" in capsys.readouterr().out


def test_sharded_fit_benchmark_runs_on_the_tiny_zoo(tmp_path, capsys):
    """Two processes: each rank's probes are read back, the shard is half the stack, and the
    coefficients equal one process's."""
    main = runpy.run_path(str(SCRIPT.parent / "sharded_fit.py"))["main"]
    assert main(["--cases", "tiny", "--worlds", "1,2", "--strategies", "shard,shard_cut", "--json", str(tmp_path / "rows.json"),
                 "--work", str(tmp_path / "w")]) == 0
    one, two, cut = json.loads((tmp_path / "rows.json").read_text())
    # shard: each rank read its shard; shard_cut: each built the whole stack and cut it (the same run otherwise)
    assert (two["sharding"]["build"], cut["sharding"]["build"]) == ("per_rank_shard", "whole_then_cut")
    assert cut["max_abs_coef_diff_vs_r1"] < 1e-5
    assert (one["world"], two["world"]) == (1, 2) and one["sharding"] is None
    assert two["task_vector_mib_per_rank"] == pytest.approx(one["task_vector_mib_per_rank"] / 2, rel=0.01)
    assert two["sharding"]["task_vector_bytes_per_rank"] * 2 == pytest.approx(two["sharding"]["task_vector_bytes"], rel=0.01)
    assert two["max_abs_coef_diff_vs_r1"] < 1e-5
    assert two["grad0_rel_diff_median"] < 1e-5 and two["grad0_sign_flips"] == 0 and one["grad0_rel_diff_max"] == 0
    assert all(r["step_s"] > 0 and r["train_peak_mib_per_rank"] > 0 for r in (one, two))
    out = capsys.readouterr().out
    assert "| tiny | 2 | shard | per_rank_shard | 1 |" in out and "| tiny | 2 | shard_cut | whole_then_cut | 1 |" in out


def test_vs_fusionbench_ours_only_runs_our_side_alone_and_reports_the_auto_chunking(tmp_path, capsys):
    """``--ours-only`` on the cases: our worker alone (no peer environment needed), medians and
    ranges over the rounds, and the options it ran with (here ``micro_batch: auto`` and what it chose)."""
    out = tmp_path / "ours.json"
    assert _vs_fusionbench()["main"](["--cases", "tiny", "--rounds", "2", "--ours-only", "--micro-batch", "auto",
                                       "--peer-python", str(tmp_path / "absent"), "--json", str(out)]) == 0
    case = json.loads(out.read_text())["cases"]["tiny"]
    assert "peer_step_s" not in case and case["rounds"] == 2 and case["ours_options"]["micro_batch"] == "auto"
    lo, hi = case["ours_step_s_range"]
    assert 0 < lo <= case["ours_step_s"] <= hi and case["ours_peak_mb"] > 0
    assert case["ours_micro_batch"]["chunk"] == case["batch_per_task"]  # the tiny model's activations fit the budget
    assert "tiny | 2 |" in capsys.readouterr().out
