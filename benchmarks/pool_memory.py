"""Peak memory of FW-Merging's pool path against the pool size.

For each pool size C this writes C candidate checkpoints of the demo model (EfficientNet-Lite0,
the demo zoo's architecture; candidates are the base plus ``0.01 · N(0, 1)`` per tensor, seeded)
as safetensors files, then, in a FRESH subprocess per measurement, runs what one FW-Merging
iteration does with the pool: the oracle's pass (cosine of a gradient-shaped tensor with every
candidate tensor) and the merge ``θ0 + Σ_c λ_c (θ_c − θ0)`` with every λ_c non-zero (every
candidate read). It reports the peak resident memory (``VmHWM``) and its growth over the
process's resident memory before the pool was touched, and the pool's own count of the largest
bytes it held at once. ``--naive`` also measures the public port's way (every candidate loaded
into memory at once, then combined) for contrast.

Example::

    .venv/bin/python benchmarks/pool_memory.py                 # C = 4, 8, 16 (+ naive)
    .venv/bin/python benchmarks/pool_memory.py --sizes 4,16 --json pool.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _model():
    from adamerge.zoo import create_backbone

    return create_backbone(pretrained=False).eval()


def _write_pool(folder: Path, size: int) -> None:
    import torch
    from safetensors.torch import save_file

    model = _model()
    base = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(base, str(folder / "base.safetensors"))
    for c in range(size):
        gen = torch.Generator().manual_seed(c)
        cand = {k: (v + 0.01 * torch.randn(v.shape, generator=gen)).contiguous() if v.is_floating_point() else v
                for k, v in base.items()}
        save_file(cand, str(folder / f"c{c}.safetensors"))


def worker(folder: str, size: int, naive: bool) -> dict:
    import torch
    from safetensors.torch import load_file

    from adamerge.memory import process_memory_mb
    from adamerge.methods.fw_merging import oracle_scores
    from adamerge.core.pool import CheckpointPool

    model = _model()
    keys = [n for n, _ in model.named_parameters()]
    base = load_file(os.path.join(folder, "base.safetensors"))
    grad = {k: torch.randn(base[k].shape) for k in keys}  # gradient-shaped, as an iteration has one
    paths = {f"c{c}": os.path.join(folder, f"c{c}.safetensors") for c in range(size)}
    lam = torch.full((size, len(keys)), 1.0 / size, dtype=torch.float64)
    before = process_memory_mb("VmRSS")
    out: dict = {"size": size, "naive": naive}
    if naive:  # the public port's way: every candidate in memory, then combined
        cands = [load_file(p) for p in paths.values()]
        merged = {k: base[k] + sum(lam[c, i].item() * (cands[c][k] - base[k]) for c in range(size)) for i, k in enumerate(keys)}
        del cands, merged
    else:
        pool = CheckpointPool(paths, base, keys)
        oracle_scores(grad, pool, "cosine")
        merged = pool.merge(lam)
        del merged
        out["pool_peak_live_mb"] = pool.peak_live_bytes / 2**20
        out["pool_read_mb"] = pool.bytes_read / 2**20
    out["rss_before_mb"] = before
    out["peak_rss_mb"] = process_memory_mb("VmHWM")
    out["growth_mb"] = out["peak_rss_mb"] - before
    out["candidate_mb"] = sum(base[k].numel() * base[k].element_size() for k in keys) / 2**20
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4,8,16")
    p.add_argument("--no-naive", action="store_true", help="skip the load-everything comparison")
    p.add_argument("--json")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.worker[2] == "1")))
        return []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pool-bench-") as tmp:
        _write_pool(Path(tmp), max(sizes))
        for naive in ([False] if args.no_naive else [False, True]):
            for size in sizes:
                res = subprocess.run([sys.executable, __file__, "--worker", tmp, str(size), "1" if naive else "0"],
                                     capture_output=True, text=True, check=True)
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print("| path | candidates | candidate size (MiB) | peak RSS (MiB) | growth over start (MiB) | pool's peak held (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        held = f"{r['pool_peak_live_mb']:.2f}" if "pool_peak_live_mb" in r else "n/a"
        print(f"| {'load all (naive)' if r['naive'] else 'pool (memory-mapped)'} | {r['size']} | {r['candidate_mb']:.1f} |"
              f" {r['peak_rss_mb']:.0f} | {r['growth_mb']:.0f} | {held} |")
    streamed = [r for r in rows if not r["naive"]]
    if len(streamed) > 1:
        lo, hi = streamed[0], streamed[-1]
        print(f"\npool path: peak RSS at {hi['size']} candidates / at {lo['size']}: {hi['peak_rss_mb'] / lo['peak_rss_mb']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
