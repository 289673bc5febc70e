"""Data-free baselines expressed as fixed :class:`MergedModel` s, so they share the merge path,
the buffer policy, evaluation and export with the learned methods.

- ``weight_average``: λ = 1/T for every task (θ0 + mean τ = mean of the experts).
- ``task_arithmetic``: one shared λ (``lam``).
- ``ties``: TIES-processed task vectors, element mask 1/(number of agreeing tasks), λ = ``lam``:
  θ0 + λ · disjoint mean (see :func:`adamerge.merges.ties`).
"""
from __future__ import annotations

import torch
from torch import nn

from adamerge.errors import InputError
from adamerge.merged import MergedModel
from adamerge.merges import ties_vectors
from adamerge.task_vectors import TaskVectors

DATA_FREE_METHODS = ("weight_average", "task_arithmetic", "ties")


def build_data_free(
    name: str,
    model: nn.Module,
    tv: TaskVectors,
    *,
    lam: float = 0.3,
    density: float = 0.2,
    buffer_policy: str = "base",
) -> MergedModel:
    """A frozen merged model for a data-free baseline (coefficients do not require grad)."""
    if name == "weight_average":
        mm = MergedModel(model, tv, "task", init=1.0 / tv.num_tasks, clamp=None, buffer_policy=buffer_policy)
    elif name == "task_arithmetic":
        mm = MergedModel(model, tv, "task", init=lam, clamp=None, buffer_policy=buffer_policy)
    elif name == "ties":
        kept = ties_vectors(tv.vectors, density, keys=[n for n, _ in model.named_parameters()])
        ttv = TaskVectors(tv.base, kept, tv.task_names, tv.sources)
        mm = MergedModel(model, ttv, "task", init=lam, clamp=None, buffer_policy=buffer_policy)
        masks = {}
        for key in mm.merge_keys:
            count = (kept[key] != 0).sum(0).clamp_min(1)
            masks[key] = 1.0 / count.to(torch.float32)
        mm.masks = masks
    else:
        raise InputError(f"unknown data-free method '{name}'; choose from {DATA_FREE_METHODS}")
    mm.coefficients.requires_grad_(False)
    return mm
