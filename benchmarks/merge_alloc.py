"""The merge's forward into freshly allocated outputs against into outputs reused from the step
before (issue 25: where the per-step overhead that the merge's own arithmetic does not explain
may come from). ViT-B-32's visual tower (random weights, nothing downloaded), T = 8 float32 task
vectors of 0.01 · N(0, 1), every floating tensor merged as :class:`adamerge.core.merged.MergedModel`
does (``merge_tensor``, blocked ``addmv``; reused: its ``into``, what the training step passes
since session 38); five timed calls of each, twice, medians printed.
Also the per-step zero gradients (``zeros_like`` against ``zero_`` of kept tensors).

    python benchmarks/merge_alloc.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import logging

    import adamerge  # noqa: F401  (makes torchvision/open_clip importable on CPU torch)
    import adamerge.core.merged as merged
    import open_clip
    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded" is intended
    model = open_clip.create_model("ViT-B-32", pretrained=None).visual
    gen = torch.Generator().manual_seed(0)
    params = {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}
    taus = {k: 0.01 * torch.randn((args.tasks, *v.shape), generator=gen) for k, v in params.items()}
    w = torch.full((args.tasks,), 0.3)
    kept = {k: [None] for k in params}  # merge_tensor's ``into``: allocated by the first call, then reused
    grads = {k: torch.empty_like(v) for k, v in params.items()}

    def fresh():
        return {k: merged.merge_tensor(w, taus[k], params[k]) for k in params}

    def reuse():
        return {k: merged.merge_tensor(w, taus[k], params[k], None, kept[k]) for k in params}

    def zeros_like():
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def zero_():
        for v in grads.values():
            v.zero_()
        return grads

    for name, fn in [("merge, fresh outputs", fresh), ("merge, reused outputs", reuse)] * 2 + [
            ("zero gradients, zeros_like", zeros_like), ("zero gradients, zero_", zero_)] * 2:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            del out
        print(f"{name:28s} median {statistics.median(times):.3f} s  ({', '.join(f'{t:.3f}' for t in times)})", flush=True)


if __name__ == "__main__":
    main()
