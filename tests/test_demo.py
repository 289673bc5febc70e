"""`adamerge demo --quick` on the real offline zoo: the structure of its outputs and the claim it
makes (the recommended learned merge beats the best data-free baseline without hurting any task)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adamerge.cli import main
from adamerge.config import check_tasks, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    cache = tmp_path_factory.mktemp("cache")
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]) == 0
    (out / "cache_dir.txt").write_text(str(cache))
    return out


def test_a_second_demo_reuses_finished_rows(demo_out, capsys):
    """An interrupted or repeated demo continues: finished rows (same zoo, same options) are
    reused, not refitted, and give the same table."""
    before = json.loads((demo_out / "results.json").read_text())
    cache = (demo_out / "cache_dir.txt").read_text()
    rows = "adamerging(task);doge"
    assert main(["demo", "--quick", "--out", str(demo_out), "--cache-dir", cache, "--rows", rows]) == 0
    err = capsys.readouterr().err
    assert "reusing the finished run of adamerging(task)" in err and "reusing the finished run of doge" in err
    again = json.loads((demo_out / "results.json").read_text())
    for name in rows.split(";"):
        assert again["methods"][name]["per_task"] == before["methods"][name]["per_task"]
    (demo_out / "results.json").write_text(json.dumps(before))  # the other tests read the full table


def test_a_row_is_refitted_when_a_default_of_its_option_classes_changes(demo_out, monkeypatch):
    """The demo reuses a finished row only if its *settings* are unchanged: the config and every
    parsed option class (method_args, each solver's options), defaults filled in. A changed
    default of a solver's option class (not visible in the config) makes the row stale."""
    import dataclasses

    from adamerge.methods import create_method
    from adamerge.solvers.doge import DOGESolver

    marker = json.loads((demo_out / "runs" / "doge" / "demo_row.json").read_text())
    doge = create_method("doge")
    settings = json.loads(json.dumps(doge.settings(doge.config(marker["options"])), default=str))
    assert marker["resolved"] == settings
    assert settings["solvers"][0]["options"]["trim"] == 0.3 and settings["method_args"] is None

    @dataclasses.dataclass
    class OtherTrim(DOGESolver.Options):
        trim: float = 0.5

    monkeypatch.setattr(DOGESolver, "Options", OtherTrim)
    changed = json.loads(json.dumps(doge.settings(doge.config(marker["options"])), default=str))
    assert changed["config"] == settings["config"] and changed != marker["resolved"]
    t3 = create_method("t3")  # method_args defaults are filled in too
    assert t3.settings(t3.config({}))["method_args"]["gamma"] == 5.0


def test_a_row_made_under_other_execution_options_is_the_same_run(demo_out, capsys):
    """``micro_batch`` says how a step is computed, not what (the chunked and whole steps agree to
    float rounding: test_micro_batch.py): a finished row whose marker records another micro_batch
    is reused; one whose lr differs is not the same run."""
    from adamerge.methods.base import EXECUTION_OPTIONS, same_run

    assert EXECUTION_OPTIONS == ("micro_batch",)
    path = demo_out / "runs" / "doge" / "demo_row.json"
    original = path.read_text()
    marker = json.loads(original)
    assert marker["resolved"]["config"]["micro_batch"] == "auto"
    other = json.loads(original)
    other["resolved"]["config"]["micro_batch"] = True
    assert same_run(other, marker) and other != marker
    slower = json.loads(original)
    slower["resolved"]["config"]["lr"] = 0.5
    assert not same_run(slower, marker)
    table = (demo_out / "results.json").read_text()
    path.write_text(json.dumps(other))
    try:
        cache = (demo_out / "cache_dir.txt").read_text()
        assert main(["demo", "--quick", "--out", str(demo_out), "--cache-dir", cache, "--rows", "doge"]) == 0
        assert "reusing the finished run of doge" in capsys.readouterr().err
    finally:
        path.write_text(original)
        (demo_out / "results.json").write_text(table)  # the other tests read the full table


def test_a_row_with_the_settings_of_another_rows_run_reuses_it(demo_out, capsys, monkeypatch):
    """A row whose options resolve to another finished row's settings (a default named
    explicitly, or a variant that a default later became) is not refitted: the run is copied
    into the row's own folder with the row's own config and marker."""
    import yaml

    from adamerge.workflows import demo

    method, options = demo.LEARNED["adamerging(layer)"]
    monkeypatch.setitem(demo.LEARNED, "adamerging(layer,entropy)", (method, {**options, "objective": "entropy"}))
    table = (demo_out / "results.json").read_text()
    cache = (demo_out / "cache_dir.txt").read_text()
    folder = demo_out / "runs" / demo._slug("adamerging(layer,entropy)")
    try:
        assert main(["demo", "--quick", "--out", str(demo_out), "--cache-dir", cache, "--rows", "adamerging(layer,entropy)"]) == 0
        err = capsys.readouterr().err
        assert "reusing the finished run of adamerging(layer,entropy) from row folder 'adamerging_layer'" in err, err
        again = json.loads((demo_out / "results.json").read_text())["methods"]["adamerging(layer,entropy)"]
        assert again["per_task"] == json.loads(table)["methods"]["adamerging(layer)"]["per_task"]
        assert yaml.safe_load((folder / "config.yaml").read_text())["run_dir"] == str(folder.resolve())
        assert json.loads((folder / "demo_row.json").read_text())["options"]["objective"] == "entropy"
        assert not folder.with_name(folder.name + ".copying").exists()
        # a row whose settings differ has no twin
        spec = json.loads((folder / "demo_row.json").read_text())
        spec["resolved"]["config"]["lr"] = 0.5
        assert demo.same_finished_run(demo_out / "runs", spec) is None
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        (demo_out / "results.json").write_text(table)  # the other tests read the full table


def test_demo_writes_results_plots_and_export(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    tasks = results["tasks"]
    assert len(tasks) >= 3
    methods = results["methods"]
    from adamerge.workflows.demo import QUICK_ROWS

    for name in ("experts", "pretrained+heads", "weight_average", "task_arithmetic(lam=0.3)", "ties(lam=0.5)", *QUICK_ROWS):
        assert name in methods, name
    assert {"adamerging(task)", "adamerging(layer)", results["recommended"], "doge"} <= set(QUICK_ROWS)
    for name, r in methods.items():
        assert r["kind"] in ("reference", "data_free", "learned")
        assert isinstance(r["uses_labels"], bool)
        assert set(r["per_task"]) == set(tasks)
        assert all(0.0 <= v <= 1.0 for v in r["per_task"].values())
        assert abs(r["mean"] - sum(r["per_task"].values()) / len(tasks)) < 1e-9
        assert r["seconds"] >= 0
        if r["kind"] in ("learned", "data_free"):
            assert r["uses_labels"] == ("few_shot" in name), name  # only few-shot rows read (training-split) labels
    assert results["recommended"] in methods and methods[results["recommended"]]["kind"] == "learned"
    for name in ("results.md", "accuracy.png", "coefficients.png", "config.yaml"):
        assert (demo_out / name).is_file(), name
    assert (demo_out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    export = demo_out / "export"
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "adamerge.json", "heads.safetensors", "model.safetensors"]


def test_recommended_beats_data_free_and_hurts_no_task(demo_out):
    """The recommended row beats every data-free row (weight average, task arithmetic, TIES grids
    and DOGE) and drops no task more than 5 points under task arithmetic λ = 0.3 (issue 24's rule
    bar the share of the experts, which the protocol script judges). Between sessions 34 and 36
    DOGE was left out of this bar: it scored within noise of the former recommendation on this zoo
    (78.5 against 78.2); the recommendation since session 37 scores 84.0 there (session 36's 83.2)."""
    results = json.loads((demo_out / "results.json").read_text())
    methods = results["methods"]
    assert "doge" in methods and methods["doge"]["kind"] == "data_free"
    best_data_free = max(r["mean"] for r in methods.values() if r["kind"] == "data_free")
    rec = methods[results["recommended"]]
    assert rec["mean"] > best_data_free
    ta = methods["task_arithmetic(lam=0.3)"]["per_task"]
    for task, acc in rec["per_task"].items():
        assert acc >= ta[task] - 0.05, (task, acc, ta[task])


def test_demo_summary_script_reads_the_verdict(demo_out):
    import runpy

    script = Path(__file__).resolve().parents[1] / "experiments" / "demo_summary.py"
    summarize = runpy.run_path(str(script))["summarize"]
    row = summarize(demo_out)
    results = json.loads((demo_out / "results.json").read_text())
    assert row["recommended"] == results["recommended"]
    assert row["recommended_mean"] == results["methods"][results["recommended"]]["mean"]
    assert row["best_data_free_mean"] == max(r["mean"] for r in results["methods"].values() if r["kind"] == "data_free")
    # the verdict is the numbers' (DOGE included: on the quick zoo it can go either way)
    assert row["wins"] is (row["recommended_mean"] > row["best_data_free_mean"]) and row["worst_change"] >= -0.05
    other = summarize(demo_out, "adamerging(layer)")
    assert other["recommended"] == "adamerging(layer)" and other["recommended_mean"] == results["methods"]["adamerging(layer)"]["mean"]


def test_demo_export_reloads_to_the_learned_model(demo_out):
    from adamerge.workflows.export import load_run
    from adamerge.io.state_dicts import load_state_dict
    from adamerge.zoo import create_backbone

    results = json.loads((demo_out / "results.json").read_text())
    run_dir = Path(load_config(demo_out / "config.yaml")["run_dir"])
    merged, parts, _ = load_run(run_dir)
    model = create_backbone(pretrained=False)
    model.load_state_dict(load_state_dict(demo_out / "export" / "model.safetensors"), strict=True)
    model.eval()
    x = parts["streams"][0].inputs(torch.arange(4))
    with torch.no_grad():
        assert torch.allclose(model(x), merged(x), atol=1e-5)
    meta = json.loads((demo_out / "export" / "adamerge.json").read_text())
    rec = results["methods"][results["recommended"]]
    assert meta["metrics"]["mean"] == pytest.approx(rec["mean"])


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml", "vit_b32_8tasks.yaml"])
def test_example_configs_parse(name):
    cfg = load_config(CONFIGS / name)
    assert len(check_tasks(cfg)) >= 3
