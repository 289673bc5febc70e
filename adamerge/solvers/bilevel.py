"""``bilevel``: the first-order bi-level loop of Concrete AdaMerging (Tang et al., 2023).

Each meta-step takes two batches. Inner: reset the coefficients to their initial values, draw a
mask sample and hold it fixed (detached), take ONE Adam step on the coefficients (``inner_lr``,
default 1; this Adam's state persists across meta-steps and is checkpointed). Outer: with the
updated coefficients held fixed (first order), merge again with a FRESH mask sample and take one
step of the Lightning optimiser (Adam, ``lr``) on the mask logits on the second batch. The public
code takes its inner step on a merged state built before the reset; here the inner step starts
from the reset coefficients, as the algorithm says.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.checks import check_fields, option
from adamerge.errors import InputError
from adamerge.solvers.base import Solver, register_solver


@dataclass
class BilevelOptions:
    inner_lr: float = option(1.0, low=0, low_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "bilevel option")


@register_solver("bilevel")
class BilevelSolver(Solver):
    Options = BilevelOptions
    batches_per_step = 2
    needs_masks = True
    constraints = ("none", "box")
    description = "inner Adam step on the coefficients (mask fixed), outer step on the mask logits (fresh batch)"

    def __init__(self, cfg, args: dict | None = None) -> None:
        super().__init__(cfg, args)
        self.inner = None
        self._inner_state: dict | None = None
        self._init: Tensor | None = None

    def parametrisation(self) -> dict:
        return {"clamp": tuple(self.cfg.bounds), "simplex": False} if self.cfg.constraint == "box" else {"clamp": None, "simplex": False}

    def prepare(self, merged) -> None:
        self._init = merged.coefficients.detach().clone()

    def configure_optimizers(self, module):
        masks = module.merged.mask_set
        if masks is None:
            raise InputError("the bilevel solver needs learnable masks (methods concrete_*)")
        coef = module.merged.coefficients
        if self._init is None:
            self._init = coef.detach().clone()
        self.inner = torch.optim.Adam([coef], lr=self.args.inner_lr)
        if self._inner_state is not None:
            self.inner.load_state_dict(self._inner_state)
        return torch.optim.Adam(list(masks.parameters()), lr=self.cfg.lr)

    def training_step(self, module, batch) -> Tensor:
        inner_batch, outer_batch = batch
        merged = module.merged
        coef, masks = merged.coefficients, merged.mask_set
        # inner: reset λ, one Adam step with a detached mask sample
        with torch.no_grad():
            coef.copy_(self._init.to(coef.device))
        sample = {k: v.detach() for k, v in masks().items()}
        masks.frozen = sample
        coef.requires_grad_(True)
        inner_loss, _ = module.batch_loss(inner_batch)
        (grad,) = torch.autograd.grad(inner_loss, [coef])
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:
            # autograd.grad bypasses DDP's gradient averaging: average by hand, or every rank
            # would take its own inner step on its share of the batch and the ranks drift apart
            grad = trainer.strategy.reduce(grad, reduce_op="mean")
        masks.frozen = None
        self.inner.zero_grad()
        coef.grad = grad
        self.inner.step()
        coef.grad = None
        # outer: λ fixed (first order), a fresh mask sample, one step on the logits
        coef.requires_grad_(False)
        opt = module.optimizers()
        opt.zero_grad()
        loss, losses = module.batch_loss(outer_batch)
        module.log_step(loss, losses)
        module.log_extra({"inner_loss": float(inner_loss.detach())})
        module.manual_backward(loss)
        if self.cfg.grad_clip:
            module.clip_gradients(opt, gradient_clip_val=self.cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        coef.requires_grad_(True)
        return loss

    def state_dict(self) -> dict:
        return {"inner": None if self.inner is None else self.inner.state_dict(), "init": self._init}

    def load_state_dict(self, state: dict) -> None:
        self._inner_state = state.get("inner")
        if state.get("init") is not None:
            self._init = state["init"]
        if self.inner is not None and self._inner_state is not None:
            self.inner.load_state_dict(self._inner_state)
