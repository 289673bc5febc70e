"""Overhead of learning merge coefficients against training the plain model.

For each model and number of tasks T this times one training step of a
:class:`adamerge.core.merged.MergedModel` (merge + forward + backward to the coefficients) and the
same forward + backward of the plain model with trainable weights (the reference), on the same
batch, and reports the overhead, the peak resident memory and the tensor bytes the merged model
holds in units of the model's parameter size.

Models: ``tiny`` (the tiny open_clip ViT of :mod:`adamerge.zoo.tiny`, 16 px) and ``vitb32``
(a RANDOM-WEIGHT open_clip ViT-B/32 visual tower, 224 px: nothing is downloaded). Task vectors
are random perturbations (``0.01 * N(0, 1)``) built straight into the stacked ``[T, *shape]``
layout, so the numbers show the steady state of training, not the loading of T checkpoints.

Timing: one subprocess holds both the reference and the merged model and alternates blocks of
their steps (``--pairs`` pairs, the order flipped every pair; each block starts with one untimed
step so that each model is timed in its own steady state, as in training), so slow drifts of a
shared machine's load hit both alike; the overhead is the median of the per-pair
ratios, and "range" their min..max. "merge alone" is the median time of the merge's own forward
and backward (no network), as a share of the reference step: the part of the overhead that
the merge itself costs, far less sensitive to machine noise than the difference of two long
steps. A timed unit runs as many steps as fit in ``--min-time``
seconds (at least one), so tiny models are not timed by a single millisecond. Memory: each peak
RSS (``VmHWM`` from ``/proc/self/status``) comes from a fresh subprocess that holds only one of
the two models.

Example::

    .venv/bin/python benchmarks/merge_overhead.py                # tiny + vitb32, T = 2, 4, 8
    .venv/bin/python benchmarks/merge_overhead.py --models tiny --tasks 2,16 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

MODELS = ("tiny", "vitb32")


# --------------------------------------------------------------------------- worker side
def _build_model(name: str):
    """The backbone in eval mode and its input image size."""
    import torch

    torch.manual_seed(0)
    if name == "tiny":
        from adamerge.zoo.tiny import IMAGE, tiny_vit

        return tiny_vit(seed=0).eval(), IMAGE
    if name == "vitb32":
        import logging

        import open_clip

        logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded" is intended
        model = open_clip.create_model("ViT-B-32", pretrained=None).visual
        return model.eval(), 224
    raise SystemExit(f"unknown model '{name}'; choose from {MODELS}")


def _head(model, x):
    """A seeded linear head over the model's features (``--per-task``: entropy through it)."""
    import torch

    from adamerge.train.data import LinearHead

    with torch.no_grad():
        dim = model(x[:1]).shape[-1]
    return LinearHead(torch.randn(10, dim, generator=torch.Generator().manual_seed(2)) / dim**0.5)


def _reference_step(model, x, tasks: int = 0):
    """One forward + backward of the plain model with trainable weights; with ``tasks``, one
    forward + backward per task's share of the images (entropy through a head), the work the
    merged model's ``micro_batch`` step does."""
    from adamerge.train.objectives import entropy

    for p in model.parameters():
        p.requires_grad_(True)
    head = _head(model, x) if tasks else None

    def step():
        model.zero_grad(set_to_none=True)
        if not tasks:
            model(x).float().pow(2).mean().backward()
            return
        for chunk in x.chunk(tasks):
            entropy(head(model(chunk))).backward()

    return step


def _merged_step(model, x, args, gen, result: dict):
    """One merge + forward + backward to the coefficients, and the merge's own forward + backward
    alone (no network); fills the memory fields of ``result``."""
    import torch

    import adamerge.core.merged
    from adamerge.core.merged import MergedModel
    from adamerge.core.task_vectors import STORAGE_DTYPES, TaskVectors

    if args.cpu_chunk is not None:
        adamerge.core.merged.CPU_CHUNK = args.cpu_chunk
    result["cpu_chunk"] = adamerge.core.merged.CPU_CHUNK
    params = dict(model.named_parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    dtype = STORAGE_DTYPES[args.dtype]
    base = {k: v.detach() for k, v in model.state_dict().items()}  # shares the model's storage
    vectors = {}
    for k, v in base.items():
        if v.is_floating_point():
            stack = torch.empty((args.tasks, *v.shape), dtype=dtype)
            for t in range(args.tasks):
                stack[t] = (0.01 * torch.randn(v.shape, generator=gen)).to(dtype)
            vectors[k] = stack
    tv = TaskVectors(base, vectors, [f"task{t}" for t in range(args.tasks)])
    mm = MergedModel(model, tv, granularity=args.granularity, init=0.3, clamp=(0.0, 1.0)).train()

    def step():
        mm.zero_grad(set_to_none=True)
        loss = mm(x).float().pow(2).mean()
        loss.backward()
        assert mm.coefficients.grad is not None

    if args.per_task:  # the training module's own step: options.micro_batch = true
        from adamerge.methods import create_method
        from adamerge.solvers import create_solver
        from adamerge.train.loop import MergeModule

        cfg = create_method("adamerging").config({"granularity": args.granularity, "micro_batch": True})
        head = _head(model, x)
        module = MergeModule(mm, {n: head for n in tv.task_names}, cfg, create_solver("gradient", cfg))
        batch = dict(zip(tv.task_names, x.chunk(args.tasks)))

        def step():  # noqa: F811
            mm.zero_grad(set_to_none=True)
            loss, _ = module.batch_loss(batch)
            loss.backward()
            assert mm.coefficients.grad is not None

    def merge_only():  # the merge's own forward and backward, no network
        mm.zero_grad(set_to_none=True)
        merged = mm.merged_parameters()
        torch.autograd.backward(list(merged.values()), [torch.ones_like(v) for v in merged.values()])

    held = mm.nbytes()
    result["held_model_units"] = sum(held.values()) / model_bytes
    result["held"] = {k: v / 2**20 for k, v in held.items()}
    result["coefficients"] = list(mm.coefficients.shape)
    return step, merge_only


def _time_pairs(ref_step, merged_step, merge_only, pairs: int, min_time: float) -> dict:
    """Alternate blocks of reference and merged steps (order flipped every pair, so drifting
    machine load hits both alike). Each block starts with one untimed step (switching models
    leaves the allocator's free lists shaped by the other model; a training run only ever runs
    one), then times as many steps as fit in ``min_time`` (at least one, the same count for
    both). Medians and the median per-pair ratio."""
    import statistics

    warm = []
    for step in (ref_step, merged_step):
        t0 = time.perf_counter()
        step()
        warm.append(time.perf_counter() - t0)
    n = max(1, int(min_time / max(max(warm), 1e-6)))
    ref, mer = [], []
    for i in range(pairs):
        order = ((ref_step, ref), (merged_step, mer)) if i % 2 == 0 else ((merged_step, mer), (ref_step, ref))
        for step, times in order:
            step()  # settle
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            times.append((time.perf_counter() - t0) / n)
    ratios = [m / r for m, r in zip(mer, ref)]
    merge = []
    for _ in range(max(pairs, 5)):
        t0 = time.perf_counter()
        merge_only()
        merge.append(time.perf_counter() - t0)
    return {
        "merge_seconds": statistics.median(merge),
        "ref_seconds": statistics.median(ref),
        "merged_seconds": statistics.median(mer),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": pairs,
        "steps_per_unit": n,
    }


def worker(args: argparse.Namespace) -> dict:
    import adamerge  # noqa: F401  (makes torchvision/open_clip importable on CPU torch)
    import torch

    torch.set_num_threads(args.threads)
    model, size = _build_model(args.model)
    params = dict(model.named_parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=gen)
    result = {
        "model": args.model,
        "kind": args.kind,
        "tasks": args.tasks,
        "batch": args.batch,
        "dtype": args.dtype,
        "threads": args.threads,
        "model_mb": model_bytes / 2**20,
        "tensors": len(params),
    }

    if args.kind == "paired":  # both models in this process, blocks of steps interleaved: the timing
        merged, merge_only = _merged_step(model, x, args, gen, result)
        ref = _reference_step(copy.deepcopy(model), x, args.tasks if args.per_task else 0)
        result.update(_time_pairs(ref, merged, merge_only, args.pairs, args.min_time))
        return result
    # one model in this process: its peak memory over two steps
    if args.kind == "reference":
        step = _reference_step(model, x, args.tasks if args.per_task else 0)
        result["held_model_units"] = None
    else:
        step, _ = _merged_step(model, x, args, gen, result)
    step(), step()
    from adamerge.memory import process_memory_mb

    result["peak_rss_mb"] = process_memory_mb("VmHWM")
    return result


# --------------------------------------------------------------------------- driver side
def _run_worker(args: argparse.Namespace, model: str, kind: str, tasks: int, batch: int) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker",
        "--kind", kind, "--model", model, "--tasks-one", str(tasks),
        "--batch", str(batch), "--pairs", str(args.pairs), "--dtype", args.dtype, "--threads", str(args.threads),
        "--min-time", str(args.min_time),
        "--granularity", args.granularity,
    ] + (["--per-task"] if args.per_task else []) + (["--cpu-chunk", str(args.cpu_chunk)] if args.cpu_chunk is not None else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    head = (
        "model", "T", "batch", "dtype", "ref s/step", "merged s/step", "overhead %", "range %", "merge alone %",
        "ref peak RSS MB", "merged peak RSS MB", "held / model",
    )  # fmt: skip
    lines = [head]
    for r in rows:
        ref, mer, pair = r["reference"], r["merged"], r["paired"]
        lines.append((
            r["model"], str(r["tasks"]), str(r["batch"]), r["dtype"],
            f"{pair['ref_seconds']:.4f}", f"{pair['merged_seconds']:.4f}",
            f"{100.0 * (pair['ratio'] - 1.0):+.1f}",
            f"{100.0 * (pair['ratio_min'] - 1.0):+.0f}..{100.0 * (pair['ratio_max'] - 1.0):+.0f}",
            f"{100.0 * pair['merge_seconds'] / pair['ref_seconds']:.1f}",
            f"{ref['peak_rss_mb']:.0f}", f"{mer['peak_rss_mb']:.0f}",
            f"{mer['held_model_units']:.2f}",
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: " | ".join(c.rjust(w) for c, w in zip(line, widths))  # noqa: E731
    return "\n".join([fmt(lines[0]), "-+-".join("-" * w for w in widths), *map(fmt, lines[1:])])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,vitb32", help=f"comma list from {MODELS}")
    p.add_argument("--tasks", default="2,4,8", help="comma list of task counts T")
    p.add_argument("--batch", type=int, default=8, help="images per step (ignored with --per-task-batch)")
    p.add_argument(
        "--per-task-batch", type=int, default=None,
        help="images per task per step: the batch is this times T, as in one AdaMerging step over all tasks",
    )  # fmt: skip
    p.add_argument("--pairs", type=int, default=4, help="timed (reference, merged) step pairs after one warm-up each")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="task-vector storage")
    p.add_argument("--granularity", default="layer")
    p.add_argument("--per-task", action="store_true",
                   help="each task's images forward + backward alone (options.micro_batch: true, never cut), the"
                        " reference likewise; without it, one batched forward over every task")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a shared, busy 2-core machine two spin-waiting"
        " OpenMP threads made ViT-B/32 steps 4x slower and tiny-model timings meaningless)",
    )  # fmt: skip
    p.add_argument(
        "--cpu-chunk", type=int, default=None,
        help="elements per block of the CPU merge (adamerge.core.merged.CPU_CHUNK; 0 = one BLAS call per tensor)",
    )  # fmt: skip
    p.add_argument("--min-time", type=float, default=0.5, help="seconds a timed unit lasts at least (tiny models: many steps)")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    # internal: one measurement in this process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=("reference", "merged", "paired"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tasks-one", dest="tasks_one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.tasks = args.tasks_one
        print(json.dumps(worker(args)))
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model '{m}'; choose from {MODELS}")
    tasks = [int(t) for t in args.tasks.split(",") if t.strip()]
    if any(t < 1 for t in tasks):
        p.error("--tasks must be positive integers")
    rows = []
    start = time.perf_counter()
    for m in models:
        for t in tasks:
            batch = args.per_task_batch * t if args.per_task_batch else args.batch
            pair = _run_worker(args, m, "paired", t, batch)
            ref = _run_worker(args, m, "reference", t, batch)
            mer = _run_worker(args, m, "merged", t, batch)
            row = {"model": m, "tasks": t, "batch": batch, "dtype": args.dtype, "paired": pair, "reference": ref, "merged": mer}
            rows.append(row)
            print(
                f"[{time.perf_counter() - start:6.1f}s] {m} T={t}: ref {pair['ref_seconds']:.4f} s/step,"
                f" merged {pair['merged_seconds']:.4f} s/step, ratio {pair['ratio']:.3f}"
                f" (coefficients {mer['coefficients']})",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"granularity={args.granularity}, {'per task' if args.per_task else 'one batched forward'}, threads={args.threads}, {args.pairs} interleaved step pairs (medians),"
        f" cpu_chunk={rows[0]['merged']['cpu_chunk'] if rows else None},"
        f" task vectors stored as {args.dtype}; model size: "
        + ", ".join(f"{r['model']} {r['merged']['model_mb']:.1f} MB ({r['merged']['tensors']} tensors)" for r in rows[:: len(tasks)])
    )
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
