"""Per-rank memory and step time of ``adamerge fit`` with the task vectors sharded across R processes.

For each case and each R, the driver runs ``adamerge fit --devices R --strategy shard`` (R = 1:
one process, nothing sharded) through this script's worker mode, which adds three probes to the
product's loop on every rank: the kernel's peak RSS while the run is built (up to the moment the
rank holds its shard: by default each rank reads only its shard from the files; strategy
``shard_cut`` makes every rank build the whole stack first and cut it, as before the per-rank
build existed, for the comparison), the RSS held
once the shard is cut (and the freed pages handed back), the peak RSS while training (reset
after the cut), and the wall time of every step. It then compares each R's coefficients with
R = 1's (the paper's entropy, a mean over samples: R ranks with 1/R of each task's batch follow
one process on the whole batch up to the order of the reductions).

Cases: ``demo_zoo`` (the demo's EfficientNet-Lite0 experts, T = 5, its cached zoo) and ``vitb32``
(a random-weight open_clip ViT-B-32 visual tower, T = 8 random experts base + 0.01·N(0, 1), random
images and heads, written as files to a temporary folder). Threads: 2 // R per rank on this
2-core machine (at least 1), so the ranks share the cores the one process had.

    python benchmarks/sharded_fit.py --cases demo_zoo,vitb32 --worlds 1,2,4 --json sharded.json
    python benchmarks/sharded_fit.py --cases vitb32 --worlds 1,2 --strategies shard,ddp   # beside DDP
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "demo_zoo": {"steps": 6, "batch": 16},
    "vitb32": {"steps": 3, "batch": 8, "tasks": 8, "classes": 10},
    "tiny": {"steps": 3, "batch": 8},  # the tests' case
}


# ------------------------------------------------------------------------------ worker (every rank)
def _worker(args: argparse.Namespace, fit_args: list[str]) -> int:
    from adamerge.cli import main
    from adamerge.memory import process_memory_mb, release_freed_memory, reset_peak_memory
    from adamerge.train.loop import MergeModule

    if os.environ.get("SHARDED_FIT_WHOLE_BUILD") == "1":  # strategy shard_cut: build whole, then cut
        from adamerge.plan import RunPlan

        RunPlan.shard_build = lambda self: None
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    record: dict = {"rank": rank, "step_s": []}
    setup, batch_end, train_end = MergeModule.setup, MergeModule.on_train_batch_end, MergeModule.on_train_end
    clock = [0.0]

    def on_setup(self, stage):
        setup(self, stage)
        release_freed_memory()
        record["build_peak_mib"] = process_memory_mb("VmHWM")
        record["held_after_shard_mib"] = process_memory_mb("VmRSS")
        record["held_bytes"] = self.merged.nbytes()
        reset_peak_memory()
        clock[0] = time.perf_counter()

    def on_batch_end(self, outputs, batch, batch_idx):
        now = time.perf_counter()
        record["step_s"].append(now - clock[0])
        clock[0] = now
        if len(record["step_s"]) == 1 and self.merged.coefficients.grad is not None:  # the first step's gradient
            import torch

            torch.save(self.merged.coefficients.grad.detach().clone(), Path(args.out, f"grad0_rank{rank}.pt"))
        return batch_end(self, outputs, batch, batch_idx)

    def on_end(self):
        record["train_peak_mib"] = process_memory_mb("VmHWM")
        train_end(self)
        Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))

    MergeModule.setup, MergeModule.on_train_batch_end, MergeModule.on_train_end = on_setup, on_batch_end, on_end
    return main(fit_args)


# ------------------------------------------------------------------------------ cases
def _vitb32_files(folder: Path, spec: dict) -> dict:
    """A random ViT-B-32 visual tower, T random experts, heads and images, written as files."""
    import logging

    from adamerge._compat import ensure_torchvision

    ensure_torchvision()  # the CPU torch build's torchvision fix, before open_clip imports it
    import open_clip
    import torch
    from safetensors.torch import save_file

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights": intended
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base, str(folder / "base.safetensors"))
    names = [f"task{t}" for t in range(spec["tasks"])]
    cfg = {"model": {"source": "open_clip", "name": "ViT-B-32"}, "base": str(folder / "base.safetensors"),
           "experts": {}, "heads": {}, "data": {}}
    for t, n in enumerate(names):
        gen = torch.Generator().manual_seed(100 + t)
        expert = {k: (v + 0.01 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v for k, v in base.items()}
        save_file(expert, str(folder / f"{n}.safetensors"))
        save_file({"weight": torch.randn(spec["classes"], 512, generator=gen)}, str(folder / f"head_{n}.safetensors"))
        save_file({"x": torch.randn(2 * spec["batch"], 3, 224, 224, generator=gen),
                   "y": torch.randint(0, spec["classes"], (2 * spec["batch"],), generator=gen)}, str(folder / f"data_{n}.safetensors"))
        cfg["experts"][n] = str(folder / f"{n}.safetensors")
        cfg["heads"][n] = str(folder / f"head_{n}.safetensors")
        cfg["data"][n] = {"tensors": str(folder / f"data_{n}.safetensors")}
        del expert
    return cfg


def _demo_zoo_files(folder: Path) -> dict:
    from safetensors.torch import save_file

    from adamerge.workflows.demo import DEFAULT_TASKS, FULL
    from adamerge.zoo import build_zoo, list_tasks

    tasks = [t for t in DEFAULT_TASKS if t in list_tasks(available_only=True)]
    cache = Path(os.environ.get("ADAMERGE_CACHE", Path.home() / ".cache" / "adamerge"))
    zoo = build_zoo(cache, tasks, image_size=FULL.image_size, seed=0, steps=FULL.zoo_steps,
                    n_train=FULL.n_train, n_test=FULL.n_test, progress=False)
    cfg = {"model": {"source": "efficientnet_lite0"}, "base": str(zoo.path / "base.safetensors"),
           "experts": {t: str(zoo.path / "experts" / f"{t}.safetensors") for t in tasks},
           "heads": {t: str(zoo.path / "heads" / f"{t}.safetensors") for t in tasks}, "data": {}}
    for t in tasks:
        save_file({"x": zoo.tasks[t].x_test[:256].float().contiguous(), "y": zoo.tasks[t].y_test[:256].long().contiguous()},
                  str(folder / f"data_{t}.safetensors"))
        cfg["data"][t] = {"tensors": str(folder / f"data_{t}.safetensors")}
    return cfg


def _tiny_files(folder: Path) -> dict:
    from adamerge.zoo.tiny import build_tiny_zoo, write_tiny_zoo

    zoo = write_tiny_zoo(folder / "zoo", build_tiny_zoo(seed=0))
    tasks = json.loads((zoo / "manifest.json").read_text())["tasks"]
    return {"model": {"source": "tiny_vit"}, "base": str(zoo / "base.safetensors"),
            "experts": {t: str(zoo / "experts" / f"{t}.safetensors") for t in tasks},
            "heads": {t: str(zoo / "heads" / f"{t}.safetensors") for t in tasks},
            "data": {t: {"tensors": str(zoo / "data" / f"{t}.safetensors")} for t in tasks}}


def _case_config(name: str, folder: Path) -> dict:
    spec = CASES[name]
    inputs = {"vitb32": lambda: _vitb32_files(folder, spec), "demo_zoo": lambda: _demo_zoo_files(folder),
              "tiny": lambda: _tiny_files(folder)}[name]()
    return {"seed": 0, **inputs, "method": "adamerging",
            "options": {"granularity": "layer", "objective": "entropy", "steps": spec["steps"], "lr": 0.01,
                        "batch_size": spec["batch"]},
            "checkpoint_every": spec["steps"], "eval_batch_size": 64}


# ------------------------------------------------------------------------------ driver
def run_case(name: str, worlds: list[int], work: Path, say=print, strategies: tuple[str, ...] = ("shard",)) -> list[dict]:
    import yaml
    from safetensors.torch import load_file

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    cfg = _case_config(name, folder)
    import torch

    rows, first, first_grad = [], None, None
    runs = [(w, "single") for w in worlds if w == 1] + [(w, s) for w in worlds if w > 1 for s in strategies]
    for world, strategy in runs:
        tag = f"r{world}" + ("" if strategy in ("single", "shard") else f"_{strategy}")
        run, probes = folder / f"run_{tag}", folder / f"probes_{tag}"
        probes.mkdir(exist_ok=True)
        config = folder / f"config_{tag}.yaml"
        config.write_text(yaml.safe_dump({**cfg, "run_dir": str(run)}))
        fit = ["fit", "--config", str(config), "--no-progress", "--devices", str(world)]
        if world > 1:
            fit += ["--strategy", "shard" if strategy == "shard_cut" else strategy]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // world)), "PYTHONUNBUFFERED": "1",
               "SHARDED_FIT_WHOLE_BUILD": "1" if strategy == "shard_cut" else "0"}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(probes), "--", *fit],
                              env=env, capture_output=True, text=True, cwd=str(folder))
        if proc.returncode != 0:
            raise SystemExit(f"{name} R={world} failed:\n{proc.stderr[-4000:]}")
        ranks = [json.loads((probes / f"rank{r}.json").read_text()) for r in range(world)]
        coef = load_file(str(run / "coefficients.safetensors"))["coefficients"]
        first = coef if first is None else first
        grad = torch.load(probes / "grad0_rank0.pt")
        first_grad = grad if first_grad is None else first_grad
        rel = (grad - first_grad).abs() / first_grad.abs().clamp_min(1e-30)
        results = json.loads((run / "results.json").read_text())
        steps = [s for r in ranks for s in r["step_s"][1:]]  # the first step is warm-up
        row = {
            "case": name, "world": world, "strategy": strategy, "threads_per_rank": max(1, 2 // world), "wall_s": time.perf_counter() - start,
            "task_vector_mib_per_rank": max(r["held_bytes"]["task_vectors"] for r in ranks) / 2**20,
            "build_peak_mib_per_rank": max(r["build_peak_mib"] for r in ranks),
            "held_after_shard_mib_per_rank": max(r["held_after_shard_mib"] for r in ranks),
            "train_peak_mib_per_rank": max(r["train_peak_mib"] for r in ranks),
            "step_s": statistics.median(steps) if steps else None,
            "max_abs_coef_diff_vs_r1": float((coef - first).abs().max()),
            # the first step's coefficient gradient against R = 1's: relative difference (median,
            # and at the largest), and the largest gradient whose sign differs (a near-zero one:
            # Adam's first step turns any non-zero gradient into ±lr)
            "grad0_rel_diff_median": float(rel.median()), "grad0_rel_diff_max": float(rel.max()),
            "grad0_median_abs": float(first_grad.abs().median()),
            "grad0_sign_flips": int((grad.sign() != first_grad.sign()).sum()),
            "grad0_largest_flipped_abs": float(first_grad[grad.sign() != first_grad.sign()].abs().max()) if bool((grad.sign() != first_grad.sign()).any()) else 0.0,
            "sharding": results.get("sharding"),
        }
        say(json.dumps(row))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | R | strategy | build | threads/rank | task vectors per rank MiB | build peak per rank MiB | held after the cut MiB | training peak per rank MiB | s/step (median) | first step's gradient vs R = 1: median relative diff | sign flips (largest flipped abs gradient; median abs gradient) | max abs coefficient diff vs R = 1 after the run |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        build = (r.get("sharding") or {}).get("build", "whole")
        lines.append(f"| {r['case']} | {r['world']} | {r['strategy']} | {build} | {r['threads_per_rank']} | {r['task_vector_mib_per_rank']:.1f} | "
                     f"{r['build_peak_mib_per_rank']:.0f} | {r['held_after_shard_mib_per_rank']:.0f} | {r['train_peak_mib_per_rank']:.0f} | "
                     f"{r['step_s']:.2f} | {r['grad0_rel_diff_median']:.1e} | {r['grad0_sign_flips']} ({r['grad0_largest_flipped_abs']:.1e}; {r['grad0_median_abs']:.1e}) | "
                     f"{r['max_abs_coef_diff_vs_r1']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        split = argv.index("--")
        p = argparse.ArgumentParser()
        p.add_argument("--worker", action="store_true")
        p.add_argument("--out", required=True)
        return _worker(p.parse_args(argv[:split]), argv[split + 1 :])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="demo_zoo,vitb32", help=f"comma-separated, from {list(CASES)}")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--strategies", default="shard", help="for R > 1: shard (task vectors sharded, each rank reading its"
                   " shard), shard_cut (sharded, each rank building the whole stack and cutting it), ddp (replicated); several"
                   " comma-separated")
    p.add_argument("--json")
    p.add_argument("--work", help="folder for the cases' files and runs (default: a temporary folder)")
    args = p.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        strategies = tuple(args.strategies.split(","))
        rows = [row for case in args.cases.split(",") for row in run_case(case, worlds, work, strategies=strategies)]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
