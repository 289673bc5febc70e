"""Helpers shared by the end-to-end tests: a run config over the tiny test zoo."""
from __future__ import annotations

from pathlib import Path

import yaml

TASKS = ["task0", "task1", "task2"]


def write_config(folder: Path, zoo: Path, **changes) -> Path:
    """A config over the tiny zoo at ``zoo``; ``changes`` are dotted keys (``options.steps=5``)."""
    cfg = {
        "seed": 0,
        "model": {"source": "tiny_vit"},
        "base": str(zoo / "base.safetensors"),
        "experts": {t: str(zoo / "experts" / f"{t}.safetensors") for t in TASKS},
        "heads": {t: str(zoo / "heads" / f"{t}.safetensors") for t in TASKS},
        "data": {t: {"tensors": str(zoo / "data" / f"{t}.safetensors")} for t in TASKS},
        "method": "adamerging",
        "options": {"granularity": "layer", "steps": 40, "lr": 0.01, "batch_size": 16},
        "run_dir": str(folder / "run"),
        "checkpoint_every": 10,
    }
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def crash_then_resume(config: Path, cut_at: int, monkeypatch, solver: str | None = None) -> None:
    """``fit`` that crashes at global step ``cut_at`` (after its last checkpoint) of the stage run by
    ``solver`` (any stage when ``None``), then ``fit --resume``."""
    import pytest

    from adamerge.cli import main
    from adamerge.train.loop import MergeModule

    original = MergeModule.training_step

    def crash(self, batch, idx):
        if self.global_step == cut_at and solver in (None, self.solver.name):
            raise RuntimeError("simulated crash")
        return original(self, batch, idx)

    monkeypatch.setattr(MergeModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", "--config", str(config), "--no-progress"])
    monkeypatch.setattr(MergeModule, "training_step", original)
    run = Path(yaml.safe_load(config.read_text())["run_dir"])
    assert not (run / "results.json").exists()
    assert main(["eval", "--run", str(run)]) == 2  # an unfinished run is refused
    assert main(["fit", "--config", str(config), "--resume", "--no-progress"]) == 0


def assert_export_reproduces(run: Path, out: Path) -> None:
    """The exported ``model.safetensors`` loaded into a plain tiny ViT gives the functional
    merged model's outputs."""
    import torch

    from adamerge.workflows.export import load_run
    from adamerge.io.state_dicts import load_state_dict
    from adamerge.zoo.tiny import tiny_vit

    merged, parts, _ = load_run(run)
    model = tiny_vit()
    model.load_state_dict(load_state_dict(out / "model.safetensors"), strict=True)
    model.eval()
    x = parts["streams"][0].inputs(torch.arange(8))
    with torch.no_grad():
        assert torch.allclose(model(x), merged(x), atol=1e-6)


def assert_predict_matches_run(run: Path, out: Path, tmp: Path) -> None:
    """``adamerge predict`` on the export scores each task's stream exactly as the run did."""
    import csv
    import json

    from adamerge.cli import main

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    after = json.loads((run / "results.json").read_text())["after"]["per_task"]
    for task, spec in cfg["data"].items():
        path = tmp / f"predictions-{task}.csv"
        assert main(["predict", str(out), spec["tensors"], "--task", task, "--out", str(path), "--no-progress", "--force"]) == 0
        rows = list(csv.DictReader(path.open()))
        assert sum(r["prediction"] == r["label"] for r in rows) / len(rows) == after[task]
