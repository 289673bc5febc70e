"""Per-task objectives on a head's logits ``[N, C]``; each returns a scalar to minimise.

Unlabeled (test-time) objectives:

- ``entropy``: mean Shannon entropy of softmax(logits) (AdaMerging's objective, as published).
- ``entropy_norm``: the same divided by log(C), so tasks with many classes do not dominate.
- ``reliable_entropy``: EATA/SAR-style: only samples whose entropy is below ``e0 · log C`` count,
  each weighted by ``exp(-(H − e0 · log C))`` so confident samples lead.
- ``infomax``: information maximisation (SHOT): mean entropy + (log C − marginal entropy of the
  batch's mean prediction), divided by log(C). The marginal term rewards using every class,
  which stops the collapse to one predicted class that plain entropy minimisation can fall
  into. It also pulls the predicted class balance towards uniform, which is wrong for a task
  whose classes are not balanced; ``floor < 1`` penalises the marginal entropy only below
  ``floor · log C`` (a hinge), so it stops a collapse but leaves a skewed balance alone.

Labeled: ``cross_entropy`` (for few-shot methods; never used on test streams).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from adamerge.errors import InputError

Objective = Callable[..., Tensor]


def shannon_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of softmax(logits), ``[N]`` (nats). The one entropy of the library."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    return shannon_entropy(logits).mean()


def entropy_norm(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    return entropy(logits) / math.log(logits.shape[-1])


def reliable_entropy(logits: Tensor, labels: Tensor | None = None, e0: float = 0.4) -> Tensor:
    h = shannon_entropy(logits)
    margin = e0 * math.log(logits.shape[-1])
    keep = (h < margin).float()
    weight = torch.exp(-(h.detach() - margin)) * keep
    return (weight * h).sum() / logits.shape[0]


def infomax(logits: Tensor, labels: Tensor | None = None, diversity: float = 1.0, floor: float = 1.0) -> Tensor:
    """``(H̄ + diversity · max(0, floor · log C − H(p̄))) / log C``; ``floor=1`` is SHOT's
    information maximisation (up to the constant 1), ``floor < 1`` only stops collapse."""
    if not 0.0 <= floor <= 1.0:
        raise InputError(f"infomax: floor must be in [0, 1], got {floor}")
    log_c = math.log(logits.shape[-1])
    mean_p = F.softmax(logits.float(), dim=-1).mean(0)
    marginal = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return (shannon_entropy(logits).mean() + diversity * torch.relu(floor * log_c - marginal)) / log_c


def cross_entropy(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    if labels is None:
        raise InputError("the cross_entropy objective needs labels")
    return F.cross_entropy(logits.float(), labels)


OBJECTIVES: dict[str, Objective] = {
    "entropy": entropy,
    "entropy_norm": entropy_norm,
    "reliable_entropy": reliable_entropy,
    "infomax": infomax,
    "cross_entropy": cross_entropy,
}


def get_objective(name: str) -> Objective:
    """Look up an objective by name (see ``OBJECTIVES``)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise InputError(f"unknown objective '{name}'; choose from {sorted(OBJECTIVES)}") from None
