"""Where merges meet task vectors and learned methods: run a merge on a model's parameters,
hand its rewritten task vectors to ``preprocess`` and its coefficients to ``init``."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.core.granularity import Grouping
from adamerge.merges.base import MergeResult, MergeSpec, get_merge, merge_request
from adamerge.core.task_vectors import TaskVectors


def run_merge(merge: str | MergeSpec, tv: TaskVectors, keys: Sequence[str], options: Mapping[str, Any] | Any = None, *,
              model: nn.Module | None = None, heads: Mapping[str, nn.Module] | None = None,
              streams: Sequence | None = None) -> MergeResult:
    """Run a merge on the stacks of ``keys`` (the parameters: buffers never compete for kept
    entries). ``options`` is a mapping (validated here) or already-validated options; a merge
    that needs data gets ``model``, ``heads`` and ``streams``. Options that do not fit the task
    vectors (consensus ``k > T``) and a rewriting merge that keeps no entry are one-line errors
    (:meth:`MergeSpec.apply`)."""
    spec = get_merge(merge) if isinstance(merge, str) else merge
    opts = options if isinstance(options, spec.Options) else spec.options(options)
    data = spec.estimate(model, tv, heads, streams, opts, list(keys)) if spec.needs_data else {}
    return spec.apply({k: tv.vectors[k] for k in keys}, opts, **data)


def rewrite_task_vectors(tv: TaskVectors, keys: Sequence[str], request: Any) -> TaskVectors:
    """``preprocess``: the task vectors with the stacks of ``keys`` rewritten by the merge that
    ``request`` names (``"ties"`` or ``{merge: ties, density: 0.2}``); other stacks unchanged."""
    spec, opts = merge_request(request, "preprocess")
    result = run_merge(spec, tv, keys, opts)
    return TaskVectors(tv.base, {**tv.vectors, **result.vectors}, tv.task_names, tv.sources)


def coefficients_for_groups(coefficients: Mapping[str, Tensor], grouping: Grouping, shapes: Mapping[str, torch.Size],
                            dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-tensor coefficients (``key -> [T]``) as a ``[T, G]`` matrix for ``grouping``: each group
    takes the mean over its tensors weighted by the elements it governs (a partitioned tensor's
    chunks each take the tensor's value), so ``layer`` reproduces them exactly and ``task`` gets
    their size-weighted average."""
    T = next(iter(coefficients.values())).shape[0]
    total = torch.zeros(T, grouping.num_groups, dtype=torch.float64)
    sizes = torch.zeros(grouping.num_groups, dtype=torch.float64)
    for key, g in grouping.tensor_group.items():
        c = coefficients[key].to(torch.float64)
        ch = grouping.chunks.get(key)
        parts = [(ch.first + i, s) for i, s in enumerate(ch.sizes)] if ch else [(g, int(torch.Size(shapes[key]).numel()))]
        for gi, size in parts:
            total[:, gi] += c * size
            sizes[gi] += size
    return (total / sizes.clamp_min(1)).to(dtype)


def initial_coefficients(request: Any, tv: TaskVectors, grouping: Grouping, keys: Sequence[str]) -> Tensor:
    """``init: {merge: NAME, ...}``: the merge's per-tensor coefficients on ``tv`` as ``[T, G]``."""
    spec, opts = merge_request(request, "init")
    result = run_merge(spec, tv, keys, opts)
    # float64: MergedModel.set_coefficients casts to its coefficients' dtype (float64 for a float64 model)
    return coefficients_for_groups(result.coefficients, grouping, {k: tv.base[k].shape for k in keys}, torch.float64)
