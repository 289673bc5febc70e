"""DOGE per-layer tensor operations (adamerge.solvers.doge_ops)."""
from __future__ import annotations

import adamerge  # noqa: F401  (import order: adamerge before torch-vision-related imports)

import pytest
import torch

from adamerge.errors import InputError
from adamerge.solvers import doge_ops as D


def _taus(T=3, out=12, inn=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, out, inn, generator=g, dtype=dtype)


# --------------------------------------------------------------------------- subspace / projector
def test_shared_subspace_shape_and_orthonormal():
    taus = _taus(T=3, out=40, inn=30)
    U = D.shared_subspace(taus)  # r=30: 10 per task, k = floor(30/6) = 5
    assert U.shape == (40, 5)
    assert torch.allclose(U.T @ U, torch.eye(5, dtype=U.dtype), atol=1e-10)
    assert D.shared_subspace(taus, subspace_divisor=None).shape == (40, 10)  # AdaMerging variant: r/T
    assert D.shared_subspace(_taus(T=2, out=8, inn=5)).shape == (8, 0)  # floor(5/6) = 0


def test_shared_subspace_finds_common_direction():
    g = torch.Generator().manual_seed(1)
    common = torch.linalg.qr(torch.randn(20, 2, generator=g, dtype=torch.float64)).Q
    taus = torch.stack([common @ torch.randn(2, 12, generator=g, dtype=torch.float64) * 10
                        + 0.01 * torch.randn(20, 12, generator=g, dtype=torch.float64) for _ in range(3)])
    U = D.shared_subspace(taus, subspace_divisor=6.0, per_task_divisor=6.0)  # n=2 per task, k=2
    P = U @ U.T
    assert torch.allclose(P @ common, common, atol=1e-3)


@pytest.mark.parametrize("batched", [False, True])
def test_projector_properties(batched):
    U = D.shared_subspace(_taus(T=2, out=24, inn=18))
    eye = torch.eye(24, dtype=U.dtype)
    P_sub = D.project_gradient(eye, U, "subspace")
    P_orth = D.project_gradient(eye, U, "orthogonal")
    for P in (P_sub, P_orth):
        assert torch.allclose(P @ P, P, atol=1e-10)
        assert torch.allclose(P, P.T, atol=1e-10)
    assert torch.allclose(P_sub + P_orth, eye, atol=1e-12)
    g = _taus(T=3, out=24, inn=7, seed=5) if batched else _taus(T=1, out=24, inn=7, seed=5)[0]
    assert torch.allclose(D.project_gradient(g, U, "subspace") + D.project_gradient(g, U, "orthogonal"), g)
    assert torch.allclose(U.T @ D.project_gradient(g, U, "orthogonal"), torch.zeros((), dtype=U.dtype), atol=1e-10)
    with pytest.raises(InputError):
        D.project_gradient(g, U, "inside")


# --------------------------------------------------------------------------- loss
def _loop_loss(taus, delta, lam):
    T, out, inn = taus.shape
    total = 0.0
    for j in range(T):
        for r in range(out):
            s = 0.0
            for c in range(inn):
                merged = sum(lam[i] * (taus[i, r, c] + (delta[i, r, c] if delta.dim() == 3 else delta[r, c]))
                             for i in range(T))
                s += taus[j, r, c] * (taus[j, r, c] - merged)
            total += s * s
    return float(total)


@pytest.mark.parametrize("per_task", [False, True])
def test_layer_loss_matches_double_loop(per_task):
    taus = _taus(T=3, out=4, inn=3, seed=2)
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(*(taus.shape if per_task else taus.shape[1:]), generator=g, dtype=taus.dtype)
    lam = torch.tensor([0.3, 0.5, 0.2], dtype=taus.dtype)
    got = float(D.layer_loss(taus, delta, lam))
    assert got == pytest.approx(_loop_loss(taus, delta, lam), rel=1e-12)
    with pytest.raises(InputError):
        D.layer_loss(taus, torch.zeros(2, 2, dtype=taus.dtype), lam)


# --------------------------------------------------------------------------- solver
@pytest.mark.parametrize("per_task", [False, True])
@pytest.mark.parametrize("keep", ["orthogonal", "subspace"])
def test_solve_layer_update_mode_stays_in_subspace_and_loss_falls(per_task, keep):
    taus = _taus(T=3, out=18, inn=12, seed=4, dtype=torch.float32) * 0.1
    lam = D.doge_coefficients(taus, 0.07)
    U = D.shared_subspace(taus)  # k = floor(12/6) = 2
    delta, losses = D.solve_layer(taus, lam, steps=60, lr=1e-2, per_task=per_task, keep=keep,
                                  U=U, project="update")
    assert delta.shape == (taus.shape if per_task else taus.shape[1:])
    assert len(losses) == 60 and losses[-1] < losses[0]
    inside = D.project_gradient(delta, U, "subspace")
    outside = delta - inside
    leak = inside if keep == "orthogonal" else outside
    assert float(leak.abs().max()) <= 1e-6 * max(1.0, float(delta.abs().max()))
    assert float(delta.abs().max()) > 0


def test_solve_layer_gradient_mode_is_the_port_and_adam_leaks():
    """project="gradient" equals a plain Adam loop with g <- g - U U^T g; Adam's per-entry scaling
    then moves delta out of the orthogonal complement (why project="update" exists)."""
    taus = _taus(T=2, out=12, inn=12, seed=6)
    lam = D.doge_coefficients(taus, 0.07)
    U = D.shared_subspace(taus)
    delta, losses = D.solve_layer(taus, lam, steps=25, lr=1e-3, U=U)
    ref = torch.zeros(12, 12, dtype=taus.dtype, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=1e-3)
    for _ in range(25):
        opt.zero_grad()
        D.layer_loss(taus, ref, lam).backward()
        with torch.no_grad():
            ref.grad -= U @ (U.T @ ref.grad)
        opt.step()
    assert torch.allclose(delta, ref.detach(), atol=1e-12)
    assert losses[-1] < losses[0]
    assert float((U.T @ delta).abs().max()) > 1e-6  # not confined to the complement
    again, losses2 = D.solve_layer(taus, lam, steps=25, lr=1e-3, U=U)
    assert torch.equal(again, delta) and losses2 == losses  # deterministic


@pytest.mark.parametrize("per_task", [False, True])
def test_visible_part_keeps_the_loss_and_drops_what_it_cannot_see(per_task):
    """visible_part(δ) lies in each row's span of the task vectors' rows, differs from δ by a part
    orthogonal to every task row (so every inner product, hence the loss, is unchanged), is
    idempotent, never larger, and handles a zero task row (rank-deficient Gram)."""
    taus = _taus(T=3, out=8, inn=20, seed=11)
    taus[1, 2] = 0.0  # task 1 did not change row 2
    taus[2, 5] = taus[0, 5] * 2.0  # parallel rows in row 5
    g = torch.Generator().manual_seed(12)
    delta = torch.randn(*((3, 8, 20) if per_task else (8, 20)), generator=g, dtype=torch.float64)
    lam = torch.tensor([0.3, 0.2, 0.4], dtype=torch.float64)
    kept = D.visible_part(taus, delta)
    assert kept.shape == delta.shape and kept.dtype == delta.dtype
    removed = (delta - kept).reshape(-1, 8, 20)
    inner = torch.einsum("tri,sri->tsr", taus, removed)  # every task row against every removed row
    assert float(inner.abs().max()) < 1e-10
    assert float(D.layer_loss(taus, kept, lam)) == pytest.approx(float(D.layer_loss(taus, delta, lam)), rel=1e-10)
    assert torch.allclose(D.visible_part(taus, kept), kept, atol=1e-12)
    assert float(kept.norm()) < float(delta.norm())
    # in the span: each kept row is a combination of the task rows (least squares fits exactly)
    rows = kept.reshape(-1, 8, 20)
    for r in range(8):
        a = taus[:, r, :].T  # [in, T]
        for s in range(rows.shape[0]):
            c = torch.linalg.lstsq(a, rows[s, r].unsqueeze(1), driver="gelsd").solution
            assert torch.allclose(a @ c, rows[s, r].unsqueeze(1), atol=1e-10)
    # by hand, one row: the projector A^T (A A^T)^+ A
    a = taus[:, 0, :]
    want = a.T @ torch.linalg.pinv(a @ a.T) @ a @ delta.reshape(-1, 8, 20)[0, 0]
    assert torch.allclose(rows[0, 0], want, atol=1e-10)


def test_solve_layer_span_is_the_visible_part_of_the_ports_delta():
    """span=True returns visible_part of what the port's loop trains, with the same loss; plain
    gradient descent from zero would already stay in that span (Adam's per-entry steps do not)."""
    taus = _taus(T=2, out=12, inn=12, seed=6)
    lam = D.doge_coefficients(taus, 0.07)
    delta, losses = D.solve_layer(taus, lam, steps=25, lr=1e-3)
    kept, losses2 = D.solve_layer(taus, lam, steps=25, lr=1e-3, span=True)
    assert losses2 == losses
    assert torch.allclose(kept, D.visible_part(taus, delta), atol=1e-12)
    assert float(D.layer_loss(taus, kept, lam)) == pytest.approx(float(D.layer_loss(taus, delta, lam)), rel=1e-9)
    assert float(kept.norm()) < 0.9 * float(delta.norm())  # Adam put a good part of δ outside the span
    gd = torch.zeros(12, 12, dtype=taus.dtype, requires_grad=True)
    for _ in range(5):
        loss = D.layer_loss(taus, gd, lam)
        (grad,) = torch.autograd.grad(loss, gd)
        gd = (gd - 1e-2 * grad / grad.norm()).detach().requires_grad_(True)
    assert torch.allclose(D.visible_part(taus, gd.detach()), gd.detach(), atol=1e-12)


def test_solve_layer_dtype_and_validation():
    taus = _taus(T=2, out=6, inn=6, dtype=torch.float16).float().half()
    lam = torch.tensor([0.1, 0.2])
    delta, losses = D.solve_layer(taus, lam, steps=2)
    assert delta.dtype == torch.float32 and len(losses) == 2
    with pytest.raises(InputError):
        D.solve_layer(taus, lam, steps=-1)
    with pytest.raises(InputError):
        D.solve_layer(taus, torch.tensor([0.1]), steps=1)
    with pytest.raises(InputError):
        D.solve_layer(taus, lam, steps=1, project="both")
    bad = taus.float().clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError):
        D.solve_layer(bad, lam, steps=1)


# --------------------------------------------------------------------------- trim mask
def test_magnitude_trim_mask_counts_and_ties():
    tau = torch.tensor([[1.0, -5.0, 3.0, 0.5, -2.0, 0.0, 4.0, 1.5, -0.1, 2.5],
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    m = D.magnitude_trim_mask(tau, 0.3)
    assert m.dtype == torch.bool and m.shape == tau.shape
    assert m.sum(dim=1).tolist() == [3, 3]
    assert m[0].nonzero().flatten().tolist() == [1, 2, 6]  # |-5|, |4|, |3|
    assert m[1].nonzero().flatten().tolist() == [0, 1, 2]  # ties: earlier index wins
    x = _taus(T=4, out=7, inn=9, seed=8)
    mm = D.magnitude_trim_mask(x, 0.3)
    assert mm.shape == x.shape and mm.reshape(4, -1).sum(1).tolist() == [19] * 4  # round(18.9)
    kept_min = torch.where(mm, x.abs(), torch.inf).reshape(4, -1).min(1).values
    drop_max = torch.where(mm, -torch.inf, x.abs()).reshape(4, -1).max(1).values
    assert bool((kept_min >= drop_max).all())
    assert not D.magnitude_trim_mask(x, 0.0).any() and D.magnitude_trim_mask(x, 1.0).all()
    with pytest.raises(InputError):
        D.magnitude_trim_mask(x, 1.5)


# --------------------------------------------------------------------------- coefficients
def test_doge_coefficients_and_zero_norm():
    taus = torch.zeros(3, 2, 2)
    taus[0] = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    taus[2] = 1.0  # norm 2
    lam = D.doge_coefficients(taus, 0.07)
    assert torch.allclose(lam, torch.tensor([0.07 / 5, 0.0, 0.07 / 2]))
    with pytest.raises(InputError, match="zero norm"):
        D.doge_coefficients(taus, 0.07, on_zero="raise")
    for bad_c in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError):
            D.doge_coefficients(taus, bad_c)
    # a zero task vector with lam=0 leaves the solver finite
    big = taus.repeat(1, 3, 3)  # [3, 6, 6]: task 1 is all zeros
    delta, losses = D.solve_layer(big, D.doge_coefficients(big, 0.07), steps=3)
    assert all(torch.isfinite(torch.tensor(losses))) and bool(torch.isfinite(delta).all())


def test_doge_visible_script_measures_the_seen_fraction(tmp_path):
    """experiments/doge_visible.py: one ratio per weight matrix of a zoo folder, each ||visible|| /
    ||δ|| of the port's δ, in (0, 1]; biases and untouched matrices are skipped."""
    import runpy
    from pathlib import Path

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base = {"a.weight": torch.randn(6, 16, generator=g), "a.bias": torch.randn(6, generator=g),
            "b.weight": torch.randn(4, 6, generator=g)}
    (tmp_path / "experts").mkdir()
    save_file(base, str(tmp_path / "base.safetensors"))
    for t in range(2):
        expert = {k: v.clone() for k, v in base.items()}
        expert["a.weight"] += 0.01 * torch.randn(6, 16, generator=g)  # b.weight left untouched
        save_file(expert, str(tmp_path / "experts" / f"t{t}.safetensors"))
    script = Path(__file__).resolve().parents[1] / "experiments" / "doge_visible.py"
    ratios = runpy.run_path(str(script))["visible_ratios"](tmp_path)
    assert len(ratios) == 1 and 0.0 < ratios[0] < 1.0
