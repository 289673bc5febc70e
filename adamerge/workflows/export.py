"""Reload a finished run and export its merged checkpoint.

Saving coefficients (``coefficients.safetensors``, done by ``fit``) and exporting a merged model
(``export``: full weights a user can load without adamerge) are two separate, named actions.
An export folder holds ``model.safetensors`` (same keys as the base), ``heads.safetensors`` (the
run's trained heads with ``options.train_heads``, else the config's),
``adamerge.json`` (inputs with sha256, method, coefficients, metrics, version) and ``README.md``.
It is written to a temporary sibling folder and renamed into place, so it is whole or absent.

What ``export RUN OUT`` may write over (checked before anything is created):

* ``OUT`` absent or an empty folder: written. ``OUT`` a file or a symbolic link: refused.
* ``OUT`` a non-empty folder: refused without ``--force``. With ``--force`` it is replaced only
  when it is recognisably a previous export: an ``adamerge.json`` written by ``adamerge export``
  (an export kind and a version) and nothing but the files an export writes
  (:data:`adamerge.io.export_files.EXPORT_FILES`). Any other folder is refused even with
  ``--force``: a run folder (``config.yaml``, ``results.json``, ``checkpoints/``), a folder of
  runs, a folder with a file of the user's.
* Never, with or without ``--force``: the run being exported or a folder containing it, an input
  of the run's config (base, experts, heads, data, pool, model checkpoint, cache) or a folder
  containing one, the current folder or a folder containing it. Nor a new folder inside an input
  folder (an image folder would gain a class).

A refused or failed export leaves the disk as it found it: no temporary folder, and the missing
parent folders it created for ``OUT`` are removed again. The old export is swapped out only once
the new one is complete, and is put back if the swap fails. Non-finite coefficients, method state
or merged weights are refused (:func:`load_run`, :func:`adamerge.io.export_files.write_merged_export`).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from adamerge.errors import InputError
from adamerge.io.export_files import previous_export_problem, write_merged_export
from adamerge.io.files import make_folders, os_message, remove_folders
from adamerge.core.merged import MergedModel
from adamerge.methods import create_method
from adamerge.plan import RunPlan
from adamerge.train.runs import RunFolder
from adamerge.train.evaluation import reestimate_batches


def load_run(run_dir: str | Path) -> tuple[MergedModel, dict, dict]:
    """Rebuild a finished run's merged model with its saved coefficients and method state:
    (merged, parts, config). An unfinished run, or one whose coefficients or method state hold
    NaN or inf, is refused with a clear message."""
    from adamerge.io.state_dicts import require_finite

    run = RunFolder(run_dir)
    run.require_finished(("config.yaml", "coefficients.safetensors", "results.json"))
    coef = run.load_coefficients()
    require_finite({"coefficients": coef}, f"{run.path}/coefficients.safetensors")
    state = run.load_state()
    if state is not None:
        require_finite(state, str(run.state_path))
    plan = RunPlan.for_run(run_dir)
    cfg, parts, mcfg = plan.cfg, plan.parts, plan.options
    parts["heads"] = run.load_heads(parts["heads"])  # options.train_heads: the run's trained heads
    merged = plan.method.build(parts["model"], parts["tv"], mcfg, seed=cfg["seed"], state=state)
    if tuple(coef.shape) != tuple(merged.coefficients.shape):
        raise InputError(
            f"{run.path}/coefficients.safetensors has shape {tuple(coef.shape)}, the config gives"
            f" {tuple(merged.coefficients.shape)}"
        )
    merged.set_coefficients(coef)
    if mcfg.buffer_policy == "reestimate":
        merged.reestimate_buffers(reestimate_batches(parts["streams"], cfg["eval_batch_size"]))
    return merged, parts, cfg


def _input_paths(cfg: dict) -> list[tuple[str, Path]]:
    """(what, path) of every file or folder the run's config reads."""
    found: list[tuple[str, object]] = [("the base checkpoint", cfg.get("base")),
                                       ("the model checkpoint", (cfg.get("model") or {}).get("checkpoint")),
                                       ("the cache folder", cfg.get("cache_dir"))]
    for section, what in (("experts", "the expert checkpoint of"), ("pool", "the pool candidate")):
        for t, p in (cfg.get(section) or {}).items():
            found.append((f"{what} '{t}'", p))
    for t, spec in (cfg.get("heads") or {}).items():
        found.append((f"the head of '{t}'", spec.get("path") if isinstance(spec, dict) else spec))
    for section in ("data", "labeled"):
        for t, spec in (cfg.get(section) or {}).items():
            for key in ("folder", "tensors", "text", "jsonl"):
                found.append((f"the {section} of '{t}'", spec.get(key) if isinstance(spec, dict) else spec))
    return [(what, Path(p).resolve()) for what, p in found if isinstance(p, str) and p]


def _contains(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


def check_destination(out: Path, run_dir: Path, cfg: dict, force: bool) -> None:
    """Refuse an ``out`` that export must not write over (the rules in the module docstring)."""
    if out.is_symlink():
        raise InputError(f"{out} is a symbolic link; give the export folder's real path or a new name")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; an export is a folder (give a new name)")
    target = out.resolve()
    protected = [("the run being exported", run_dir.resolve())]
    try:
        protected.append(("the current folder", Path.cwd().resolve()))
    except OSError:  # the current folder was deleted: nothing to protect there
        pass
    inputs = _input_paths(cfg)
    for what, path in protected + inputs:
        if _contains(target, path):
            where = "is" if target == path else f"contains {path}, which is"
            raise InputError(f"{out} {where} {what}; export writes a new folder, give another OUT")
    for what, path in inputs:
        if path in target.parents and path.is_dir():  # e.g. a new class folder inside an image folder
            raise InputError(f"{out} is inside {what} ({path}); the export would become part of that input, give another OUT")
    try:
        if not out.exists() or not any(out.iterdir()):
            return
    except OSError as err:
        raise InputError(f"cannot read the folder {out}: {os_message(err)}") from None
    if not force:
        raise InputError(f"{out} exists and is not empty; pass --force to replace it (a previous export only)")
    if any((out / name).exists() for name in ("config.yaml", "results.json", "checkpoints")):
        raise InputError(f"{out} is a run folder; --force only replaces a previous export, never a run")
    problem = previous_export_problem(out)
    if problem:
        raise InputError(f"{out} is not a previous export ({problem}); --force only replaces an export folder,"
                         " remove it yourself or give another OUT")


def export_run(run_dir: str | Path, out: str | Path, force: bool = False, task_masks: float | None = None) -> tuple[Path, str]:
    """Write the export of ``run_dir`` to the folder ``out``: a merged checkpoint, or what an
    own-loop method writes (a T3 package). Returns the folder and what it holds. ``task_masks``
    (a TALL λ) also stores bit-packed per-task masks (:mod:`adamerge.io.task_masks`).
    ``force`` replaces a previous export only (see the module docstring)."""
    run_dir, out = Path(run_dir), Path(out)
    run = RunFolder(run_dir)
    run.require_finished()
    cfg = run.read_config()
    check_destination(out, run_dir, cfg, force)
    method = create_method(cfg["method"])
    if task_masks is not None:
        if method.own_loop:
            raise InputError(f"--task-masks needs a merged checkpoint; method '{cfg['method']}' exports its own package")
        if not (isinstance(task_masks, (int, float)) and math.isfinite(task_masks) and task_masks >= 0):
            raise InputError(f"--mask-lambda must be a finite number >= 0, got {task_masks!r}")
    results = run.read_results()
    target = out.resolve()
    created = make_folders(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as err:
        remove_folders(created)
        raise InputError(f"cannot write in {target.parent}: {os_message(err)}") from None
    try:
        if method.own_loop:
            what = method.export(tmp, run_dir, cfg, results)
        elif cfg["model"].get("source") == "hf":  # a Hugging Face folder (save_pretrained)
            if task_masks is not None:
                raise InputError("--task-masks is not available for a Hugging Face export (model.source hf)")
            from adamerge.workflows.export_hf import write_hf_export

            merged, parts, cfg = load_run(run_dir)
            what = write_hf_export(tmp, merged, parts["heads"], cfg, results)
        else:
            merged, parts, cfg = load_run(run_dir)
            write_export(tmp, merged, parts["heads"], cfg, results)
            what = "a merged checkpoint (model.safetensors, heads.safetensors)"
            if task_masks is not None:
                from adamerge.io.task_masks import MASKS_FILE, save_task_masks

                save_task_masks(tmp, parts["tv"], merged.merged_state_dict(), merged.merge_keys, lam=task_masks,
                                base_path=cfg["base"], prefix=cfg.get("prefix"))
                what += f" with per-task masks ({MASKS_FILE})"
        _swap_into_place(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_folders(created)
        if isinstance(err, OSError):
            raise InputError(f"could not write the export to {out}: {os_message(err)}") from None
        raise
    return out, what


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete export ``tmp`` to ``target``; an existing ``target`` (an empty folder or
    a checked previous export) is moved aside first and deleted only after the rename."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_export(folder: Path, merged: MergedModel, heads: dict, cfg: dict, results: dict) -> None:
    coefficients = {
        "tasks": merged.task_names,
        "granularity": merged.grouping.spec,
        "groups": merged.group_names,
        "coefficients": merged.applied_coefficients().detach().tolist(),
        "buffer_policy": merged.buffer_policy,
    }
    write_merged_export(folder, merged.merged_state_dict(), heads, cfg, results, coefficients)
