"""The merge's own forward and backward per coefficient granularity: time and memory.

For each granularity a fresh subprocess builds a :class:`adamerge.core.merged.MergedModel` over
random task vectors (``0.01 * N(0, 1)``, stacked ``[T, *shape]``, float32) of ``--model``
(``vitb32``: a RANDOM-WEIGHT open_clip ViT-B/32 visual tower, nothing downloaded; ``tiny``: the
tiny test ViT), then times ``--repeats`` calls of the merge (every merged tensor) and its
backward to the coefficients (a gradient of ones), as a training step runs them, no network.
Printed: the median and range of the calls, the resident memory once the task vectors are held,
and the process's peak over the calls (what the merge and its backward add).

    python benchmarks/merge_granularity.py --model vitb32 --tasks 8 --threads 2 \\
        --granularities task,layer,partition:4,partition:4:random,partition:4:atlas --json out.json

Run it against another commit's library with ``PYTHONPATH=<that checkout>``: the script itself
uses only ``MergedModel``'s public surface.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

GRANULARITIES = "task,layer,partition:4,partition:4:random,partition:4:atlas"


def worker(args: argparse.Namespace) -> dict:
    import adamerge  # noqa: F401  (makes torchvision/open_clip importable on CPU torch)
    import torch
    from merge_overhead import _build_model  # this script's folder is on the worker's path

    from adamerge.core.merged import MergedModel
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.memory import process_memory_mb

    torch.set_num_threads(args.threads)
    model, _ = _build_model(args.model)
    gen = torch.Generator().manual_seed(0)
    base = {k: v.detach() for k, v in model.state_dict().items()}
    vectors = {k: 0.01 * torch.randn((args.tasks, *v.shape), generator=gen) for k, v in base.items()
               if v.is_floating_point()}
    mm = MergedModel(model, TaskVectors(base, vectors, [f"t{i}" for i in range(args.tasks)]),
                     granularity=args.granularity, init=0.3).train()
    held = process_memory_mb("VmRSS")
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        mm.zero_grad(set_to_none=True)
        merged = mm.merged_parameters()
        torch.autograd.backward(list(merged.values()), [torch.ones_like(v) for v in merged.values()])
        times.append(time.perf_counter() - t0)
        del merged
    return {"granularity": args.granularity, "model": args.model, "tasks": args.tasks, "threads": args.threads,
            "groups": int(mm.coefficients.shape[1]), "seconds": statistics.median(times),
            "seconds_min": min(times), "seconds_max": max(times), "repeats": args.repeats,
            "held_rss_mb": held, "peak_rss_mb": process_memory_mb("VmHWM")}


def _table(rows: list[dict]) -> str:
    head = ("granularity", "groups", "fwd+bwd s (median)", "range s", "held RSS MiB", "peak RSS MiB", "added MiB")
    lines = [head] + [(r["granularity"], str(r["groups"]), f"{r['seconds']:.3f}",
                       f"{r['seconds_min']:.3f}..{r['seconds_max']:.3f}", f"{r['held_rss_mb']:.0f}",
                       f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - r['held_rss_mb']:.0f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [" | ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("vitb32", "tiny"), default="vitb32")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--granularities", default=GRANULARITIES, help="comma-separated")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--granularity", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return []
    rows = []
    for spec in args.granularities.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--granularity", spec, "--model", args.model,
               "--tasks", str(args.tasks), "--threads", str(args.threads), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"worker failed: {' '.join(cmd)}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{spec}: {rows[-1]['seconds']:.3f} s, peak {rows[-1]['peak_rss_mb']:.0f} MiB", flush=True)
    print(f"{args.model}, T = {args.tasks}, {args.threads} threads, float32 task vectors, "
          f"median of {args.repeats} merge forward + backward calls")
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
