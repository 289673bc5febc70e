"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022), with the Fisher estimated on the
unlabeled streams from each expert's own predictions.

The merge is the per-entry Fisher-weighted mean of the experts,
``θ = Σ_t F_t ⊙ θ_t / Σ_t F_t = θ0 + Σ_t (F_t / Σ_s F_s) ⊙ τ_t`` (scaled by λ, default 1), with
each F_t floored at ``floor`` (``max(F, floor)``, as a public WiSE-FT fork's Fisher merge does) so
entries no task's Fisher sees fall back to the plain average.

F_t is the diagonal Fisher of expert t (θ0 + τ_t, with its own buffers) through task t's head on
``samples`` inputs of task t's stream: ``E_x E_{y ~ p(y|x)} [(∂ log p(y|x) / ∂θ)²]`` with y drawn
from the expert's predictive distribution (``mode: sample``) or summed exactly over the classes
(``mode: expected``). No labels are read.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from adamerge.errors import InputError
from adamerge.checks import check_fields
from adamerge.merges.base import MergeResult, Stacks, constant_coefficients, f32, option, register_merge

MODES = ("sample", "expected")


@dataclass
class FisherOptions:
    lam: float = option(1.0)
    samples: int = option(128, low=1)  # inputs per task the Fisher is averaged over
    mode: str = option("sample", choices=MODES)  # sample: y ~ p(y|x); expected: Σ_y p(y|x) (∇ log p(y|x))²
    floor: float = option(1e-6, low=0, low_open=True)  # F_t = max(F_t, floor)
    seed: int = option(0, low=0)  # which inputs, and the sampled labels
    chunk: int = option(16, low=1)  # per-sample gradients computed this many at a time

    def __post_init__(self) -> None:
        check_fields(self)


def diagonal_fisher(model: nn.Module, head: nn.Module, x: Tensor, keys: Sequence[str], mode: str = "sample",
                    generator: torch.Generator | None = None, chunk: int = 16) -> dict[str, Tensor]:
    """The mean over the inputs ``x`` of the per-sample squared gradients of log p(y|x) with
    respect to the parameters ``keys`` (y sampled from, or averaged under, the model's p(y|x))."""
    params = {k: p.detach() for k, p in model.named_parameters() if k in set(keys)}
    fixed = {k: p.detach() for k, p in model.named_parameters() if k not in params}
    fixed.update({k: b for k, b in model.named_buffers()})

    def log_prob(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        logits = head(functional_call(model, {**p, **fixed}, (xi[None],)))
        return torch.log_softmax(logits.float(), -1).gather(1, yi.reshape(1, 1)).reshape(())

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))
    # accumulated in float64 for a float64 model, float32 otherwise (bfloat16 too)
    work = torch.float64 if any(p.dtype == torch.float64 for p in params.values()) else torch.float32
    total = {k: torch.zeros_like(v, dtype=work) for k, v in params.items()}
    first = next(iter(params.values()), None)
    if first is not None and x.is_floating_point():
        x = x.to(first.dtype)  # the inputs in the model's dtype
    model.eval()
    for lo in range(0, x.shape[0], chunk):
        xb = x[lo:lo + chunk]
        with torch.no_grad():
            probs = torch.softmax(head(model(xb)).float(), -1)
        if mode == "sample":
            labels = [(torch.multinomial(probs, 1, generator=generator)[:, 0], None)]
        else:
            labels = [(torch.full((xb.shape[0],), c, dtype=torch.long), probs[:, c]) for c in range(probs.shape[1])]
        for y, weight in labels:
            grads = per_sample(params, xb, y)
            for k, g in grads.items():
                g2 = g.to(work) ** 2
                if weight is not None:
                    g2 = g2 * weight.reshape(-1, *([1] * (g2.dim() - 1)))
                total[k] += g2.sum(0)
    return {k: v / x.shape[0] for k, v in total.items()}


def estimate_fishers(model: nn.Module, tv, heads: Mapping[str, nn.Module] | None, streams: Sequence | None,
                     options: FisherOptions, keys: Sequence[str]) -> dict:
    """Every expert's diagonal Fisher on its own unlabeled stream, stacked ``[T, *shape]``."""
    from adamerge.train.data import images_layout

    if heads is None or streams is None:
        raise InputError("merge 'fisher' needs data: the task heads and the unlabeled streams (eval --config gives both)")
    by_name = {s.name: s for s in streams}
    missing = [t for t in tv.task_names if t not in by_name or t not in heads]
    if missing:
        raise InputError(f"merge 'fisher': no stream or head for task '{missing[0]}'")
    from adamerge.core.merged import merge_dtype

    # the experts in the base's dtype (float64 stays float64); a half-precision expert is scored in
    # float32 (exact for its values), as the merge computes it, so its per-sample gradients are not bf16
    dtype = merge_dtype(next((tv.base[k].dtype for k in keys), torch.float32))
    expert = copy.deepcopy(model).to(dtype).eval()
    gen = torch.Generator().manual_seed(options.seed)
    fishers: dict[str, list[Tensor]] = {k: [] for k in keys}
    for t, task in enumerate(tv.task_names):
        state = {k: (v.double() + tv.vectors[k][t].double()).to(dtype if k in keys else v.dtype) if k in tv.vectors else v
                 for k, v in tv.base.items()}
        expert.load_state_dict(state)
        stream = by_name[task]
        idx = torch.randperm(len(stream), generator=gen)[: options.samples]
        x = images_layout(stream.inputs(idx), expert).to(dtype)
        f = diagonal_fisher(expert, heads[task], x, keys, options.mode, gen, options.chunk)
        for k in keys:
            fishers[k].append(f[k])
    return {"fishers": {k: torch.stack(v) for k, v in fishers.items()}}


@register_merge("fisher", FisherOptions, estimate=estimate_fishers)
def fisher(stacks: Stacks, options: FisherOptions, fishers: Mapping[str, Tensor]) -> MergeResult:
    """Fisher-weighted averaging: θ0 + λ Σ_t (F_t / Σ_s F_s) ⊙ τ_t, F floored."""
    weights = {}
    for k, v in stacks.items():
        f = torch.clamp_min(fishers[k].to(f32(v).dtype), options.floor)
        weights[k] = f / f.sum(0, keepdim=True)
    return MergeResult(dict(stacks), constant_coefficients(stacks, options.lam), weights)
