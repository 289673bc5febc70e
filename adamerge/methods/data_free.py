"""Data-free merges as fixed :class:`MergedModel` s, so they share the merge path, the buffer
policy, evaluation and export with the learned methods.

Any merge registered in :mod:`adamerge.merges` (``list_merges()``) is built the same way: the
merge runs on the parameters' task vectors and its :class:`~adamerge.merges.MergeResult`
(rewritten τ', per-tensor coefficients c, element weights w) becomes a frozen merged model with
``layer`` granularity, coefficients c and fixed masks w: θ0 + Σ_t c_t · w_t ⊙ τ'_t. Buffers
follow ``buffer_policy``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from adamerge.errors import InputError
from adamerge.core.merged import MergedModel
from adamerge.merges import MergeResult, get_merge, list_merges, run_merge
from adamerge.core.task_vectors import TaskVectors

DATA_FREE_METHODS = tuple(list_merges())


def build_data_free(
    name: str,
    model: nn.Module,
    tv: TaskVectors,
    *,
    lam: float | None = None,
    density: float | None = None,
    options: Mapping[str, Any] | None = None,
    buffer_policy: str = "base",
    heads: Mapping[str, nn.Module] | None = None,
    streams: Sequence | None = None,
) -> MergedModel:
    """A frozen merged model (coefficients do not require grad) for the registered merge ``name``
    with ``options``; ``lam`` and ``density`` are shorthands for those options. A merge that
    needs data (``fisher``) reads ``heads`` and the unlabeled ``streams``."""
    spec = get_merge(name)
    values = dict(options or {})
    for key, value in (("lam", lam), ("density", density)):
        if value is not None:
            if key not in spec.option_names():
                raise InputError(f"merge '{name}' has no option '{key}'; its options: {spec.option_names()}")
            values[key] = value
    keys = [n for n, _ in model.named_parameters()]
    result = run_merge(spec, tv, keys, values, model=model, heads=heads, streams=streams)
    return merged_model(model, tv, result, buffer_policy)


def merged_model(model: nn.Module, tv: TaskVectors, result: MergeResult, buffer_policy: str = "base") -> MergedModel:
    """The frozen merged model θ0 + Σ_t c_t · w_t ⊙ τ'_t of a merge's result on the parameters."""
    merged_tv = TaskVectors(tv.base, {**tv.vectors, **result.vectors}, tv.task_names, tv.sources)
    mm = MergedModel(model, merged_tv, "layer", init=1.0, clamp=None, buffer_policy=buffer_policy)
    coef = mm.coefficients.detach().clone()
    for key in mm.merge_keys:
        coef[:, mm.group_index(key)] = result.coefficients[key]
    mm.set_coefficients(coef)
    mm.masks = dict(result.weights) or None
    mm.coefficients.requires_grad_(False)
    return mm
