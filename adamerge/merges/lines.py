"""LiNeS (Wang et al., 2024): layer-increasing network scaling of the merged task vector.

The task-arithmetic sum Σ_t τ_t is scaled per residual block ``l`` (0 … L−1) by
``α + β · l / (L − 1)``, so the shallow blocks stay close to the pretrained weights and the deep
ones take most of the update; every tensor outside the residual blocks (embeddings, stem, final
norm, projection) gets ``α`` (as the authors' ``LiNeS_scaling`` does). For multi-task merging the
authors set ``α = (‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁) / T``, which for the task-arithmetic τ_MTL = Σ_t τ_t is
1/T (the default ``alpha: null``), and choose β on validation data.

Blocks and their depth come from the parameter names with the same detection as the ``block``
granularity (:mod:`adamerge.core.granularity`): ``blocks.N`` / ``resblocks.N`` / ``layers.N`` /
``stages.N`` / ``layerN`` containers with all their indices, in the order the names appear.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adamerge.core.granularity import make_grouping
from adamerge.checks import check_fields
from adamerge.merges.base import MergeResult, Stacks, option, register_merge


@dataclass
class LinesOptions:
    alpha: float | None = option(None)  # scale outside the blocks and of block 0; None: 1/T
    beta: float = option(0.5)  # extra scale of the deepest block (the authors tune it on validation data)

    def __post_init__(self) -> None:
        check_fields(self)


def block_depths(names: Sequence[str]) -> tuple[dict[str, int | None], int]:
    """Each name's residual-block index (``None`` outside the blocks) and the number of blocks L."""
    grouping = make_grouping("block", {n: torch.Size([1]) for n in names})
    # a block label keeps its container path ("blocks.2.1"); any other label is one top-level name
    blocks = [g for g in grouping.group_names if "." in g]
    index = {g: i for i, g in enumerate(blocks)}
    depth = {n: index.get(grouping.group_names[grouping.tensor_group[n]]) for n in names}
    return depth, len(blocks)


def depth_scales(names: Sequence[str], alpha: float, beta: float) -> dict[str, float]:
    """``α + β · l / (L − 1)`` for a tensor in block ``l``, ``α`` outside the blocks."""
    depth, L = block_depths(names)
    return {n: alpha if l is None else alpha + beta * (l / (L - 1) if L > 1 else 0.0) for n, l in depth.items()}


@register_merge("lines", LinesOptions)
def lines(stacks: Stacks, options: LinesOptions) -> MergeResult:
    """LiNeS: θ0 + (α + β·l/(L−1)) Σ_t τ_t per residual block l; α outside the blocks."""
    T = next(iter(stacks.values())).shape[0]
    alpha = 1.0 / T if options.alpha is None else options.alpha
    scales = depth_scales(list(stacks), alpha, options.beta)
    return MergeResult(dict(stacks), {k: torch.full((T,), scales[k], dtype=torch.float64) for k in stacks})
