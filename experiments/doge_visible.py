"""How much of DOGE's learned δ its own loss sees (issue 23): per weight matrix of a demo zoo,
the norm of ``doge_ops.visible_part(τ, δ)`` over the norm of δ, for δ as the port's loop leaves it
(Adam, gradient projected) with method doge's λ (lam_mean 0.3, cap 1).

    python experiments/doge_visible.py ZOO      # ZOO: a demo zoo folder (base.safetensors, experts/)
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

from adamerge.solvers import doge_ops


def visible_ratios(zoo: Path) -> list[float]:
    base = load_file(str(zoo / "base.safetensors"))
    experts = [load_file(str(f)) for f in sorted((zoo / "experts").glob("*.safetensors"))]
    ratios = []
    for k, v in base.items():
        if not (k.endswith("weight") and v.dim() >= 2 and v.is_floating_point()):
            continue
        taus = torch.stack([e[k].float() - v.float() for e in experts])
        taus = taus.reshape(taus.shape[0], taus.shape[1], -1)
        if float(taus.norm()) == 0:
            continue
        lam = doge_ops.doge_coefficients(taus, doge_ops.DEFAULT_C, cap=1.0, lam_mean=0.3)
        delta, _ = doge_ops.solve_layer(taus, lam)
        ratios.append(float(doge_ops.visible_part(taus, delta).norm() / delta.norm()))
    return ratios


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("zoo", type=Path)
    r = visible_ratios(p.parse_args(argv).zoo)
    print(f"{len(r)} matrices: ||visible part|| / ||delta|| median {statistics.median(r):.3f} "
          f"(min {min(r):.3f}, max {max(r):.3f})")


if __name__ == "__main__":
    main()
