"""TALL masks and Consensus merging (Wang et al., ICML 2024, "Localizing Task Information for
Improved Model Merging and Compression").

TALL mask of task t: ``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|`` with τ_MTL the multi-task vector (the
task-arithmetic sum Σ_t τ_t). The authors' code compares strictly (``>``), so an entry the task
never moved is never in its mask; they pick λ_t per task on validation data from
{0.2, 0.3, 0.4, 0.5, 0.6}. Consensus merging keeps the entries active in at least ``k`` task
masks (k = 2 drops "selfish" weights used by one task and "catastrophic" ones used by none), then
scales the masked sum by λ as task arithmetic does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.checks import check_fields
from adamerge.errors import InputError
from adamerge.merges.base import MergeResult, Stacks, constant_coefficients, f32, option, register_merge


def tall_masks(stacks: Stacks, multi: Stacks | None = None, lam: float | Tensor = 0.4) -> dict[str, Tensor]:
    """Boolean ``[T, *shape]`` masks ``|τ_t| > λ_t · |τ_MTL − τ_t|``; ``multi`` is τ_MTL per key
    (default Σ_t τ_t) and ``lam`` a float or one value per task."""
    out = {}
    for k, v in stacks.items():
        v = f32(v)
        mtl = v.sum(0) if multi is None else f32(multi[k]).to(v.dtype)
        lam_t = torch.as_tensor(lam, dtype=v.dtype).expand(v.shape[0]).reshape(-1, *([1] * (v.dim() - 1)))
        out[k] = v.abs() > lam_t * (mtl - v).abs()
    return out


@dataclass
class ConsensusOptions:
    lam: float = option(0.3)  # λ of the task-arithmetic sum of the masked vectors
    # keep entries active in at least k TALL masks: 0 <= k <= T (k = 0 keeps every entry: task arithmetic)
    k: int = option(2, low=0)
    tall_lambda: float = option(0.4, low=0)  # λ_t of every TALL mask (the middle of the authors' grid)
    KEEPS_NOTHING = "lower k or tall_lambda"

    def __post_init__(self) -> None:
        check_fields(self)

    def check_fit(self, tasks: int, entries: int) -> None:
        """An entry is in at most T masks: k > T keeps nothing."""
        if self.k > tasks:
            raise InputError(f"option 'k' = {self.k} keeps no entry: an entry is in at most {tasks} TALL masks with "
                             f"{tasks} tasks; choose k in [0, {tasks}] (0 keeps every entry, i.e. task arithmetic)")


@register_merge("consensus", ConsensusOptions, rewrites=True)
def consensus(stacks: Stacks, options: ConsensusOptions) -> MergeResult:
    """Consensus merging: τ_t kept where ≥ k TALL masks agree, then λ Σ_t."""
    masks = tall_masks(stacks, lam=options.tall_lambda)
    vectors = {}
    for key, v in stacks.items():
        keep = masks[key].sum(0) >= options.k
        vectors[key] = torch.where(keep, v, torch.zeros_like(v))
    return MergeResult(vectors, constant_coefficients(stacks, options.lam))
