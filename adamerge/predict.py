"""``adamerge predict``: serve any export (a merged checkpoint, a T3 package) on new inputs.

An export folder is untrusted input: ``adamerge.json`` is parsed as data and checked (its kind,
its tasks, a registered model source); a model source that imports code named in the file
(``python``) is refused unless the caller passes ``trust_code``. Weights are read with
safetensors only.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from adamerge.data import LinearHead, TaskStream, images_layout, stream_from_folder, stream_from_tensors
from adamerge.errors import InputError
from adamerge.progress import Progress

KINDS = ("merged", "t3")


def _read_meta(folder: Path) -> dict:
    path = folder / "adamerge.json"
    if not path.is_file():
        raise InputError(f"{folder} is not an adamerge export: adamerge.json is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object")
    kind = meta.get("kind", "merged")  # exports written before kinds existed are merged checkpoints
    if kind not in KINDS:
        raise InputError(f"{path}: unknown export kind {kind!r}; this adamerge serves {list(KINDS)}")
    tasks = meta.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise InputError(f"{path}: 'tasks' must be a non-empty list of task names")
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("source", "open_clip"), str):
        raise InputError(f"{path}: 'model' must be a mapping with a 'source' name")
    meta["kind"] = kind
    return meta


def read_heads(path: Path, tasks: list[str]) -> dict[str, LinearHead]:
    """The per-task heads of an export (``<task>.weight`` / ``<task>.bias``)."""
    from safetensors import safe_open

    from adamerge.io.state_dicts import load_state_dict

    state = load_state_dict(path)
    with safe_open(str(path), framework="pt") as f:
        normalize = json.loads((f.metadata() or {}).get("normalize", "{}"))
    heads = {}
    for t in tasks:
        sd = {k[len(t) + 1:]: v for k, v in state.items() if k.startswith(f"{t}.")}
        heads[t] = LinearHead.from_state_dict(sd, bool(normalize.get(t, False)), f"{path} head '{t}'")
    return heads


@dataclass
class Predictor:
    """Logits of an export for inputs of a known task."""

    kind: str
    tasks: list[str]
    logits: Callable[[Tensor, str], Tensor]
    transform: Callable | None  # the model's preprocessing (image folders), None for tensors


def load_export(folder: str | Path, task: str | None = None, trust_code: bool = False,
                task_masks: bool = True) -> Predictor:
    """Open an export folder for prediction (see the module docstring for what is trusted).
    A merged export with TALL task masks (``export --task-masks``) serves ``task``'s own
    reconstructed model unless ``task_masks`` is false."""
    from adamerge.task_masks import MASKS_FILE, load_task_state

    from adamerge.io.state_dicts import load_state_dict
    from adamerge.sources import build_model

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"export folder {folder} does not exist")
    meta = _read_meta(folder)
    if meta["model"].get("source") == "python" and not trust_code:
        raise InputError(f"{folder}/adamerge.json names a python model source ({meta['model'].get('target')!r}), which"
                         " imports code named in the file; pass --trust-code if you trust this export")
    if task is not None and task not in meta["tasks"]:
        raise InputError(f"unknown task '{task}'; this export has {meta['tasks']}")
    model, transform = build_model(meta["model"])
    heads = read_heads(folder / "heads.safetensors", meta["tasks"])
    if meta["kind"] == "t3":
        from adamerge.methods.t3 import T3Options
        from adamerge.solvers.base import parse_options
        from adamerge.task_vectors import TaskVectors
        from adamerge.test_time import TestTimeMerger, t3_merged_model

        vectors = load_state_dict(folder / "task_vectors.safetensors")
        tasks = meta.get("t3", {}).get("tasks", meta["tasks"])
        tv = TaskVectors(load_state_dict(folder / "base.safetensors"), vectors, tasks)
        bad = [k for k, v in vectors.items() if v.shape[0] != len(tasks)]
        if bad:
            raise InputError(f"{folder}/task_vectors.safetensors: '{bad[0]}' does not stack {len(tasks)} tasks")
        opts = parse_options(T3Options, meta.get("t3", {}).get("settings", {}), f"{folder}/adamerge.json t3 settings")
        merger = TestTimeMerger(t3_merged_model(model, tv), heads, opts)
        return Predictor("t3", meta["tasks"], merger.forward, transform)
    if task is not None and task_masks and (folder / MASKS_FILE).is_file():
        state = load_task_state(folder, task)  # θ0 + m_task ⊙ (θ_merged − θ0), the expert's buffers
        kind = "merged with task masks"
    else:
        state, kind = load_state_dict(folder / "model.safetensors"), "merged"
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{folder}/model.safetensors does not fit the model {meta['model']}: {str(err).splitlines()[0]}") from None
    model.eval()

    @torch.no_grad()
    def logits(x: Tensor, t: str) -> Tensor:
        return heads[t](model(images_layout(x)))

    return Predictor(kind, meta["tasks"], logits, transform)


def read_inputs(path: str | Path, task: str, transform: Callable | None) -> TaskStream:
    """A tensors file (``x``, optional ``y``) or an image folder (labels from class sub-folders)."""
    from adamerge.io.state_dicts import load_state_dict

    path = Path(path)
    if path.is_dir():
        if transform is None:
            raise InputError(f"{path} is an image folder, but the export's model takes tensors (give a tensors file)")
        return stream_from_folder(task, path, transform)
    if not path.is_file():
        raise InputError(f"input {path} does not exist")
    sd = load_state_dict(path)
    if "x" not in sd:
        raise InputError(f"{path}: a tensors file needs a tensor named 'x' (and optionally 'y'), found {sorted(sd)}")
    return stream_from_tensors(task, sd["x"], sd.get("y"), source=str(path))


@torch.no_grad()
def predict(export: str | Path, inputs: str | Path, task: str, out: str | Path, *, batch_size: int = 64,
            progress: bool = True, trust_code: bool = False, force: bool = False, task_masks: bool = True) -> dict:
    """Write ``index,prediction,confidence[,label]`` for every input to ``out`` (CSV, atomically);
    returns a summary (rows, accuracy when labelled, inputs per second)."""
    from adamerge.io.files import atomic_write_text

    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    predictor = load_export(export, task, trust_code, task_masks)
    stream = read_inputs(inputs, task, predictor.transform)
    labels = stream.labels()
    rows: list[tuple] = []
    start = time.perf_counter()
    with Progress(len(stream), f"predict {task}", enabled=progress, unit="inputs") as bar:
        for lo in range(0, len(stream), batch_size):
            idx = torch.arange(lo, min(lo + batch_size, len(stream)))
            probs = torch.softmax(predictor.logits(stream.inputs(idx), task).float(), dim=-1)
            conf, pred = probs.max(-1)
            for k, i in enumerate(idx.tolist()):
                rows.append((i, int(pred[k]), float(conf[k])) + (() if labels is None else (int(labels[i]),)))
            bar.update(len(idx))
    seconds = time.perf_counter() - start
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "prediction", "confidence"] + ([] if labels is None else ["label"]))
    writer.writerows((i, p, f"{c:.6f}", *rest) for i, p, c, *rest in rows)
    atomic_write_text(out, buf.getvalue())
    summary = {"rows": len(rows), "kind": predictor.kind, "inputs_per_second": len(rows) / max(seconds, 1e-9)}
    if labels is not None:
        summary["accuracy"] = sum(r[1] == r[3] for r in rows) / len(rows)
    return summary

