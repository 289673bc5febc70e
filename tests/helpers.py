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
