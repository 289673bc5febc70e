"""Every registered data-free merge on the demo zoo, TALL per-task masks, and the recommended
learned method started from the best of the merges.

Builds (or loads from the cache) the zoo exactly as ``adamerge demo`` does (5 tasks, 64 px, seed
0) and prints one table of per-task and mean accuracy. Rows marked ``(test labels)`` are grids
whose best point is chosen on the scored test labels (as the demo does for task arithmetic); the
other rows use options fixed before any score was seen (the merges' defaults). Then:

- TALL masks: for the recommended learned merge and for task arithmetic λ = 0.3, every task's
  model is rebuilt from the merged checkpoint with its bit-packed mask (``adamerge.io.task_masks``)
  and scored on its own task, next to the expert; the mask file's bytes against the model's.
- the recommended learned method of the time (``FORMER_RECOMMENDED`` in ``adamerge.workflows.demo``, the
  recommendation until session 36, with which docs/data_free_merges.md was measured) fitted as is, with
  ``preprocess`` = the best rewriting merge, and with ``init`` = LiNeS's depth profile.

    OMP_NUM_THREADS=1 python experiments/data_free_merges.py --out DIR --seeds 0 1   # heavy: ~30 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from adamerge.train.data import LinearHead, stream_from_tensors
from adamerge.workflows.demo import DEFAULT_TASKS, FULL, LEARNED
from adamerge.workflows.demo import FORMER_RECOMMENDED as RECOMMENDED
from adamerge.io.files import atomic_save_safetensors, atomic_write_json
from adamerge.merges import get_merge
from adamerge.methods import create_method
from adamerge.methods.data_free import merged_model
from adamerge.train.runs import RunFolder
from adamerge.io.task_masks import MASKS_FILE, load_task_state, save_task_masks
from adamerge.core.task_vectors import TaskVectors
from adamerge.plan import fit
from adamerge.train.evaluation import evaluate

LAMBDAS = FULL.lambdas  # the demo's λ grid
# options fixed before any score was seen: each merge's defaults (task arithmetic at the demo's 0.3)
FIXED = {
    "weight_average": ("weight_average", {}),
    "task_arithmetic(lam=0.3)": ("task_arithmetic", {"lam": 0.3}),
    "ties(lam=0.3,density=0.2)": ("ties", {}),
    "lines(alpha=1/T,beta=0.5)": ("lines", {}),
    "consensus(lam=0.3,k=2,tall_lambda=0.4)": ("consensus", {}),
    "breadcrumbs(lam=0.3,top=0.01,bottom=0.85)": ("breadcrumbs", {}),
    "dare(lam=0.3,p=0.5,seed=0)": ("dare", {}),
    "pcb(lam=1,ratio=0.1)": ("pcb", {}),
    "fisher(lam=1,samples=128,sample)": ("fisher", {}),
}
# grids whose best point is picked on the test labels
GRIDS = {
    "ties": ("lam", LAMBDAS),
    "lines": ("beta", (0.0, 0.25, 0.5, 0.75, 1.0)),
    "consensus": ("lam", LAMBDAS),
    "breadcrumbs": ("lam", LAMBDAS),
    "dare": ("lam", LAMBDAS),
    "pcb": ("lam", (0.5, 0.7, 1.0, 1.3)),
    "fisher": ("lam", (0.5, 0.7, 1.0, 1.3)),
}
MASK_LAMBDAS = (0.2, 0.4, 0.6)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(rows: dict, tasks: list[str]) -> str:
    width = max(len(n) for n in rows) + 2
    lines = ["method".ljust(width) + "".join(t[:13].rjust(14) for t in tasks) + "mean".rjust(8) + "seconds".rjust(9)]
    lines.append("-" * len(lines[0]))
    for name, r in rows.items():
        lines.append(name.ljust(width) + "".join(f"{100 * r['per_task'][t]:14.1f}" for t in tasks)
                     + f"{100 * r['mean']:8.1f}" + f"{r.get('seconds', 0):9.1f}")
    return "\n".join(lines)


def main() -> None:
    from adamerge.zoo import build_zoo, create_backbone, list_tasks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data-free-merges-out")
    ap.add_argument("--cache-dir", default=os.environ.get("ADAMERGE_CACHE", str(Path.home() / ".cache" / "adamerge")))
    ap.add_argument("--skip-learned", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the learned fits")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    available = list_tasks(available_only=True)
    tasks = [t for t in DEFAULT_TASKS if t in available]
    zoo = build_zoo(args.cache_dir, tasks, image_size=FULL.image_size, seed=0, steps=FULL.zoo_steps,
                    n_train=FULL.n_train, n_test=FULL.n_test, progress=False)
    heads = {t: LinearHead.from_state_dict(zoo.heads[t], source=f"zoo head '{t}'") for t in tasks}
    streams = [stream_from_tensors(t, zoo.tasks[t].x_test, zoo.tasks[t].y_test, zoo.tasks[t].classes, "demo zoo") for t in tasks]
    tv = TaskVectors.from_state_dicts(zoo.base, {t: zoo.experts[t] for t in tasks})
    arch = create_backbone(pretrained=False)
    keys = [n for n, _ in arch.named_parameters()]
    stacks = {k: tv.vectors[k] for k in keys}
    rows: dict[str, dict] = {}

    def record(name: str, scores: dict, seconds: float) -> dict:
        rows[name] = {**scores, "seconds": round(seconds, 1)}
        say(f"{name:55s} mean {100 * scores['mean']:.1f}%  ({seconds:.1f} s)")
        return rows[name]

    per_task = {}
    for t, s in zip(tasks, streams):
        arch.load_state_dict(zoo.experts[t])
        per_task[t] = evaluate(arch, heads, [s])["per_task"][t]
    record("experts (reference)", {"per_task": per_task, "mean": sum(per_task.values()) / len(tasks)}, 0.0)

    # fixed-option rows; the merge results are kept for the grids (Fisher is estimated once)
    results = {}
    for name, (merge, options) in FIXED.items():
        t0 = time.perf_counter()
        spec = get_merge(merge)
        opts = spec.options(options)
        data = spec.estimate(arch, tv, heads, streams, opts, keys) if spec.needs_data else {}
        results[merge] = (spec, options, data)
        mm = merged_model(arch, tv, spec.run(stacks, opts, **data))
        record(name, evaluate(mm, heads, streams), time.perf_counter() - t0)
        del mm
    grid_rows: dict[str, dict] = {}
    for merge, (key, grid) in GRIDS.items():
        spec, options, data = results[merge]
        best = None
        for value in grid:
            t0 = time.perf_counter()
            mm = merged_model(arch, tv, spec.run(stacks, spec.options({**options, key: value}), **data))
            scores = evaluate(mm, heads, streams)
            grid_rows[f"{merge}({key}={value:g})"] = {**scores, "seconds": round(time.perf_counter() - t0, 1)}
            if best is None or scores["mean"] > best[1]["mean"]:
                best = (value, scores, time.perf_counter() - t0)
            del mm
        record(f"{merge}({key}={best[0]:g}) (test labels)", best[1], best[2])

    new = [n for n in FIXED if n.split("(")[0] in ("lines", "consensus", "breadcrumbs", "dare", "pcb", "fisher")]
    best_fixed = max(new, key=lambda n: rows[n]["mean"])
    rewriting = [n for n in new if get_merge(FIXED[n][0]).rewrites and not get_merge(FIXED[n][0]).needs_data]
    best_rewrite = max(rewriting, key=lambda n: rows[n]["mean"])
    say(f"best new merge at fixed options: {best_fixed}; best rewriting one: {best_rewrite} (chosen on test labels)")

    # TALL masks on task arithmetic λ = 0.3 (and below on the recommended learned merge)
    masks: dict[str, dict] = {}

    def tall(label: str, merged_state: dict) -> None:
        folder = Path(tempfile.mkdtemp(prefix="tall-", dir=out))
        try:
            atomic_save_safetensors({k: v.contiguous() for k, v in merged_state.items()}, folder / "model.safetensors")
            model_bytes = (folder / "model.safetensors").stat().st_size
            for lam in MASK_LAMBDAS:
                save_task_masks(folder, tv, merged_state, keys, lam=lam)
                acc = {}
                for t, s in zip(tasks, streams):
                    arch.load_state_dict(load_task_state(folder, t, base=zoo.base))
                    acc[t] = evaluate(arch, heads, [s])["per_task"][t]
                masks[f"{label}, TALL λ={lam:g}"] = {
                    "per_task": acc, "mean": sum(acc.values()) / len(acc),
                    "mask_bytes": (folder / MASKS_FILE).stat().st_size, "model_bytes": model_bytes,
                }
                say(f"TALL {label} λ={lam:g}: mean {100 * masks[f'{label}, TALL λ={lam:g}']['mean']:.1f}%,"
                    f" masks {(folder / MASKS_FILE).stat().st_size} B vs model {model_bytes} B")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    spec, _, _ = results["task_arithmetic"]
    ta = merged_model(arch, tv, spec.run(stacks, spec.options({"lam": 0.3})))
    tall("task_arithmetic(lam=0.3)", ta.merged_state_dict())
    del ta

    learned: dict[str, dict] = {}
    if not args.skip_learned:
        method, rec = LEARNED[RECOMMENDED]
        rec = {**rec, "steps": FULL.steps}
        variants = {
            RECOMMENDED: rec,
            f"{RECOMMENDED} + preprocess {FIXED[best_rewrite][0]}": {**rec, "preprocess": {"merge": FIXED[best_rewrite][0], **FIXED[best_rewrite][1]}},
            f"{RECOMMENDED} + init lines": {**rec, "init": {"merge": "lines"}},
        }
        for seed, (name, options) in ((s, v) for s in args.seeds for v in variants.items()):
            run_dir = out / "runs" / f"{''.join(c if c.isalnum() else '_' for c in name)}-seed{seed}"
            if RunFolder(run_dir).is_finished():
                res = RunFolder(run_dir).read_results()
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
                say(f"fitting {name}")
                res = fit(run_dir, arch, tv, heads, streams, method, options, seed=seed, progress=False,
                          checkpoint_every=options["steps"])
            row = f"{name} (seed {seed})"
            learned[row] = record(row, res["after"], res["seconds"])
            learned[row]["before"] = res["before"]
            say(f"  started from mean {100 * res['before']['mean']:.1f}%")
            if name == RECOMMENDED and seed == args.seeds[0]:
                m = create_method(method)
                cfg = m.config(options)
                mm = m.build(arch, tv, cfg, seed=seed, state=RunFolder(run_dir).load_state() or None)
                mm.set_coefficients(RunFolder(run_dir).load_coefficients())
                tall(f"recommended (seed {seed})", mm.merged_state_dict())
                del mm

    text = table(rows, tasks)
    print(text)
    print()
    print(table(grid_rows, tasks))
    print()
    print(table(masks, tasks))
    for name, r in masks.items():
        print(f"{name}: masks {r['mask_bytes']} B = {100 * r['mask_bytes'] / r['model_bytes']:.2f}% of the model ({r['model_bytes']} B)")
    atomic_write_json(out / "results.json", {"tasks": tasks, "rows": rows, "grid": grid_rows, "tall": masks,
                                             "best_fixed": best_fixed, "best_rewrite": best_rewrite, "learned": learned,
                                             "zoo": str(zoo.path)})


if __name__ == "__main__":
    main()
