"""Feasible sets for merge coefficients: Euclidean projections and linear minimisation oracles.

Merge coefficients are a tensor ``x`` of shape ``[T, G]``: T tasks (rows, dim 0) and G coefficient
groups (columns). Two constraint sets are supported (``CONSTRAINTS``):

- ``box``: ``lo <= x <= hi`` elementwise (``lo <= hi`` required).
- ``simplex``: every column is a point of the scaled probability simplex,
  ``x[:, g] >= 0`` and ``sum_t x[t, g] = total`` (``total > 0`` required).

Projected-gradient solvers use :func:`project`; Frank-Wolfe (conditional-gradient) solvers use
:func:`lmo` and :func:`fw_gap`. Everything here is a pure tensor function: the inputs are never
modified, and results keep the input's dtype and device. The simplex functions work along dim 0,
so any trailing shape is treated as a batch of columns (a 1-D tensor is one column).

Non-finite entries in ``x`` or ``g`` are not checked for (that would force a device sync every
step); they give non-finite or meaningless results, so callers check their losses instead.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from adamerge.errors import InputError

CONSTRAINTS = ("box", "simplex")

Bound = float | Tensor


# --------------------------------------------------------------------------- argument checks
def _check_constraint(constraint: str) -> None:
    if constraint not in CONSTRAINTS:
        raise InputError(
            f"unknown constraint {constraint!r}; choose one of: {', '.join(CONSTRAINTS)}"
        )


def _check_total(total: float) -> float:
    """``total`` must be a finite number > 0 (the simplex is empty or a point otherwise)."""
    try:
        value = float(total)
    except (TypeError, ValueError):
        raise InputError(f"simplex total must be a number > 0, got {total!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"simplex total must be a finite number > 0, got {total!r}")
    return value


def _check_bounds(lo: Bound, hi: Bound, like: Tensor) -> tuple[Bound, Bound]:
    """Validate ``lo <= hi`` (NaN fails); tensors are moved to ``like``'s device and dtype."""
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        lo_t = torch.as_tensor(lo, dtype=dtype, device=like.device)
        hi_t = torch.as_tensor(hi, dtype=dtype, device=like.device)
        try:
            ok = bool(torch.all(lo_t <= hi_t))
        except RuntimeError as exc:  # shapes that do not broadcast
            raise InputError(f"box bounds do not broadcast: {exc}") from None
        if not ok:
            raise InputError("box bounds need lo <= hi everywhere (and no NaN)")
        return lo_t, hi_t
    try:
        lo_f, hi_f = float(lo), float(hi)
    except (TypeError, ValueError):
        raise InputError(f"box bounds must be numbers or tensors, got {lo!r}, {hi!r}") from None
    if not lo_f <= hi_f:  # also rejects NaN
        raise InputError(f"box bounds need lo <= hi, got lo={lo!r}, hi={hi!r}")
    return lo_f, hi_f


def _check_pair(bounds) -> tuple[Bound, Bound]:
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise InputError(f"bounds must be a pair (lo, hi), got {bounds!r}") from None
    return lo, hi


def _check_columns(x: Tensor, what: str) -> None:
    """The simplex functions need a floating tensor with at least one row along dim 0."""
    if not isinstance(x, Tensor):
        raise InputError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise InputError(f"{what} must have shape [T, ...] with T >= 1, got {tuple(x.shape)}")


# --------------------------------------------------------------------------- projections
def project_box(x: Tensor, lo: Bound = 0.0, hi: Bound = 1.0) -> Tensor:
    """Euclidean projection onto ``{lo <= x <= hi}``: an elementwise clamp, which is exact
    because the box is a product of intervals. ``lo``/``hi`` may be tensors broadcasting to x."""
    lo, hi = _check_bounds(lo, hi, x)
    return torch.clamp(x, min=lo, max=hi)


def project_simplex(x: Tensor, total: float = 1.0) -> Tensor:
    """Euclidean projection of every column ``x[:, g]`` onto ``{p >= 0, sum(p) = total}``.

    Sort-based algorithm (Held et al. 1974, Michelot 1986; Duchi et al. 2008): the projection
    is ``max(x - theta, 0)`` with ``theta = (sum of the rho largest entries - total) / rho`` and
    ``rho`` the largest k such that ``u_k - (sum_{j<=k} u_j - total) / k > 0`` for ``u`` sorted
    in decreasing order. O(T log T) per column, all columns at once (no loop over G).

    Each column is first shifted by its maximum (the projection is invariant to adding a constant
    to a column, because the simplex lies in a hyperplane with normal ``1``); this keeps the
    condition exact for k = 1 and avoids cancellation with large values. With T = 1 the result
    is ``total``.
    """
    _check_columns(x, "x")
    total = _check_total(total)
    shifted = x - x.amax(dim=0, keepdim=True)  # column max becomes 0
    u = torch.sort(shifted, dim=0, descending=True).values
    cssv = torch.cumsum(u, dim=0) - total
    shape = (-1,) + (1,) * (x.dim() - 1)
    k = torch.arange(1, x.shape[0] + 1, dtype=x.dtype, device=x.device).view(shape)
    support = u - cssv / k > 0  # a prefix in exact arithmetic; k = 1 always holds (u_1 = 0)
    # rho = the largest k in the support (robust even if rounding breaks the prefix shape)
    rho = torch.where(support, k, torch.zeros_like(k)).amax(dim=0, keepdim=True).clamp_min(1)
    theta = torch.gather(cssv, 0, rho.long() - 1) / rho
    return torch.clamp(shifted - theta, min=0)


def project_simplex_weighted(x: Tensor, d: Tensor, total: float = 1.0) -> Tensor:
    """Projection of every column onto the scaled simplex in the metric ``Σ_t d_t (y_t − x_t)²``
    (``d > 0``, the shape of ``x``): ``y = max(0, x − ν / d)`` with ν chosen so the column sums
    to ``total``. This is the projection a diagonally preconditioned gradient step needs (Adam:
    ``d = sqrt(v̂) + eps``): with the Euclidean one, the fixed points of ``P(x − η D⁻¹ g)`` are
    not the constrained optima. Exact, sort-based over the breakpoints ``d·x`` (as
    :func:`project_simplex`, which it equals for ``d = 1``), all columns at once.
    """
    _check_columns(x, "x")
    total = _check_total(total)
    if d.shape != x.shape or not bool((d > 0).all()):
        raise InputError(f"project_simplex_weighted needs d > 0 of x's shape {tuple(x.shape)}, got {tuple(d.shape)}")
    z = x  # no shift: unlike the Euclidean case, adding a constant does not commute with the metric
    order = torch.argsort(d * z, dim=0, descending=True)
    zs, ws = torch.gather(z, 0, order), torch.gather(1.0 / d, 0, order)
    nu_k = (torch.cumsum(zs, dim=0) - total) / torch.cumsum(ws, dim=0)
    breakpoints = torch.gather(d * z, 0, order)
    support = breakpoints > nu_k  # the k largest breakpoints are active
    shape = (-1,) + (1,) * (x.dim() - 1)
    k = torch.arange(1, x.shape[0] + 1, device=x.device).view(shape).expand_as(x)
    rho = torch.where(support, k, torch.zeros_like(k)).amax(dim=0, keepdim=True).clamp_min(1)
    nu = torch.gather(nu_k, 0, rho - 1)
    return torch.clamp(z - nu / d, min=0)


# --------------------------------------------------------------------------- LMOs
def lmo_box(g: Tensor, lo: Bound = 0.0, hi: Bound = 1.0) -> Tensor:
    """Linear minimisation oracle ``argmin_{lo <= s <= hi} <g, s>``: elementwise ``lo`` where
    ``g > 0`` and ``hi`` where ``g < 0``. Where ``g == 0`` every value in ``[lo, hi]`` is a
    minimiser; we choose ``lo`` so the answer is deterministic (a vertex of the box)."""
    lo, hi = _check_bounds(lo, hi, g)
    dtype = g.dtype if g.is_floating_point() else torch.get_default_dtype()
    lo_t = torch.as_tensor(lo, dtype=dtype, device=g.device)
    hi_t = torch.as_tensor(hi, dtype=dtype, device=g.device)
    return torch.where(g < 0, hi_t, lo_t)  # a new tensor of the broadcast shape


def lmo_simplex(g: Tensor, total: float = 1.0) -> Tensor:
    """Linear minimisation oracle over the scaled simplex, per column: the vertex
    ``total * e_i`` with ``i = argmin_t g[t, col]``. On ties the smallest index wins (the
    documented behaviour of ``torch.argmin``), so the answer is deterministic."""
    _check_columns(g, "g")
    total = _check_total(total)
    idx = torch.argmin(g, dim=0, keepdim=True)
    out = torch.zeros_like(g)
    return out.scatter_(0, idx, total)


def fw_gap(g: Tensor, x: Tensor, s: Tensor) -> Tensor:
    """Frank-Wolfe duality gap ``<g, x - s>`` as a 0-dim tensor. With ``g`` the gradient at a
    feasible ``x`` and ``s = lmo(g)`` it is >= 0 and bounds ``f(x) - min f`` for convex ``f``;
    it is 0 exactly when x is stationary, so solvers use it as a stopping criterion."""
    if not (g.shape == x.shape == s.shape):
        raise InputError(
            f"fw_gap needs g, x and s of one shape, got {tuple(g.shape)}, {tuple(x.shape)}, "
            f"{tuple(s.shape)}"
        )
    return torch.sum(g * (x - s))


# --------------------------------------------------------------------------- dispatch
def project(x: Tensor, constraint: str, bounds=(0.0, 1.0), total: float = 1.0, metric: Tensor | None = None) -> Tensor:
    """Projection of ``x`` onto ``constraint`` (``"box"`` uses ``bounds``, ``"simplex"`` uses
    ``total``; the other argument is ignored): Euclidean, or in the diagonal ``metric``
    ``Σ d (y − x)²`` when given (the box's projection is the clamp in every diagonal metric)."""
    _check_constraint(constraint)
    if constraint == "box":
        lo, hi = _check_pair(bounds)
        return project_box(x, lo, hi)
    return project_simplex(x, total) if metric is None else project_simplex_weighted(x, metric, total)


def lmo(g: Tensor, constraint: str, bounds=(0.0, 1.0), total: float = 1.0) -> Tensor:
    """Linear minimisation oracle ``argmin_{s in set} <g, s>`` for ``constraint``."""
    _check_constraint(constraint)
    if constraint == "box":
        lo, hi = _check_pair(bounds)
        return lmo_box(g, lo, hi)
    return lmo_simplex(g, total)


def is_feasible(
    x: Tensor, constraint: str, bounds=(0.0, 1.0), total: float = 1.0, atol: float = 1e-5
) -> bool:
    """Whether ``x`` lies in the set up to ``atol``: box entries within ``[lo - atol,
    hi + atol]``; simplex entries ``>= -atol`` and column sums within ``atol * max(1, total)``
    of ``total`` (relative for large totals, since rounding grows with them). NaN → False."""
    _check_constraint(constraint)
    if constraint == "box":
        lo, hi = _check_bounds(*_check_pair(bounds), x)
        return bool(torch.all((x >= lo - atol) & (x <= hi + atol)))
    _check_columns(x, "x")
    total = _check_total(total)
    sums_ok = torch.all((x.sum(dim=0) - total).abs() <= atol * max(1.0, total))
    return bool(torch.all(x >= -atol)) and bool(sums_ok)
