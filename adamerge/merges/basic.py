"""Weight averaging, task arithmetic and TIES, and the helpers other merges share.

TIES follows Yadav et al. (2023): keep each task's top-``density`` fraction of entries by
magnitude (over the whole model), elect a sign per entry by the sign of the sum, keep the entries
that agree, and average the kept ones (disjoint mean). :func:`merged_state` adds a delta to the base.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.checks import check_fields
from adamerge.errors import InputError
from adamerge.merges.base import MergeResult, Stacks, constant_coefficients, f32, option, register_merge


@dataclass
class NoOptions:
    """A merge without options."""


@dataclass
class LamOptions:
    lam: float = option(0.3)  # λ: the scale of the summed (or averaged) update (0: the pretrained model, explicitly)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class TiesOptions(LamOptions):
    density: float = option(0.2, low=0, low_open=True, high=1)  # fraction of each task's entries kept (by magnitude, whole model)
    KEEPS_NOTHING = "raise density"

    def check_fit(self, tasks: int, entries: int) -> None:
        """``round(density · n)`` of each task's n entries are kept: at least one."""
        if int(round(self.density * entries)) < 1:
            raise InputError(f"option 'density' {self.density:g} keeps round({self.density:g} · {entries}) = 0 of each task's "
                             f"{entries} entries; choose density in [{1 / entries:.3g}, 1]")


@register_merge("weight_average", NoOptions)
def weight_average(stacks: Stacks, options: NoOptions | None = None) -> MergeResult:
    """Mean of the experts: θ0 + (1/T) Σ_t τ_t."""
    T = next(iter(stacks.values())).shape[0]
    return MergeResult(dict(stacks), constant_coefficients(stacks, 1.0 / T))


@register_merge("task_arithmetic", LamOptions)
def task_arithmetic(stacks: Stacks, options: LamOptions) -> MergeResult:
    """θ0 + λ Σ_t τ_t (Ilharco et al., 2023)."""
    return MergeResult(dict(stacks), constant_coefficients(stacks, options.lam))


def trim_top_k(stacks: Stacks, density: float = 0.2) -> dict[str, Tensor]:
    """Zero all but each task's ``density`` fraction of largest-magnitude entries (whole model)."""
    if not 0.0 < density <= 1.0:
        raise InputError(f"option 'density' must be in (0, 1], got {density}")
    T = next(iter(stacks.values())).shape[0]
    thresholds = []
    for t in range(T):
        flat = torch.cat([f32(v[t]).abs().flatten() for v in stacks.values()])
        k = max(1, int(round(density * flat.numel())))
        # k-th largest magnitude = (n - k + 1)-th smallest
        thresholds.append(flat.kthvalue(flat.numel() - k + 1).values)
        del flat
    th = torch.stack(thresholds)
    out = {}
    for key, v in stacks.items():
        view = th.reshape(-1, *([1] * (v.dim() - 1))).to(f32(v).dtype)
        out[key] = torch.where(f32(v).abs() >= view, v, torch.zeros_like(v))
    return out


def elect_sign(stacks: Stacks) -> dict[str, Tensor]:
    """Per-entry elected sign: the sign of the sum over tasks (+1 where the sum is zero)."""
    return {k: torch.where(f32(v).sum(0) >= 0, 1.0, -1.0) for k, v in stacks.items()}


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
        k: torch.where(torch.sign(f32(v)) == signs[k], v, torch.zeros_like(v))
        for k, v in trimmed.items()
    }


@register_merge("ties", TiesOptions, rewrites=True)
def ties_merge(stacks: Stacks, options: TiesOptions) -> MergeResult:
    """TIES: trim to ``density``, elect signs, λ · disjoint mean of the agreeing entries."""
    kept = ties_vectors(stacks, options.density)
    weights = {k: 1.0 / (v != 0).sum(0).clamp_min(1).to(f32(v).dtype) for k, v in kept.items()}
    return MergeResult(kept, constant_coefficients(stacks, options.lam), weights)


def ties(stacks: Stacks, lam: float = 0.3, density: float = 0.2) -> dict[str, Tensor]:
    """λ · disjoint mean of the TIES-processed task vectors (pass parameter stacks only)."""
    return ties_merge(stacks, TiesOptions(lam=lam, density=density)).delta()


def merged_state(base: Mapping[str, Tensor], delta: Mapping[str, Tensor], keys=None) -> dict[str, Tensor]:
    """θ0 + delta for the keys in ``delta`` (restricted to ``keys`` if given); others copied."""
    out = {}
    for k, v in base.items():
        if k in delta and (keys is None or k in keys):
            out[k] = (v.to(delta[k].dtype) + delta[k]).to(v.dtype)
        else:
            out[k] = v.clone()
    return out
