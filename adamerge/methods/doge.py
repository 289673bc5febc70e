"""DOGE (ICML 2025): data-free corrections of the task vectors, then (optionally) AdaMerging.

- ``doge``: the ``doge`` solver learns δ per weight matrix (shared by the tasks); the merge is
  ``θ0 + Σ_t λ_t,l · ((τ_t + δ) ⊙ M_t)`` with λ_t,l = min(c_l / ‖τ_t,l‖_F, cap) (layer
  granularity, nothing learned from data; the same λ in each layer's data-free loss) and M_t
  keeping the top ``trim`` fraction of |τ_t| over all of task t's weight matrices together (the
  port's global trim). Parameters without a correction (biases, BatchNorm affine parameters, ...)
  get the coefficient ``others``. ``steps`` = Adam steps per layer. Three departures from the
  port, all defaults of this method (``solver_args``), measured on the demo zoos (docs/methods.md):
  ``lam_mean: 0.3`` (a scale-free c: c_l is chosen per matrix so that the tasks' λ_t,l average to
  task arithmetic's 0.3, keeping DOGE's 1/‖τ_t,l‖ ratios between tasks; the port's fixed
  c = 0.07 was calibrated on ViT-B/32's matrices and gives an EfficientNet's pointwise
  convolutions λ ≈ 0.2 and its depthwise kernels λ up to 5), ``others: 0.3`` (task arithmetic's
  λ; the port's 0 leaves them at θ0, harmless on a ViT's LayerNorms, not on a BatchNorm network
  whose experts fine-tuned their affine parameters) and ``cap: 1`` (never more than the expert's
  own task vector). Two more keep δ where DOGE means it to be: ``project: update`` (δ itself, not
  only its gradient, projected out of the shared subspace after every Adam step) and ``span: true``
  (each row of δ projected onto the span of the task vectors' same rows after training: the
  loss is unchanged, and what Adam's per-entry steps put outside that span, noise the loss
  cannot see, is dropped). The port: ``solver_args: {lam_mean: null, others: 0, cap: null,
  span: false, project: gradient}``.
- ``doge_adamerging``: the same δ, one per task (``prepare_args``), then the coefficients of
  ``θ0 + Σ_t λ_t,g · ((τ_t + δ_t) ⊙ M_t)`` trained like AdaMerging (``solver``, ``objective``, any
  granularity; init 0.3, box [0, 1]). Unlike the port, parameters without a correction are
  merged too (with their own coefficients), as in AdaMerging.
"""
from __future__ import annotations

import torch

from adamerge.errors import InputError
from adamerge.methods.adamerging import AdaMerging
from adamerge.methods.base import Method, MethodConfig, register_method
from adamerge.solvers import doge_ops
from adamerge.solvers.base import parse_options
from adamerge.solvers.doge import DOGEOptions, matrix_keys
from adamerge.core.task_vectors import TaskVectors


def trim_masks(vectors: dict, keys: list[str], keep: float) -> dict[str, torch.Tensor]:
    """Per task, keep the top ``keep`` fraction of |τ_t| over all ``keys`` together (ties at the
    threshold kept, as in the port). One task's magnitudes are concatenated at a time."""
    if keep >= 1.0:
        return {}
    T = vectors[keys[0]].shape[0]
    masks = {k: torch.zeros(vectors[k].shape, dtype=torch.bool) for k in keys}
    for t in range(T):
        flat = torch.cat([vectors[k][t].abs().reshape(-1).float() for k in keys])
        if int(keep * flat.numel()) < 1:
            raise InputError(f"doge option 'trim' {keep:g} keeps int({keep:g} · {flat.numel()}) = 0 of each task's "
                             f"{flat.numel()} weight-matrix entries; choose trim in [{1 / flat.numel():.3g}, 1]")
        drop = flat.numel() - int(keep * flat.numel())
        threshold = flat.kthvalue(drop).values if drop > 0 else flat.min() - 1
        for k in keys:
            masks[k][t] = vectors[k][t].abs().float() > threshold
    return masks


class _DOGEBase(Method):
    def _options(self, cfg: MethodConfig) -> DOGEOptions:
        raise NotImplementedError

    def prepare(self, tv: TaskVectors, cfg: MethodConfig, model, state: dict | None = None) -> TaskVectors:
        tv = super().prepare(tv, cfg, model, state)
        a = self._options(cfg)
        keys = matrix_keys(tv, [n for n, _ in model.named_parameters()])
        masks = trim_masks(tv.vectors, keys, a.trim)
        vectors = dict(tv.vectors)
        for k in keys:
            v = tv.vectors[k]
            delta = None if state is None else state.get(f"delta.{k}")
            if delta is not None:
                v = (v.float() + delta.float()).to(v.dtype)  # shared δ broadcasts over tasks
            if k in masks:
                v = v * masks[k]
            vectors[k] = v
        return TaskVectors(tv.base, vectors, tv.task_names, tv.sources)


@register_method("doge")
class DOGE(_DOGEBase):
    # the solver's options default to the port's reading; ours (measured on the demo zoos, see
    # docs/methods.md): a scale-free c (the tasks' λ average to task arithmetic's 0.3 in every
    # matrix), the parameters without a correction merged like task arithmetic (0.3), λ capped
    # at 1; δ kept where its loss and DOGE's projection put it (project: update, span: true; session 34).
    # The port: solver_args {lam_mean: null, others: 0, cap: null, span: false, project: gradient}.
    defaults = {"granularity": "layer", "constraint": "none", "solver": "doge", "steps": 400,
                "solver_args": {"lam_mean": 0.3, "others": 0.3, "cap": 1.0, "span": True, "project": "update"}}
    description = "DOGE: data-free projective-gradient corrections of the task vectors (λ = c/‖τ‖)"

    def _options(self, cfg: MethodConfig) -> DOGEOptions:
        return parse_options(DOGEOptions, cfg.solver_args, "solver 'doge'")

    def config(self, overrides: dict | None = None) -> MethodConfig:
        cfg = super().config(overrides)
        if cfg.granularity != "layer":
            raise InputError(f"doge sets one coefficient c/‖τ‖ per weight tensor: granularity must be 'layer', got {cfg.granularity!r}")
        if cfg.solver != "doge":
            raise InputError(f"method doge runs the data-free solver 'doge'; for DOGE then {cfg.solver}, use method doge_adamerging")
        return cfg

    def initial_coefficients(self, merged, cfg: MethodConfig, tv: TaskVectors, state: dict | None = None):
        """λ_t,l = min(c_l / ‖τ_t,l‖_F, cap) (c_l = c, or scale-free with ``lam_mean``; the original
        τ, before δ and the trim) for every weight matrix, ``others`` for every other parameter."""
        a = self._options(cfg)
        coef = torch.full((merged.num_tasks, merged.grouping.num_groups), float(a.others))
        for k in matrix_keys(tv, merged.merge_keys):
            tau = tv.vectors[k]
            coef[:, merged.group_index(k)] = doge_ops.doge_coefficients(tau.reshape(tau.shape[0], tau.shape[1], -1).float(), a.c, cap=a.cap,
                                                                         lam_mean=a.lam_mean)
        return coef


@register_method("doge_adamerging")
class DOGEAdaMerging(_DOGEBase):
    defaults = {**AdaMerging.defaults, "prepare_args": {"per_task": True, "steps_per_layer": 400}}
    prepare_solver = "doge"
    description = "DOGE's per-task corrections, then AdaMerging of the corrected task vectors"

    def _options(self, cfg: MethodConfig) -> DOGEOptions:
        return parse_options(DOGEOptions, cfg.prepare_args, "prepare solver 'doge'")
