"""Solvers: how a method's parameters move, registered by name (``list_solvers()`` /
``create_solver(name, cfg)``).

- ``gradient`` (default): Adam/AdamW/SGD, the constraint applied in the forward (clamp or softmax).
- ``pgd``: a gradient (or Adam) step, then the exact Euclidean projection onto the box or simplex.
- ``frank_wolfe``: the linear minimisation oracle's vertex, step 2/(t+2) or a line search, duality gap.
- ``bilevel``: Concrete AdaMerging's first-order bi-level loop (inner step on the coefficients,
  outer step on the mask logits).
- ``doge``: data-free, DOGE's per-layer corrections with the gradient projected out of (or onto)
  a shared subspace.

Pure tensor maths lives in :mod:`~adamerge.solvers.projections` (projections, oracles, gap) and
:mod:`~adamerge.solvers.doge_ops`; the solver modules only schedule it.
"""
from adamerge.solvers.base import Solver, create_solver, list_solvers, register_solver, solver_class
from adamerge.solvers import gradient, pgd, frank_wolfe, doge, bilevel  # noqa: F401,E402  (registration)

__all__ = ["Solver", "create_solver", "list_solvers", "register_solver", "solver_class"]
