"""``frank_wolfe``: conditional gradient over the box or the simplex, projection-free.

Each step: d = the batch gradient (or a running average of batch gradients, since one batch's
gradient is noisy), s = the linear minimisation oracle's vertex (per group: ``total`` on the task
with the most negative entry for the simplex; ``lo``/``hi`` by the sign for the box), the duality
gap ``<d, x − s>`` (logged as ``fw_gap``; it bounds ``f(x) − min f`` for a convex f and is 0 only
at a stationary point), then ``x ← x + γ (s − x)`` with γ = 2/(t+2) (t = 0, 1, ...) or γ from a
line search of the batch loss along the segment. Every iterate is a convex combination of
feasible points, so it stays feasible. ``gap_tol`` stops the run once the gap falls below it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.checks import check_fields, check_float, option
from adamerge.errors import InputError
from adamerge.solvers.base import Solver, closure_loss, register_solver, start_feasible
from adamerge.solvers.gradient import backward_and_step
from adamerge.solvers.projections import fw_gap, lmo

STEPS = ("standard", "line_search")


def average_weight(average: float | str, t: int) -> float:
    """Weight ρ_t of the new gradient in ``d ← (1 − ρ) d + ρ g`` (t = 0, 1, ...): a constant,
    or ``decaying`` ρ_t = 4 / (t + 8)^(2/3) (stochastic Frank-Wolfe, Mokhtari et al. 2018)."""
    if t == 0:
        return 1.0
    if average == "decaying":
        return min(1.0, 4.0 / (t + 8) ** (2.0 / 3.0))
    return float(average)


class FrankWolfe(torch.optim.Optimizer):
    """State per parameter: the step count ``t``, the averaged gradient ``d``, the last vertex ``s``
    and gap. :meth:`direction` computes them from ``p.grad``; :meth:`step` moves towards ``s``."""

    def __init__(self, params, constraint: str, bounds=(0.0, 1.0), total: float = 1.0, average: float | str = 1.0):
        super().__init__(params, dict(constraint=constraint, bounds=tuple(bounds), total=total, average=average, gamma=None))

    @torch.no_grad()
    def direction(self) -> float:
        """Update the averaged gradient and the vertex of every parameter; the summed gap."""
        gap = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                t = st.get("step", 0)
                rho = average_weight(group["average"], t)
                st["d"] = p.grad.clone() if "d" not in st or rho >= 1.0 else st["d"].mul_(1 - rho).add_(p.grad, alpha=rho)
                st["s"] = lmo(st["d"], group["constraint"], group["bounds"], group["total"])
                st["gap"] = float(fw_gap(st["d"], p.detach(), st["s"]))
                gap += st["gap"]
        return gap

    def default_gamma(self) -> float:
        p = self.param_groups[0]["params"][0]
        return 2.0 / (self.state[p].get("step", 0) + 2.0)

    @torch.no_grad()
    def move(self, gamma: float) -> None:
        """``x ← x + γ (s − x)`` (no step counted; used by the line search on trial points)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "s" in self.state[p]:
                    p.add_(self.state[p]["s"] - p, alpha=gamma)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if "s" not in st:
                    continue
                gamma = group["gamma"] if group["gamma"] is not None else 2.0 / (st.get("step", 0) + 2.0)
                p.add_(st["s"] - p, alpha=gamma)
                st["step"] = st.get("step", 0) + 1
            group["gamma"] = None
        return loss


def _average(name: str, value, owner: str) -> float:
    if isinstance(value, str):
        raise InputError(f"{owner} '{name}' must be a number in (0, 1] or 'decaying', got {value!r}")
    return check_float(name, value, low=0, low_open=True, high=1, owner=owner)


@dataclass
class FWOptions:
    step: str = option("standard", choices=STEPS)  # "standard" (γ = 2/(t+2)) or "line_search" (on the step's batch)
    # weight of the new gradient in the running average (1 = none) or "decaying"
    average: float | str = option(1.0, check=lambda name, v, owner: v if v == "decaying" else _average(name, v, owner))
    gap_tol: float | None = option(None, low=0)  # stop once the duality gap is below this
    line_search_evals: int = option(12, low=2)  # batch-loss evaluations of the golden-section search

    def __post_init__(self) -> None:
        check_fields(self, "frank_wolfe option")


def golden_section(f, evals: int) -> float:
    """Minimise a function of γ ∈ [0, 1] with ``evals`` evaluations (unimodal assumed; the best
    point seen is returned, so a non-unimodal f still gets no worse than its samples)."""
    r = (math.sqrt(5) - 1) / 2
    lo, hi = 0.0, 1.0
    a, b = hi - r * (hi - lo), lo + r * (hi - lo)
    fa, fb = f(a), f(b)
    seen = [(fa, a), (fb, b)]
    for _ in range(max(0, evals - 2)):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - r * (hi - lo)
            fa = f(a)
            seen.append((fa, a))
        else:
            lo, a, fa = a, b, fb
            b = lo + r * (hi - lo)
            fb = f(b)
            seen.append((fb, b))
    return min(seen)[1]


@register_solver("frank_wolfe")
class FrankWolfeSolver(Solver):
    Options = FWOptions
    constraints = ("box", "simplex")
    description = "linear minimisation oracle (a vertex per group), step 2/(t+2) or line search; logs the duality gap"

    def __init__(self, cfg, args: dict | None = None) -> None:
        super().__init__(cfg, args)
        self.last_gap: float | None = None

    def prepare(self, merged) -> None:
        start_feasible(merged, self.cfg)

    def configure_optimizers(self, module):
        return FrankWolfe(module.trainable_parameters(), self.cfg.constraint, self.cfg.bounds, self.cfg.total, self.args.average)

    def training_step(self, module, batch) -> Tensor:
        loss, opt = backward_and_step(module, batch, self, self.cfg.grad_clip)
        fw = opt.optimizer
        gap = fw.direction()
        if self.args.step == "line_search":
            params = [p for g in fw.param_groups for p in g["params"]]
            start = [p.detach().clone() for p in params]

            def trial(gamma: float) -> float:
                with torch.no_grad():
                    for p, x0 in zip(params, start):
                        p.copy_(x0)
                    fw.move(gamma)
                    value = float(module.batch_loss(batch)[0])
                return value if math.isfinite(value) else math.inf

            gamma = golden_section(trial, self.args.line_search_evals)
            with torch.no_grad():
                for p, x0 in zip(params, start):
                    p.copy_(x0)
            for g in fw.param_groups:
                g["gamma"] = gamma
        else:
            gamma = fw.default_gamma()
        module.log_extra({"fw_gap": gap, "fw_gamma": gamma})
        opt.step()
        self.last_gap = gap
        if self.args.gap_tol is not None and gap <= self.args.gap_tol:
            module.request_stop(f"Frank-Wolfe gap {gap:.3g} <= gap_tol {self.args.gap_tol:g}")
        return loss

    def state_dict(self) -> dict:
        return {"last_gap": self.last_gap}

    def load_state_dict(self, state: dict) -> None:
        self.last_gap = state.get("last_gap", self.last_gap)

    def summary(self, module=None) -> dict:
        return {**super().summary(module), "final_gap": self.last_gap}
