"""``doge``: DOGE's data-free solver (ICML 2025; facts in ALGORITHMS.md, maths in
:mod:`~adamerge.solvers.doge_ops`).

For every weight matrix (a parameter named ``*weight`` with 2 or more dimensions; convolution
kernels are read as ``[out, in·kh·kw]``) it learns a correction δ (shared by the tasks, or one per
task) with Adam on the layer's data-free loss, the gradient projected against the shared subspace
of the task vectors every step, with λ_t = min(c / ‖τ_t‖_F, cap) (``cap`` None: the port), c fixed (the port) or chosen per
matrix so that the tasks' λ average to ``lam_mean``. Layers
are independent: each finished layer is kept in a partial checkpoint, so an interrupted solve
resumes at the next layer.
The state it returns, ``{"delta.<name>": δ}``, is applied by the ``doge`` methods' ``build``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.checks import check_fields, option
from adamerge.errors import InputError, NonFiniteLossError
from adamerge.solvers import doge_ops
from adamerge.solvers.base import Solver, register_solver


def matrix_keys(tv, param_names: list[str]) -> list[str]:
    """The parameters DOGE corrects: weights with two or more dimensions."""
    return [k for k in param_names if k.endswith("weight") and tv.base[k].dim() >= 2]


@dataclass
class DOGEOptions:
    c: float = option(doge_ops.DEFAULT_C, low=0, low_open=True)  # λ_t = c / ‖τ_t‖_F per weight matrix
    # scale-free c: per weight matrix, c_l such that the mean over tasks of c_l/‖τ_t,l‖ is lam_mean
    # (c is then ignored; the 1/‖τ_t‖ ratios between tasks are kept); None: the fixed c (the port;
    # method doge: 0.3)
    lam_mean: float | None = option(None, low=0, low_open=True)
    cap: float | None = option(None, low=0, low_open=True)  # λ_t = min(c / ‖τ_t‖_F, cap); None: uncapped (the port; method doge: 1)
    per_task: bool = option(False)  # one δ per task (the AdaMerging variant of the port) or one shared
    # the gradient part kept: "orthogonal" (the port: g − UUᵀg) or "subspace" (UUᵀg)
    keep: str = option("orthogonal", choices=tuple(doge_ops.KEEP_CHOICES))
    project: str = option("gradient", choices=tuple(doge_ops.PROJECT_CHOICES))  # project the gradient (the port) or also every update ("update")
    subspace_divisor: float = option(doge_ops.DEFAULT_SUBSPACE_DIVISOR, low=0, low_open=True)  # keep r/6 columns of the shared basis
    per_task_divisor: float | None = option(None, low=0, low_open=True)  # each task contributes r/T singular vectors (None: T)
    lr: float = option(doge_ops.DEFAULT_LR, low=0, low_open=True)
    # keep only the part of δ the loss sees (each row projected onto the span of the task vectors'
    # rows: the same loss, without what Adam's per-entry steps put outside it); False: the port
    span: bool = option(False)
    steps_per_layer: int | None = option(None, low=0)  # None: options.steps
    trim: float = option(doge_ops.DEFAULT_TRIM_KEEP, low=0, low_open=True, high=1)  # final merge keeps this fraction of each τ_t by magnitude (1: no trim)
    others: float = option(0.0)  # coefficient of the parameters without a correction (the port: 0, they stay at θ0; method doge: 0.3)

    def __post_init__(self) -> None:
        check_fields(self, "doge option")


@register_solver("doge")
class DOGESolver(Solver):
    Options = DOGEOptions
    needs_data = False
    constraints = ("none", "box")
    description = "data-free: per-layer corrections δ, gradient projected against the tasks' shared subspace"

    def __init__(self, cfg, args: dict | None = None) -> None:
        super().__init__(cfg, args)
        self.loss_first = 0.0
        self.loss_last = 0.0

    def steps(self) -> int:
        return self.cfg.steps if self.args.steps_per_layer is None else self.args.steps_per_layer

    def solve(self, problem) -> dict[str, Tensor]:
        a = self.args
        tv = problem.tv
        keys = matrix_keys(tv, [n for n, _ in problem.model.named_parameters()])
        if not keys:
            raise InputError("doge: the model has no weight matrices (parameters '*weight' with 2+ dimensions)")
        partial = problem.run.checkpoints / "doge.partial.safetensors"
        state: dict[str, Tensor] = {}
        if partial.is_file():
            from safetensors.torch import load_file

            saved = load_file(str(partial))
            state = {k: v for k, v in saved.items() if k.startswith("delta.")}
            self.loss_first = float(saved["losses"][0]) if "losses" in saved else 0.0
            self.loss_last = float(saved["losses"][1]) if "losses" in saved else 0.0
            problem.say(f"[doge] resuming: {len(state)} of {len(keys)} layers already solved")
        steps = self.steps()
        start, last_save, report = time.perf_counter(), time.perf_counter(), 0
        for i, key in enumerate(keys):
            if f"delta.{key}" in state:
                continue
            tau = tv.vectors[key]
            taus = tau.reshape(tau.shape[0], tau.shape[1], -1).to(torch.float64 if tau.dtype == torch.float64 else torch.float32)
            lam = doge_ops.doge_coefficients(taus, a.c, cap=a.cap, lam_mean=a.lam_mean)
            try:
                delta, losses = doge_ops.solve_layer(
                    taus, lam, steps=steps, lr=a.lr, per_task=a.per_task, keep=a.keep,
                    subspace_divisor=a.subspace_divisor, per_task_divisor=a.per_task_divisor, project=a.project,
                    span=a.span,
                )
            except FloatingPointError as err:
                raise NonFiniteLossError(f"doge: layer '{key}': {err}") from None
            if losses:
                final = float(doge_ops.layer_loss(taus, delta, lam))
                self.loss_first += losses[0]
                self.loss_last += final
            shape = tau.shape if a.per_task else tau.shape[1:]
            state[f"delta.{key}"] = delta.reshape(shape).to(tau.dtype)
            done = i + 1
            if 100 * done // len(keys) >= report + 5 or done == len(keys):
                report = 100 * done // len(keys)
                problem.say(f"[doge] {done}/{len(keys)} layers ({report}%), {time.perf_counter() - start:.0f} s")
            if time.perf_counter() - last_save > 30 or done % max(1, len(keys) // 10) == 0:
                self._save_partial(partial, state)
                last_save = time.perf_counter()
        return state

    def _save_partial(self, path, state: dict[str, Tensor]) -> None:
        from adamerge.io.files import atomic_save_safetensors

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({**state, "losses": torch.tensor([self.loss_first, self.loss_last], dtype=torch.float64)}, path)

    def summary(self, module=None) -> dict:
        return {**super().summary(module), "loss_first": self.loss_first, "loss_last": self.loss_last, "steps_per_layer": self.steps()}
