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

Expert-guided (no labels): ``expert_distill``: per task, KL(expert ‖ merged) between expert t's
predictive distribution on the same unlabeled samples (precomputed once, see
:mod:`adamerge.train.expert_targets`) and the merged model's, at a temperature, with soft or hard
(argmax) targets and an optional confidence filter. It assumes each expert is good on its own
task: the merged model is pulled towards the experts, errors included.

Trust-weighted (no labels): ``trusted_distill``: per sample, KL(expert ‖ merged) where the
expert's confidence (its max probability) is at least ``confidence``, else KL(start ‖ merged)
with the fit's starting merge (e.g. task arithmetic λ = 0.3) as the anchor. A confident expert is
trusted; where it is unsure the merge keeps what it predicted at the start instead of copying
the expert's guess or sharpening its own (what entropy-style objectives do, and where they
collapse a weak task). Its targets are ``[N, 2, C]``: the expert's and the start's logits.
``unsure: mean`` (the demo's recommended row since session 36) puts the mean of the two
distributions there instead: on the demo's settings neither guess alone is the better one.
``start_views: K`` averages the start's prediction over K shifted copies of each image (the
expert's stays single-view, so its confidence keeps the meaning the threshold was set for).

Self-training (no labels): ``weak_strong`` (aTLAS's test-time objective): cross-entropy of a strong
augmented view against the weak view's confident pseudo-label.

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


def expert_distill(
    logits: Tensor,
    labels: Tensor | None = None,
    targets: Tensor | None = None,
    temperature: float = 1.0,
    hard: bool = False,
    confidence: float | None = None,
) -> Tensor:
    """``T² · mean KL(softmax(targets/T) ‖ softmax(logits/T))`` over the samples whose expert
    confidence (max probability at temperature 1) is at least ``confidence``; ``hard``: cross-
    entropy against the expert's argmax instead. Zero (with zero gradient) when the merged model
    predicts what the expert predicts. ``targets`` are the expert's logits on the same samples."""
    if targets is None:
        raise InputError("the expert_distill objective needs the experts' predictions (targets)")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise InputError(f"expert_distill: temperature must be > 0, got {temperature!r}")
    if confidence is not None and not (isinstance(confidence, (int, float)) and 0 <= confidence <= 1):
        raise InputError(f"expert_distill: confidence must be in [0, 1], got {confidence!r}")
    targets = targets.float().detach()
    keep = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if confidence is not None:
        keep = F.softmax(targets, dim=-1).amax(-1) >= confidence
    if not bool(keep.any()):
        return logits.float().sum() * 0.0
    z, t = logits.float()[keep], targets[keep]
    if hard:
        return F.cross_entropy(z, t.argmax(-1))
    log_p = F.log_softmax(z / temperature, dim=-1)
    log_q = F.log_softmax(t / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return kl.mean() * temperature**2


def trusted_distill(
    logits: Tensor,
    labels: Tensor | None = None,
    targets: Tensor | None = None,
    confidence: float = 0.9,
    temperature: float = 1.0,
    hard: bool = False,
    unsure: str = "start",
    start_views: int = 1,
) -> Tensor:
    """``T² · mean_i KL(softmax(q_i/T) ‖ softmax(logits_i/T))`` with ``q_i`` the expert's logits
    where its confidence (max probability at temperature 1) is at least ``confidence``, else the
    start's (``unsure``: or the mean of the expert's and the start's distributions, the expert all
    the same, or the expert only where the start predicts its class, see :data:`UNSURE`);
    ``hard``: cross-entropy against ``q_i``'s argmax instead. ``targets``: ``[N, 2, C]``,
    ``[:, 0]`` the expert's logits, ``[:, 1]`` the start's. A mean over independent samples (the
    choice depends on each sample's own expert). ``start_views``: the start's prediction is the
    mean over that many shifted copies of each image; it is applied where the targets are computed
    (:func:`adamerge.train.expert_targets.stream_logits`, which checks it; the config checks it
    against ``OBJECTIVE_RANGES`` first), so the targets here already carry it."""
    if targets is None or targets.dim() != 3 or targets.shape[1] != 2:
        raise InputError("the trusted_distill objective needs [N, 2, C] targets: the expert's and the start's logits")
    if not (isinstance(confidence, (int, float)) and 0 <= confidence <= 1):
        raise InputError(f"trusted_distill: confidence must be in [0, 1], got {confidence!r}")
    if unsure not in UNSURE:
        raise InputError(f"trusted_distill: unsure must be one of {list(UNSURE)}, got {unsure!r}")
    targets = targets.float().detach()
    expert, start = targets[:, 0], targets[:, 1]
    trusted = F.softmax(expert, dim=-1).amax(-1) >= confidence
    if unsure == "agree":
        # an unsure expert counts where the start predicts its class; elsewhere the sample gives no target
        keep = trusted | (expert.argmax(-1) == start.argmax(-1))
        if not bool(keep.any()):
            return logits.float().sum() * 0.0
        # a mean over all N samples (the dropped ones count as zero), so chunks still add up
        return expert_distill(logits[keep], targets=expert[keep], temperature=temperature, hard=hard) * (keep.sum() / keep.numel())
    if unsure == "mean":  # the mixture of the two distributions, as logits
        fallback = torch.log((F.softmax(expert, dim=-1) + F.softmax(start, dim=-1)) / 2)
    else:
        fallback = start if unsure == "start" else expert
    # per sample, the trusted target; then the one distillation loss of the library
    return expert_distill(logits, targets=torch.where(trusted[:, None], expert, fallback), temperature=temperature, hard=hard)


UNSURE = ("start", "expert", "mean", "agree")
"""``trusted_distill``'s target where the expert is unsure: the start's prediction, the expert's all
the same, the mean of the two distributions, or the expert's only where the start agrees."""


def weak_strong(logits: Tensor, labels: Tensor | None = None, targets: Tensor | None = None, confidence: float = 0.99) -> Tensor:
    """aTLAS's test-time objective: cross-entropy of the strong (augmented) view's logits against
    the weak (plain) view's predicted class, on the samples where the weak view's confidence is at
    least ``confidence``. ``targets`` are the weak view's logits (computed without gradient)."""
    return expert_distill(logits, targets=targets, hard=True, confidence=confidence)


# what an objective needs besides the logits: the experts' predictions, the labels of a labeled
# (few-shot) split, or the weak view of the same samples
expert_distill.target_kind = "experts"  # type: ignore[attr-defined]
weak_strong.target_kind = "views"  # type: ignore[attr-defined]
trusted_distill.target_kind = "experts"  # type: ignore[attr-defined]
trusted_distill.needs_start = True  # type: ignore[attr-defined]  # targets [N, 2, C]: expert, start


def cross_entropy(logits: Tensor, labels: Tensor | None = None) -> Tensor:
    if labels is None:
        raise InputError("the cross_entropy objective needs labels")
    return F.cross_entropy(logits.float(), labels)


cross_entropy.target_kind = "labels"  # type: ignore[attr-defined]


OBJECTIVES: dict[str, Objective] = {
    "entropy": entropy,
    "entropy_norm": entropy_norm,
    "reliable_entropy": reliable_entropy,
    "infomax": infomax,
    "expert_distill": expert_distill,
    "trusted_distill": trusted_distill,
    "weak_strong": weak_strong,
    "cross_entropy": cross_entropy,
}


# objectives whose value is a mean over the samples (weighted by 1/N), so a batch split into
# chunks gives the same value and gradient as the sum of the chunks' values, each weighted by its
# share of the samples (``options.micro_batch: N``); infomax's marginal term and a confidence
# filter's count of kept samples depend on the whole batch
_SAMPLE_MEANS = {"entropy", "entropy_norm", "reliable_entropy", "cross_entropy", "expert_distill", "trusted_distill"}


def averages_over_samples(name: str, args: dict | None = None) -> bool:
    """Whether objective ``name`` with ``args`` is a mean over independent samples."""
    if name == "expert_distill":
        return (args or {}).get("confidence") is None
    return name in _SAMPLE_MEANS


def target_kind(name: str) -> str | None:
    """What an objective needs per sample: ``experts``, ``labels``, ``views`` or nothing (None)."""
    return getattr(get_objective(name), "target_kind", None)


def needs_start(name: str) -> bool:
    """Whether an objective also needs the starting merge's predictions (targets ``[N, 2, C]``)."""
    return bool(getattr(get_objective(name), "needs_start", False))


def needs_targets(name: str) -> bool:
    """Whether an objective needs the experts' predictions on the stream."""
    return target_kind(name) == "experts"


def get_objective(name: str) -> Objective:
    """Look up an objective by name (see ``OBJECTIVES``)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise InputError(f"unknown objective '{name}'; choose from {sorted(OBJECTIVES)}") from None
