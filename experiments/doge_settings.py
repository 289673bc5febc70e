"""DOGE on a cached demo zoo (issue 23): λ statistics per layer kind, how much of τ the trim keeps,
and the demo score of option settings of method doge (solver_args variants).

Each variant is the method's own solve + build (what `fit` of method doge runs, data-free): the δ
of a λ rule (c, lam_mean, cap, steps) is solved once and cached under --delta-cache, then every
variant sharing that rule only rebuilds the merge (trim, others). `--fit` runs `fit` instead.

    python experiments/doge_settings.py --quick --steps 100
    python experiments/doge_settings.py --seed 2 --tasks digits,textile,opencv_digits --image-size 48
    python experiments/doge_settings.py --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# solver_args are merged into method doge's defaults ({lam_mean: 0.3, others: 0.3, cap: 1}): the
# fixed c = 0.07 needs lam_mean None explicitly
PORT = {"lam_mean": None, "others": 0.0, "cap": None}
VARIANTS = {  # name -> solver_args (steps from --steps)
    "port": PORT,
    "others .3 cap 1 (old default)": {"lam_mean": None, "others": 0.3, "cap": 1.0},
    "others .3 cap 1 trim 1": {"lam_mean": None, "others": 0.3, "cap": 1.0, "trim": 1.0},
    "others .3 cap 1 no-delta": {"lam_mean": None, "others": 0.3, "cap": 1.0, "steps_per_layer": 0},
    "lam_mean .3 cap 1": {"others": 0.3, "cap": 1.0, "lam_mean": 0.3},
    "lam_mean .3 cap 1 trim 1": {"others": 0.3, "cap": 1.0, "lam_mean": 0.3, "trim": 1.0},
    "lam_mean .3 cap 1 trim .5": {"others": 0.3, "cap": 1.0, "lam_mean": 0.3, "trim": 0.5},
    "lam_mean .4 cap 1": {"others": 0.3, "cap": 1.0, "lam_mean": 0.4},
    "lam_mean .5 cap 1": {"others": 0.3, "cap": 1.0, "lam_mean": 0.5},
    "lam_mean .4 cap 1 trim 1": {"others": 0.3, "cap": 1.0, "lam_mean": 0.4, "trim": 1.0},
    "lam_mean .3 cap 1 trim 1 no-delta": {"others": 0.3, "cap": 1.0, "lam_mean": 0.3, "trim": 1.0, "steps_per_layer": 0},
}
DELTA_KEYS = ("trim", "c", "lam_mean", "cap", "per_task", "keep", "project", "subspace_divisor", "per_task_divisor", "lr",
              "steps_per_layer")


def _t3_settings():
    path = Path(__file__).resolve().parents[1] / "experiments" / "t3_settings.py"
    spec = importlib.util.spec_from_file_location("t3_settings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kind(tau) -> str:
    """tau: [T, out, in, kh, kw] conv kernel (or [T, out, in] linear)."""
    if tau.dim() == 5 and tau.shape[2] == 1:
        return "depthwise"
    if tau.dim() == 5 and tau.shape[-1] == 1:
        return "pointwise"
    return "other"


def coefficient_stats(tv, keys: list[str], args: dict) -> dict:
    """Quantiles of λ_t,l (the rule of ``args``) over (task, matrix) by layer kind, and the share of
    ‖τ_t‖² the trim keeps (whole model's matrices, per task)."""
    import torch

    from adamerge.methods.doge import trim_masks
    from adamerge.solvers import doge_ops
    from adamerge.solvers.doge import DOGEOptions

    a = DOGEOptions(**args)
    rows = []
    for k in keys:
        tau = tv.vectors[k].float()
        lam = doge_ops.doge_coefficients(tau.reshape(tau.shape[0], tau.shape[1], -1), a.c, cap=a.cap, lam_mean=a.lam_mean)
        rows += [(k, _kind(tau), float(lam[t]), float(tau[t].norm())) for t in range(tau.shape[0])]
    out = {}
    for kind in ("all", "depthwise", "pointwise", "other"):
        lam = torch.tensor([r[2] for r in rows if kind == "all" or r[1] == kind])
        if lam.numel() == 0:
            continue
        q = torch.quantile(lam, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])).tolist()
        # the λ-weighted share: Σ λ‖τ‖² / Σ ‖τ‖² (the effective λ on the squared norm)
        w = torch.tensor([r[3] ** 2 for r in rows if kind == "all" or r[1] == kind])
        out[kind] = {"count": lam.numel(), "p10": round(q[1], 3), "median": round(q[2], 3), "p90": round(q[3], 3),
                     "max": round(q[4], 3), "norm2_weighted_mean": round(float((lam * w).sum() / w.sum()), 3)}
    masks = trim_masks(tv.vectors, keys, a.trim)
    if masks:
        kept = {}
        for t, name in enumerate(tv.task_names):
            num = sum(float((tv.vectors[k][t].float() * masks[k][t]).norm() ** 2) for k in keys)
            den = sum(float(tv.vectors[k][t].float().norm() ** 2) for k in keys)
            kept[name] = round((num / den) ** 0.5, 3)
        out["trim_kept_norm_share"] = kept
    return out


def _delta(bench, args: dict, steps: int, cache: Path, tag: str):
    """The solver's state {delta.<key>: δ} for these options, cached on disk."""
    from safetensors.torch import load_file, save_file

    from adamerge.methods import create_method
    from adamerge.solvers.doge import DOGESolver

    cfg = create_method("doge").config({"steps": steps, "solver_args": dict(args)})
    a = DOGESolver(cfg, cfg.solver_args).args
    rule = {k: getattr(a, k) for k in DELTA_KEYS}
    rule["steps"] = steps
    path = cache / f"{tag}-{hashlib.sha1(json.dumps(rule, sort_keys=True).encode()).hexdigest()[:12]}.safetensors"
    if path.is_file():
        return load_file(str(path)), cfg
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # as fit (adamerge.train.loop.run_plan): the solver sees the method's prepared (trimmed) τ
        prepared = create_method("doge").prepare(bench.tv, cfg, bench.arch, None)
        problem = SimpleNamespace(tv=prepared, model=bench.arch, say=lambda m: None,
                                  run=SimpleNamespace(checkpoints=Path(tmp)))
        state = DOGESolver(cfg, cfg.solver_args).solve(problem)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    print(f"  (solved δ for {rule} in {time.perf_counter() - start:.0f} s)", flush=True)
    return state, cfg


def score_variants(bench, steps: int, variants: dict, cache: Path, tag: str, use_fit: bool) -> dict:
    from adamerge.methods import create_method
    from adamerge.plan import fit
    from adamerge.train.loop import evaluate

    out = {}
    for name, args in variants.items():
        if use_fit:
            with tempfile.TemporaryDirectory() as tmp:
                res = fit(Path(tmp) / "run", bench.arch, bench.tv, bench.heads, bench.streams, "doge",
                          {"steps": steps, "solver_args": dict(args)}, seed=0, progress=False)
            after = res["after"]
        else:
            state, cfg = _delta(bench, args, steps, cache, tag)
            merged = create_method("doge").build(bench.arch, bench.tv, cfg, state=state)
            after = evaluate(merged, bench.heads, bench.streams)
        out[name] = {"args": args, **after}
        per = " ".join(f"{100 * v:5.1f}" for v in after["per_task"].values())
        print(f"doge {name:36s}: {per} | mean {100 * after['mean']:5.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    from adamerge.solvers.doge import matrix_keys
    from adamerge.workflows.demo import DEFAULT_TASKS, FULL, QUICK
    from adamerge.zoo import list_tasks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=os.environ.get("ADAMERGE_CACHE", str(Path.home() / ".cache" / "adamerge")))
    p.add_argument("--delta-cache", default="/tmp/doge_delta")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks")
    p.add_argument("--image-size", type=int)
    p.add_argument("--steps", type=int, default=400, help="DOGE Adam steps per layer (the quick demo: 100)")
    p.add_argument("--variants", help="semicolon-separated names of VARIANTS (default: all)")
    p.add_argument("--extra", help="JSON {name: solver_args} of further variants")
    p.add_argument("--stats", help="JSON list of solver_args whose λ statistics to print")
    p.add_argument("--fit", action="store_true", help="score with `fit` (no δ cache)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.seed in (3, 4):
        raise SystemExit("seeds 3 and 4 are held out")
    t3s = _t3_settings()
    setting = QUICK if args.quick else FULL
    tasks = args.tasks.split(",") if args.tasks else [t for t in DEFAULT_TASKS if t in list_tasks(available_only=True)][: 3 if args.quick else None]
    size = args.image_size or setting.image_size
    zoo = t3s.load_cached_zoo(args.cache_dir, tasks, size, args.seed, args.quick)
    bench = t3s.Bench.__new__(t3s.Bench)  # the streams, heads and task vectors only (no divergences)
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.train.data import LinearHead, stream_from_tensors
    from adamerge.zoo import create_backbone

    bench.tasks = tasks
    bench.heads = {t: LinearHead.from_state_dict(zoo.heads[t]) for t in tasks}
    bench.streams = [stream_from_tensors(t, zoo.tasks[t].x_test, zoo.tasks[t].y_test) for t in tasks]
    bench.tv = TaskVectors.from_state_dicts(zoo.base, {t: zoo.experts[t] for t in tasks})
    bench.arch = create_backbone(pretrained=False)
    keys = matrix_keys(bench.tv, [n for n, _ in bench.arch.named_parameters()])
    result = {"tasks": tasks, "zoo": str(zoo.path), "matrices": len(keys), "stats": {}}
    for sa in json.loads(args.stats) if args.stats else []:
        result["stats"][json.dumps(sa)] = coefficient_stats(bench.tv, keys, sa)
        print(json.dumps(sa), json.dumps(result["stats"][json.dumps(sa)]), flush=True)
    ref = {f"task_arithmetic(lam={lam:g})": v for lam, v in zip((0.3, 0.5), bench.reference((0.3, 0.5)).values())}
    result["reference"] = ref
    for k, v in ref.items():
        print(f"{k:41s}: {' '.join(f'{100 * x:5.1f}' for x in v['per_task'].values())} | mean {100 * v['mean']:5.1f}", flush=True)
    chosen = {k: VARIANTS[k] for k in args.variants.split(";")} if args.variants else dict(VARIANTS)
    if args.variants == "":
        chosen = {}
    chosen.update(json.loads(args.extra) if args.extra else {})
    tag = f"s{args.seed}-{'q' if args.quick else 'f'}-{size}-{'_'.join(tasks)}"
    result["variants"] = score_variants(bench, args.steps, chosen, Path(args.delta_cache), tag, args.fit)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
