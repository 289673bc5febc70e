"""``pgd``: projected gradient. A gradient step on the raw coefficients (plain, or preconditioned
by Adam's moment estimates), then the exact projection onto the constraint set: ``box``
(``bounds``) or ``simplex`` (per coefficient group, the T task coefficients are >= 0 and sum to
``total``). Nothing is clamped in the forward: every iterate is feasible itself.

The plain step uses the Euclidean projection. The Adam step uses the projection in Adam's own
metric ``Σ (sqrt(v̂) + eps)(y − x)²``: for the box that is still the clamp, for the simplex it is
not, and with the Euclidean projection the fixed points of a preconditioned step are not the
constrained optima (measured on a quadratic: Adam + Euclidean projection stalls at an excess loss
of 1.36 where this reaches the optimum; tests/test_solvers.py).

Step sizes: ``schedule: constant`` (lr) or ``decay`` (lr / sqrt(t)) for t = 1, 2, ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.checks import check_fields, option
from adamerge.errors import InputError
from adamerge.solvers.base import Solver, closure_loss, register_solver, start_feasible
from adamerge.solvers.gradient import backward_and_step
from adamerge.solvers.projections import project

SCHEDULES = ("constant", "decay")
PRECONDITIONERS = ("none", "adam")


def step_size(lr: float, t: int, schedule: str) -> float:
    """The step size of step ``t`` (1-based)."""
    return lr if schedule == "constant" else lr / math.sqrt(t)


class ProjectedGradient(torch.optim.Optimizer):
    """``x ← P(x − η_t · d)``, d = the gradient (P Euclidean) or Adam's bias-corrected
    ``m / (sqrt(v) + eps)`` (P in the metric ``sqrt(v) + eps``)."""

    def __init__(self, params, lr: float, constraint: str, bounds=(0.0, 1.0), total: float = 1.0,
                 preconditioner: str = "adam", schedule: str = "constant", betas=(0.9, 0.999), eps: float = 1e-8):
        if preconditioner not in PRECONDITIONERS:
            raise InputError(f"pgd: preconditioner must be one of {PRECONDITIONERS}, got '{preconditioner}'")
        if schedule not in SCHEDULES:
            raise InputError(f"pgd: schedule must be one of {SCHEDULES}, got '{schedule}'")
        defaults = dict(lr=lr, constraint=constraint, bounds=tuple(bounds), total=total,
                        preconditioner=preconditioner, schedule=schedule, betas=tuple(betas), eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                t = state["step"] = state.get("step", 0) + 1
                g = p.grad
                if group["preconditioner"] == "adam":
                    b1, b2 = group["betas"]
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    metric = (v / (1 - b2**t)).sqrt() + group["eps"]
                    d = (m / (1 - b1**t)) / metric
                else:
                    metric, d = None, g
                p.sub_(step_size(group["lr"], t, group["schedule"]) * d)
                p.copy_(project(p, group["constraint"], group["bounds"], group["total"], metric))
        return loss


@dataclass
class PGDOptions:
    preconditioner: str = option("adam", choices=tuple(PRECONDITIONERS))  # "none" (plain gradient step) or "adam"
    schedule: str = option("constant", choices=tuple(SCHEDULES))  # "constant" or "decay" (lr / sqrt(t))
    betas: tuple[float, float] = option((0.9, 0.999), low=0, high=1, high_open=True)  # Adam's β1, β2 in [0, 1)
    eps: float = option(1e-8, low=0, low_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "pgd option")


@register_solver("pgd")
class PGDSolver(Solver):
    Options = PGDOptions
    constraints = ("box", "simplex")
    description = "gradient (or Adam) step, then the exact Euclidean projection onto the box or the simplex"

    def prepare(self, merged) -> None:
        start_feasible(merged, self.cfg)

    def configure_optimizers(self, module):
        a = self.args
        return ProjectedGradient(module.trainable_parameters(), self.cfg.lr, self.cfg.constraint, self.cfg.bounds,
                                 self.cfg.total, a.preconditioner, a.schedule, a.betas, a.eps)

    def training_step(self, module, batch) -> Tensor:
        loss, opt = backward_and_step(module, batch, self, self.cfg.grad_clip)
        opt.step()
        return loss
