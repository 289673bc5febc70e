"""PCB merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging").

Over the whole model (each task's entries flattened together, as the authors' ``PCB_merge``):

1. clip |τ_t| to its own [``clip``, 1 − ``clip``] quantiles (outliers);
2. intra-task balance ``exp(T · norm(|τ_t|)²)`` with ``norm`` the per-task min-max scaling;
3. inter-task balance ``tanh(τ_t · Σ_s τ_s)`` (agreement with the other tasks, unclipped τ);
4. score = intra · inter; below each task's top-``ratio`` quantile the score is raised to that
   quantile and the result min-max scaled, so entries outside the top ratio weigh 0;
5. merged = λ · Σ_t score_t · clip(τ_t) / Σ_t score_t.

The authors then tune λ per task by evolutionary search on validation data (init 1.0 in [0.8, 1.3]);
here λ is one number (default 1.0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.checks import check_fields
from adamerge.errors import InputError
from adamerge.merges.base import MergeResult, Stacks, constant_coefficients, f32, option, register_merge


@dataclass
class PcbOptions:
    lam: float = option(1.0)
    ratio: float = option(0.1, low=0, low_open=True, high=1)  # fraction of each task's entries kept (the authors' pcb_ratio default)
    clip: float = option(1e-4, low=0, high=0.5, high_open=True)  # quantile clipped at both ends of |τ_t|
    KEEPS_NOTHING = "raise ratio"

    def __post_init__(self) -> None:
        check_fields(self)

    def check_fit(self, tasks: int, entries: int) -> None:
        """Entries scored above the ``int(n · (1 − ratio))``-th smallest survive: at least one."""
        if int(entries * (1 - self.ratio)) >= entries - 1:
            raise InputError(f"option 'ratio' {self.ratio:g} keeps none of each task's {entries} entries (only entries scored "
                             f"above the top-ratio quantile are kept); choose ratio > {1 / entries:.3g} (1/n) and <= 1")


def _sorted_at(x: Tensor, position: int) -> Tensor:
    """Per row, the entry at ``position`` (0-based, clamped) of the ascending sort, ``[T, 1]``."""
    position = min(max(position, 0), x.shape[1] - 1)
    return x.kthvalue(position + 1, dim=1, keepdim=True).values


def _minmax(x: Tensor) -> Tensor:
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)


@register_merge("pcb", PcbOptions, rewrites=True)
def pcb(stacks: Stacks, options: PcbOptions) -> MergeResult:
    """PCB: intra- and inter-task competition scores, top ``ratio`` kept, score-weighted mean."""
    keys = list(stacks)
    T = stacks[keys[0]].shape[0]
    work = torch.float64 if stacks[keys[0]].dtype == torch.float64 else torch.float32
    flat = torch.cat([f32(stacks[k]).reshape(T, -1) for k in keys], dim=1).to(work)
    n = flat.shape[1]
    mag = flat.abs()
    # the authors' positions: int(n · clip) and int(n · (1 − clip) − 1)
    mag = torch.minimum(torch.maximum(mag, _sorted_at(mag, int(n * options.clip))), _sorted_at(mag, int(n * (1 - options.clip) - 1)))
    clipped = torch.sign(flat) * mag
    intra = torch.exp(T * _minmax(mag) ** 2)
    inter = torch.tanh(flat * flat.sum(0, keepdim=True))
    del flat
    score = intra * inter
    del intra, inter
    scale = _minmax(torch.maximum(score, _sorted_at(score, int(n * (1 - options.ratio)))))
    del score
    total = scale.sum(0, keepdim=True).clamp_min(1e-12)
    vectors, weights, start = {}, {}, 0
    for k in keys:
        v = stacks[k]
        size = v[0].numel()
        s = scale[:, start:start + size].reshape(v.shape)
        vectors[k] = torch.where(s > 0, clipped[:, start:start + size].reshape(v.shape), 0.0).to(v.dtype)
        weights[k] = s / total[:, start:start + size].reshape(v.shape[1:])
        start += size
    return MergeResult(vectors, constant_coefficients(stacks, options.lam), weights)
