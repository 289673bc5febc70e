"""Throughput (inputs per second) of T3 and T3_B against one fixed merged checkpoint, in one run.

The fixed checkpoint is task arithmetic (λ = 0.3) loaded into a plain module: one forward per
batch. T3_B adds one vmapped pass of the pretrained model and the T experts (the divergences)
and one merge per batch; T3 adds one merge per input (``chunk`` inputs at once). All three run on
the same batches of the same task, alternating in rounds; each number is the median over rounds.

Zoos: ``demo`` (the demo zoo, EfficientNet-Lite0 at 64 px, read from the cache that
``adamerge demo`` fills; built if absent) or ``tiny`` (the test zoo's tiny ViT, for a smoke run).

Example::

    .venv/bin/python benchmarks/t3_throughput.py                       # demo zoo, 256 inputs, 3 rounds
    .venv/bin/python benchmarks/t3_throughput.py --zoo tiny --inputs 64 --rounds 1 --json t3.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path


def _load(zoo: str, cache_dir: str | None):
    from adamerge.train.data import LinearHead
    from adamerge.core.task_vectors import TaskVectors

    if zoo == "tiny":
        from adamerge.zoo.tiny import build_tiny_zoo, tiny_vit

        z = build_tiny_zoo(seed=0)
        tv = TaskVectors.from_state_dicts(z.base, z.experts)
        task = tv.task_names[0]
        return tiny_vit(0).eval(), tv, dict(z.heads), task, z.streams[0].dataset.x
    from adamerge.workflows.demo import DEFAULT_TASKS, FULL
    from adamerge.zoo import build_zoo, create_backbone, list_tasks

    tasks = [t for t in DEFAULT_TASKS if t in list_tasks(available_only=True)]
    cache = Path(cache_dir or os.environ.get("ADAMERGE_CACHE", Path.home() / ".cache" / "adamerge"))
    z = build_zoo(cache, tasks, image_size=FULL.image_size, seed=0, steps=FULL.zoo_steps, progress=False)
    tv = TaskVectors.from_state_dicts(z.base, {t: z.experts[t] for t in tasks})
    heads = {t: LinearHead.from_state_dict(z.heads[t]) for t in tasks}
    return create_backbone(pretrained=False).eval(), tv, heads, tasks[0], z.tasks[tasks[0]].x_test


def main(argv: list[str] | None = None) -> dict:
    import torch

    from adamerge.train.data import images_layout
    from adamerge.merges import merged_state
    from adamerge.core.test_time import T3Options, TestTimeMerger, t3_merged_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", choices=["demo", "tiny"], default="demo")
    p.add_argument("--cache-dir")
    p.add_argument("--inputs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tv, heads, task, x = _load(args.zoo, args.cache_dir)
    x = x[: args.inputs]
    fixed = copy.deepcopy(model)
    fixed.load_state_dict(merged_state(tv.base, {k: 0.3 * v.float().sum(0) for k, v in tv.vectors.items()},
                                       keys={n for n, _ in model.named_parameters()}))
    merged = t3_merged_model(model, tv)
    runners = {
        "fixed merged checkpoint": lambda xb: heads[task](fixed(images_layout(xb))),
        "T3_B (per batch)": TestTimeMerger(merged, heads, T3Options(per="batch", chunk=args.chunk)).forward,
        "T3 (per input)": TestTimeMerger(merged, heads, T3Options(per="sample", chunk=args.chunk)).forward,
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.no_grad():
        for name, run in runners.items():  # warm-up
            run(x[: args.batch_size], task) if name != "fixed merged checkpoint" else run(x[: args.batch_size])
        for r in range(args.rounds):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                run = runners[name]
                start = time.perf_counter()
                for lo in range(0, x.shape[0], args.batch_size):
                    xb = x[lo : lo + args.batch_size]
                    run(xb) if name == "fixed merged checkpoint" else run(xb, task)
                times[name].append(time.perf_counter() - start)
    rows = {name: {"inputs_per_second": x.shape[0] / statistics.median(t), "seconds": statistics.median(t)} for name, t in times.items()}
    ref = rows["fixed merged checkpoint"]["inputs_per_second"]
    print(f"zoo {args.zoo}, task {task}, T = {tv.num_tasks}, {x.shape[0]} inputs of shape {tuple(x.shape[1:])},"
          f" batch {args.batch_size}, chunk {args.chunk}, median of {args.rounds} rounds, {torch.get_num_threads()} threads")
    print("| path | inputs/s | relative to the fixed checkpoint |")
    print("| --- | ---: | ---: |")
    for name, r in rows.items():
        r["relative"] = r["inputs_per_second"] / ref
        print(f"| {name} | {r['inputs_per_second']:.1f} | {r['relative']:.3f} |")
    out = {"zoo": args.zoo, "tasks": tv.num_tasks, "inputs": int(x.shape[0]), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
