"""Reload a finished run and export its merged checkpoint.

Saving coefficients (``coefficients.safetensors``, done by ``fit``) and exporting a merged model
(``export``: full weights a user can load without adamerge) are two separate, named actions.
An export folder holds ``model.safetensors`` (same keys as the base), ``heads.safetensors``,
``adamerge.json`` (inputs with sha256, method, coefficients, metrics, version) and ``README.md``.
It is written to a temporary sibling folder and renamed into place, so it is whole or absent.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import adamerge
from adamerge.config import build_all
from adamerge.errors import InputError
from adamerge.io.files import atomic_save_safetensors, atomic_write_json, atomic_write_text, sha256_file
from adamerge.merged import MergedModel
from adamerge.methods import create_method
from adamerge.runs import RunFolder
from adamerge.evaluation import reestimate_batches


def load_run(run_dir: str | Path) -> tuple[MergedModel, dict, dict]:
    """Rebuild a finished run's merged model with its saved coefficients and method state:
    (merged, parts, config). An unfinished run is refused with a clear message."""
    run = RunFolder(run_dir)
    run.require_finished(("config.yaml", "coefficients.safetensors", "results.json"))
    cfg = run.read_config()
    parts = build_all(cfg)
    method = create_method(cfg["method"])
    mcfg = method.config(cfg["options"])
    merged = method.build(parts["model"], parts["tv"], mcfg, seed=cfg["seed"], state=run.load_state())
    coef = run.load_coefficients()
    if tuple(coef.shape) != tuple(merged.coefficients.shape):
        raise InputError(
            f"{run.path}/coefficients.safetensors has shape {tuple(coef.shape)}, the config gives"
            f" {tuple(merged.coefficients.shape)}"
        )
    merged.set_coefficients(coef)
    if mcfg.buffer_policy == "reestimate":
        merged.reestimate_buffers(reestimate_batches(parts["streams"], cfg["eval_batch_size"]))
    return merged, parts, cfg


def export_run(run_dir: str | Path, out: str | Path, force: bool = False, task_masks: float | None = None) -> tuple[Path, str]:
    """Write the export of ``run_dir`` to the folder ``out``: a merged checkpoint, or what an
    own-loop method writes (a T3 package). Returns the folder and what it holds. ``task_masks``
    (a TALL λ) also stores bit-packed per-task masks (:mod:`adamerge.task_masks`)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} exists and is not empty; pass --force to replace it")
    run = RunFolder(run_dir)
    run.require_finished()
    cfg = run.read_config()
    method = create_method(cfg["method"])
    results = run.read_results()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if method.own_loop:
            if task_masks is not None:
                raise InputError(f"--task-masks needs a merged checkpoint; method '{cfg['method']}' exports its own package")
            what = method.export(tmp, run_dir, cfg, results)
        else:
            merged, parts, cfg = load_run(run_dir)
            write_export(tmp, merged, parts["heads"], cfg, results)
            what = "a merged checkpoint (model.safetensors, heads.safetensors)"
            if task_masks is not None:
                from adamerge.task_masks import MASKS_FILE, save_task_masks

                save_task_masks(tmp, parts["tv"], merged.merged_state_dict(), merged.merge_keys, lam=task_masks,
                                base_path=cfg["base"], prefix=cfg.get("prefix"))
                what += f" with per-task masks ({MASKS_FILE})"
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, what


def write_heads(folder: Path, heads: dict) -> None:
    """``heads.safetensors``: ``<task>.weight`` / ``<task>.bias``; which heads normalise, in metadata."""
    head_state = {f"{t}.{k}": v for t, h in heads.items() for k, v in h.state().items()}
    atomic_save_safetensors(head_state, folder / "heads.safetensors",
                            {"normalize": json.dumps({t: bool(getattr(h, "normalize", False)) for t, h in heads.items()})})


def export_metadata(cfg: dict, results: dict, kind: str = "merged") -> dict:
    """The common part of ``adamerge.json``: what was merged (inputs with sha256), how, and the scores."""
    inputs = {"base": {"path": cfg["base"], "sha256": sha256_file(cfg["base"])}}
    inputs["experts"] = {t: {"path": p, "sha256": sha256_file(p)} for t, p in cfg["experts"].items()}
    return {
        "adamerge_version": adamerge.__version__,
        "kind": kind,
        "method": cfg["method"],
        "options": cfg["options"],
        "tasks": list(cfg["experts"]),
        "model": cfg["model"],
        "inputs": inputs,
        "metrics": results.get("after"),
        "metrics_before": results.get("before"),
        "solvers": results.get("solvers"),
        "uses_labels": results.get("uses_labels"),
        # method facts: the mask's density and evaluation mode (Concrete), aTLAS's mode, FW's choices
        **{k: results[k] for k in ("mask", "atlas", "fw_merging") if k in results},
    }


def write_merged_export(folder: Path, state: dict, heads: dict, cfg: dict, results: dict, coefficients: dict) -> None:
    """A merged checkpoint: ``model.safetensors`` (keys as the base), heads, metadata, model card."""
    atomic_save_safetensors(state, folder / "model.safetensors", {"format": "pt", "adamerge": adamerge.__version__})
    write_heads(folder, heads)
    meta = {**export_metadata(cfg, results), **coefficients}
    atomic_write_json(folder / "adamerge.json", meta)
    atomic_write_text(folder / "README.md", model_card(meta))


def write_export(folder: Path, merged: MergedModel, heads: dict, cfg: dict, results: dict) -> None:
    coefficients = {
        "tasks": merged.task_names,
        "granularity": merged.grouping.spec,
        "groups": merged.group_names,
        "coefficients": merged.applied_coefficients().detach().tolist(),
        "buffer_policy": merged.buffer_policy,
    }
    write_merged_export(folder, merged.merged_state_dict(), heads, cfg, results, coefficients)


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
