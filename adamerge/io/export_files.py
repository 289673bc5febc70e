"""The files of an export folder, shared by every method's export: ``heads.safetensors``, the
common part of ``adamerge.json``, a merged checkpoint (``model.safetensors``) and the model card;
and the schema ``adamerge.json`` is checked against when it is read back (:func:`check_export_metadata`).

They sit below the methods (T3 and FW-Merging write their own packages with them), so that
:mod:`adamerge.workflows.export` can dispatch to the methods without an import circle.

Nothing non-finite is written: the heads and the merged weights are checked before the first
file. The exported ``model`` section has no local ``checkpoint`` (the export's own weights replace
it; its path and sha256 are kept under ``inputs.checkpoint``), so serving an export reads nothing
outside its folder. ``input_shape`` records the shape of one input sample when the run's data are
tensors files, so that ``predict`` can refuse inputs of another size or layout.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import adamerge
from adamerge.checks import is_number
from adamerge.errors import InputError
from adamerge.io.files import atomic_save_safetensors, atomic_write_json, atomic_write_text, sha256_file

__all__ = ["write_heads", "export_metadata", "write_merged_export", "model_card", "check_export_metadata",
           "EXPORT_KINDS", "EXPORT_FILES", "previous_export_problem"]

EXPORT_KINDS = ("merged", "t3")
# every file name an export folder may hold (a method that writes a new one adds it here): a folder
# holding anything else is not a previous export, and ``export --force`` refuses to replace it
EXPORT_FILES = frozenset({"adamerge.json", "README.md", "model.safetensors", "heads.safetensors", "base.safetensors",
                          "task_vectors.safetensors", "task_masks.safetensors"})
# what a Hugging Face export (``"format": "hf"`` in adamerge.json) adds: save_pretrained's files, the tokenizer's
HF_EXPORT_FILE = re.compile(r"config\.json|generation_config\.json|preprocessor_config\.json|model\.safetensors(\.index\.json)?"
                            r"|model-\d{5}-of-\d{5}\.safetensors|tokenizer(_config)?\.json|special_tokens_map\.json"
                            r"|added_tokens\.json|vocab\.(json|txt)|merges\.txt|chat_template\.jinja|tokenizer\.model")
_TMP_FILE = re.compile(r"\..+\.tmp")  # a temporary file of adamerge.io.files.atomic_path left by a crash
_TASK_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,127}")  # as adamerge.config.TASK_NAME, not starting with '.'
_SHA256 = re.compile(r"[0-9a-f]{64}")


def write_heads(folder: Path, heads: dict) -> None:
    """``heads.safetensors``: ``<task>.weight`` / ``<task>.bias``; which heads normalise, in metadata."""
    from adamerge.io.state_dicts import require_finite

    head_state = {f"{t}.{k}": v for t, h in heads.items() for k, v in h.state().items()}
    require_finite(head_state, "the heads to export (heads of the run's config)")
    atomic_save_safetensors(head_state, folder / "heads.safetensors",
                            {"normalize": json.dumps({t: bool(getattr(h, "normalize", False)) for t, h in heads.items()})})


def input_digest(path: str) -> str:
    """sha256 of an input: a weight file's bytes, or a model folder's config and weights."""
    if Path(path).is_dir():
        from adamerge.io.hf_folders import folder_digest

        return folder_digest(path)
    return sha256_file(path)


def export_metadata(cfg: dict, results: dict, kind: str = "merged") -> dict:
    """The common part of ``adamerge.json``: what was merged (inputs with sha256), how, and the scores."""
    inputs = {"base": {"path": cfg["base"], "sha256": input_digest(cfg["base"])}}
    inputs["experts"] = {t: {"path": p, "sha256": input_digest(p)} for t, p in cfg["experts"].items()}
    model = dict(cfg["model"])
    checkpoint = model.get("checkpoint")
    if isinstance(checkpoint, str) and Path(checkpoint).is_file():
        # the export holds every weight: predict needs the architecture, not this file (outside the export)
        del model["checkpoint"]
        same = Path(checkpoint).resolve() == Path(cfg["base"]).resolve()
        inputs["checkpoint"] = {"path": checkpoint, "sha256": inputs["base"]["sha256"] if same else sha256_file(checkpoint)}
    shape = _input_shape(cfg)
    return {
        "adamerge_version": adamerge.__version__,
        "kind": kind,
        "method": cfg["method"],
        "options": cfg["options"],
        "tasks": list(cfg["experts"]),
        "model": model,
        **({"input_shape": shape} if shape else {}),
        "inputs": inputs,
        "metrics": results.get("after"),
        "metrics_before": results.get("before"),
        "solvers": results.get("solvers"),
        "uses_labels": results.get("uses_labels"),
        # method facts: the mask's density and evaluation mode (Concrete), aTLAS's mode, FW's choices
        **{k: results[k] for k in ("mask", "atlas", "fw_merging") if k in results},
    }


def write_merged_export(folder: Path, state: dict, heads: dict, cfg: dict, results: dict, coefficients: dict) -> None:
    """A merged checkpoint: ``model.safetensors`` (keys as the base), heads, metadata, model card.
    Non-finite merged weights are refused before anything is written."""
    from adamerge.io.state_dicts import require_finite

    require_finite(state, "the merged model (nothing exported; are the run's coefficients finite?)")
    atomic_save_safetensors(state, folder / "model.safetensors", {"format": "pt", "adamerge": adamerge.__version__})
    write_heads(folder, heads)
    meta = {**export_metadata(cfg, results), **coefficients}
    atomic_write_json(folder / "adamerge.json", meta)
    atomic_write_text(folder / "README.md", model_card(meta))


def model_card(meta: dict, package: str | None = None) -> str:
    what = package or ("Load `model.safetensors` into the base architecture with `load_state_dict(strict=True)`;"
                       " `heads.safetensors` holds one `<task>.weight`/`<task>.bias` classifier per task.")
    gran = f", granularity `{meta['granularity']}`" if "granularity" in meta else ""
    lines = [
        "# Merged model (adamerge)",
        "",
        f"Method `{meta['method']}`{gran}, {len(meta['tasks'])} tasks:"
        f" {', '.join(meta['tasks'])}. Built with adamerge {meta['adamerge_version']}.",
        "",
        what,
        "",
        f"Base: `{meta['inputs']['base']['path']}` (sha256 `{meta['inputs']['base']['sha256'][:16]}…`).",
        "",
        "| task | expert checkpoint sha256 | accuracy before | accuracy after |",
        "| --- | --- | --- | --- |",
    ]
    before = (meta.get("metrics_before") or {}).get("per_task", {})
    after = (meta.get("metrics") or {}).get("per_task", {})
    for t in meta["tasks"]:
        fmt = lambda d: f"{100 * d[t]:.1f}%" if t in d else "n/a"  # noqa: E731
        lines.append(f"| {t} | `{meta['inputs']['experts'][t]['sha256'][:16]}…` | {fmt(before)} | {fmt(after)} |")
    lines += ["", "Coefficients and settings are in `adamerge.json`.", ""]
    return "\n".join(lines)


def _input_shape(cfg: dict) -> list[int] | None:
    """The shape of one input sample when every data source of the run is a tensors file and
    they agree (read from the files' headers), else ``None``."""
    from safetensors import safe_open

    shapes = set()
    try:
        for spec in (cfg.get("data") or {}).values():
            if not isinstance(spec, dict) or "tensors" not in spec:
                return None
            with safe_open(str(spec["tensors"]), framework="pt") as f:
                shapes.add(tuple(f.get_slice("x").get_shape()[1:]))
    except Exception:  # noqa: BLE001 - a fact for predict's checks, never a reason to fail the export
        return None
    return list(shapes.pop()) if len(shapes) == 1 else None


# ------------------------------------------------------------------------ reading adamerge.json back
def _first_non_finite(meta) -> str | None:
    """The path (``metrics.per_task.a``, ``coefficients[0][2]``) of the first NaN/inf number, if any."""
    stack = [("", meta)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


def _task_names(value, where: str, field: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: '{field}' must be a non-empty list of task names")
    for t in value:
        if not isinstance(t, str) or not _TASK_NAME.fullmatch(t):
            raise InputError(f"{where}: '{field}' holds {t!r}, not a task name (letters, digits and _ . + -, it names"
                             " files; not starting with '.')")
    if len(set(value)) != len(value):
        dup = next(t for t in value if value.count(t) > 1)
        raise InputError(f"{where}: '{field}' names task '{dup}' twice")
    return value


def _typed(meta: dict, field: str, types: tuple, what: str, where: str, optional: bool = True):
    value = meta.get(field)
    if value is None and optional:
        return None
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        raise InputError(f"{where}: '{field}' must be {what}, got {type(value).__name__}")
    return value


def _check_model_spec(model, where: str) -> dict:
    if not isinstance(model, dict):
        raise InputError(f"{where}: 'model' must be a mapping with a 'source' name")
    source = model.get("source", "open_clip")
    if not isinstance(source, str) or not source:
        raise InputError(f"{where}: 'model.source' must be the name of a model source")
    fields = {"open_clip": {"name": str, "checkpoint": (str, type(None))}, "timm": {"name": str},
              "python": {"target": str, "kwargs": dict}, "tiny_vit": {"seed": int}, "tiny_cnn": {"seed": int}}
    required = {"open_clip": ("name",), "timm": ("name",), "python": ("target",)}
    for key in required.get(source, ()):
        if key not in model:
            raise InputError(f"{where}: 'model.{key}' is missing (model source '{source}' needs it)")
    for key, types in fields.get(source, {}).items():
        if key in model and (not isinstance(model[key], types) or isinstance(model[key], bool)):
            want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise InputError(f"{where}: 'model.{key}' must be {want}, got {type(model[key]).__name__}")
    return {**model, "source": source}


def check_export_metadata(meta, where: str) -> dict:
    """Check an export's ``adamerge.json`` (untrusted: it may have been edited) against the schema
    :func:`export_metadata` writes, and return it with defaults filled in (``kind``, ``model.source``).
    Required: ``tasks`` (a list of task names that are safe file names) and ``model`` (a mapping
    naming a source, with the fields a built-in source reads of the right types). Every other field
    the writers use is type-checked when present, and no number anywhere may be NaN or inf. Each
    problem is one :class:`InputError` line naming the field."""
    if not isinstance(meta, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    bad = _first_non_finite(meta)
    if bad is not None:
        raise InputError(f"{where}: '{bad}' is not a finite number")
    kind = meta.get("kind", "merged")  # exports written before kinds existed are merged checkpoints
    if not isinstance(kind, str) or kind not in EXPORT_KINDS:
        raise InputError(f"{where}: unknown export kind {kind!r}; this adamerge serves {list(EXPORT_KINDS)}")
    tasks = _task_names(meta.get("tasks"), where, "tasks")
    model = _check_model_spec(meta.get("model"), where)
    for field in ("adamerge_version", "method", "buffer_policy"):
        _typed(meta, field, (str,), "a string", where)
    for field in ("options", "inputs", "mask", "atlas", "fw_merging"):
        _typed(meta, field, (dict,), "a mapping", where)
    _typed(meta, "solvers", (list,), "a list of solver summaries", where)
    for field in ("groups", "pool"):
        if _typed(meta, field, (list,), "a list of names", where) and not all(isinstance(g, str) for g in meta[field]):
            raise InputError(f"{where}: '{field}' must be a list of names")
    _typed(meta, "uses_labels", (bool,), "true or false", where)
    for field in ("metrics", "metrics_before"):
        m = _typed(meta, field, (dict,), "a mapping of scores", where)
        if m is not None:
            if "mean" in m and not is_number(m["mean"]):
                raise InputError(f"{where}: '{field}.mean' must be a number")
            per = m.get("per_task", {})
            if not isinstance(per, dict) or not all(is_number(v) for v in per.values()):
                raise InputError(f"{where}: '{field}.per_task' must map task names to numbers")
    coef = meta.get("coefficients")
    if coef is not None:
        rows = coef if isinstance(coef, list) else None
        if rows is None or not all(is_number(c) or isinstance(c, list) and all(is_number(v) for v in c) for c in rows):
            raise InputError(f"{where}: 'coefficients' must be a list of numbers or of lists of numbers")
    shape = meta.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not all(is_number(d) and isinstance(d, int) and d > 0 for d in shape)):
        raise InputError(f"{where}: 'input_shape' must be a list of positive integers")
    inputs = meta.get("inputs") or {}
    for name, entry in [(k, inputs.get(k)) for k in ("base", "checkpoint") if k in inputs] + [
            (f"experts.{t}", e) for t, e in (inputs.get("experts") or {}).items()]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise InputError(f"{where}: 'inputs.{name}' must be a mapping with a 'path' and a hex 'sha256'")
    if "experts" in inputs and not isinstance(inputs["experts"], dict):
        raise InputError(f"{where}: 'inputs.experts' must be a mapping of task names")
    if kind == "t3":
        t3 = meta.get("t3", {})
        if not isinstance(t3, dict):
            raise InputError(f"{where}: 't3' must be a mapping (settings, tasks)")
        if "settings" in t3 and not isinstance(t3["settings"], dict):
            raise InputError(f"{where}: 't3.settings' must be a mapping of T3 options")
        if "tasks" in t3:
            _task_names(t3["tasks"], where, "t3.tasks")
    return {**meta, "kind": kind, "tasks": tasks, "model": model}


def previous_export_problem(folder: Path) -> str | None:
    """``None`` when ``folder`` is recognisably an earlier export (an ``adamerge.json`` with an
    export kind, and only files an export writes), else what makes it something else."""
    meta_path = folder / "adamerge.json"
    if meta_path.is_symlink() or not meta_path.is_file():
        return "it has no adamerge.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return "its adamerge.json is not readable JSON"
    if not isinstance(meta, dict) or meta.get("kind", "merged") not in EXPORT_KINDS or not isinstance(meta.get("adamerge_version"), str):
        return "its adamerge.json was not written by adamerge export"
    hf = meta.get("format") == "hf"
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            return f"it holds '{entry.name}', which is not a file an export writes"
        if entry.name not in EXPORT_FILES and not _TMP_FILE.fullmatch(entry.name) \
                and not (hf and HF_EXPORT_FILE.fullmatch(entry.name)):
            return f"it holds '{entry.name}', which export does not write"
    return None
