"""Learned merging methods, registered by name (``list_methods()`` / ``create_method(name)``).

A method is a small object with declared defaults (:class:`MethodConfig` fields) and hooks:
``prepare`` (task-vector preprocessing, e.g. TIES for AdaMerging++), ``initial_coefficients``,
``build`` (the :class:`~adamerge.core.merged.MergedModel`) and ``solvers`` (the solver stages; the
default is ``options.solver``). Adding a method = one module here with one ``register_method``
call; the shared test matrix (tests/test_methods.py) picks it up.
"""
from adamerge.methods.base import Method, MethodConfig, create_method, list_methods, register_method
from adamerge.methods import adamerging, atlas, concrete, doge, fw_merging, t3  # noqa: F401  (registration)
from adamerge.methods.data_free import DATA_FREE_METHODS, build_data_free

__all__ = [
    "Method",
    "MethodConfig",
    "create_method",
    "list_methods",
    "register_method",
    "DATA_FREE_METHODS",
    "build_data_free",
]
