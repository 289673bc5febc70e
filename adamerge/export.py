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
from adamerge.training import reestimate_batches


def load_run(run_dir: str | Path) -> tuple[MergedModel, dict, dict]:
    """Rebuild a finished run's merged model with its saved coefficients and method state:
    (merged, parts, config). An unfinished run is refused with a clear message."""
    run = RunFolder(run_dir)
    run.require_finished()
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


def export_run(run_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the merged checkpoint of ``run_dir`` to the folder ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"{out} exists and is not empty; pass --force to replace it")
    merged, parts, cfg = load_run(run_dir)
    results = RunFolder(run_dir).read_results()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_export(tmp, merged, parts["heads"], cfg, results)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_export(folder: Path, merged: MergedModel, heads: dict, cfg: dict, results: dict) -> None:
    state = merged.merged_state_dict()
    atomic_save_safetensors(state, folder / "model.safetensors", {"format": "pt", "adamerge": adamerge.__version__})
    head_state = {f"{t}.{k}": v for t, h in heads.items() for k, v in h.state().items()}
    atomic_save_safetensors(head_state, folder / "heads.safetensors", {"normalize": json.dumps({t: bool(getattr(h, "normalize", False)) for t, h in heads.items()})})
    inputs = {"base": {"path": cfg["base"], "sha256": sha256_file(cfg["base"])}}
    inputs["experts"] = {t: {"path": p, "sha256": sha256_file(p)} for t, p in cfg["experts"].items()}
    coef = merged.applied_coefficients().detach()
    meta = {
        "adamerge_version": adamerge.__version__,
        "method": cfg["method"],
        "options": cfg["options"],
        "granularity": merged.grouping.spec,
        "tasks": merged.task_names,
        "groups": merged.group_names,
        "coefficients": coef.tolist(),
        "buffer_policy": merged.buffer_policy,
        "model": cfg["model"],
        "inputs": inputs,
        "metrics": results.get("after"),
        "metrics_before": results.get("before"),
        "solvers": results.get("solvers"),
        "uses_labels": results.get("uses_labels"),
        # method facts: the mask's density and evaluation mode (Concrete), aTLAS's mode
        **{k: results[k] for k in ("mask", "atlas") if k in results},
    }
    atomic_write_json(folder / "adamerge.json", meta)
    atomic_write_text(folder / "README.md", model_card(meta))


def model_card(meta: dict) -> str:
    lines = [
        "# Merged model (adamerge)",
        "",
        f"Method `{meta['method']}`, granularity `{meta['granularity']}`, {len(meta['tasks'])} tasks:"
        f" {', '.join(meta['tasks'])}. Built with adamerge {meta['adamerge_version']}.",
        "",
        "Load `model.safetensors` into the base architecture with `load_state_dict(strict=True)`;"
        " `heads.safetensors` holds one `<task>.weight`/`<task>.bias` classifier per task.",
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
    lines += ["", "Coefficients per task and group are in `adamerge.json`.", ""]
    return "\n".join(lines)
