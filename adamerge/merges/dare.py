"""DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each entry of every task
vector with probability ``p`` and rescale the survivors by 1/(1 − p), so each τ_t keeps its
expectation; the rescaled vectors are then summed with λ as task arithmetic does.

The drop is reproducible: the generator of each tensor is seeded from ``seed`` and the tensor's
name (CRC-32), so the result depends on neither the order of the keys nor other tensors.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from adamerge.checks import check_fields
from adamerge.merges.base import MergeResult, Stacks, constant_coefficients, f32, option, register_merge


@dataclass
class DareOptions:
    lam: float = option(0.3)
    p: float = option(0.5, low=0, high=1, high_open=True)  # drop probability (0: nothing dropped, task arithmetic)
    seed: int = option(0, low=0)
    KEEPS_NOTHING = "lower p"

    def __post_init__(self) -> None:
        check_fields(self)


def key_generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the tensor name."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))


@register_merge("dare", DareOptions, rewrites=True)
def dare(stacks: Stacks, options: DareOptions) -> MergeResult:
    """DARE: Bernoulli(1 − p) keep mask per entry, survivors × 1/(1 − p), then λ Σ_t."""
    vectors = {}
    for key, v in stacks.items():
        keep = torch.rand(v.shape, generator=key_generator(options.seed, key)) >= options.p
        vectors[key] = torch.where(keep.to(v.device), f32(v) / (1.0 - options.p), 0.0).to(v.dtype)
    return MergeResult(vectors, constant_coefficients(stacks, options.lam))
