"""``adamerge predict``: serve any export (a merged checkpoint, a T3 package) on new inputs.

An export folder is untrusted input. ``adamerge.json`` is parsed as data and checked against the
schema its writer follows (:func:`adamerge.io.export_files.check_export_metadata`: kind, task
names that are safe file names, the model section's fields and types, finite numbers); each
problem is one line naming the field. Weights are read with safetensors only, and every weight
tensor (model, heads, T3 base and task vectors, task-mask buffers) must be finite: a NaN or inf is
refused at load, naming the file and the tensor. The heads must be exactly the metadata's tasks,
each a ``[classes, features]`` weight and a ``[classes]`` bias.

A model section that reads anything outside the export folder is refused unless the caller passes
``trust_code`` (``--trust-code``): a ``python`` source (it imports code named in the file), a
``checkpoint``/``pretrained`` that is not a file inside the export (an absolute path, a ``..``
path, a pretrained tag or hub name: a file elsewhere or a download), and any value naming a hub,
a URL or a local folder (``hf-hub:``, ``local-dir:``, ``https://`` ...) or an absolute path.

Inputs: a tensors file's ``x`` must be float ``[N, ...]`` samples of the shape the export records
(``input_shape``: the run's data), ``y`` integer class labels ``[N]``; non-finite model outputs are
refused. ``--out`` is a file: never a folder, never the input or the export; with ``force`` it
replaces only an earlier predictions CSV (first line ``index,prediction,confidence[,label]``). The
CSV is written atomically at the end, so a refused or failed predict leaves no partial file and
removes the parent folders it created.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from adamerge.train.data import LinearHead, TaskStream, images_layout, stream_from_folder, stream_from_tensors
from adamerge.errors import InputError
from adamerge.io.export_files import EXPORT_KINDS, check_export_metadata
from adamerge.io.files import make_folders, os_message, remove_folders
from adamerge.progress import Progress

KINDS = EXPORT_KINDS
CSV_HEADERS = ("index,prediction,confidence", "index,prediction,confidence,label")
_META_MAX_BYTES = 64 << 20
_REMOTE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "http://", "https://", "s3://", "gs://", "ftp://", "file:")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _read_meta(folder: Path) -> dict:
    path = folder / "adamerge.json"
    if not path.is_file():
        raise InputError(f"{folder} is not an adamerge export: adamerge.json is missing")
    try:
        size = path.stat().st_size
        data = path.read_bytes() if size <= _META_MAX_BYTES else None
    except OSError as err:
        raise InputError(f"cannot read {path}: {os_message(err)}") from None
    if data is None:
        raise InputError(f"{path}: {size} bytes is too large for export metadata")
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise InputError(f"{path}: not valid JSON ({_one_line(err)})") from None
    except RecursionError:
        raise InputError(f"{path}: not valid JSON (nested too deeply)") from None
    return check_export_metadata(meta, str(path))


def _file_inside(folder: Path, value) -> Path | None:
    """``value`` as a file inside the export folder (a relative path that stays inside), else None."""
    if not isinstance(value, str) or not value or value.startswith(_REMOTE_PREFIXES):
        return None
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts or value.startswith("~"):
        return None
    root = folder.resolve()
    path = (root / rel).resolve()
    return path if root in path.parents and path.is_file() else None


def _strings(value, path: str = "model"):
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def model_source_risk(spec: dict, folder: Path) -> tuple[dict, str | None]:
    """(the model section to build, with ``checkpoint``/``pretrained`` files inside the export made
    absolute; why building it reads code or data from outside the export folder, or ``None``)."""
    spec = dict(spec)
    if spec.get("source") == "python":
        return spec, f"names a python model source ({spec.get('target')!r}), which imports code named in the file"
    for key in ("checkpoint", "pretrained"):
        value = spec.get(key)
        if value is None or value is False:
            continue
        inside = _file_inside(folder, value)
        if inside is None:
            return spec, (f"gives model.{key} {value!r}, which is not a file inside the export: the model would read"
                          " weights from elsewhere on this machine or download them")
        spec[key] = str(inside)
    for where, value in _strings({k: v for k, v in spec.items() if k not in ("checkpoint", "pretrained")}):
        if value.lower().startswith(_REMOTE_PREFIXES):
            return spec, f"gives {where} {value!r}, which reads from a hub, a URL or a folder outside the export"
        if Path(value).is_absolute() or ".." in Path(value).parts or value.startswith("~"):
            return spec, f"gives {where} {value!r}, a path outside the export folder"
    return spec, None


def read_heads(path: Path, tasks: list[str], *, exact: bool = False) -> dict[str, LinearHead]:
    """The per-task heads of an export (``<task>.weight`` / ``<task>.bias``), checked: a float
    ``[classes, features]`` weight, a ``[classes]`` bias, finite values. With ``exact`` the file
    must hold the heads of ``tasks`` and nothing else."""
    from safetensors import safe_open

    from adamerge.io.state_dicts import load_state_dict, require_finite

    state = load_state_dict(path)
    require_finite(state, str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            normalize = json.loads((f.metadata() or {}).get("normalize", "{}"))
    except (ValueError, RecursionError):
        raise InputError(f"{path}: its 'normalize' metadata is not valid JSON") from None
    if not isinstance(normalize, dict) or not all(isinstance(v, bool) for v in normalize.values()):
        raise InputError(f"{path}: its 'normalize' metadata must map task names to true/false")
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        task, _, part = key.rpartition(".")
        if task in tasks and part in ("weight", "bias"):
            grouped.setdefault(task, {})[part] = value
        elif exact:
            raise InputError(f"{path}: tensor '{key}' is not the weight or bias of a head of the export's tasks {tasks}")
    heads = {}
    for t in tasks:
        sd = grouped.get(t, {})
        where = f"{path} head '{t}'"
        if "weight" not in sd:
            raise InputError(f"{where}: '{t}.weight' is missing (the metadata's tasks and the heads disagree)")
        w, b = sd["weight"], sd.get("bias")
        if w.dim() != 2 or not w.is_floating_point() or w.shape[0] < 1:
            raise InputError(f"{where}: the weight must be a float [classes, features] matrix, got {w.dtype} {tuple(w.shape)}")
        if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0] or not b.is_floating_point()):
            raise InputError(f"{where}: the bias must be a float vector of {w.shape[0]} classes, got {b.dtype} {tuple(b.shape)}")
        heads[t] = LinearHead(w, b, normalize.get(t, False))
    return heads


@dataclass
class Predictor:
    """Logits of an export for inputs of a known task."""

    kind: str
    tasks: list[str]
    logits: Callable[[Tensor, str], Tensor]
    transform: Callable | None  # the model's preprocessing (image folders), None for tensors
    input_shape: tuple[int, ...] | None = None  # one sample's shape (the run's data), when recorded


def _fit_problem(expected: dict[str, Tensor], got: dict[str, Tensor]) -> str | None:
    """The first missing, unexpected, wrongly shaped or wrongly typed key of ``got``, as words."""
    for key, ref in expected.items():
        if key not in got:
            return f"missing key '{key}'"
        if tuple(got[key].shape) != tuple(ref.shape):
            return f"'{key}' has shape {tuple(got[key].shape)}, the model expects {tuple(ref.shape)}"
        if got[key].is_floating_point() != ref.is_floating_point():
            return f"'{key}' has dtype {got[key].dtype}, the model expects {ref.dtype}"
    extra = [k for k in got if k not in expected]
    return f"unexpected key '{extra[0]}'" if extra else None


def _build(spec: dict, folder: Path):
    from adamerge.sources import build_model

    try:
        return build_model(spec)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - the metadata named a model its source cannot build
        raise InputError(f"{folder}/adamerge.json: cannot build the model {spec}: {_one_line(err)}") from None


def load_export(folder: str | Path, task: str | None = None, trust_code: bool = False,
                task_masks: bool = True) -> Predictor:
    """Open an export folder for prediction (see the module docstring for what is trusted and
    checked). A merged export with TALL task masks (``export --task-masks``) serves ``task``'s own
    reconstructed model unless ``task_masks`` is false."""
    from adamerge.io.task_masks import MASKS_FILE, load_task_state

    from adamerge.io.state_dicts import load_state_dict, require_finite

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"export folder {folder} does not exist")
    meta = _read_meta(folder)
    spec, risk = model_source_risk(meta["model"], folder)
    if risk and not trust_code:
        raise InputError(f"{folder}/adamerge.json {risk}; pass --trust-code if you trust this export")
    if task is not None and task not in meta["tasks"]:
        raise InputError(f"unknown task '{task}'; this export has {meta['tasks']}")
    model, transform = _build(spec, folder)
    heads = read_heads(folder / "heads.safetensors", meta["tasks"], exact=True)
    expected = model.state_dict()
    dtype = next((v.dtype for v in expected.values() if v.is_floating_point()), torch.float32)
    shape = tuple(meta["input_shape"]) if meta.get("input_shape") else None

    def cast(x: Tensor) -> Tensor:
        return x.to(dtype) if x.is_floating_point() else x

    if meta["kind"] == "t3":
        from adamerge.methods.t3 import T3Options
        from adamerge.solvers.base import parse_options
        from adamerge.core.task_vectors import TaskVectors
        from adamerge.core.test_time import TestTimeMerger, t3_merged_model

        base_path, vectors_path = folder / "base.safetensors", folder / "task_vectors.safetensors"
        base, vectors = load_state_dict(base_path), load_state_dict(vectors_path)
        require_finite(base, str(base_path))
        require_finite(vectors, str(vectors_path))
        tasks = meta.get("t3", {}).get("tasks", meta["tasks"])
        problem = _fit_problem(expected, base)
        if problem:
            raise InputError(f"{base_path} does not fit the model {meta['model']}: {problem}")
        for k, v in vectors.items():
            if k not in base or tuple(v.shape) != (len(tasks), *base[k].shape) or not v.is_floating_point():
                raise InputError(f"{vectors_path}: '{k}' does not stack {len(tasks)} task vectors of the base's shape")
        tv = TaskVectors(base, vectors, tasks)
        opts = parse_options(T3Options, meta.get("t3", {}).get("settings", {}), f"{folder}/adamerge.json t3 settings")
        try:
            merger = TestTimeMerger(t3_merged_model(model, tv), heads, opts)
        except InputError:
            raise
        except (RuntimeError, KeyError, ValueError) as err:
            raise InputError(f"{folder}: the T3 package does not fit the model: {_one_line(err)}") from None
        return Predictor("t3", meta["tasks"], lambda x, t: merger.forward(cast(x), t), transform, shape)
    model_path = folder / "model.safetensors"
    state = load_state_dict(model_path)
    require_finite(state, str(model_path))
    kind = "merged"
    if task is not None and task_masks and (folder / MASKS_FILE).is_file():
        del state
        try:
            state = load_task_state(folder, task)  # θ0 + m_task ⊙ (θ_merged − θ0), the expert's buffers
        except InputError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise InputError(f"{folder}/{MASKS_FILE}: not readable task masks ({_one_line(err)})") from None
        require_finite(state, f"{folder}/{MASKS_FILE} (task '{task}')")
        kind = "merged with task masks"
    problem = _fit_problem(expected, state)
    if problem:
        raise InputError(f"{model_path} does not fit the model {meta['model']}: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{model_path} does not fit the model {meta['model']}: {str(err).splitlines()[0]}") from None
    model.eval()

    @torch.no_grad()
    def logits(x: Tensor, t: str) -> Tensor:
        features = model(images_layout(cast(x), model))
        width = heads[t].weight.shape[1]
        if features.dim() != 2 or features.shape[-1] != width:
            raise InputError(f"the head of '{t}' in {folder}/heads.safetensors takes {width} features, the model gives"
                             f" {tuple(features.shape[1:])}: the heads do not belong to this model")
        return heads[t](features)

    return Predictor(kind, meta["tasks"], logits, transform, shape)


def read_inputs(path: str | Path, task: str, transform: Callable | None,
                input_shape: tuple[int, ...] | None = None) -> TaskStream:
    """A tensors file (``x``, optional ``y``) or an image folder (labels from class sub-folders).
    A tensors file's ``x`` must be float samples ``[N, ...]`` (of ``input_shape`` when given) and
    ``y`` integer class labels ``[N]``."""
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
    x, y = sd["x"], sd.get("y")
    if not x.is_floating_point():
        raise InputError(f"{path}: 'x' has dtype {x.dtype}; give float inputs as the model's preprocessing makes"
                         " them (raw pixels? convert and normalise them first)")
    if x.dim() < 2:
        raise InputError(f"{path}: 'x' has shape {tuple(x.shape)}; expected one sample per row, [N, ...]"
                         + (f" with samples of shape {input_shape}" if input_shape else ""))
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        hint = ""
        if x.dim() == 4 and len(input_shape) == 3 and tuple(x.shape[1:]) == (*input_shape[1:], input_shape[0]):
            hint = " (channels last? give [N, C, H, W])"
        raise InputError(f"{path}: 'x' holds samples of shape {tuple(x.shape[1:])}; this export's model takes"
                         f" {tuple(input_shape)}{hint}")
    if y is not None:
        if y.dim() != 1:
            raise InputError(f"{path}: 'y' has shape {tuple(y.shape)}; labels are one class index per input, [N]")
        if y.is_floating_point() and not bool(torch.isfinite(y).all() and (y == y.round()).all()):
            raise InputError(f"{path}: 'y' holds values that are not class indices (integers)")
        if y.numel() and int(y.min()) < 0:
            raise InputError(f"{path}: 'y' holds a negative class index ({int(y.min())})")
    return stream_from_tensors(task, x, y, source=str(path))


def _is_predictions_csv(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            first = fh.read(256).split(b"\n", 1)[0].rstrip(b"\r")
    except OSError:
        return False
    return first.decode("utf-8", "replace") in CSV_HEADERS


def check_out(out: Path, force: bool, inputs: Path, export: Path) -> None:
    """Refuse an ``--out`` that predict must not write (see the module docstring)."""
    if out.is_symlink():
        raise InputError(f"--out {out} is a symbolic link; give the file's real path or a new name")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; --out names the CSV file to write")
    target = out.resolve()
    for what, path in (("the input", inputs), ("the export", export)):
        if target == path.resolve():
            raise InputError(f"--out {out} is {what}; give another file name")
    if out.exists():
        if not force:
            raise InputError(f"{out} exists; pass --force to replace it (a previous predictions CSV only)")
        if not _is_predictions_csv(out):
            raise InputError(f"{out} is not a predictions CSV (its first line is not {CSV_HEADERS[0]}[,label]);"
                             " --force only replaces the output of an earlier predict")
    p = target.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise InputError(f"cannot write {out}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {out}: the folder {p} is not writable")


@torch.no_grad()
def predict(export: str | Path, inputs: str | Path, task: str, out: str | Path, *, batch_size: int = 64,
            progress: bool = True, trust_code: bool = False, force: bool = False, task_masks: bool = True) -> dict:
    """Write ``index,prediction,confidence[,label]`` for every input to ``out`` (CSV, atomically);
    returns a summary (rows, accuracy when labelled, inputs per second)."""
    from adamerge.io.files import atomic_write_text

    out = Path(out)
    check_out(out, force, Path(inputs), Path(export))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    predictor = load_export(export, task, trust_code, task_masks)
    stream = read_inputs(inputs, task, predictor.transform, predictor.input_shape)
    labels = stream.labels()
    rows: list[tuple] = []
    start = time.perf_counter()
    with Progress(len(stream), f"predict {task}", enabled=progress, unit="inputs") as bar:
        for lo in range(0, len(stream), batch_size):
            idx = torch.arange(lo, min(lo + batch_size, len(stream)))
            x = stream.inputs(idx)
            try:
                scores = predictor.logits(x, task)
            except InputError:
                raise
            except (RuntimeError, ValueError, IndexError) as err:
                raise InputError(f"inputs from {inputs} (a batch of shape {tuple(x.shape)}, {x.dtype}) do not fit the"
                                 f" export's model: {_one_line(err)}") from None
            if scores.dim() != 2 or not bool(torch.isfinite(scores).all()):
                raise InputError(f"the export's model gave non-finite scores for inputs {lo}..{lo + len(idx) - 1}"
                                 f" of {inputs}; no predictions written")
            probs = torch.softmax(scores.float(), dim=-1)
            conf, pred = probs.max(-1)
            for k, i in enumerate(idx.tolist()):
                rows.append((i, int(pred[k]), float(conf[k])) + (() if labels is None else (int(labels[i]),)))
            bar.update(len(idx))
    seconds = time.perf_counter() - start
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "prediction", "confidence"] + ([] if labels is None else ["label"]))
    writer.writerows((i, p, f"{c:.6f}", *rest) for i, p, c, *rest in rows)
    target = out.resolve()
    created = make_folders(target.parent)
    try:
        atomic_write_text(target, buf.getvalue())
    except OSError as err:
        remove_folders(created)
        raise InputError(f"could not write {out}: {os_message(err)}") from None
    except BaseException:
        remove_folders(created)
        raise
    summary = {"rows": len(rows), "kind": predictor.kind, "inputs_per_second": len(rows) / max(seconds, 1e-9)}
    if labels is not None and rows:
        summary["accuracy"] = sum(r[1] == r[3] for r in rows) / len(rows)
    return summary
