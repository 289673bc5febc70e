"""T3 / T3_B: merging at test time without backpropagation (pure maths and the merger).

For an input x of task t, the pretrained model and every expert j (each through task t's head)
give predictive distributions p_0(x) and p_j(x). T3 turns each expert's divergence from the
pretrained model into that expert's coefficient and merges per input (T3) or per batch (T3_B):

    d_j(x) = JS(p_0(x) ‖ p_j(x)) / ln(base)                  (base 2: d ∈ [0, 1])
    λ_j(x) = λ_min + (λ_max − λ_min) · σ(γ · d_j(x))          (combine = independent)
    θ(x)   = θ0 + Σ_j c_j(x) · τ_j,   c_j = λ_j (side = expert) or λ_min + λ_max − λ_j (generalist)

``combine = softmax`` (the default) replaces σ by a softmax over the experts (c sums to
λ_min·T + λ_max − λ_min): a router. The public material leaves the bounds, the side, the log base
and the batch aggregation open; the defaults (side expert, softmax on divergences in bits; per
batch γ = 10 and λ ∈ [0, 1], per input a softer γ = 5 and λ ∈ [0.2, 0.8]) were chosen on the
development demo zoos, see :data:`ROUTER_DEFAULTS` and docs/test_time_and_pools.md; the paper's
form is ``preset: paper``.

Cost per batch against one fixed merged model: one vmapped pass of T + 1 parameter sets (the
pretrained model and the experts, :meth:`MergedModel.forward_many`) for the divergences, then the
merged forward: per batch (T3_B) one merge and one forward, per sample (T3) one merge per input,
``chunk`` inputs at a time (memory: ``chunk`` merged copies of the parameters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
from torch import Tensor, nn

from adamerge.checks import check_fields, option
from adamerge.train.data import images_layout
from adamerge.errors import InputError
from adamerge.core.merged import MergedModel


LAM_LIMIT = 1e6

#: The router's settings when not given, by ``per``: fixed on the development demo zoos (quick,
#: full seeds 0 and 1, the seed-2 subset; experiments/t3_settings.py, docs/test_time_and_pools.md).
#: One input's divergence is a noisier routing signal than a batch's mean (on full0 the largest
#: divergence is the input's own expert for 20-85 % of a task's inputs), so per input the router
#: is softer and its coefficients stay in a band around task arithmetic's.
ROUTER_DEFAULTS: dict[str, dict] = {
    "batch": {"gamma": 10.0, "lam_min": 0.0, "lam_max": 1.0, "log_base": 2.0, "side": "expert", "combine": "softmax"},
    "sample": {"gamma": 5.0, "lam_min": 0.2, "lam_max": 0.8, "log_base": 2.0, "side": "expert", "combine": "softmax"},
}
#: The paper's form (one σ per expert, γ = 0.5 on the JS divergence in nats, leaning on the
#: generalist as the divergence grows, λ ∈ [0, 1]): ``preset: paper``, for either ``per``.
PAPER = {"gamma": 0.5, "lam_min": 0.0, "lam_max": 1.0, "log_base": math.e, "side": "generalist", "combine": "independent"}


@dataclass
class T3Options:
    """Options of ``t3`` (``options.method_args``). The router's settings left unset (``None``)
    come from the preset: ``adamerge`` takes :data:`ROUTER_DEFAULTS` of ``per``, ``paper`` the
    paper's form (:data:`PAPER`); a setting given explicitly always wins."""

    per: str = option("sample", choices=("sample", "batch"))  # sample (T3: one merge per input) | batch (T3_B: one merge per batch)
    preset: str = option("adamerge", choices=("adamerge", "paper"))  # where unset router settings come from
    gamma: float | None = option(None)  # slope of the sigmoid (or softmax temperature⁻¹) on the divergence; any finite value
    # the coefficients' range; |λ| <= 1e6 (a larger coefficient overflows the merged float32 weights)
    lam_min: float | None = option(None, low=-LAM_LIMIT, high=LAM_LIMIT)
    lam_max: float | None = option(None, low=-LAM_LIMIT, high=LAM_LIMIT)
    log_base: float | None = option(None, low=1, low_open=True)  # 2: divergences in bits, JS ∈ [0, 1]; math.e gives nats (JS ≤ ln 2)
    side: str | None = option(None, choices=("expert", "generalist"))  # expert: c_j grows with expert j's divergence | generalist: shrinks
    combine: str | None = option(None, choices=("independent", "softmax"))  # softmax (over experts: a router) | independent (a sigmoid per expert)
    aggregate: str = option("mean_divergence", choices=("mean_divergence", "mean_lambda"))  # T3_B: mean_divergence (then λ) | mean_lambda
    chunk: int = option(16, low=1)  # T3: inputs merged at once (memory: chunk merged parameter copies)
    batch_size: int = option(64, low=1)

    def __post_init__(self) -> None:
        check_fields(self, "t3 option")
        fill = PAPER if self.preset == "paper" else ROUTER_DEFAULTS[self.per]
        for name, value in fill.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.lam_min > self.lam_max:
            raise InputError(f"t3 options need lam_min <= lam_max, got {self.lam_min} > {self.lam_max}")


def js_divergence(p: Tensor, q: Tensor, log_base: float = math.e) -> Tensor:
    """Jensen–Shannon divergence between probability rows (last axis), in units of ``log_base``.
    ``p`` and ``q`` broadcast; 0 for identical rows, ≤ log_base(2)."""
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0) / math.log(log_base)


def t3_coefficients(divergence: Tensor, opts: T3Options) -> Tensor:
    """Coefficients of the task vectors ``[..., T]`` from the divergences ``[..., T]``.

    Finite for every finite option: computed in float64; the softmax is taken of
    ``γ·s·(d − d_ref)`` with ``d_ref`` the divergence where ``γ·s·d`` is largest, so every
    exponent is <= 0 (an overflow to −inf gives weight 0, the largest entry gives exactly 1,
    never inf − inf); the sigmoid's input is clamped to ±80 (σ is 0 or 1 to float64 precision
    beyond); and ``λ_min·(1 − w) + λ_max·w`` never forms ``λ_max − λ_min``."""
    lo, hi = float(opts.lam_min), float(opts.lam_max)
    d = divergence.to(torch.float64)
    if opts.combine == "softmax":
        slope = opts.gamma * (1.0 if opts.side == "expert" else -1.0)
        ref = d.amax(-1, keepdim=True) if slope >= 0 else d.amin(-1, keepdim=True)
        z = slope * (d - ref)  # <= 0, possibly -inf, never NaN (d is finite)
        w = torch.softmax(z.nan_to_num(nan=0.0, neginf=-torch.inf), dim=-1)
    else:
        w = torch.sigmoid((opts.gamma * d).nan_to_num(nan=0.0).clamp(-80.0, 80.0))
        if opts.side != "expert":
            w = 1.0 - w
    return (lo * (1.0 - w) + hi * w).to(divergence.dtype)


class T3Output(NamedTuple):
    logits: Tensor  # [N, C]
    coefficients: Tensor  # [N, T] (T3_B: one row repeated)
    divergences: Tensor  # [N, T]


class TestTimeMerger(nn.Module):
    """Per-input (T3) or per-batch (T3_B) merging over a :class:`MergedModel` with task-wise
    coefficients; :meth:`predict` needs the input's task (its head scores every model)."""

    __test__ = False  # not a pytest class

    def __init__(self, merged: MergedModel, heads: Mapping[str, nn.Module], opts: T3Options) -> None:
        super().__init__()
        if merged.grouping.num_groups != 1:
            raise InputError("T3 merges with one coefficient per task (granularity 'task')")
        self.merged, self.opts = merged, opts
        self.heads = nn.ModuleDict(dict(heads))

    @torch.no_grad()
    def divergences(self, x: Tensor, task: str) -> Tensor:
        """JS(p_0 ‖ p_j) per input and expert, ``[N, T]`` (one pass of T + 1 parameter sets)."""
        T = self.merged.num_tasks
        sets = torch.cat([torch.zeros(1, T), torch.eye(T)]).unsqueeze(-1)  # pretrained, then experts
        feats = self.merged.forward_many(sets, images_layout(x, self.merged))  # [T + 1, N, F]
        probs = torch.softmax(self.heads[task](feats).float(), dim=-1)
        return js_divergence(probs[:1], probs[1:], self.opts.log_base).t()

    @torch.no_grad()
    def predict(self, x: Tensor, task: str) -> T3Output:
        """Logits, the coefficients used and the divergences they came from."""
        if task not in self.heads:
            raise InputError(f"unknown task '{task}'; tasks: {list(self.heads)}")
        d = self.divergences(x, task)
        coef = t3_coefficients(d, self.opts)
        if self.opts.per == "batch":
            one = coef.mean(0) if self.opts.aggregate == "mean_lambda" else t3_coefficients(d.mean(0), self.opts)
            feats = self.merged.forward_many(one[None, :, None], images_layout(x, self.merged))[0]
            coef = one.expand_as(coef)
        else:
            parts = []
            for lo in range(0, x.shape[0], self.opts.chunk):
                c = coef[lo : lo + self.opts.chunk]
                parts.append(self.merged.forward_many(c[:, :, None], x[lo : lo + self.opts.chunk], per_input=True))
            feats = torch.cat(parts)
        return T3Output(self.heads[task](feats), coef, d)

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.predict(x, task).logits


def t3_merged_model(model: nn.Module, tv, buffer_policy: str = "base") -> MergedModel:
    """The frozen task-wise merged model that T3 sets per input."""
    merged = MergedModel(model, tv, "task", init=0.0, clamp=None, buffer_policy=buffer_policy)
    merged.coefficients.requires_grad_(False)
    return merged

