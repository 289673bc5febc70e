"""DOGE (ICML 2025, "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent"):
pure tensor operations for one layer.

DOGE learns, per 2-D weight matrix, a correction ``delta`` to the task vectors so that the merged
vector ``tau_m = sum_i lam_i * (tau_i + delta)`` (``delta_i`` with one correction per task) stays
close to every task vector. The loss is data-free (:func:`layer_loss`); ``delta`` is trained with
Adam from zero while its gradient is projected against a shared subspace of the task vectors
(:func:`shared_subspace`, :func:`project_gradient`), and ``lam_t = c / ||tau_t||_F``
(:func:`doge_coefficients`; optionally capped, or with a per-layer c such that the tasks' mean
coefficient is a target, both departures from the port for a network whose layers differ in scale). The
final merge keeps each task vector's top magnitudes (:func:`magnitude_trim_mask`). Defaults follow the public port in FusionBench
(``fusion_bench/method/doge_ta/doge_ta.py``): ``c = 0.07``, 400 Adam steps at lr 1e-4 per layer,
per-task SVD keeping ``floor(r/T)`` left singular vectors (``r = min(out, in)``), a second SVD of
the stacked bases keeping ``floor(r/6)`` columns, and ``g <- g - U U^T g`` (the in-subspace
component of the gradient is removed: ``keep="orthogonal"``).

Tensors: ``taus`` is ``[T, out, in]``; ``U`` is ``[out, k]`` with orthonormal columns; ``delta`` is
``[out, in]`` (shared by the tasks) or ``[T, out, in]`` (one per task). Work is done in float64 when
``taus`` is float64 and in float32 otherwise; inputs are never modified.

Note on Adam: projecting only the *gradient* (as the port does) does not keep ``delta`` inside the
chosen subspace, because Adam rescales each entry separately. ``solve_layer(project="update")``
additionally projects every step, so ``delta`` stays exactly in the subspace.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from adamerge.errors import InputError

KEEP_CHOICES = ("orthogonal", "subspace")
PROJECT_CHOICES = ("gradient", "update")

#: Defaults of the FusionBench port (config/method/doge_ta/doge_ta.yaml, doge_ta.py).
DEFAULT_C = 0.07
DEFAULT_STEPS = 400
DEFAULT_LR = 1e-4
DEFAULT_SUBSPACE_DIVISOR = 6.0
DEFAULT_TRIM_KEEP = 0.3


# --------------------------------------------------------------------------- helpers
def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_taus(taus: Tensor) -> Tensor:
    """``taus`` must be a finite floating tensor ``[T, out, in]`` with T, out, in >= 1."""
    if not isinstance(taus, Tensor):
        raise InputError(f"taus must be a tensor [T, out, in], got {type(taus).__name__}")
    if taus.dim() != 3 or min(taus.shape) < 1:
        raise InputError(f"taus must have shape [T, out, in] with every size >= 1, got {tuple(taus.shape)}")
    if not (taus.is_floating_point()):
        raise InputError(f"taus must be a floating tensor, got {taus.dtype}")
    if not bool(torch.isfinite(taus).all()):
        raise InputError("taus contains NaN or inf")
    return taus.detach().to(_work_dtype(taus))


def _check_divisor(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _check_keep(keep: str) -> None:
    if keep not in KEEP_CHOICES:
        raise InputError(f"unknown keep {keep!r}; choose one of: {', '.join(KEEP_CHOICES)}")


# --------------------------------------------------------------------------- subspace
def shared_subspace(
    taus: Tensor,
    subspace_divisor: float | None = DEFAULT_SUBSPACE_DIVISOR,
    per_task_divisor: float | None = None,
) -> Tensor:
    """Orthonormal basis ``U [out, k]`` of the subspace the task vectors of one layer share.

    With ``r = min(out, in)``: each ``tau_t`` contributes its first ``n = floor(r / per_task_divisor)``
    left singular vectors (``per_task_divisor`` defaults to T, the port's ``r/T``); these ``T*n``
    columns are stacked and decomposed again, and the first ``k = floor(r / subspace_divisor)`` left
    singular vectors are kept (``subspace_divisor`` 6 in DOGE-TA; ``None`` means T, as in the
    port's AdaMerging variant). Why: directions that many tasks use carry shared knowledge, which
    the correction ``delta`` must not disturb.

    Edge cases (the port would use arbitrary directions there): ``n`` is at least 1, and ``k`` is at
    most ``T*n``; ``k`` may be 0 (small layers, ``r < subspace_divisor``): the projector is then 0.
    Singular-vector signs do not matter: only ``U U^T`` is used.
    """
    t = _check_taus(taus)
    T, out, inn = t.shape
    r = min(out, inn)
    per = float(T) if per_task_divisor is None else _check_divisor("per_task_divisor", per_task_divisor)
    div = float(T) if subspace_divisor is None else _check_divisor("subspace_divisor", subspace_divisor)
    n = max(1, int(r / per))
    n = min(n, r)
    k = min(int(r / div), T * n, out)
    bases = []
    for i in range(T):
        u, _, _ = torch.linalg.svd(t[i], full_matrices=False)
        bases.append(u[:, :n])
    stacked = torch.cat(bases, dim=1)  # [out, T*n]
    u2, _, _ = torch.linalg.svd(stacked, full_matrices=False)
    return u2[:, :k].contiguous()


def project_gradient(g: Tensor, U: Tensor, keep: Literal["orthogonal", "subspace"] = "orthogonal") -> Tensor:
    """Project ``g`` (``[out, in]`` or ``[T, out, in]``) on the left with ``U [out, k]``.

    ``keep="orthogonal"``: ``g - U (U^T g)`` (drops the shared-subspace component; the port).
    ``keep="subspace"``: ``U (U^T g)`` (keeps only that component; the abstract's wording).
    ``U`` must have orthonormal columns. Cost O(out*k*in), no ``[out, out]`` matrix is formed.
    """
    _check_keep(keep)
    if U.dim() != 2:
        raise InputError(f"U must be [out, k], got {tuple(U.shape)}")
    if g.dim() not in (2, 3) or g.shape[-2] != U.shape[0]:
        raise InputError(f"g must be [out, in] or [T, out, in] with out={U.shape[0]}, got {tuple(g.shape)}")
    U = U.to(dtype=g.dtype, device=g.device)
    inside = U @ (U.transpose(0, 1) @ g)
    return inside if keep == "subspace" else g - inside


# --------------------------------------------------------------------------- loss, coefficients
def layer_loss(taus: Tensor, delta: Tensor, lam: Tensor) -> Tensor:
    """DOGE's data-free loss of one layer (differentiable in ``delta``; also in ``lam``).

    ``tau_m = sum_i lam_i * (tau_i + delta_i)`` (a shared ``[out, in]`` delta enters as
    ``(sum_i lam_i) * delta``); the loss is ``sum_j sum_rows <tau_j[row], tau_j[row] - tau_m[row]>^2``
    with no normalisation, exactly the port's ``taskvector_loss``. Why: row-wise inner products
    with ``tau_j`` are a data-free proxy of how far the merged layer's outputs move from expert j's
    along expert j's own directions.
    """
    if taus.dim() != 3:
        raise InputError(f"taus must be [T, out, in], got {tuple(taus.shape)}")
    T = taus.shape[0]
    if lam.shape != (T,):
        raise InputError(f"lam must have shape [{T}], got {tuple(lam.shape)}")
    if delta.shape == taus.shape:
        delta_sum = (lam.view(-1, 1, 1) * delta).sum(dim=0)
    elif delta.shape == taus.shape[1:]:
        delta_sum = lam.sum() * delta
    else:
        raise InputError(
            f"delta must be [out, in]={tuple(taus.shape[1:])} or [T, out, in]={tuple(taus.shape)}, "
            f"got {tuple(delta.shape)}"
        )
    merged = (lam.view(-1, 1, 1) * taus).sum(dim=0) + delta_sum
    inner = (taus * (taus - merged)).sum(dim=-1)  # [T, out]
    return inner.pow(2).sum()


def doge_coefficients(
    taus: Tensor, c: float = DEFAULT_C, on_zero: Literal["zero", "raise"] = "zero", cap: float | None = None,
    lam_mean: float | None = None,
) -> Tensor:
    """Training-free coefficients ``lam_t = min(c / ||tau_t||_F, cap)`` (norm over all but dim 0),
    shape [T]; ``cap=None`` (the port) leaves them uncapped.

    Why: the coefficient acts as a per-task learning rate that equalises tasks whose vectors differ
    in scale. ``c = 0.07`` was calibrated on ViT-B/32, whose weight matrices are large; on a small
    layer (a depthwise kernel of a few hundred entries) ``c / ||tau||`` exceeds 1, i.e. the merge
    would add more than the expert's own task vector: ``cap=1`` forbids that. A task vector that
    is exactly zero in this layer (e.g. the layer was frozen while fine-tuning) gets ``lam_t = 0``
    with ``on_zero="zero"`` (it carries nothing to merge, and an infinite coefficient would blow
    up its delta term); ``on_zero="raise"`` raises InputError.

    ``lam_mean`` (not in the port): a scale-free c. The layer's c is chosen so that the mean of
    ``c / ||tau_t||`` over the tasks with a nonzero task vector equals ``lam_mean``
    (:func:`scale_free_c`); the ratios between tasks (DOGE's 1/||tau_t|| equalisation) are kept,
    ``c`` is ignored, and ``cap`` still applies afterwards.
    """
    norms = _task_norms(taus)
    if lam_mean is not None:
        c = _scale_free_c(norms, lam_mean)
        if c == 0.0:  # every task vector is zero in this layer
            return torch.zeros_like(norms)
    lam = _uncapped_coefficients(norms, c, on_zero)
    if cap is None:
        return lam
    cap_v = _check_divisor("cap", cap)
    return lam.clamp(max=cap_v)


def scale_free_c(taus: Tensor, lam_mean: float) -> float:
    """The c of one layer for which the mean over tasks of ``c / ||tau_t||_F`` is ``lam_mean``:
    ``c = lam_mean * n / sum_t 1/||tau_t||`` over the n tasks whose task vector is nonzero here
    (0.0 when there is none). Why: c = 0.07 is calibrated on ViT-B/32's matrices; the norms of a
    small CNN's matrices differ by an order of magnitude between layer kinds, so a fixed c gives
    some layers a far smaller coefficient than task arithmetic and others a far larger one."""
    return _scale_free_c(_task_norms(taus), lam_mean)


def _scale_free_c(norms: Tensor, lam_mean: float) -> float:
    lm = _check_divisor("lam_mean", lam_mean)
    nonzero = norms[norms > 0]
    if nonzero.numel() == 0:
        return 0.0
    return float(lm * nonzero.numel() / (1.0 / nonzero).sum())


def _task_norms(taus: Tensor) -> Tensor:
    """``||tau_t||_F`` per task (norm over all but dim 0), after checking the tensor."""
    if not isinstance(taus, Tensor) or taus.dim() < 1 or taus.shape[0] < 1:
        raise InputError("taus must be a tensor [T, ...] with T >= 1")
    t = taus.detach().to(_work_dtype(taus))
    if not bool(torch.isfinite(t).all()):
        raise InputError("taus contains NaN or inf")
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _uncapped_coefficients(norms: Tensor, c: float, on_zero: str) -> Tensor:
    """``c / ||tau_t||_F`` per task from the norms (0 for a zero task vector, or InputError with
    ``on_zero="raise"``)."""
    if on_zero not in ("zero", "raise"):
        raise InputError(f"on_zero must be 'zero' or 'raise', got {on_zero!r}")
    try:
        cv = float(c)
    except (TypeError, ValueError):
        raise InputError(f"c must be a number > 0, got {c!r}") from None
    if not (math.isfinite(cv) and cv > 0):
        raise InputError(f"c must be a finite number > 0, got {c!r}")
    zero = norms == 0
    if bool(zero.any()):
        if on_zero == "raise":
            idx = [int(i) for i in torch.nonzero(zero).flatten()]
            raise InputError(f"task vector(s) {idx} have zero norm in this layer; lam = c/||tau|| is undefined")
        return torch.where(zero, torch.zeros_like(norms), cv / torch.where(zero, torch.ones_like(norms), norms))
    return cv / norms


# --------------------------------------------------------------------------- trimming
def magnitude_trim_mask(tau: Tensor, keep: float = DEFAULT_TRIM_KEEP) -> Tensor:
    """Boolean mask of the top-``keep`` fraction of entries by ``|value|``, per task (dim 0).

    Each ``tau[t]`` keeps exactly ``n = floor(keep * d + 0.5)`` of its ``d`` entries (round half up);
    ties are broken by position (the earlier flat index wins), so the result is deterministic.
    Pass one tensor ``[T, ...]`` for a per-tensor trim, or the task vectors flattened and
    concatenated ``[T, N]`` for the port's global (whole-model) trim. The port keeps
    ``int(d*keep) + 1`` entries plus ties; this keeps the exact count.
    """
    if not isinstance(tau, Tensor) or tau.dim() < 1 or tau.shape[0] < 1:
        raise InputError("tau must be a tensor [T, ...] with T >= 1")
    try:
        kf = float(keep)
    except (TypeError, ValueError):
        raise InputError(f"keep must be a number in [0, 1], got {keep!r}") from None
    if not (0.0 <= kf <= 1.0):
        raise InputError(f"keep must be in [0, 1], got {keep!r}")
    flat = tau.detach().reshape(tau.shape[0], -1)
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        raise InputError("tau contains NaN or inf")
    d = flat.shape[1]
    n = min(d, int(math.floor(kf * d + 0.5)))
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if n > 0:
        order = torch.sort(flat.abs(), dim=1, descending=True, stable=True).indices
        mask.scatter_(1, order[:, :n], True)
    return mask.reshape(tau.shape)


def visible_part(taus: Tensor, delta: Tensor) -> Tensor:
    """The part of ``delta`` that :func:`layer_loss` sees: each row of ``delta`` (``[out, in]``, or
    every task's in ``[T, out, in]``) projected onto the span of the task vectors' same rows,
    ``P_r = A_r^T (A_r A_r^T)^+ A_r`` with ``A_r = taus[:, r, :]`` (``[T, in]``).

    Why: the loss reads ``delta`` only through the inner products ``<tau_j[r], delta[r]>``, so
    this projection leaves every such product, hence the loss, unchanged, and drops what the
    loss cannot see. Gradient descent from zero never leaves that span; Adam's per-entry scaling
    does, and what it puts outside is noise added to the merged weights (on sub2's demo zoo the
    part kept is a median 0.52 of ``delta``'s norm over 49 matrices, experiments/doge_visible.py). Rank-deficient rows (a zero task vector row, parallel rows) are handled
    by the pseudo-inverse. Computed in float64, returned in ``delta``'s dtype.
    """
    t = _check_taus(taus)
    if delta.shape not in (t.shape, t.shape[1:]):
        raise InputError(f"delta must be [out, in]={tuple(t.shape[1:])} or [T, out, in]={tuple(t.shape)}, "
                         f"got {tuple(delta.shape)}")
    a = t.transpose(0, 1).to(torch.float64)  # [out, T, in]
    d = delta.detach().to(torch.float64)
    rows = d.unsqueeze(1) if d.dim() == 2 else d.transpose(0, 1)  # [out, S, in]
    gram = a @ a.transpose(1, 2)  # [out, T, T]
    coef = torch.linalg.pinv(gram, hermitian=True) @ (a @ rows.transpose(1, 2))  # [out, T, S]
    kept = (a.transpose(1, 2) @ coef).transpose(1, 2)  # [out, S, in]
    out = kept.squeeze(1) if d.dim() == 2 else kept.transpose(0, 1)
    return out.to(delta.dtype).contiguous()


# --------------------------------------------------------------------------- solver
def solve_layer(
    taus: Tensor,
    lam: Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    per_task: bool = False,
    keep: Literal["orthogonal", "subspace"] = "orthogonal",
    subspace_divisor: float | None = DEFAULT_SUBSPACE_DIVISOR,
    per_task_divisor: float | None = None,
    U: Tensor | None = None,
    project: Literal["gradient", "update"] = "gradient",
    span: bool = False,
) -> tuple[Tensor, list[float]]:
    """Train DOGE's correction ``delta`` for one layer; returns ``(delta, losses)``.

    ``delta`` starts at 0 (``[out, in]``, or ``[T, out, in]`` with ``per_task``) and takes ``steps``
    Adam steps (default betas/eps, a fresh optimizer) on :func:`layer_loss`; before every step
    its gradient is projected with :func:`project_gradient` (``U`` from :func:`shared_subspace`
    unless given). ``project="gradient"`` is the port; ``project="update"`` also projects
    ``delta`` after every step so it stays exactly in the kept subspace (Adam's per-entry scaling
    otherwise leaks components into the removed one). ``losses[i]`` is the loss before step i.
    No randomness (repeated calls on one small layer give the same δ, tested; two demo runs of
    the port's reading on large layers differed, docs/results.md). Raises FloatingPointError if the loss
    stops being finite. ``span=True`` (not in the port) returns :func:`visible_part` of the
    trained ``delta``: the same loss, without the components the loss cannot see. ``delta`` is
    returned detached, in the working dtype.
    """
    _check_keep(keep)
    if project not in PROJECT_CHOICES:
        raise InputError(f"unknown project {project!r}; choose one of: {', '.join(PROJECT_CHOICES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be an int >= 0, got {steps!r}")
    lr_v = _check_divisor("lr", lr)
    t = _check_taus(taus)
    T = t.shape[0]
    lam_t = torch.as_tensor(lam).detach().to(dtype=t.dtype, device=t.device)
    if lam_t.shape != (T,) or not bool(torch.isfinite(lam_t).all()):
        raise InputError(f"lam must be a finite tensor of shape [{T}], got shape {tuple(lam_t.shape)}")
    if U is None:
        U = shared_subspace(t, subspace_divisor=subspace_divisor, per_task_divisor=per_task_divisor)
    else:
        if U.dim() != 2 or U.shape[0] != t.shape[1]:
            raise InputError(f"U must be [out={t.shape[1]}, k], got {tuple(U.shape)}")
        U = U.detach().to(dtype=t.dtype, device=t.device)

    shape = tuple(t.shape) if per_task else tuple(t.shape[1:])
    delta = torch.zeros(shape, dtype=t.dtype, device=t.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr_v)
    losses: list[float] = []
    with torch.enable_grad():
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = layer_loss(t, delta, lam_t)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"DOGE layer loss became non-finite at step {step}")
            losses.append(value)
            loss.backward()
            with torch.no_grad():
                delta.grad.copy_(project_gradient(delta.grad, U, keep))
            opt.step()
            if project == "update":
                with torch.no_grad():
                    delta.copy_(project_gradient(delta, U, keep))
    if span:
        return visible_part(t, delta), losses
    return delta.detach(), losses
