"""Reliability of ``adamerge export`` and ``adamerge predict`` (issue 21): no data loss (``--force``
replaces only a previous output of the same command), no silent wrong answer (non-finite weights,
edited metadata, model sources that read outside the export), one line instead of a traceback,
and no debris after a refusal."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adamerge.cli import main
from helpers import write_config


# ---------------------------------------------------------------------------------- helpers
def tree_sha256(root: Path) -> str:
    """sha256 over every file below ``root`` (relative path and bytes) and every folder name."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def one_error(capsys, *words: str) -> str:
    """The one ``adamerge: error:`` line on stderr (and nothing else), containing ``words``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adamerge: error: "), err
    assert all(w in err[0] for w in words), (words, err[0])
    return err[0]


def refused(capsys, argv: list[str], *words: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    return one_error(capsys, *words)


def copy_export(src: Path, dst: Path, meta_change=None) -> Path:
    shutil.copytree(src, dst)
    if meta_change is not None:
        meta = json.loads((dst / "adamerge.json").read_text())
        meta_change(meta)
        (dst / "adamerge.json").write_text(json.dumps(meta))
    return dst


def predict_argv(export: Path, inputs, out: Path, *extra: str, task: str = "task0") -> list[str]:
    return ["predict", str(export), str(inputs), "--task", task, "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def done(tiny_zoo_dir, tmp_path_factory):
    """A finished run (``runs/a``), a sibling run (``runs/b``) and the export of ``runs/a``."""
    root = tmp_path_factory.mktemp("export_reliability")
    # model.checkpoint: a file outside the export that the export must not need (tiny_vit ignores it)
    config = write_config(root / "cfg", tiny_zoo_dir, **{"options.steps": 2, "run_dir": str(root / "runs" / "a"),
                                                          "model.checkpoint": str(tiny_zoo_dir / "base.safetensors")})
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0
    shutil.copytree(root / "runs" / "a", root / "runs" / "b")
    assert main(["export", str(root / "runs" / "a"), str(root / "export")]) == 0
    return {"root": root, "run": root / "runs" / "a", "runs": root / "runs", "export": root / "export",
            "zoo": tiny_zoo_dir, "x": tiny_zoo_dir / "data" / "task0.safetensors"}


# ---------------------------------------------------------------------------------- 1. no data loss
def test_export_force_never_deletes_a_run_an_input_or_a_folder_containing_one(done, tmp_path, capsys, monkeypatch):
    run, runs, zoo = done["run"], done["runs"], done["zoo"]
    before = {p: tree_sha256(p) for p in (runs, zoo)}
    cases = [
        ([str(run), str(run), "--force"], ["is the run being exported"]),
        ([str(run), str(runs), "--force"], ["contains", "the run being exported"]),
        ([str(run), str(runs / "b"), "--force"], ["is a run folder"]),  # a sibling run
        ([str(run), str(zoo), "--force"], ["contains", "base checkpoint"]),
        ([str(run), str(zoo / "experts"), "--force"], ["contains", "the expert checkpoint of 'task0'"]),
        ([str(run), str(zoo / "data"), "--force"], ["contains", "data of 'task0'"]),
        ([str(run), str(zoo / "base.safetensors"), "--force"], ["not a folder"]),
        ([str(run), str(zoo / "heads" / "task1.safetensors"), "--force"], ["not a folder"]),
        ([str(run), str(run.parent.parent), "--force"], ["contains", "the run being exported"]),
        ([str(run), "/", "--force"], ["contains"]),
    ]
    for argv, words in cases:
        refused(capsys, ["export", *argv], *words)
    monkeypatch.chdir(tmp_path)  # the current folder, even when it is empty
    refused(capsys, ["export", str(run), ".", "--force"], "the current folder")
    assert {p: tree_sha256(p) for p in (runs, zoo)} == before
    assert [p.name for p in run.parent.iterdir() if p.name.startswith(".")] == []


def test_export_force_replaces_a_previous_export_and_nothing_else(done, tmp_path, capsys):
    run = done["run"]
    out = tmp_path / "out"
    assert main(["export", str(run), str(out)]) == 0
    first = (out / "adamerge.json").read_text(), load_file(str(out / "model.safetensors"))
    refused(capsys, ["export", str(run), str(out)], "pass --force")
    os.utime(out / "model.safetensors", (0, 0))
    assert main(["export", str(run), str(out), "--force"]) == 0  # its own previous output: replaced
    assert (out / "model.safetensors").stat().st_mtime > 0  # a new file
    again = load_file(str(out / "model.safetensors"))
    assert (out / "adamerge.json").read_text() == first[0] and all(torch.equal(again[k], v) for k, v in first[1].items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is gone, no temporary folder
    (out / "notes.txt").write_text("mine")  # a file of the user's: no longer only an export
    refused(capsys, ["export", str(run), str(out), "--force"], "not a previous export", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "adamerge.json").write_text(json.dumps({"kind": "merged", "adamerge_version": "0"}))
    (mine / "sub" / "data.bin").write_bytes(b"\x00" * 10)
    before = tree_sha256(mine)
    refused(capsys, ["export", str(run), str(mine), "--force"], "not a previous export", "sub")
    assert tree_sha256(mine) == before
    (mine / "adamerge.json").write_text(json.dumps({"some": "other tool"}))
    shutil.rmtree(mine / "sub")
    before = tree_sha256(mine)
    refused(capsys, ["export", str(run), str(mine), "--force"], "not written by adamerge export")
    assert tree_sha256(mine) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(run), str(empty)]) == 0  # an empty folder needs no --force
    assert (empty / "model.safetensors").is_file()


def test_predict_force_only_replaces_a_previous_predictions_csv(done, tmp_path, capsys):
    export, x = done["export"], done["x"]
    csv_path = tmp_path / "p.csv"
    assert main(predict_argv(export, x, csv_path)) == 0
    refused(capsys, predict_argv(export, x, csv_path), "pass --force")
    assert main(predict_argv(export, x, csv_path, "--force")) == 0
    before = {p: tree_sha256(p) for p in (done["zoo"], export)}
    other = tmp_path / "notes.csv"
    other.write_text("name,value\na,1\n")
    refused(capsys, predict_argv(export, x, other, "--force"), "not a predictions CSV")
    assert other.read_text() == "name,value\na,1\n"
    refused(capsys, predict_argv(export, x, x, "--force"), "is the input")
    refused(capsys, predict_argv(export, x, export / "model.safetensors", "--force"), "not a predictions CSV")
    refused(capsys, predict_argv(export, x, export, "--force"), "is a folder")
    refused(capsys, predict_argv(export, x, tmp_path, "--force"), "is a folder")
    assert {p: tree_sha256(p) for p in (done["zoo"], export)} == before


# ---------------------------------------------------------------------------------- 2. no silent wrong answer
def _poison(path: Path, value: float) -> str:
    sd = dict(load_file(str(path)))
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[1] = value
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return key


@pytest.mark.parametrize("file", ["model.safetensors", "heads.safetensors"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_predict_refuses_an_export_with_non_finite_weights(done, tmp_path, capsys, file, value):
    export = copy_export(done["export"], tmp_path / "export")
    key = _poison(export / file, value)
    out = tmp_path / "p.csv"
    refused(capsys, predict_argv(export, done["x"], out), file, f"tensor '{key}'", "non-finite")
    assert not out.exists()


def test_non_finite_coefficients_are_refused_by_eval_and_export(done, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done["run"], run)
    path = run / "coefficients.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, coef = f.metadata(), f.get_tensor("coefficients")
    bad = coef.clone()
    bad[0, 0] = float("nan")
    save_file({"coefficients": bad}, str(path), meta)
    refused(capsys, ["eval", "--run", str(run)], "coefficients.safetensors", "non-finite")
    refused(capsys, ["export", str(run), str(tmp_path / "out")], "coefficients.safetensors", "non-finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_non_finite_merged_weights_are_not_exported(done, tmp_path, capsys, monkeypatch):
    from adamerge.core.merged import MergedModel

    original = MergedModel.merged_state_dict

    def overflowing(self):  # finite coefficients whose merge overflows
        state = dict(original(self))
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key] * float("inf")
        return state

    monkeypatch.setattr(MergedModel, "merged_state_dict", overflowing)
    refused(capsys, ["export", str(done["run"]), str(tmp_path / "new" / "out")], "the merged model", "non-finite")
    assert list(tmp_path.iterdir()) == []


def _set(path: str, value):
    def change(meta):
        node = meta
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return change


EDITS = {
    "tasks not a list": (_set("tasks", "task0"), ["'tasks'"]),
    "a task name that is a path": (_set("tasks", ["task0", "../task1", "task2"]), ["'tasks'", "../task1"]),
    "a task named twice": (_set("tasks", ["task0", "task0", "task2"]), ["task0", "twice"]),
    "a task without a head": (_set("tasks", ["task0", "task1", "task2", "task3"]), ["task3.weight", "missing"]),
    "a head without a task": (_set("tasks", ["task0", "task1"]), ["'task2.", "not the weight or bias"]),
    "no tasks": (lambda m: m.pop("tasks"), ["'tasks'"]),
    "model not a mapping": (_set("model", "tiny_vit"), ["'model'"]),
    "model source not a name": (_set("model", {"source": 3}), ["'model.source'"]),
    "an unknown model source": (_set("model", {"source": "tiny_vitt"}), ["tiny_vitt", "did you mean"]),
    "model seed not an int": (_set("model", {"source": "tiny_vit", "seed": "zero"}), ["'model.seed'", "int"]),
    "open_clip without a name": (_set("model", {"source": "open_clip"}), ["'model.name'", "missing"]),
    "an unknown kind": (_set("kind", "pickle"), ["kind", "pickle"]),
    "a NaN metric": (_set("metrics.mean", float("nan")), ["'metrics.mean'", "finite"]),
    "an infinite coefficient": (lambda m: m["coefficients"][1].__setitem__(0, float("inf")), ["'coefficients[1][0]'", "finite"]),
    "coefficients not numbers": (_set("coefficients", [["a"]]), ["'coefficients'"]),
    "a bad input shape": (_set("input_shape", [3, -16, 16]), ["'input_shape'"]),
    "a bad sha256": (_set("inputs.base.sha256", "not hex"), ["'inputs.base'"]),
    "metrics per task not numbers": (_set("metrics.per_task", {"task0": "high"}), ["'metrics.per_task'"]),
    "version not a string": (_set("adamerge_version", 1), ["'adamerge_version'"]),
}


def test_edited_metadata_is_refused_naming_the_field(done, tmp_path, capsys):
    for i, (name, (change, words)) in enumerate(EDITS.items()):
        export = copy_export(done["export"], tmp_path / f"e{i}", change)
        refused(capsys, predict_argv(export, done["x"], tmp_path / "p.csv"), *words)
    assert not (tmp_path / "p.csv").exists()
    export = tmp_path / "raw"
    shutil.copytree(done["export"], export)
    for text, words in [("[1, 2]", ["JSON object"]), ("[" * 100000 + "]" * 100000, ["not valid JSON"]),
                        ('{"tasks": ["task0"], "model": {"source": "tiny_vit"}, "x": 1' + "0" * 5000 + "}", ["not valid JSON"]),
                        (b"\xff\xfe{}", ["not valid JSON"])]:
        if isinstance(text, bytes):
            (export / "adamerge.json").write_bytes(text)
        else:
            (export / "adamerge.json").write_text(text)
        refused(capsys, predict_argv(export, done["x"], tmp_path / "p.csv"), *words)


def test_a_model_source_reading_outside_the_export_needs_trust_code(done, tmp_path, capsys):
    outside = str(done["zoo"] / "base.safetensors")
    specs = {
        "absolute checkpoint": {"source": "open_clip", "name": "ViT-B-32", "checkpoint": outside},
        "a '..' checkpoint": {"source": "open_clip", "name": "ViT-B-32", "checkpoint": "../base.safetensors"},
        "a pretrained tag": {"source": "open_clip", "name": "ViT-B-32", "checkpoint": "openai"},
        "a hub model": {"source": "open_clip", "name": "hf-hub:laion/CLIP-ViT-B-32"},
        "a local dir": {"source": "open_clip", "name": "local-dir:/tmp/model"},
        "a timm hub name": {"source": "timm", "name": "hf-hub:timm/resnet18.a1_in1k"},
        "pretrained weights": {"source": "tiny_vit", "pretrained": "laion2b"},
        "python code": {"source": "python", "target": "os:getcwd"},
        "a URL anywhere": {"source": "tiny_vit", "extra": {"url": "https://example.com/w.bin"}},
    }
    for i, (name, spec) in enumerate(specs.items()):
        export = copy_export(done["export"], tmp_path / f"e{i}", _set("model", spec))
        line = refused(capsys, predict_argv(export, done["x"], tmp_path / "p.csv"), "--trust-code")
        assert name and "Traceback" not in line
    assert not (tmp_path / "p.csv").exists()
    # tiny_vit reads no checkpoint: trusted, the same export predicts; a file inside the export needs no flag
    export = copy_export(done["export"], tmp_path / "trusted", _set("model", {"source": "tiny_vit", "checkpoint": outside}))
    assert main(predict_argv(export, done["x"], tmp_path / "a.csv", "--trust-code")) == 0
    export = copy_export(done["export"], tmp_path / "inside", _set("model", {"source": "tiny_vit", "checkpoint": "model.safetensors"}))
    assert main(predict_argv(export, done["x"], tmp_path / "b.csv")) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_an_export_serves_without_reading_outside_its_folder(done):
    meta = json.loads((done["export"] / "adamerge.json").read_text())
    assert meta["input_shape"] == [3, 16, 16] and "checkpoint" not in meta["model"]
    assert meta["inputs"]["checkpoint"]["sha256"] == meta["inputs"]["base"]["sha256"]  # kept as provenance
    from adamerge.workflows.predict import model_source_risk

    assert model_source_risk(meta["model"], done["export"])[1] is None


# ---------------------------------------------------------------------------------- 3. one line, not a traceback
def _inputs(x0: torch.Tensor) -> dict:
    """name -> (tensors, words with the export's input_shape, words without it (an older export))."""
    fit = ["do not fit the export's model"]  # without input_shape, the model's own error, on one line
    return {
        "wrong image size": ({"x": torch.randn(4, 3, 20, 20)}, ["(3, 20, 20)"], fit),
        "integer pixels": ({"x": (x0[:4] * 50).to(torch.uint8)}, ["uint8"], ["uint8"]),
        "integer dtype": ({"x": torch.zeros(4, 3, 16, 16, dtype=torch.int64)}, ["int64"], ["int64"]),
        "channels last": ({"x": x0[:4].permute(0, 2, 3, 1).contiguous()}, ["(16, 16, 3)", "channels last"], fit),
        "2-D": ({"x": torch.randn(4, 768)}, ["(768,)"], fit),
        "1-D": ({"x": torch.randn(4)}, ["(4,)"], ["(4,)"]),
        "labels 2-D": ({"x": x0[:4].contiguous(), "y": torch.zeros(4, 2, dtype=torch.long)}, ["'y'"], ["'y'"]),
        "labels not integers": ({"x": x0[:4].contiguous(), "y": torch.tensor([0.5, 1.0, 0.0, 1.0])}, ["'y'"], ["'y'"]),
        "empty": ({"x": torch.zeros(0, 3, 16, 16)}, ["empty"], ["empty"]),
    }


@pytest.mark.parametrize("recorded_shape", [True, False])
def test_predict_on_inputs_of_the_wrong_size_dtype_or_layout_is_one_line(done, tmp_path, capsys, recorded_shape):
    export = done["export"] if recorded_shape else copy_export(done["export"], tmp_path / "old", lambda m: m.pop("input_shape"))
    x0 = load_file(str(done["x"]))["x"]
    for i, (name, (tensors, with_shape, without)) in enumerate(_inputs(x0).items()):
        path = tmp_path / f"in{i}.safetensors"
        save_file(tensors, str(path))
        capsys.readouterr()
        assert main(predict_argv(export, path, tmp_path / "p.csv")) == 2, name
        one_error(capsys, *(with_shape if recorded_shape else without))
    assert not (tmp_path / "p.csv").exists()
    half = tmp_path / "half.safetensors"  # another float dtype is converted, not refused
    save_file({"x": x0[:8].half().contiguous()}, str(half))
    assert main(predict_argv(export, half, tmp_path / "h.csv")) == 0


def test_predict_on_edited_heads_is_one_line(done, tmp_path, capsys):
    cases = {
        "features": lambda sd: sd.update({"task0.weight": sd["task0.weight"][:, :5].contiguous()}),
        "bias": lambda sd: sd.update({"task0.bias": sd["task0.bias"][:1].contiguous()}),
        "matrix": lambda sd: sd.update({"task0.weight": sd["task0.weight"].reshape(-1).contiguous()}),
        "'task0.weight' is missing": lambda sd: sd.pop("task0.weight"),
    }
    for i, (word, change) in enumerate(cases.items()):
        export = copy_export(done["export"], tmp_path / f"e{i}")
        sd = dict(load_file(str(export / "heads.safetensors")))
        change(sd)
        save_file(sd, str(export / "heads.safetensors"), {"normalize": "{}"})
        refused(capsys, predict_argv(export, done["x"], tmp_path / "p.csv"), word)
    export = copy_export(done["export"], tmp_path / "norm")
    sd = load_file(str(export / "heads.safetensors"))
    save_file(sd, str(export / "heads.safetensors"), {"normalize": "{not json"})
    refused(capsys, predict_argv(export, done["x"], tmp_path / "p.csv"), "normalize")
    export = copy_export(done["export"], tmp_path / "weights")
    sd = dict(load_file(str(export / "model.safetensors")))
    key = next(iter(sd))
    sd[key] = sd[key].to(torch.int32)
    save_file(sd, str(export / "model.safetensors"))
    refused(capsys, predict_argv(export, done["x"], tmp_path / "p.csv"), f"'{key}'", "dtype")
    assert not (tmp_path / "p.csv").exists()


def _read_only_folder(path: Path) -> Path:
    path.mkdir()
    os.chmod(path, 0o500)
    if os.access(path, os.W_OK):
        os.chmod(path, 0o700)
        pytest.skip("chmod does not stop this user from writing (root)")
    return path


def test_a_destination_whose_parent_is_a_file_is_one_line(done, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(capsys, ["export", str(done["run"]), str(afile / "out")], "is a file, not a folder")
    refused(capsys, ["export", str(done["run"]), str(afile / "deeper" / "out")], "is a file, not a folder")
    refused(capsys, predict_argv(done["export"], done["x"], afile / "p.csv"), "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and afile.read_text() == "x"


def test_a_read_only_destination_is_one_line(done, tmp_path, capsys):
    locked = _read_only_folder(tmp_path / "locked")
    try:
        refused(capsys, ["export", str(done["run"]), str(locked / "out")], str(locked))
        refused(capsys, ["export", str(done["run"]), str(locked / "a" / "out")], str(locked))
        refused(capsys, predict_argv(done["export"], done["x"], locked / "p.csv"), "not writable")
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(locked, 0o700)


def test_a_destination_the_os_refuses_is_one_line(done, tmp_path, capsys, monkeypatch):
    """What a read-only folder does, simulated (chmod does not stop root)."""
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "new"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    refused(capsys, ["export", str(done["run"]), str(tmp_path / "new" / "deep" / "out")], "Permission denied")
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone again
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    refused(capsys, predict_argv(done["export"], done["x"], tmp_path / "p.csv"), "not writable")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- 4. no debris
def test_a_refused_export_leaves_no_folders_behind(done, tmp_path, capsys, monkeypatch):
    import adamerge.io.export_files as export_files
    from adamerge.errors import InputError

    out = tmp_path / "new" / "deep" / "out"

    def refuse(*args, **kwargs):
        raise InputError("refused on purpose")

    monkeypatch.setattr(export_files, "write_heads", refuse)  # fails after model.safetensors was written
    refused(capsys, ["export", str(done["run"]), str(out)], "refused on purpose")
    assert list(tmp_path.iterdir()) == []

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_files, "write_heads", disk_full)
    refused(capsys, ["export", str(done["run"]), str(out)], "No space left on device")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    previous = tmp_path / "prev"
    assert main(["export", str(done["run"]), str(previous)]) == 0
    before = tree_sha256(previous)
    monkeypatch.setattr(export_files, "write_heads", refuse)
    refused(capsys, ["export", str(done["run"]), str(previous), "--force"], "refused on purpose")
    assert tree_sha256(previous) == before  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]


def test_a_refused_predict_leaves_no_csv_and_no_folders(done, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p" / "q" / "r.csv"
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.randn(4, 3, 20, 20)}, str(bad))
    refused(capsys, predict_argv(done["export"], bad, out), "(3, 20, 20)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
    import adamerge.io.files as files

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "atomic_write_text", disk_full)
    refused(capsys, predict_argv(done["export"], done["x"], out), "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


# ---------------------------------------------------------------------------------- more of each class
def test_more_destinations_export_refuses(done, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(done["run"], run)
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["task0"] = {"folder": str(images)}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    refused(capsys, ["export", str(run), str(images / "export")], "inside the data of 'task0'")
    assert [p.name for p in images.iterdir()] == ["cat"]  # no new class folder
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    refused(capsys, ["export", str(done["run"]), str(link)], "symbolic link")
    for bad in ("inf", "nan"):
        refused(capsys, ["export", str(done["run"]), str(tmp_path / "m"), "--task-masks", "--mask-lambda", bad], "--mask-lambda")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "link", "run"]


def test_non_finite_scores_are_refused_not_written(done, tmp_path, capsys):
    export = copy_export(done["export"], tmp_path / "export")
    sd = load_file(str(export / "model.safetensors"))
    sd["conv1.weight"] = torch.full_like(sd["conv1.weight"], 3e38)  # finite weights whose forward overflows
    save_file(sd, str(export / "model.safetensors"))
    refused(capsys, predict_argv(export, done["x"], tmp_path / "p.csv"), "non-finite scores")
    assert not (tmp_path / "p.csv").exists()


def _t3_package(done, folder: Path) -> Path:
    """A T3 package written by hand from the tiny zoo (base, stacked task vectors, heads)."""
    zoo = done["zoo"]
    folder.mkdir()
    base = load_file(str(zoo / "base.safetensors"))
    tasks = ["task0", "task1", "task2"]
    experts = [load_file(str(zoo / "experts" / f"{t}.safetensors")) for t in tasks]
    save_file(base, str(folder / "base.safetensors"))
    save_file({k: torch.stack([e[k] - v for e in experts]).contiguous() for k, v in base.items() if v.is_floating_point()},
              str(folder / "task_vectors.safetensors"))
    shutil.copy(done["export"] / "heads.safetensors", folder / "heads.safetensors")
    (folder / "adamerge.json").write_text(json.dumps({"kind": "t3", "tasks": tasks, "model": {"source": "tiny_vit"},
                                                      "input_shape": [3, 16, 16], "t3": {"settings": {}, "tasks": tasks}}))
    return folder


def test_a_t3_package_with_non_finite_or_mismatched_tensors_is_refused(done, tmp_path, capsys):
    good = _t3_package(done, tmp_path / "good")
    assert main(predict_argv(good, done["x"], tmp_path / "ok.csv")) == 0
    bad = copy_export(good, tmp_path / "nan")
    key = _poison(bad / "task_vectors.safetensors", float("nan"))
    refused(capsys, predict_argv(bad, done["x"], tmp_path / "p.csv"), "task_vectors.safetensors", f"'{key}'", "non-finite")
    two = copy_export(good, tmp_path / "two", _set("t3", {"settings": {}, "tasks": ["task0", "task1"]}))
    refused(capsys, predict_argv(two, done["x"], tmp_path / "p.csv"), "does not stack 2 task vectors")
    odd = copy_export(good, tmp_path / "odd", _set("t3", {"settings": {"gamma": "steep"}, "tasks": ["task0", "task1", "task2"]}))
    refused(capsys, predict_argv(odd, done["x"], tmp_path / "p.csv"), "gamma")
    assert not (tmp_path / "p.csv").exists()


def test_unreadable_task_masks_are_one_line(done, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(done["run"]), str(out), "--task-masks"]) == 0
    assert main(predict_argv(out, done["x"], tmp_path / "ok.csv")) == 0
    sd = load_file(str(out / "task_masks.safetensors"))
    save_file(sd, str(out / "task_masks.safetensors"), {"format": "adamerge-task-masks-v1"})  # no 'tasks'
    refused(capsys, predict_argv(out, done["x"], tmp_path / "p.csv"), "task_masks.safetensors")
    assert not (tmp_path / "p.csv").exists()
