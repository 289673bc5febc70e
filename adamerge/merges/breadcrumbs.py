"""Model Breadcrumbs (Davari & Belilovsky, 2023): per layer (tensor) and task, drop the largest
``top`` fraction of entries by magnitude (outliers) and the smallest ``bottom`` fraction
(negligible perturbations), then sum the remaining "breadcrumbs" with λ as task arithmetic does.

Counts are truncated (``int(fraction · n)``) as in mergekit's ``magnitude_outliers`` (whose
``gamma``, the top fraction, defaults to 0.01); ties in magnitude are broken by position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adamerge.errors import InputError
from adamerge.checks import check_fields
from adamerge.merges.base import MergeResult, Stacks, constant_coefficients, f32, option, register_merge


@dataclass
class BreadcrumbsOptions:
    lam: float = option(0.3)
    top: float = option(0.01, low=0, high=1, high_open=True)  # fraction of the largest-magnitude entries dropped per tensor and task
    bottom: float = option(0.85, low=0, high=1, high_open=True)  # fraction of the smallest-magnitude entries dropped per tensor and task
    KEEPS_NOTHING = "lower top or bottom"

    def __post_init__(self) -> None:
        check_fields(self)
        # int(top·n) + int(bottom·n) <= floor((top + bottom)·n) < n: every tensor keeps an entry
        if self.top + self.bottom >= 1:
            raise InputError(f"top + bottom must be < 1 (something must be kept), got {self.top} + {self.bottom}")


@register_merge("breadcrumbs", BreadcrumbsOptions, rewrites=True)
def breadcrumbs(stacks: Stacks, options: BreadcrumbsOptions) -> MergeResult:
    """Model Breadcrumbs: per tensor drop the top and bottom magnitudes, then λ Σ_t."""
    vectors = {}
    for key, v in stacks.items():
        T, n = v.shape[0], v[0].numel()
        n_top, n_bottom = int(options.top * n), int(options.bottom * n)
        order = f32(v).reshape(T, n).abs().argsort(dim=1, stable=True)  # ascending magnitude
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(T, n).contiguous())
        keep = (rank >= n_bottom) & (rank < n - n_top)
        vectors[key] = torch.where(keep.reshape(v.shape), v, torch.zeros_like(v))
    return MergeResult(vectors, constant_coefficients(stacks, options.lam))
