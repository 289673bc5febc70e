"""Data-free merges as registered plug-ins: pure tensor functions over stacked task vectors.

``list_merges()`` / ``get_merge(name)``; each merge returns a :class:`MergeResult` (rewritten task
vectors × per-tensor coefficients × optional element weights, see :mod:`adamerge.merges.base`).
Registered: ``weight_average``, ``task_arithmetic``, ``ties``, ``lines``, ``consensus``,
``breadcrumbs``, ``dare``, ``pcb`` and ``fisher`` (which needs heads and unlabeled streams).
Adding a merge = one module here with one ``register_merge`` call; the registry test matrix
(tests/test_merges.py) picks it up.
"""
from adamerge.merges.base import (
    MergeResult,
    MergeSpec,
    get_merge,
    list_merges,
    merge_request,
    register_merge,
)
from adamerge.merges.basic import elect_sign, merged_state, ties, ties_vectors, trim_top_k
from adamerge.merges import lines, consensus, breadcrumbs, dare, pcb, fisher  # noqa: F401,E402  (registration)
from adamerge.merges.consensus import tall_masks
from adamerge.merges.compose import coefficients_for_groups, initial_coefficients, rewrite_task_vectors, run_merge

__all__ = [
    "MergeResult",
    "MergeSpec",
    "coefficients_for_groups",
    "elect_sign",
    "initial_coefficients",
    "get_merge",
    "list_merges",
    "merge_request",
    "merged_state",
    "register_merge",
    "rewrite_task_vectors",
    "run_merge",
    "tall_masks",
    "ties",
    "ties_vectors",
    "trim_top_k",
]
