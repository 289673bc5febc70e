"""``adamerge ablate``: the cross product of config options × seeds, each cell an ordinary run
folder made through the same path as ``adamerge fit``, then one table and plots.

Layout of ``--out DIR``::

    ablation.yaml            the grid, the seeds and the base config (written before any cell runs)
    runs/<cell>/             one run folder per cell and seed (config.yaml, results.json, ...)
    runs/<cell>/ablation_cell.json   wall time and peak memory of the attempt that finished it
    ablation.csv             one row per finished run
    ablation.md              mean ± std over seeds per cell
    accuracy_vs_coefficients.png, coefficients.png

A cell is finished when its ``results.json`` says so (written last by ``fit``), so a rerun skips
finished cells and resumes (from its checkpoints) or restarts an interrupted one, even after a
``kill -9``. The tables are written once, at the end, atomically: a kill never leaves a table that
looks complete but is not, and ``ablation.md`` states how many of the cells it covers.

Everything the command line gives (axes, seeds, ``--out``, overrides) and every cell's config is
checked before anything is written; one ablation at a time runs on a folder (a lock on ``--out``).
Cells of methods with their own loop (T3, FW-Merging) have no ``coefficients.safetensors``: their
row counts the coefficients they saved otherwise (FW-Merging's pool coefficients) or says n/a.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adamerge.errors import AdamergeError, InputError
from adamerge.io.files import atomic_write_json, atomic_write_text, check_folder_path, folder_lock, make_folders, remove_folders
from adamerge.memory import process_memory_mb
from adamerge.train.runs import RunFolder

# bare names that are top-level config keys (everything else bare is an ``options.`` key)
_TOP_LEVEL = ("method", "storage_dtype", "prefix", "eval_batch_size", "checkpoint_every")
_SECTIONS = ("options", "trainer", "model", "data", "labeled", "heads", "experts")


def option_key(name: str) -> str:
    """The config key an axis name means: ``lr`` → ``options.lr``, ``objective_args.floor`` →
    ``options.objective_args.floor``; ``method`` and keys under a config section stay as they are."""
    name = name.strip()
    if name.startswith("options."):
        return name
    if not name or any(not p for p in name.split(".")):
        raise InputError(f"bad option name '{name}'")
    if name in ("seed", "run_dir"):
        raise InputError(f"'{name}' cannot be an axis: seeds come from --seeds, folders from --out")
    head = name.split(".", 1)[0]
    if name in _TOP_LEVEL or ("." in name and head in _SECTIONS):
        return name
    return f"options.{name}"


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``["granularity=task,layer", "lr=0.01,0.1"]`` → ``{"options.granularity": ["task", "layer"],
    "options.lr": [0.01, 0.1]}`` (values typed as YAML types them)."""
    from adamerge.config import parse_value

    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"bad grid axis '{item}': write NAME=V1,V2 (e.g. granularity=task,layer)")
        name, values = item.split("=", 1)
        key = option_key(name)
        if key in grid:
            raise InputError(f"grid axis '{name}' is given twice")
        parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
        if not parsed:
            raise InputError(f"grid axis '{name}' has no values")
        if len({json.dumps(v, sort_keys=True) for v in parsed}) != len(parsed):
            raise InputError(f"grid axis '{name}' repeats a value")
        grid[key] = parsed
    check_distinct_keys(list(grid), "grid axes")
    return grid


def check_distinct_keys(keys: Sequence[str], what: str) -> None:
    """No key is another key or inside another (``objective_args`` and ``objective_args.floor``
    would set the same option twice)."""
    for a, b in itertools.permutations(keys, 2):
        if a == b or b.startswith(a + "."):
            raise InputError(f"{what} '{axis_label(a)}' and '{axis_label(b)}' set the same option ({a}); give it once")


def check_not_overridden(keys: Sequence[str], overrides: Sequence[tuple[str, Any]], what: str) -> None:
    """An option that varies (a grid axis, a tuned parameter) is not also fixed by an override
    (``--options.lr 0.1`` next to ``--grid lr=...``): one of the two would be silently ignored."""
    for key in keys:
        for name, _ in overrides:
            if name == key or name.startswith(key + ".") or key.startswith(name + "."):
                raise InputError(f"{what} '{axis_label(key)}' is also given as the override --{name}; give it once")


MAX_SEED = 2**32 - 1  # numpy's (and Lightning's seed_everything's) range


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``: distinct whole numbers in [0, 2**32 - 1]."""
    seeds = []
    for item in str(text).split(","):
        item = item.strip()
        if not re.fullmatch(r"\+?[0-9]+", item):
            what = "an empty item" if not item else f"'{item}'"
            raise InputError(f"--seeds must be whole numbers >= 0 separated by commas (e.g. 0,1,2); '{text}' has {what}")
        seed = int(item)
        if seed > MAX_SEED:
            raise InputError(f"--seeds: {seed} is out of range (at most {MAX_SEED})")
        seeds.append(seed)
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds must name distinct seeds, got '{text}'")
    return seeds


def axis_label(key: str) -> str:
    """The short name of an axis key (``options.lr`` → ``lr``)."""
    return key[len("options."):] if key.startswith("options.") else key


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "+-_.=" else "-" for c in text)


@dataclass
class Cell:
    """One grid point and seed: its axis values, its resolved config and its run folder."""

    values: dict[str, Any]  # axis key -> value
    seed: int
    cfg: dict
    folder: Path
    plan: Any = None  # its adamerge.plan.RunPlan (config checks done)

    @property
    def name(self) -> str:
        return ",".join(f"{axis_label(k)}={_text(v)}" for k, v in self.values.items())


@dataclass
class AblationResult:
    """What ``run_ablation`` did: finished rows, failures, the number of fits it ran."""

    rows: list[dict]
    failed: dict[str, str] = field(default_factory=dict)
    fitted: int = 0
    skipped: int = 0
    total: int = 0


def plan_cells(config: str | Path, grid: dict[str, list], seeds: Sequence[int], out: Path,
               overrides: Sequence[tuple[str, Any]] = ()) -> list[Cell]:
    """Every (grid point, seed) with its run plan (all checked before anything runs)."""
    from adamerge.plan import RunPlan

    keys = list(grid)
    cells, folders, models = [], {}, {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        for seed in seeds:
            base = ",".join(f"{axis_label(k)}={_text(v)}" for k, v in values.items()) or "base"
            folder = out / "runs" / _slug(f"{base},seed={seed}")
            if folder in folders:
                raise InputError(f"grid cells '{folders[folder]}' and '{base}' map to the same folder {folder.name}")
            folders[folder] = base
            try:
                plan = RunPlan.from_config(config, [*overrides, *values.items(), ("seed", seed),
                                                    ("run_dir", str(folder.resolve()))], resume=None)
                plan.check_granularity(_shapes(plan.cfg, models))
            except AdamergeError as err:
                raise InputError(f"grid cell {base}: {err}") from None
            cells.append(Cell(values, seed, plan.cfg, folder, plan))
    return cells


def _shapes(cfg: dict, models: dict) -> dict:
    """The parameter shapes of the cell's architecture (``models``: shapes per model spec)."""
    from adamerge.config import build_model

    key = json.dumps(cfg["model"], sort_keys=True)
    if key not in models:
        model, _ = build_model(cfg["model"])
        models[key] = {n: p.shape for n, p in model.named_parameters()}
    return models[key]


class PeakMemory:
    """Peak memory of a block: CUDA bytes allocated when the run uses a GPU, else the process's
    resident set size sampled every 20 ms (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.peak_mb, self.kind = cuda, float("nan"), "cuda_allocated" if cuda else "cpu_rss"
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, process_memory_mb())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_mb = process_memory_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, process_memory_mb())


def _uses_cuda(cfg: dict) -> bool:
    import torch

    return str(cfg.get("trainer", {}).get("accelerator", "cpu")) in ("gpu", "cuda", "auto") and torch.cuda.is_available()


class _Parts:
    """``build_all`` once per distinct model/data config (the grid rarely changes them)."""

    _KEYS = ("model", "base", "experts", "heads", "data", "labeled", "storage_dtype", "prefix")

    def __init__(self) -> None:
        self._cache: dict[str, dict] = {}

    def _key(self, cfg: dict) -> str:
        return json.dumps({k: cfg.get(k) for k in self._KEYS}, sort_keys=True, default=str)

    def get(self, cfg: dict) -> dict:
        from adamerge.config import build_all

        key = self._key(cfg)
        if key not in self._cache:
            self._cache.clear()  # one set of tensors in memory at a time
            self._cache[key] = build_all(cfg)
        return self._cache[key]

    def put(self, cfg: dict, parts: dict) -> None:
        """Parts already built for ``cfg`` (what ``build_all(cfg)`` would return)."""
        self._cache.clear()
        self._cache[self._key(cfg)] = parts


def fit_cell(cfg: dict, parts: dict, *, resume: bool, progress: bool, plan=None) -> dict:
    """Fit one cell's config on the shared ``parts`` through its run plan (``plan``, or a new one
    for ``cfg``), exactly as ``adamerge fit`` does."""
    from adamerge.plan import RunPlan

    if plan is None:
        plan = RunPlan(cfg, resume=None)
        plan.check_config()
    plan.resume, plan.progress = resume, progress
    return plan.build(parts).fit()


def _same_config(run: RunFolder, cfg: dict) -> bool:
    try:
        return run.read_config() == yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False))
    except (AdamergeError, yaml.YAMLError):
        return False


def _run_cell(cell: Cell, parts: _Parts, progress: bool, say: Callable[[str], None]) -> None:
    """Fit one cell: resume an interrupted attempt with the same config, else start afresh."""
    run = RunFolder(cell.folder)
    started = run.checkpoints.exists() or run.state_path.exists()
    resume = started and _same_config(run, cell.cfg)
    if cell.folder.exists() and not resume:
        if run.config_path.exists() and not _same_config(run, cell.cfg):
            say(f"[ablate] {cell.folder.name}: its config changed; starting it afresh")
        shutil.rmtree(cell.folder)
    elif resume:
        say(f"[ablate] {cell.folder.name}: resuming the interrupted attempt")
    p = parts.get(cell.cfg)
    memory = PeakMemory(_uses_cuda(cell.cfg))
    start = time.perf_counter()
    with memory:
        try:
            fit_cell(cell.cfg, p, resume=resume, progress=progress, plan=cell.plan)
        except (AdamergeError, KeyboardInterrupt):
            raise
        except Exception as err:
            if not resume:
                raise
            # a checkpoint cut mid-write by a kill: restart the cell from scratch
            say(f"[ablate] {cell.folder.name}: cannot resume ({type(err).__name__}: {err}); starting it afresh")
            shutil.rmtree(cell.folder)
            fit_cell(cell.cfg, p, resume=False, progress=progress)
    atomic_write_json(cell.folder / "ablation_cell.json", {
        "wall_seconds": round(time.perf_counter() - start, 3), "peak_memory_mb": round(memory.peak_mb, 1),
        "memory": memory.kind})


def coefficient_count(folder: Path) -> int | None:
    """How many coefficients a finished run learned: tasks × groups of ``coefficients.safetensors``;
    for a method with its own loop, the coefficients it saved as its state (FW-Merging's pool
    coefficients); ``None`` when it has none (T3 chooses coefficients per input)."""
    from safetensors import safe_open

    for name, key in (("coefficients.safetensors", "coefficients"), ("method_state.safetensors", "pool_coefficients")):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), "pt") as f:
                if key in f.keys():
                    return math.prod(int(n) for n in f.get_slice(key).get_shape())
        except Exception:  # unreadable: no count rather than no table
            return None
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cell_row(cell: Cell) -> dict:
    """The table row of a finished cell, read from its run folder (``coefficients`` is ``None``
    for a run without a fixed set of coefficients)."""
    run = RunFolder(cell.folder)
    res = run.read_results()
    after = res.get("after") or {}
    n_coef = coefficient_count(cell.folder)
    extra = _read_json(cell.folder / "ablation_cell.json")
    row: dict[str, Any] = {axis_label(k): _text(v) for k, v in cell.values.items()}
    row |= {"seed": cell.seed, "mean_accuracy": after.get("mean")}
    row |= {f"acc/{t}": v for t, v in (after.get("per_task") or {}).items()}
    row |= {"coefficients": n_coef,
            "wall_seconds": extra.get("wall_seconds", res.get("seconds")),  # the fit's own time when the attempt's record is lost
            "peak_memory_mb": extra.get("peak_memory_mb"), "run": str(cell.folder)}
    return row


def run_ablation(config: str | Path, grid: dict[str, list], seeds: Sequence[int], out: str | Path, *,
                 overrides: Sequence[tuple[str, Any]] = (), progress: bool = True) -> AblationResult:
    """Run (or continue) the ablation into ``out`` and write its tables and plots."""
    out = Path(out)
    if not grid:
        raise InputError("ablate needs at least one --grid axis (e.g. --grid granularity=task,layer)")
    if not seeds:
        raise InputError("ablate needs at least one seed (--seeds 0)")
    check_folder_path(out, "--out")
    check_distinct_keys(list(grid), "grid axes")
    check_not_overridden(list(grid), overrides, "grid axis")
    cells = plan_cells(config, grid, seeds, out, overrides)
    made = make_folders(out)
    try:
        with folder_lock(out, f"another `adamerge ablate` is running on {out}; wait for it to end"):
            return _run_cells(config, grid, seeds, out, cells, overrides, progress)
    except InputError:
        remove_folders(made)  # refused before anything was written: leave nothing
        raise


def _run_cells(config: str | Path, grid: dict[str, list], seeds: Sequence[int], out: Path, cells: list[Cell],
               overrides: Sequence[tuple[str, Any]], progress: bool) -> AblationResult:
    from adamerge.progress import Progress

    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    atomic_write_text(out / "ablation.yaml", yaml.safe_dump(
        {"config": str(Path(config).resolve()), "grid": {axis_label(k): v for k, v in grid.items()},
         "seeds": list(seeds), "overrides": {k: v for k, v in overrides}}, sort_keys=False))
    result = AblationResult(rows=[], total=len(cells))
    parts = _Parts()
    with Progress(len(cells), "ablate", enabled=progress, unit="cells", every_percent=1e-3) as bar:
        for cell in cells:
            label = f"{cell.name} seed={cell.seed}"
            run = RunFolder(cell.folder)
            if run.is_finished() and _same_config(run, cell.cfg):
                result.skipped += 1
            else:
                say(f"[ablate] fitting {label}")
                try:
                    result.fitted += 1
                    _run_cell(cell, parts, progress, say)
                except AdamergeError as err:
                    result.failed[label] = str(err)
                    say(f"[ablate] {label} failed: {err}")
            if run.is_finished():
                result.rows.append(cell_row(cell))
            bar.update(1)
    write_tables(out, result, list(grid), seeds)
    plotted = [r for r in result.rows if r["coefficients"] is not None and r["mean_accuracy"] is not None]
    if plotted:  # cells with a coefficient count and an accuracy (labels in the streams)
        plot_accuracy_vs_coefficients(plotted, [axis_label(k) for k in grid], out / "accuracy_vs_coefficients.png")
    with_coef = [c for c in cells if RunFolder(c.folder).is_finished() and (c.folder / "coefficients.safetensors").is_file()
                 and (c.folder / "groups.json").is_file()]
    if with_coef:  # own-loop methods (T3, FW-Merging) have no coefficient heat map
        first = [c for c in with_coef if c.seed == seeds[0]] or with_coef
        plot_coefficient_grid([(c.name, c.folder) for c in first], out / "coefficients.png")
    return result


def _csv_text(rows: list[dict]) -> str:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def summary_table(rows: list[dict], axes: list[str]) -> str:
    """Markdown: one line per cell, mean ± std (over seeds) of the mean and per-task accuracy."""
    tasks = list(dict.fromkeys(k[len("acc/"):] for r in rows for k in r if k.startswith("acc/")))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[a] for a in axes), []).append(r)
    head = axes + ["seeds", "coefficients", "mean acc. (%)"] + [f"{t} (%)" for t in tasks] + ["wall s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " if i < len(axes) else " ---: " for i in range(len(head))) + "|"]
    for key, rs in groups.items():
        mem = [r["peak_memory_mb"] for r in rs if r.get("peak_memory_mb") is not None]
        wall = [r["wall_seconds"] for r in rs if r.get("wall_seconds") is not None]
        coef = rs[0]["coefficients"]
        cells = [*key, str(len(rs)), "n/a" if coef is None else str(coef),
                 _mean_std([r["mean_accuracy"] for r in rs if r["mean_accuracy"] is not None])]
        cells += [_mean_std([r[f"acc/{t}"] for r in rs if r.get(f"acc/{t}") is not None]) for t in tasks]
        cells += [f"{statistics.fmean(wall):.1f}" if wall else "–", f"{max(mem):.0f}" if mem else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, result: AblationResult, grid_keys: list[str], seeds: Sequence[int]) -> None:
    """``ablation.csv`` and ``ablation.md``, each written atomically."""
    axes = [axis_label(k) for k in grid_keys]
    atomic_write_text(out / "ablation.csv", _csv_text(result.rows))
    done = len(result.rows)
    md = [f"# Ablation over {', '.join(axes)} (seeds {', '.join(map(str, seeds))})", "",
          f"{done} of {result.total} runs finished. Accuracy: mean ± std over the seeds of each cell"
          " (test labels score only; training never sees them).", "", summary_table(result.rows, axes)]
    if result.failed:
        md += ["## Failed runs", ""] + [f"- {k}: {v}" for k, v in result.failed.items()] + [""]
    atomic_write_text(out / "ablation.md", "\n".join(md))


def plot_accuracy_vs_coefficients(rows: list[dict], axes: list[str], path: Path) -> None:
    """Mean accuracy (± std over seeds) against the number of coefficients, one point per cell;
    one line per combination of the axes other than granularity, points labelled by granularity.
    Rows without a coefficient count or an accuracy are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adamerge.workflows.demo import _save_fig

    others = [a for a in axes if a != "granularity"]
    series: dict[tuple, dict[tuple, list[dict]]] = {}
    rows = [r for r in rows if r.get("coefficients") is not None and r.get("mean_accuracy") is not None]
    for r in rows:
        series.setdefault(tuple(r[a] for a in others), {}).setdefault(tuple(r[a] for a in axes), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, cells in series.items():
        pts = sorted((rs[0]["coefficients"], [100 * r["mean_accuracy"] for r in rs], rs[0].get("granularity", "")) for rs in cells.values())
        xs = [p[0] for p in pts]
        ys = [statistics.fmean(p[1]) for p in pts]
        es = [statistics.stdev(p[1]) if len(p[1]) > 1 else 0.0 for p in pts]
        label = ", ".join(f"{a}={v}" for a, v in zip(others, key)) or "runs"
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        for x, y, p in zip(xs, ys, pts):
            if p[2]:
                ax.annotate(p[2], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("number of coefficients (tasks × groups)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title("accuracy against the number of coefficients (± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def draw_coefficients(ax, run_dir: Path, title: str = "", vmax: float | None = None):
    """A run's applied coefficients (tasks × groups) as a heat map on ``ax``; returns the image."""
    from matplotlib.ticker import MaxNLocator
    from safetensors.torch import load_file

    coef = load_file(str(Path(run_dir) / "coefficients.safetensors"))["coefficients"].numpy()
    groups = json.loads((Path(run_dir) / "groups.json").read_text())
    im = ax.imshow(coef, aspect="auto", cmap="viridis", vmin=0, vmax=vmax or max(1.0, float(coef.max())),
                   interpolation="nearest")
    ax.set_yticks(range(coef.shape[0]))
    ax.set_yticklabels(groups["tasks"], fontsize=8)
    if coef.shape[1] <= 10:
        ax.set_xticks(range(coef.shape[1]))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"group ({coef.shape[1]}, input → output side)", fontsize=8)
    ax.set_title(title, fontsize=9)
    return im


def plot_coefficient_grid(runs: list[tuple[str, Path]], path: Path) -> None:
    """The coefficient heat maps of several runs side by side, on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.torch import load_file

    from adamerge.workflows.demo import _save_fig

    vmax = max(1.0, *(float(load_file(str(d / "coefficients.safetensors"))["coefficients"].max()) for _, d in runs))
    cols = min(len(runs), 4)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.4 * rows + 0.6), squeeze=False, layout="constrained")
    im = None
    for ax, (name, folder) in zip(axes.flat, runs):
        im = draw_coefficients(ax, folder, name, vmax)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02)
    fig.suptitle("learned coefficients per cell (first seed)")
    _save_fig(fig, path)


__all__ = ["option_key", "parse_grid", "parse_seeds", "coefficient_count", "plan_cells", "run_ablation", "cell_row", "summary_table",
           "write_tables", "plot_accuracy_vs_coefficients", "plot_coefficient_grid", "draw_coefficients",
           "fit_cell", "Cell", "AblationResult", "PeakMemory"]
