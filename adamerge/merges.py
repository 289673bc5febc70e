"""Data-free merges as pure tensor functions over stacked task vectors ``{key: [T, *shape]}``.

No I/O, no modules: each function takes stacks and returns stacks or one merged delta per key.
:func:`merged_state` adds a delta to the base. TIES follows Yadav et al. (2023): keep each task's
top-``density`` fraction of entries by magnitude (over the whole model), elect a sign per entry
by the sign of the sum, keep the entries that agree, and average the kept ones (disjoint mean).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

Stacks = Mapping[str, Tensor]


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32) if t.dtype in (torch.bfloat16, torch.float16) else t


def weight_average(stacks: Stacks) -> dict[str, Tensor]:
    """Mean task vector: θ0 + mean τ is the plain average of the experts."""
    return {k: _f32(v).mean(0) for k, v in stacks.items()}


def task_arithmetic(stacks: Stacks, lam: float = 0.3) -> dict[str, Tensor]:
    """λ · Σ_t τ_t (Ilharco et al., 2023)."""
    return {k: lam * _f32(v).sum(0) for k, v in stacks.items()}


def trim_top_k(stacks: Stacks, density: float = 0.2) -> dict[str, Tensor]:
    """Zero all but each task's ``density`` fraction of largest-magnitude entries (whole model)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    T = next(iter(stacks.values())).shape[0]
    thresholds = []
    for t in range(T):
        flat = torch.cat([_f32(v[t]).abs().flatten() for v in stacks.values()])
        k = max(1, int(round(density * flat.numel())))
        # k-th largest magnitude = (n - k + 1)-th smallest
        thresholds.append(flat.kthvalue(flat.numel() - k + 1).values)
        del flat
    th = torch.stack(thresholds)
    out = {}
    for key, v in stacks.items():
        view = th.reshape(-1, *([1] * (v.dim() - 1))).to(_f32(v).dtype)
        out[key] = torch.where(_f32(v).abs() >= view, v, torch.zeros_like(v))
    return out


def elect_sign(stacks: Stacks) -> dict[str, Tensor]:
    """Per-entry elected sign: the sign of the sum over tasks (+1 where the sum is zero)."""
    return {k: torch.where(_f32(v).sum(0) >= 0, 1.0, -1.0) for k, v in stacks.items()}


def ties_vectors(stacks: Stacks, density: float = 0.2, keys=None) -> dict[str, Tensor]:
    """TIES-processed but still separate task vectors (the input of AdaMerging++):
    trimmed, and zero wherever a task disagrees with the elected sign.

    ``keys`` limits the processing (and the top-k threshold) to those stacks, e.g. the
    parameters, so BatchNorm statistics never compete for the kept entries; the other stacks
    are returned unchanged."""
    if keys is not None:
        keys = set(keys)
        rest = {k: v for k, v in stacks.items() if k not in keys}
        return {**rest, **ties_vectors({k: v for k, v in stacks.items() if k in keys}, density)}
    trimmed = trim_top_k(stacks, density)
    signs = elect_sign(trimmed)
    return {
        k: torch.where(torch.sign(_f32(v)) == signs[k], v, torch.zeros_like(v))
        for k, v in trimmed.items()
    }


def ties(stacks: Stacks, lam: float = 0.3, density: float = 0.2) -> dict[str, Tensor]:
    """λ · disjoint mean of the TIES-processed task vectors (pass parameter stacks only)."""
    kept = ties_vectors(stacks, density)
    out = {}
    for k, v in kept.items():
        v = _f32(v)
        count = (v != 0).sum(0).clamp_min(1)
        out[k] = lam * v.sum(0) / count
    return out


def merged_state(base: Mapping[str, Tensor], delta: Mapping[str, Tensor], keys=None) -> dict[str, Tensor]:
    """θ0 + delta for the keys in ``delta`` (restricted to ``keys`` if given); others copied."""
    out = {}
    for k, v in base.items():
        if k in delta and (keys is None or k in keys):
            out[k] = (v.to(delta[k].dtype) + delta[k]).to(v.dtype)
        else:
            out[k] = v.clone()
    return out

