"""Choose T3's open settings (side, combine, γ, λ bounds) on the QUICK demo zoo.

The full demo zoo (5 tasks, 64 px) is where T3 is judged; its defaults are fixed here, on the
quick zoo (3 tasks, 32 px, other fine-tuning run), before the full demo is looked at. Every
setting is scored as T3_B (one merge per batch of 64: cheap); the best few are rescored per
input (T3). Task arithmetic on the same zoo is printed for reference.

    .venv/bin/python experiments/t3_settings.py --out t3_settings.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import torch

    from adamerge.train.data import LinearHead, stream_from_tensors
    from adamerge.workflows.demo import DEFAULT_TASKS, QUICK
    from adamerge.train.evaluation import accuracy_table
    from adamerge.methods import build_data_free
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.core.test_time import T3Options, TestTimeMerger, t3_coefficients, t3_merged_model
    from adamerge.train.loop import evaluate
    from adamerge.zoo import build_zoo, create_backbone, list_tasks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=os.environ.get("ADAMERGE_CACHE", str(Path.home() / ".cache" / "adamerge")))
    p.add_argument("--top", type=int, default=4, help="settings rescored per input")
    p.add_argument("--out")
    args = p.parse_args(argv)
    tasks = [t for t in DEFAULT_TASKS if t in list_tasks(available_only=True)][:3]
    zoo = build_zoo(args.cache_dir, tasks, image_size=QUICK.image_size, seed=0, steps=QUICK.zoo_steps,
                    n_train=QUICK.n_train, n_test=QUICK.n_test, progress=False)
    heads = {t: LinearHead.from_state_dict(zoo.heads[t]) for t in tasks}
    streams = [stream_from_tensors(t, zoo.tasks[t].x_test, zoo.tasks[t].y_test) for t in tasks]
    tv = TaskVectors.from_state_dicts(zoo.base, {t: zoo.experts[t] for t in tasks})
    arch = create_backbone(pretrained=False)
    merged = t3_merged_model(arch, tv)
    rows = {}
    for lam in (0.3, 0.5, 1.0):
        rows[f"task_arithmetic(lam={lam:g})"] = evaluate(build_data_free("task_arithmetic", arch, tv, lam=lam), heads, streams)["mean"]

    # the divergences do not depend on the settings: one pass of the pretrained model and the
    # experts per batch, reused by every setting (each setting then costs its merges and forwards)
    batches = []
    for s in streams:
        merger = TestTimeMerger(merged, heads, T3Options())
        for lo in range(0, len(s), 64):
            idx = torch.arange(lo, min(lo + 64, len(s)))
            x = s.inputs(idx)
            batches.append((s.name, x, s.labels()[idx], merger.divergences(x, s.name)))

    def score(opts: T3Options) -> float:
        correct = {s.name: 0 for s in streams}
        for task, x, y, d in batches:
            coef = t3_coefficients(d, opts)
            if opts.per == "batch":
                one = coef.mean(0) if opts.aggregate == "mean_lambda" else t3_coefficients(d.mean(0), opts)
                feats = merged.forward_many(one[None, :, None], x)[0]
            else:
                feats = torch.cat([merged.forward_many(coef[lo:lo + opts.chunk, :, None], x[lo:lo + opts.chunk], per_input=True)
                                   for lo in range(0, x.shape[0], opts.chunk)])
            correct[task] += int((heads[task](feats).argmax(-1) == y).sum())
        return accuracy_table(correct, {s.name: len(s) for s in streams})["mean"]

    # log base 2 only: a base-e divergence is the base-2 one times ln 2, the same as a smaller γ
    grid = itertools.product(("expert", "generalist"), ("independent", "softmax"), (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0),
                             (0.3, 0.6, 1.0))
    batch = {}
    for side, combine, gamma, hi in grid:
        opts = T3Options(per="batch", side=side, combine=combine, gamma=gamma, log_base=2.0, lam_min=0.0, lam_max=hi)
        key = f"side={side},combine={combine},gamma={gamma:g},lam=[0,{hi:g}]"
        batch[key] = (score(opts), opts)
        print(f"T3_B {key}: {100 * batch[key][0]:.1f}", flush=True)
    best = sorted(batch, key=lambda k: -batch[k][0])[: args.top]
    sample = {}
    for key in best:
        opts = batch[key][1]
        opts.per = "sample"
        sample[key] = score(opts)
        print(f"T3   {key}: {100 * sample[key]:.1f}", flush=True)
    print("\nreference:", {k: round(100 * v, 1) for k, v in rows.items()})
    print("best T3_B:", [(k, round(100 * batch[k][0], 1)) for k in best])
    if args.out:
        Path(args.out).write_text(json.dumps({"tasks": tasks, "reference": rows,
                                              "t3_b": {k: v[0] for k, v in batch.items()}, "t3": sample}, indent=2))


if __name__ == "__main__":
    main()
