"""``adamerge demo``: the offline benchmark on a real model zoo (EfficientNet-Lite0 ImageNet
weights, packaged image datasets), every method side by side, a table, plots and an export.

The learned methods see the test streams without labels; labels only score. The recommended
method is one fixed configuration (:data:`RECOMMENDED`), never chosen per run from test labels.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from adamerge.train.data import LinearHead, stream_from_tensors
from adamerge.errors import InputError
from adamerge.io.files import atomic_write_json, atomic_write_text
from adamerge.methods import build_data_free, create_method
from adamerge.methods.base import same_run
from adamerge.train.runs import RunFolder
from adamerge.core.task_vectors import TaskVectors
from adamerge.plan import fit
from adamerge.train.evaluation import evaluate

DEFAULT_TASKS = ["mnist", "digits", "textile", "fashion_mnist", "opencv_digits"]
LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class Setting:
    image_size: int
    zoo_steps: int
    n_train: int | None
    n_test: int | None
    steps: int
    lambdas: tuple[float, ...]


FULL = Setting(image_size=64, zoo_steps=300, n_train=None, n_test=None, steps=200, lambdas=LAMBDAS)
QUICK = Setting(image_size=32, zoo_steps=80, n_train=400, n_test=200, steps=60, lambdas=(0.3, 0.5, 1.0))

# name -> (registered method, options). Demo runs use lr 1e-2 (200 steps instead of the
# paper's 500 at 1e-3).
LEARNED: dict[str, tuple[str, dict]] = {
    "adamerging(task)": ("adamerging", {"granularity": "task", "lr": 1e-2}),
    "adamerging(layer)": ("adamerging", {"granularity": "layer", "lr": 1e-2}),
    "adamerging(block)": ("adamerging", {"granularity": "block", "lr": 1e-2}),
    "adamerging++(layer)": ("adamerging++", {"granularity": "layer", "lr": 1e-2}),
    "adamerging(layer,infomax)": ("adamerging", {"granularity": "layer", "lr": 1e-2, "objective": "infomax"}),
    "adamerging(layer,reliable_entropy)": ("adamerging", {"granularity": "layer", "lr": 1e-2, "objective": "reliable_entropy"}),
    "adamerging(layer,infomax,floor=0.9)": (
        "adamerging",
        {"granularity": "layer", "lr": 1e-2, "objective": "infomax", "objective_args": {"floor": 0.9}},
    ),
}
_REC = {"granularity": "layer", "lr": 1e-2, "objective": "infomax", "objective_args": {"floor": 0.9}}
# the solvers (issue 9): the recommended objective under other solvers, and DOGE. DOGE's
# ``steps`` are its Adam steps per layer (fixed here, not the demo's step count).
LEARNED |= {
    "adamerging(layer,infomax,floor=0.9,pgd-box)": ("adamerging", {**_REC, "solver": "pgd", "constraint": "box"}),
    "adamerging(layer,infomax,floor=0.9,pgd-simplex)": ("adamerging", {**_REC, "solver": "pgd", "constraint": "simplex"}),
    "adamerging(layer,infomax,floor=0.9,fw-simplex)": ("adamerging", {**_REC, "solver": "frank_wolfe", "constraint": "simplex"}),
    "doge": ("doge", {"steps": 400}),
    "doge+adamerging(layer,infomax,floor=0.9)": ("doge_adamerging", dict(_REC)),
}
# Concrete subspace masks (issue 10): the papers' 2000 steps at lr 1e-3 compressed like the
# AdaMerging rows (the demo's steps at lr 1e-2); concrete_adamerging: that many meta-steps, then
# that many AdaMerging steps on the frozen mask
LEARNED |= {
    "concrete_ta": ("concrete_ta", {"lr": 1e-2}),
    "concrete_ta(paper)": ("concrete_ta", {"lr": 1e-2, "objective": "entropy"}),
    "concrete_adamerging(layer)": ("concrete_adamerging", {"lr": 1e-2}),
    # concrete_adamerging's former default (issue 23): the collapse-safe objective
    "concrete_adamerging(layer,infomax)": ("concrete_adamerging", {"lr": 1e-2, "objective": "infomax",
                                                                   "objective_args": {"floor": 0.9}}),
    "concrete_adamerging(layer,paper)": ("concrete_adamerging", {"lr": 1e-2, "objective": "entropy"}),
}
# aTLAS (issue 10): test time (unlabeled, trusted pseudo-labels) and few-shot (k labeled images
# per class from each task's TRAINING split, never the scored test split): uses labels
LEARNED |= {
    "atlas(test_time)": ("atlas", {"lr": 1e-2}),
    # the former default (issue 23): the paper's trusted set and weak/strong views, labelled by the
    # experts, a mild view, from task arithmetic
    "atlas(test_time,weak_strong)": ("atlas", {"lr": 1e-2, "objective": "weak_strong"}),
    "atlas(test_time,paper)": ("atlas", {"lr": 1e-2, "init": 0.0, "objective": "weak_strong",
                                         "method_args": {"teacher": "pretrained", "crop_min": 0.5, "flip": True}}),
    "atlas(few_shot,k=5)": ("atlas", {"lr": 1e-2, "method_args": {"mode": "few_shot", "shots": 5}}),
    "atlas(few_shot,k=25)": ("atlas", {"lr": 1e-2, "method_args": {"mode": "few_shot", "shots": 25}}),
}
# expert-guided (issue 16): the experts' own predictions on the unlabeled streams as targets
LEARNED |= {
    "adamerging(layer,expert_distill)": ("adamerging", {"granularity": "layer", "lr": 1e-2, "objective": "expert_distill"}),
    "adamerging(partition:4,expert_distill)": ("adamerging", {"granularity": "partition:4", "lr": 1e-2, "objective": "expert_distill"}),
}
# trust-weighted (issue 24): the expert where it is confident (max probability >= 0.9), else the
# starting merge (task arithmetic λ = 0.3) as the anchor
_TRUSTED = {"lr": 1e-2, "objective": "trusted_distill"}
_P4_TRUSTED = {"granularity": "partition:4", **_TRUSTED}
LEARNED |= {
    "adamerging(layer,trusted_distill)": ("adamerging", {"granularity": "layer", **_TRUSTED}),
    "adamerging(partition:4,trusted_distill)": ("adamerging", dict(_P4_TRUSTED)),
    "adamerging(layer,trusted_distill,hard)": ("adamerging", {"granularity": "layer", **_TRUSTED, "objective_args": {"hard": True}}),
    "adamerging(partition:4,trusted_distill,hard)": ("adamerging", {**_P4_TRUSTED, "objective_args": {"hard": True}}),
    # SyMerge's recipe (issue 24): the heads train with the coefficients on the same targets
    "adamerging(partition:4,trusted_distill,heads)": ("adamerging", {**_P4_TRUSTED, "train_heads": True}),
    # session 36: where the expert is unsure, the mean of its distribution and the start's (neither
    # prediction alone is the better one on every development setting)
    "adamerging(partition:4,trusted_distill,unsure=mean)": ("adamerging", {**_P4_TRUSTED, "objective_args": {"unsure": "mean"}}),
    "adamerging(partition:4,trusted_distill,unsure=mean,heads)": ("adamerging", {**_P4_TRUSTED, "objective_args": {"unsure": "mean"},
                                                                                 "train_heads": True}),
    # session 37: the start's prediction averaged over nine shifted copies of each image (the
    # expert's stays single-view); chosen on the development settings' targets before any fit
    "adamerging(partition:4,trusted_distill,unsure=mean,start_views=9,heads)": (
        "adamerging", {**_P4_TRUSTED, "objective_args": {"unsure": "mean", "start_views": 9}, "train_heads": True}),
}
# test-time merging and merging over a pool (issue 11): T3 per input and per batch (no training;
# settings fixed on the quick zoo, experiments/t3_settings.py); FW-Merging with the paper's
# defaults over a pool of the experts plus two distractors (see _pool)
LEARNED |= {
    "t3": ("t3", {}),
    "t3_b": ("t3", {"method_args": {"per": "batch"}}),
    "fw_merging(hard)": ("fw_merging", {}),
    # hard mode's step a_t = 2/(t+2) · step_size · scale every iteration (the paper's schedule; the
    # default line search takes the step of {0, a_t/2, a_t, 2a_t, 4a_t} with the lowest objective)
    "fw_merging(hard,schedule)": ("fw_merging", {"method_args": {"step_rule": "schedule"}}),
    "fw_merging(soft)": ("fw_merging", {"method_args": {"soft": True}}),
    # FW-Soft's former default (issue 23): the collapse-safe objective for the oracle and the
    # nested AdaMerging; and the unlabeled paper's entropy
    "fw_merging(soft,infomax)": ("fw_merging", {"objective": "infomax", "objective_args": {"floor": 0.9},
                                                "method_args": {"soft": True}}),
    "fw_merging(soft,paper)": ("fw_merging", {"objective": "entropy", "method_args": {"soft": True}}),
}
# the data-free merges of issue 15: the recommended method started from one of them
LEARNED |= {
    "adamerging(layer,infomax,floor=0.9,preprocess=pcb)": ("adamerging", {**_REC, "preprocess": {"merge": "pcb"}}),
    "adamerging(layer,infomax,floor=0.9,init=lines)": ("adamerging", {**_REC, "init": {"merge": "lines"}}),
}
DATA_FREE_GRIDS = ("task_arithmetic", "ties", "consensus", "breadcrumbs", "dare", "pcb")
DATA_FREE_FIXED = {"lines(beta=0.5)": "lines", "fisher(lam=1)": "fisher"}
# One fixed choice for every run, changed only by the recommendation protocol (defaults fixed on the
# development settings, then run once on held-out ones; README, experiments/trusted_recommendation.py).
# Since session 36 (issue 24): partition-wise coefficients and trained heads on the experts'
# confident predictions, elsewhere the mean of the expert's and the start's distributions; since
# session 37 the start's distribution averaged over nine shifted copies of each image.
RECOMMENDED = "adamerging(partition:4,trusted_distill,unsure=mean,start_views=9,heads)"
# the recommendation until session 36 (the collapse-safe entropy objective)
FORMER_RECOMMENDED = "adamerging(layer,infomax,floor=0.9)"
# ``--quick`` runs these rows only (the test suite runs it: under 3 minutes cold on 2 cores, zoo
# included; the full demo keeps every row): the paper's task- and layer-wise AdaMerging, the
# recommended row, DOGE and the former recommendation
QUICK_ROWS = ["adamerging(task)", "adamerging(layer)", RECOMMENDED, "doge", FORMER_RECOMMENDED]


def row_kind(method: str) -> str:
    """The table's kind of a learned row's method: DOGE needs no data, T3 merges at test time."""
    return {"doge": "data_free", "t3": "test_time"}.get(method, "learned")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "+-_" else "_" for c in name).strip("_")


def run_demo(
    out: str | os.PathLike = "adamerge-demo",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    tasks: list[str] | None = None,
    image_size: int | None = None,
    steps: int | None = None,
    quick: bool = False,
    progress: bool = True,
    methods: list[str] | None = None,
) -> dict:
    """Build (or load) the zoo, score every method, write results, plots and the export."""
    from adamerge.zoo import build_zoo, create_backbone, list_tasks

    setting = QUICK if quick else FULL
    image_size = image_size or setting.image_size
    steps = steps or setting.steps
    available = list_tasks(available_only=True)
    if tasks is None:
        tasks = [t for t in DEFAULT_TASKS if t in available][: 3 if quick else None]
    unknown = [t for t in tasks if t not in list_tasks(available_only=False)]
    if unknown:
        raise InputError(f"unknown demo task '{unknown[0]}'; available: {available}")
    if len(tasks) < 3:
        raise InputError(f"the demo needs at least 3 tasks, got {tasks}")
    cache_dir = Path(cache_dir or os.environ.get("ADAMERGE_CACHE", Path.home() / ".cache" / "adamerge"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    say(f"[demo] zoo: {tasks} at {image_size}px, {setting.zoo_steps} fine-tuning steps (cache {cache_dir})")
    zoo = build_zoo(cache_dir, tasks, image_size=image_size, seed=seed, steps=setting.zoo_steps,
                    n_train=setting.n_train, n_test=setting.n_test, progress=progress)
    heads = {t: LinearHead.from_state_dict(zoo.heads[t], source=f"zoo head '{t}'") for t in tasks}
    streams = [stream_from_tensors(t, zoo.tasks[t].x_test, zoo.tasks[t].y_test, zoo.tasks[t].classes, "demo zoo") for t in tasks]
    # the training splits: a labeled split for few-shot rows only (the learned rows never see it)
    labeled = [stream_from_tensors(t, zoo.tasks[t].x_train, zoo.tasks[t].y_train, zoo.tasks[t].classes, "demo zoo train split") for t in tasks]
    tv = TaskVectors.from_state_dicts(zoo.base, {t: zoo.experts[t] for t in tasks})
    arch = create_backbone(pretrained=False)
    results: dict = {"tasks": tasks, "methods": {}, "recommended": RECOMMENDED,
                     "settings": {"seed": seed, "image_size": image_size, "steps": steps, "quick": quick,
                                  "zoo": str(zoo.path), "zoo_steps": setting.zoo_steps}}

    def record(name: str, kind: str, uses_labels: bool, scores: dict, seconds: float) -> None:
        results["methods"][name] = {"kind": kind, "uses_labels": uses_labels, "per_task": scores["per_task"],
                                    "mean": scores["mean"], "seconds": round(seconds, 3)}
        say(f"[demo] {name:40s} mean {100 * scores['mean']:.1f}%")

    # references: each expert on its own task, and the pretrained backbone with the experts' heads
    t0 = time.perf_counter()
    per_task = {}
    for t, s in zip(tasks, streams):
        arch.load_state_dict(zoo.experts[t])
        per_task[t] = evaluate(arch, heads, [s])["per_task"][t]
    record("experts", "reference", True, {"per_task": per_task, "mean": sum(per_task.values()) / len(tasks)}, time.perf_counter() - t0)
    t0 = time.perf_counter()
    arch.load_state_dict(zoo.base)
    record("pretrained+heads", "reference", True, evaluate(arch, heads, streams), time.perf_counter() - t0)

    # data-free baselines
    t0 = time.perf_counter()
    record("weight_average", "data_free", False, evaluate(build_data_free("weight_average", arch, tv), heads, streams), time.perf_counter() - t0)
    # λ grids (each λ a row: picking the best would use the test labels); the other options of
    # each merge stay at their defaults (docs/data_free_merges.md)
    for name in DATA_FREE_GRIDS[:2] if quick else DATA_FREE_GRIDS:  # --quick keeps its 3-minute budget
        for lam in setting.lambdas:
            t0 = time.perf_counter()
            mm = build_data_free(name, arch, tv, lam=lam)
            record(f"{name}(lam={lam:g})", "data_free", False, evaluate(mm, heads, streams), time.perf_counter() - t0)
    # merges with their defaults as they are (Fisher estimates on the unlabeled streams)
    for row, merge in ({} if quick else DATA_FREE_FIXED).items():
        t0 = time.perf_counter()
        mm = build_data_free(merge, arch, tv, heads=heads, streams=streams)
        record(row, "data_free", False, evaluate(mm, heads, streams), time.perf_counter() - t0)

    # learned methods (unlabeled test streams)
    runs = out / "runs"
    chosen = methods or (QUICK_ROWS if quick else list(LEARNED))
    unknown = [n for n in chosen if n not in LEARNED]
    if unknown:
        raise InputError(f"unknown demo row '{unknown[0]}'; rows: {list(LEARNED)}")
    pool = None
    _zoo_files(out, zoo, tasks)
    for name in chosen:
        method, options = LEARNED[name]
        own_loop = create_method(method).own_loop
        options = dict(options) if own_loop else {**options, "steps": options.get("steps", steps)}
        if method == "fw_merging" and pool is None:
            pool = _pool(out, zoo, tasks, seed)
        if method == "concrete_adamerging":
            options["method_args"] = {"adamerging_steps": options["steps"], **options.get("method_args", {})}
        if quick and method == "doge":
            options["steps"] = 100
        run_dir = runs / _slug(name)
        # a row whose finished run was made from the same zoo and options is reused, so an
        # interrupted demo continues where it stopped
        # (the resolved options too: a run made under other method defaults is not reused)
        resolved = create_method(method).settings(create_method(method).config(options))
        spec = json.loads(json.dumps({"zoo": str(zoo.path), "method": method, "options": options, "seed": seed,
                                      "resolved": resolved}, default=str))
        marker = run_dir / "demo_row.json"
        # the row's resolved config: `adamerge fit --config RUN/config.yaml` reruns it
        row_cfg = row_config(out, zoo, tasks, seed, method, options, run_dir,
                             labeled=create_method(method).uses_labels_with(create_method(method).config(options)),
                             pool=pool if method == "fw_merging" else None)
        # (a run made under other execution options, e.g. micro_batch, is the same run: same_run)
        own = marker.is_file() and same_run(json.loads(marker.read_text()), spec) and RunFolder(run_dir).is_finished()
        twin = None if own else same_finished_run(runs, spec, run_dir)
        if own:
            res = RunFolder(run_dir).read_results()
            say(f"[demo] reusing the finished run of {name}")
            if not RunFolder(run_dir).config_path.is_file():
                RunFolder(run_dir).write_config(row_cfg)
        elif twin is not None:
            # another row under another name made this very run (e.g. a variant that a default
            # later became): copied, with this row's own config and marker
            say(f"[demo] reusing the finished run of {name} from row folder '{twin.name}' (the same resolved settings)")
            shutil.rmtree(run_dir, ignore_errors=True)
            tmp = run_dir.with_name(run_dir.name + ".copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(twin, tmp)
            tmp.rename(run_dir)
            RunFolder(run_dir).write_config(row_cfg)
            atomic_write_json(marker, spec)
            res = RunFolder(run_dir).read_results()
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            RunFolder(run_dir).write_config(row_cfg)
            say(f"[demo] fitting {name}" + ("" if own_loop else f" ({options['steps']} steps{' per layer' if method == 'doge' else ''})"))
            res = fit(run_dir, arch, tv, heads, streams, method, options, seed=seed, progress=progress,
                      checkpoint_every=max(options.get("steps", 1), 1), labeled=labeled,
                      pool=pool if method == "fw_merging" else None)
            atomic_write_json(marker, spec)
        kind = row_kind(method)
        record(name, kind, res["uses_labels"], res["after"], res["seconds"])
        if "fw_merging" in res:  # which candidates it chose: the share of the tensors' weight each holds
            results["methods"][name]["pool_weight"] = {n: round(w, 4) for n, w in res["fw_merging"]["weight_per_candidate"].items()}

    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_table(results))
    plot_accuracy(results, out / "accuracy.png")
    rec_dir = runs / _slug(RECOMMENDED)
    if RECOMMENDED in results["methods"]:
        plot_coefficients(rec_dir, out / "coefficients.png", title=RECOMMENDED)
        _export_recommended(out, rec_dir, zoo, tasks, seed, results)
    print(results_table(results))
    print(f"\nresults: {out / 'results.json'}, {out / 'results.md'}; plots: {out / 'accuracy.png'},"
          f" {out / 'coefficients.png'}; merged checkpoint: {out / 'export'}")
    return results


def same_finished_run(runs: Path, spec: dict, exclude: Path | None = None) -> Path | None:
    """A finished demo row folder under ``runs`` (other than ``exclude``) made from the same zoo,
    method, seed and resolved settings as ``spec`` (the options as written may differ: a default
    named explicitly is the same run), or ``None``."""
    if not runs.is_dir():
        return None
    keys = ("zoo", "method", "seed")
    for marker in sorted(runs.glob("*/demo_row.json")):
        folder = marker.parent
        if exclude is not None and folder.resolve() == Path(exclude).resolve():
            continue
        try:
            other = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(other, dict) or any(other.get(k) != spec.get(k) for k in keys) or "resolved" not in other:
            continue
        if same_run(other["resolved"], spec["resolved"]) and RunFolder(folder).is_finished():
            return folder
    return None


def _pool(out: Path, zoo, tasks: list[str], seed: int) -> dict[str, str]:
    """FW-Merging's demo pool: the experts' files plus two distractors written to ``OUT/pool``:
    ``noise`` (the base plus Gaussian noise as large, per tensor, as the first expert's task
    vector) and ``anti_<task>`` (the base minus the first expert's task vector: it unlearns that
    task)."""
    import torch

    from adamerge.io.files import atomic_save_safetensors

    first = tasks[0]
    pool = {t: str(zoo.path / "experts" / f"{t}.safetensors") for t in tasks}
    missing = [p for p in pool.values() if not Path(p).is_file()]
    if missing:
        raise InputError(f"the demo zoo has no expert file {missing[0]}")
    gen = torch.Generator().manual_seed(seed)
    noise, anti = {}, {}
    for k, v in zoo.base.items():
        if not v.is_floating_point():
            noise[k] = anti[k] = v
            continue
        tau = zoo.experts[first][k] - v
        noise[k] = v + tau.norm() / max(1, v.numel()) ** 0.5 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        anti[k] = v - tau
    for name, sd in (("noise", noise), (f"anti_{first}", anti)):
        path = out / "pool" / f"{name}.safetensors"
        atomic_save_safetensors(sd, path)
        pool[name] = str(path)
    return pool


def _zoo_files(out: Path, zoo, tasks: list[str]) -> None:
    """``OUT/zoo`` (a link to the cached zoo) and ``OUT/data/<task>.safetensors`` (the test
    streams), what the rows' configs point at."""
    from adamerge.io.files import atomic_save_safetensors

    link = out / "zoo"
    if not (link.is_symlink() and link.resolve() == zoo.path.resolve()):
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to(zoo.path.resolve(), target_is_directory=True)
    for t in tasks:
        atomic_save_safetensors({"x": zoo.tasks[t].x_test, "y": zoo.tasks[t].y_test}, out / "data" / f"{t}.safetensors")


def row_config(out: Path, zoo, tasks: list[str], seed: int, method: str, options: dict, run_dir: Path, *,
               labeled: bool = False, pool: dict[str, str] | None = None) -> dict:
    """The resolved ``adamerge fit`` config of one demo row over ``OUT/zoo`` and ``OUT/data``
    (see :func:`_zoo_files`): the same inputs, options, seed and checkpointing as the demo's own
    ``fit`` call. ``labeled`` adds the training splits (``OUT/data/<task>.train.safetensors``) for
    rows that read labels; ``pool`` is FW-Merging's candidates."""
    from adamerge.io.files import atomic_save_safetensors

    link = out / "zoo"
    cfg = {
        "seed": seed, "prefix": None, "storage_dtype": "float32", "method": method,
        "options": json.loads(json.dumps(options)),
        "model": {"source": "efficientnet_lite0"},
        "base": str(link / "base.safetensors"),
        "experts": {t: str(link / "experts" / f"{t}.safetensors") for t in tasks},
        "heads": {t: {"path": str(link / "heads" / f"{t}.safetensors")} for t in tasks},
        "data": {t: {"tensors": str(out / "data" / f"{t}.safetensors")} for t in tasks},
        "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto"},
        "run_dir": str(Path(run_dir).resolve()), "eval_batch_size": 256,
        "checkpoint_every": max(options.get("steps", 1), 1), "cache_dir": None,
    }
    if labeled:
        for t in tasks:
            path = out / "data" / f"{t}.train.safetensors"
            if not path.is_file():
                atomic_save_safetensors({"x": zoo.tasks[t].x_train, "y": zoo.tasks[t].y_train}, path)
        cfg["labeled"] = {t: {"tensors": str(out / "data" / f"{t}.train.safetensors")} for t in tasks}
    if pool:
        cfg["pool"] = dict(pool)
    return cfg


def _export_recommended(out: Path, run_dir: Path, zoo, tasks, seed, results) -> None:
    """Write ``OUT/config.yaml`` (the recommended row's config over the zoo, see
    :func:`row_config`) and export the recommended run through the same path as ``adamerge export``."""
    from adamerge.config import dump_config
    from adamerge.workflows.export import export_run

    method, options = LEARNED[RECOMMENDED]
    cfg = row_config(out, zoo, tasks, seed, method, {**options, "steps": results["settings"]["steps"]}, run_dir)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    export_run(run_dir, out / "export", force=True)


def results_table(results: dict) -> str:
    tasks = results["tasks"]
    lines = ["| method | kind | labels | " + " | ".join(tasks) + " | mean | seconds |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |"]
    for name, r in results["methods"].items():
        star = " (recommended)" if name == results.get("recommended") else ""
        cells = " | ".join(f"{100 * r['per_task'][t]:.1f}" for t in tasks)
        lines.append(f"| {name}{star} | {r['kind']} | {'yes' if r['uses_labels'] else 'no'} | {cells} | {100 * r['mean']:.1f} | {r['seconds']:.1f} |")
    for name, r in results["methods"].items():
        if "pool_weight" in r:  # FW-Merging: the weight each pool candidate holds in the merge
            shares = ", ".join(f"{n} {w:.3f}" for n, w in r["pool_weight"].items())
            lines.append(f"\n{name}: mean coefficient per pool candidate: {shares}")
    return "\n".join(lines) + "\n"


def plot_accuracy(results: dict, path: Path) -> None:
    """Grouped bars: accuracy per task for each method, mean as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    tasks = results["tasks"]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(names) + 2), 4.5))
    width = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        ax.bar([k + i * width - 0.4 + width / 2 for k in range(len(names))],
               [100 * results["methods"][n]["per_task"][t] for n in names], width, label=t)
    ax.scatter(range(len(names)), [100 * results["methods"][n]["mean"] for n in names], marker="_", s=300, c="k", label="mean", zorder=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("accuracy per method and task")
    fig.tight_layout()
    _save_fig(fig, path)


def plot_coefficients(run_dir: Path, path: Path, title: str = "") -> None:
    """Heat map of a run's applied coefficients: tasks × groups (layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.torch import load_file

    coef = load_file(str(run_dir / "coefficients.safetensors"))["coefficients"].numpy()
    groups = json.loads((run_dir / "groups.json").read_text())
    fig, ax = plt.subplots(figsize=(max(8, 0.06 * coef.shape[1] + 3), 0.5 * coef.shape[0] + 2))
    im = ax.imshow(coef, aspect="auto", cmap="viridis", vmin=0, vmax=max(1.0, float(coef.max())))
    ax.set_yticks(range(coef.shape[0]))
    ax.set_yticklabels(groups["tasks"])
    ax.set_xlabel(f"coefficient group ({groups['granularity']}, {coef.shape[1]} groups, input side → output side)")
    ax.set_title(f"learned coefficients {title}")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    """Save ``fig`` to ``path`` atomically: a temporary file unique to this call (``mkstemp`` in the
    same folder, so processes writing the same plot at once never share one), then a rename."""
    import matplotlib.pyplot as plt

    from adamerge.io.files import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
