"""Memory and communication per step when the task vectors are sharded across ranks.

The inputs are measured here, not assumed: the parameter count and tensor count of the open_clip
visual tower (built on the ``meta`` device: no memory), and the bytes autograd saves for the
backward per input image (a forward + backward of the random-weight tower on one image, counted
with ``torch.autograd.graph.saved_tensors_hooks``; ``--no-activations`` skips that). From them
the script prints, for T experts and R ranks, what each rank holds and what crosses the network
per step under three layouts (see docs/scaling.md):

- ``replicated`` (today's DDP): every rank holds base + T task vectors + the merged copy + its
  gradient; ranks exchange only the coefficient gradients (T × G numbers).
- ``by parameter`` (FSDP-style): rank r holds slice r of the base and of every task vector and
  builds slice r of the merged weights; the forward all-gathers the merged weights a layer at a
  time (again in the backward if resharded), the backward reduce-scatters their gradient, and
  each rank contracts its slice of the gradient with its slices of the task vectors.
- ``by task``: rank r holds T/R whole task vectors; the merged weights are an all-reduce of the
  ranks' partial sums, and the gradient of the merged weights is all-reduced so each rank can
  contract it with its own task vectors.

Example::

    python benchmarks/sharding_arithmetic.py --model ViT-L-14 --tasks 20,100 --ranks 8 --json shard.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GIB = 1024**3


def measure(name: str, activations: bool = True) -> dict:
    """Parameter count, tensor count and saved activation bytes per image of open_clip ``name``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from adamerge._compat import ensure_torchvision

    ensure_torchvision()
    import open_clip
    import torch
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config(name)
    vision = CLIPVisionCfg(**cfg["vision_cfg"])
    with torch.device("meta"):
        meta = _build_vision_tower(cfg["embed_dim"], vision)
    params = [p for p in meta.parameters()]
    out = {"model": name, "parameters": sum(p.numel() for p in params), "tensors": len(params),
           "image_size": vision.image_size, "layers": vision.layers}
    if activations:
        torch.manual_seed(0)
        model = _build_vision_tower(cfg["embed_dim"], vision).eval()
        own = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = [0]

        def pack(t):
            if t.untyped_storage().data_ptr() not in own:
                saved[0] += t.numel() * t.element_size()
            return t

        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        x = torch.randn(1, 3, size, size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        out["saved_bytes_per_image"] = saved[0]
    return out


def layouts(m: dict, tasks: int, ranks: int, bytes_per_value: int = 4, tv_bytes: int = 4, images: int = 16) -> dict:
    """GiB per rank and GiB sent per rank per step for the three layouts (ring collectives)."""
    s = m["parameters"] * bytes_per_value / GIB  # one model's weights (merged copy, base, gradient)
    tau = m["parameters"] * tv_bytes / GIB  # one task vector
    act = m.get("saved_bytes_per_image", 0) * images / GIB  # one task's chunk of images
    ring = (ranks - 1) / ranks
    coef = tasks * m["tensors"] * 4 / GIB  # the layer-wise coefficient gradient
    return {
        "replicated": {"held_gib": s * 3 + tau * tasks + act, "sent_gib": 2 * ring * coef},
        # base, merged, gradient and task vectors sliced; one block's merged weights gathered at a time
        "by_parameter": {"held_gib": (s * 3 + tau * tasks) / ranks + s / m["layers"] + act,
                         "sent_gib": 3 * ring * s + 2 * ring * coef},
        # whole task vectors split; base, merged copy and gradient replicated; two all-reduces
        "by_task": {"held_gib": s * 3 + tau * -(-tasks // ranks) + act, "sent_gib": 2 * 2 * ring * s + 2 * ring * coef},
        "activations_gib": act,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-L-14")
    p.add_argument("--tasks", default="20,100")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--images", type=int, default=16, help="images per task chunk (activations alive at once)")
    p.add_argument("--tv-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-activations", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    m = measure(args.model, not args.no_activations)
    tv_bytes = 2 if args.tv_dtype == "bfloat16" else 4
    rows = {int(t): layouts(m, int(t), args.ranks, tv_bytes=tv_bytes, images=args.images) for t in args.tasks.split(",")}
    print(f"{m['model']}: {m['parameters']:,} parameters in {m['tensors']} tensors "
          f"({m['parameters'] * 4 / GIB:.2f} GiB float32); saved activations "
          f"{m.get('saved_bytes_per_image', 0) / 2**20:.0f} MiB per image; task vectors {args.tv_dtype}; R = {args.ranks}")
    print("T | layout | held per rank (GiB) | sent per rank per step (GiB)")
    for t, r in rows.items():
        for name in ("replicated", "by_parameter", "by_task"):
            print(f"{t} | {name} | {r[name]['held_gib']:.2f} | {r[name]['sent_gib']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"measured": m, "ranks": args.ranks, "tv_dtype": args.tv_dtype,
                                               "images": args.images, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
