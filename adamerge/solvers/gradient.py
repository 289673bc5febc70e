"""``gradient``: the default solver. A first-order optimiser (Adam, AdamW or SGD: ``options.optimizer``)
on the raw coefficients, with the constraint inside the forward, as AdaMerging does:
``box`` clamps the applied coefficients to ``bounds`` (the raw parameter is unbounded; the
gradient is zero outside the box), ``simplex`` makes each group's T coefficients
``total · softmax``, ``none`` leaves them free."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from adamerge.checks import check_fields, option
from adamerge.solvers.base import Solver, register_solver
from adamerge.solvers.optimizers import create_optimizer

SCHEDULES = ("constant", "cosine")


def scheduled_lr(lr: float, step: int, total: int, schedule: str) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``: constant, or cosine annealing
    ``lr · (1 + cos(π · step / total)) / 2`` (aTLAS's few-shot schedule). A pure function of the
    step, so a resumed run uses the same rates."""
    if schedule == "cosine" and total > 0:
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return lr


@dataclass
class GradientOptions:
    schedule: str = option("constant", choices=tuple(SCHEDULES))  # or "cosine"

    def __post_init__(self) -> None:
        check_fields(self, "gradient option")


def backward_and_step(module, batch, solver: Solver, clip: float | None) -> tuple[Tensor, object]:
    """The common first half of a data step: zero grad, loss, one backward, optional clipping.
    Returns the loss and the (Lightning) optimiser, which the caller steps once."""
    opt = module.optimizers()
    opt.zero_grad()
    loss, losses = module.batch_loss(batch)
    module.log_step(loss, losses)
    module.manual_backward(loss)
    if clip:
        module.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
    return loss, opt


@register_solver("gradient")
class GradientSolver(Solver):
    Options = GradientOptions
    description = "Adam/AdamW/SGD on the raw coefficients; box = clamp in the forward, simplex = softmax"

    def parametrisation(self) -> dict:
        c = self.cfg.constraint
        if c == "box":
            return {"clamp": tuple(self.cfg.bounds), "simplex": False}
        if c == "simplex":
            return {"clamp": None, "simplex": True, "total": self.cfg.total}
        return {"clamp": None, "simplex": False}

    def configure_optimizers(self, module):
        # the coefficients (and masks) at options.lr; trained heads (options.train_heads) at options.head_lr
        return create_optimizer(self.cfg.optimizer, module.parameter_groups(), self.cfg.lr, self.cfg.weight_decay)

    def training_step(self, module, batch) -> Tensor:
        loss, opt = backward_and_step(module, batch, self, self.cfg.grad_clip)
        if self.args.schedule != "constant":
            lr = scheduled_lr(self.cfg.lr, module.global_step, module.trainer.max_steps, self.args.schedule)
            for group in opt.optimizer.param_groups:  # every group on the same schedule (heads: options.head_lr)
                group["lr"] = lr * (self.cfg.head_lr / self.cfg.lr if group.get("name") == "heads" else 1.0)
            module.log_extra({"lr": lr})
        opt.step()
        return loss
