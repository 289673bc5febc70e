"""``gradient``: the default solver. A first-order optimiser (Adam, AdamW or SGD: ``options.optimizer``)
on the raw coefficients, with the constraint inside the forward, as AdaMerging does:
``box`` clamps the applied coefficients to ``bounds`` (the raw parameter is unbounded; the
gradient is zero outside the box), ``simplex`` makes each group's T coefficients
``total · softmax``, ``none`` leaves them free."""
from __future__ import annotations

from torch import Tensor

from adamerge.solvers.base import Solver, register_solver
from adamerge.solvers.optimizers import create_optimizer


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
    description = "Adam/AdamW/SGD on the raw coefficients; box = clamp in the forward, simplex = softmax"

    def parametrisation(self) -> dict:
        c = self.cfg.constraint
        if c == "box":
            return {"clamp": tuple(self.cfg.bounds), "simplex": False}
        if c == "simplex":
            return {"clamp": None, "simplex": True, "total": self.cfg.total}
        return {"clamp": None, "simplex": False}

    def configure_optimizers(self, module):
        return create_optimizer(self.cfg.optimizer, module.trainable_parameters(), self.cfg.lr, self.cfg.weight_decay)

    def training_step(self, module, batch) -> Tensor:
        loss, opt = backward_and_step(module, batch, self, self.cfg.grad_clip)
        opt.step()
        return loss
