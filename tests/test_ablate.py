"""`adamerge ablate`: a grid of run folders, resumable, with tables that match the folders; the
non-terminal progress lines of `fit`; every demo row's config.yaml reruns it."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from adamerge.cli import main
from helpers import write_config

GRID = ["granularity=task,layer", "solver=gradient,pgd"]


def _count_fits(monkeypatch) -> list[str]:
    import adamerge.workflows.ablate as ablate

    calls: list[str] = []
    original = ablate.fit_cell

    def counting(cfg, parts, **kw):
        calls.append(cfg["run_dir"])
        return original(cfg, parts, **kw)

    monkeypatch.setattr(ablate, "fit_cell", counting)
    return calls


@pytest.fixture(scope="module")
def grid_out(tiny_zoo_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ablate")
    config = write_config(folder, tiny_zoo_dir, **{"options.steps": 6, "checkpoint_every": 3})
    out = folder / "out"
    mp = pytest.MonkeyPatch()
    calls = _count_fits(mp)
    try:
        assert main(["ablate", "--config", str(config), "--grid", *GRID, "--seeds", "0", "--out", str(out),
                     "--no-progress", "--options.batch_size", "8"]) == 0
    finally:
        mp.undo()
    return config, out, calls


def test_grid_completes_and_table_matches_run_folders(grid_out):
    config, out, calls = grid_out
    assert len(calls) == 4
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert len(rows) == 4
    assert {(r["granularity"], r["solver"]) for r in rows} == {(g, s) for g in ("task", "layer") for s in ("gradient", "pgd")}
    for r in rows:
        run = Path(r["run"])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["options"]["granularity"] == r["granularity"] and cfg["options"]["solver"] == r["solver"]
        assert cfg["options"]["batch_size"] == 8 and cfg["options"]["steps"] == 6  # the override reached every cell
        assert cfg["seed"] == int(r["seed"]) == 0
        res = json.loads((run / "results.json").read_text())
        assert float(r["mean_accuracy"]) == pytest.approx(res["after"]["mean"])
        for task, acc in res["after"]["per_task"].items():
            assert float(r[f"acc/{task}"]) == pytest.approx(acc)
        from safetensors.torch import load_file

        assert int(r["coefficients"]) == load_file(str(run / "coefficients.safetensors"))["coefficients"].numel()
        assert float(r["wall_seconds"]) > 0 and float(r["peak_memory_mb"]) > 0
    n = {r["granularity"]: int(r["coefficients"]) for r in rows}
    assert n["task"] == 3 < n["layer"]
    md = (out / "ablation.md").read_text()
    assert "4 of 4 runs finished" in md and md.count("| task |") == 2 and md.count("| layer |") == 2
    for name in ("accuracy_vs_coefficients.png", "coefficients.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_rerun_recomputes_nothing(grid_out, monkeypatch):
    config, out, _ = grid_out
    before = (out / "ablation.csv").read_text()
    calls = _count_fits(monkeypatch)
    assert main(["ablate", "--config", str(config), "--grid", *GRID, "--seeds", "0", "--out", str(out),
                 "--no-progress", "--options.batch_size", "8"]) == 0
    assert calls == []
    assert (out / "ablation.csv").read_text() == before


def test_a_killed_cell_is_finished_on_the_rerun_never_counted(tiny_zoo_dir, tmp_path, monkeypatch):
    """A cell cut mid-training (its checkpoint written, no results.json, as after kill -9) is not
    in the table until a rerun finishes it; the rerun fits that cell only."""
    from adamerge.train.loop import MergeModule

    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 6, "checkpoint_every": 2})
    args = ["ablate", "--config", str(config), "--grid", "granularity=task,layer", "--out", str(tmp_path / "out"), "--no-progress"]
    original = MergeModule.training_step

    def crash(self, batch, idx):
        if self.global_step == 4 and self.merged.coefficients.shape[1] > 3:  # the layer cell only
            raise RuntimeError("simulated crash")
        return original(self, batch, idx)

    monkeypatch.setattr(MergeModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    monkeypatch.setattr(MergeModule, "training_step", original)
    cells = sorted((tmp_path / "out" / "runs").iterdir())
    killed = [c for c in cells if "layer" in c.name][0]
    assert (killed / "checkpoints" / "last.ckpt").is_file() and not (killed / "results.json").exists()
    assert not (tmp_path / "out" / "ablation.csv").exists()  # no table that looks complete
    calls = _count_fits(monkeypatch)
    assert main(args) == 0
    assert calls == [str(killed.resolve())]
    rows = list(csv.DictReader((tmp_path / "out" / "ablation.csv").open()))
    assert sorted(r["granularity"] for r in rows) == ["layer", "task"]
    uninterrupted = tmp_path / "plain"
    assert main(["fit", "--config", str(killed / "config.yaml"), "--run-dir", str(uninterrupted), "--no-progress"]) == 0
    from safetensors.torch import load_file

    got = load_file(str(killed / "coefficients.safetensors"))["coefficients"]
    assert torch.allclose(got, load_file(str(uninterrupted / "coefficients.safetensors"))["coefficients"], atol=1e-6)


@pytest.mark.parametrize("grid, message", [
    (["granularity"], "NAME=V1,V2"),
    (["granularity=task", "granularity=layer"], "given twice"),
    (["seed=0,1"], "--seeds"),
    (["granularity=task,nonsense"], "granularity"),
    (["solver=gradient,no_such_solver"], "no_such_solver"),
])
def test_bad_grids_are_one_line_errors(tiny_zoo_dir, tmp_path, capsys, grid, message):
    config = write_config(tmp_path, tiny_zoo_dir)
    assert main(["ablate", "--config", str(config), "--grid", *grid, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adamerge: error:") and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out" / "runs").exists()  # checked before anything runs


def test_fit_progress_is_lines_when_not_a_terminal(tiny_zoo_dir, tmp_path, capsys):
    """Output that is not a terminal (pytest captures it) gets a line every few percent, no
    carriage-return bar."""
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 40})
    assert main(["fit", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("[fit] ")]
    assert 10 <= len(lines) <= 21, lines
    assert lines[-1].startswith("[fit] 40/40 steps (100%") and "loss" in lines[-1]


def test_progress_resumes_from_its_initial_count():
    import io

    from adamerge.progress import Progress

    buf = io.StringIO()
    bar = Progress(100, "fit", every_percent=10, unit="steps", stream=buf, initial=55)
    bar.update(5)  # 60%: the next line after 55%
    bar.update(1)
    bar.update(39)
    assert buf.getvalue().splitlines()[0].startswith("[fit] 60/100 steps (60%")
    assert [ln.split()[1] for ln in buf.getvalue().splitlines()] == ["60/100", "100/100"]


def test_every_demo_row_config_reproduces_its_coefficients(tmp_path, monkeypatch):
    """A demo row's run folder holds a config.yaml with which `adamerge fit` reaches the same
    coefficients (the quick demo on a smaller zoo setting)."""
    import adamerge.workflows.demo as demo
    from safetensors.torch import load_file

    monkeypatch.setattr(demo, "QUICK", demo.Setting(image_size=16, zoo_steps=3, n_train=40, n_test=32, steps=4, lambdas=(0.3,)))
    out = tmp_path / "demo"
    rows = "adamerging(task);adamerging(layer,infomax,floor=0.9,pgd-simplex)"
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--rows", rows, "--no-progress"]) == 0
    for name in rows.split(";"):
        run = out / "runs" / demo._slug(name)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["run_dir"] == str(run.resolve()) and cfg["options"]["steps"] == 4
        again = tmp_path / "again" / run.name
        assert main(["fit", "--config", str(run / "config.yaml"), "--run-dir", str(again), "--no-progress"]) == 0
        want = load_file(str(run / "coefficients.safetensors"))["coefficients"]
        got = load_file(str(again / "coefficients.safetensors"))["coefficients"]
        assert want.shape == got.shape and torch.allclose(want, got, atol=1e-6), name
        assert json.loads((again / "results.json").read_text())["after"] == json.loads((run / "results.json").read_text())["after"]


# ---------------------------------------------------------------------------------------------
# issue 21: own-loop methods in the table, bad values refused with nothing left behind, one
# ablation at a time on a folder


def test_an_ablation_over_methods_with_an_own_loop_method_writes_its_table_and_reruns(tiny_zoo_dir, tmp_path, monkeypatch):
    """`--grid method=adamerging,t3`: T3 has no coefficients.safetensors (it picks coefficients per
    input); its row says n/a and the table, plots and a rerun work."""
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 4, "options.granularity": "task", "checkpoint_every": 2})
    out = tmp_path / "out"
    args = ["ablate", "--config", str(config), "--grid", "method=adamerging,t3", "--out", str(out), "--no-progress"]
    calls = _count_fits(monkeypatch)
    assert main(args) == 0
    assert len(calls) == 2
    rows = {r["method"]: r for r in csv.DictReader((out / "ablation.csv").open())}
    assert sorted(rows) == ["adamerging", "t3"]
    assert rows["adamerging"]["coefficients"] == "3" and rows["t3"]["coefficients"] == ""
    for r in rows.values():
        res = json.loads((Path(r["run"]) / "results.json").read_text())
        assert float(r["mean_accuracy"]) == pytest.approx(res["after"]["mean"])
    assert not (Path(rows["t3"]["run"]) / "coefficients.safetensors").exists()
    md = (out / "ablation.md").read_text()
    assert "2 of 2 runs finished" in md and "| t3 | 1 | n/a |" in md
    for name in ("accuracy_vs_coefficients.png", "coefficients.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    before = (out / "ablation.csv").read_text()
    calls.clear()
    assert main(args) == 0  # the rerun reuses both cells and writes the same table
    assert calls == [] and (out / "ablation.csv").read_text() == before


def test_a_table_of_own_loop_cells_only_and_streams_without_labels(tmp_path):
    """Rows without coefficients or accuracy: the table says n/a and –, the plot leaves them out."""
    from adamerge.workflows.ablate import AblationResult, plot_accuracy_vs_coefficients, summary_table, write_tables

    rows = [{"method": "t3", "seed": 0, "mean_accuracy": None, "coefficients": None, "wall_seconds": None,
             "peak_memory_mb": None, "run": "r0"},
            {"method": "t3", "seed": 1, "mean_accuracy": 0.5, "acc/a": 0.5, "coefficients": None, "wall_seconds": 1.0,
             "peak_memory_mb": 10.0, "run": "r1"}]
    table = summary_table(rows, ["method"])
    assert "| t3 | 2 | n/a | 50.0 | 50.0 | 1.0 | 10 |" in table
    write_tables(tmp_path, AblationResult(rows=rows, total=2), ["method"], [0, 1])
    assert "2 of 2 runs finished" in (tmp_path / "ablation.md").read_text()
    plot_accuracy_vs_coefficients(rows + [dict(rows[1], method="x", coefficients=3)], ["method"], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("change, message", [
    ({"--seeds": ["-1"]}, "--seeds"),
    ({"--seeds": ["0,1.5"]}, "'1.5'"),
    ({"--seeds": ["a"]}, "'a'"),
    ({"--seeds": ["0,,1"]}, "an empty item"),
    ({"--seeds": ["0,0"]}, "distinct"),
    ({"--seeds": [str(2**32)]}, "out of range"),
    ({"--grid": ["method="]}, "has no values"),
    ({"--grid": ["method=,"]}, "has no values"),
    ({"--grid": ["lr=0.01", "options.lr=0.1"]}, "given twice"),
    ({"--grid": ["objective_args={floor: 0.9}", "objective_args.floor=0.5"]}, "set the same option"),
    ({"--grid": ["lr=0.01,0.1"], "--options.lr": ["0.5"]}, "also given as the override --options.lr"),
    ({"--out": ["a_file"]}, "is a file, not a folder"),
    ({"--out": ["a_file/out"]}, "is a file, not a folder"),
])
def test_bad_values_are_one_line_errors_that_leave_nothing(tiny_zoo_dir, tmp_path, capsys, monkeypatch, change, message):
    config = write_config(tmp_path, tiny_zoo_dir)
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    args = {"--grid": ["granularity=task,layer"], "--out": [str(tmp_path / "out")], "--seeds": ["0"], **change}
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["ablate", "--config", str(config), "--no-progress", *[a for k, v in args.items() for a in (k, *v)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adamerge: error:") and len(err.splitlines()) == 1 and message in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_one_ablation_at_a_time_on_a_folder(tiny_zoo_dir, tmp_path, capsys):
    """A second `adamerge ablate` on a folder that one is running on is refused, not interleaved."""
    from adamerge.io.files import folder_lock

    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2})
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, "held"):
        assert main(["ablate", "--config", str(config), "--grid", "granularity=task", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another `adamerge ablate` is running on" in err
    assert list(out.iterdir()) == []
