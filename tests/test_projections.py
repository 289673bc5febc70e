"""Projections and linear minimisation oracles onto the box and the (scaled) simplex.

Property tests (hypothesis) check the defining properties rather than the algorithm: the
projection is feasible, idempotent and nearer to x than every sampled feasible point (and obeys
the variational inequality); the LMO is feasible and beats every sampled feasible point. Hand
computed examples and an independent bisection reference pin the exact answers.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from adamerge.errors import InputError
from adamerge.solvers import projections as P

N_SAMPLES = 200
SETTINGS = settings(max_examples=120, deadline=None)


# --------------------------------------------------------------------------- strategies
@st.composite
def matrices(draw, max_t: int = 6, max_g: int = 4, scale: float = 50.0):
    """A [T, G] float tensor, T in 1..max_t, G in 1..max_g; often with repeated entries."""
    t = draw(st.integers(1, max_t))
    g = draw(st.integers(1, max_g))
    finite = st.floats(-scale, scale, allow_nan=False, allow_infinity=False)
    pool = draw(st.lists(finite, min_size=1, max_size=3))  # a few values → ties
    elems = draw(st.sampled_from([st.sampled_from(pool), finite | st.sampled_from(pool), finite]))
    values = draw(st.lists(elems, min_size=t * g, max_size=t * g))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return torch.tensor(values, dtype=torch.float64).view(t, g).to(dtype)


totals = st.floats(0.05, 20.0) | st.sampled_from([1.0, 2.0, 0.5])


@st.composite
def boxes(draw):
    lo = draw(st.floats(-5.0, 5.0))
    width = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 5.0))  # lo == hi allowed
    return lo, lo + width


# --------------------------------------------------------------------------- helpers
def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def simplex_samples(t: int, g: int, total: float, n: int = N_SAMPLES, seed: int = 0):
    """[n + t, t, g] float64 feasible points: Dirichlet(1) samples scaled by total, then the
    t vertices (total · e_i in every column)."""
    expo = -torch.log(torch.rand(n, t, g, generator=_gen(seed), dtype=torch.float64))
    dirichlet = expo / expo.sum(dim=1, keepdim=True) * total
    vertices = total * torch.eye(t, dtype=torch.float64).unsqueeze(-1).expand(t, t, g)
    return torch.cat([dirichlet, vertices])


def box_samples(t: int, g: int, lo: float, hi: float, n: int = N_SAMPLES, seed: int = 0):
    """[2n, t, g] float64 feasible points: n uniform, n random corners."""
    gen = _gen(seed)
    uniform = lo + (hi - lo) * torch.rand(n, t, g, generator=gen, dtype=torch.float64)
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    corners = torch.where(torch.rand(n, t, g, generator=gen) < 0.5, lo_t, hi_t)
    return torch.cat([uniform, corners])


def _tol(x: torch.Tensor, extra: float = 0.0) -> float:
    """Rounding tolerance for squared distances / inner products at x's scale."""
    scale = 1.0 + float(x.abs().max()) + extra
    return (1e-4 if x.dtype == torch.float32 else 1e-9) * scale**2


def _atol(x: torch.Tensor, extra: float = 0.0) -> float:
    scale = 1.0 + float(x.abs().max()) + extra
    return (1e-5 if x.dtype == torch.float32 else 1e-10) * scale


def bisection_reference(x: torch.Tensor, total: float) -> torch.Tensor:
    """Independent oracle: p = max(x − θ, 0) with θ found by bisection on Σ p = total."""
    x = x.double()
    lo = x.min(dim=0).values - total  # Σ max(x − lo, 0) ≥ total
    hi = x.max(dim=0).values  # Σ max(x − hi, 0) = 0
    for _ in range(200):
        mid = (lo + hi) / 2
        too_small = torch.clamp(x - mid, min=0).sum(dim=0) < total  # θ too large
        hi = torch.where(too_small, mid, hi)
        lo = torch.where(too_small, lo, mid)
    return torch.clamp(x - (lo + hi) / 2, min=0)


# --------------------------------------------------------------------------- simplex projection
def test_simplex_hand_examples():
    x = torch.tensor([[0.6, 2.0, 1.0, 0.0], [0.3, 0.0, 1.0, 0.0], [-0.2, -1.0, 1.0, 0.0]])
    want = torch.tensor(
        [[0.65, 1.0, 1 / 3, 1 / 3], [0.35, 0.0, 1 / 3, 1 / 3], [0.0, 0.0, 1 / 3, 1 / 3]]
    )
    assert torch.allclose(P.project_simplex(x), want, atol=1e-6)
    # scaled: total 3, ties → equal shares; total 2 from a point with a negative entry
    assert torch.allclose(P.project_simplex(torch.tensor([[1.0], [1.0], [1.0]]), 3.0),
                          torch.tensor([[1.0], [1.0], [1.0]]))
    assert torch.allclose(P.project_simplex(torch.tensor([[3.0], [1.0], [-5.0]]), 2.0),
                          torch.tensor([[2.0], [0.0], [0.0]]))
    assert torch.allclose(P.project_simplex(torch.tensor([[1.5], [1.0], [-5.0]]), 2.0),
                          torch.tensor([[1.25], [0.75], [0.0]]))


def test_simplex_single_task_is_total():
    x = torch.tensor([[5.0, -3.0, 0.0, 1e9]])
    assert torch.equal(P.project_simplex(x, 2.5), torch.full_like(x, 2.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simplex_keeps_dtype_device_and_input(dtype):
    x = torch.tensor([[0.2, 3.0], [0.9, -1.0], [0.9, 7.0]], dtype=dtype)
    before = x.clone()
    p = P.project_simplex(x, 1.5)
    assert p.dtype == dtype and p.device == x.device and p.shape == x.shape
    assert torch.equal(x, before)
    assert P.is_feasible(p, "simplex", total=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simplex_large_and_negative_values(dtype):
    x = torch.tensor([[1e20, -1e20, -1e6, 1e6, -1e30],
                      [0.0, -1e20, -1e6 - 1, 1e6 + 0.5, -1e30],
                      [-1e20, -9e19, -3e6, -1e6, -1e30]], dtype=dtype)
    p = P.project_simplex(x)
    assert P.is_feasible(p, "simplex")
    assert torch.allclose(p[:, 0].double(), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(p[:, 1].double(), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(p[:, 3].double(), torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64),
                          atol=1e-6)  # exact: the shift by the max removes 1e6
    assert torch.allclose(p[:, 4].double(), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_simplex_vectorised_matches_columns_and_1d():
    x = torch.randn(5, 7, generator=_gen(3), dtype=torch.float64)
    p = P.project_simplex(x, 2.0)
    for g in range(x.shape[1]):
        assert torch.allclose(P.project_simplex(x[:, g], 2.0), p[:, g], atol=1e-12)
        assert torch.allclose(P.project_simplex(x[:, g : g + 1], 2.0), p[:, g : g + 1])


@SETTINGS
@given(x=matrices(), total=totals)
def test_simplex_projection_properties(x, total):
    p = P.project_simplex(x, total)
    assert p.dtype == x.dtype and p.shape == x.shape
    assert P.is_feasible(p, "simplex", total=total, atol=_atol(x, total))
    # idempotent
    assert torch.allclose(P.project_simplex(p, total), p, rtol=0, atol=_atol(x, total))
    # the exact answer (independent bisection in float64)
    assert torch.allclose(p.double(), bisection_reference(x, total), rtol=0, atol=_atol(x, total))
    # nearest: per column, no sampled feasible point is closer than p
    x64, p64 = x.double(), p.double()
    ys = simplex_samples(*x.shape, total)
    d_p = ((x64 - p64) ** 2).sum(dim=0)  # [G]
    d_y = ((x64 - ys) ** 2).sum(dim=1)  # [N, G]
    assert bool(torch.all(d_p <= d_y + _tol(x, total)))
    # variational inequality: <x − p, y − p> ≤ 0 for every feasible y (per column)
    vi = ((x64 - p64) * (ys - p64)).sum(dim=1)
    assert bool(torch.all(vi <= _tol(x, total)))


@settings(max_examples=60, deadline=None)
@given(x=matrices(), total=totals, shift=st.floats(-100.0, 100.0))
def test_simplex_invariant_to_column_shift(x, total, shift):
    x = x.double()
    assert torch.allclose(P.project_simplex(x + shift, total), P.project_simplex(x, total),
                          atol=1e-9 * (1 + abs(shift) + float(x.abs().max())))


# --------------------------------------------------------------------------- box projection
def test_box_hand_example():
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 1.0, 0.25]])
    want = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 0.25]])
    assert torch.equal(P.project_box(x, 0.0, 1.0), want)
    assert torch.equal(P.project(x, "box", bounds=(0.0, 1.0)), want)
    assert torch.equal(P.project_box(x, 0.3, 0.3), torch.full_like(x, 0.3))


def test_box_tensor_bounds():
    x = torch.tensor([[-1.0, 5.0], [0.5, 0.5]])
    lo, hi = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])  # per-group bounds
    assert torch.equal(P.project_box(x, lo, hi), torch.tensor([[0.0, 2.0], [0.5, 1.0]]))
    with pytest.raises(InputError):
        P.project_box(x, hi, lo)


@SETTINGS
@given(x=matrices(), box=boxes())
def test_box_projection_properties(x, box):
    lo, hi = box
    p = P.project(x, "box", bounds=box)
    assert p.dtype == x.dtype and p.shape == x.shape
    assert P.is_feasible(p, "box", bounds=box, atol=_atol(x, 5.0))
    assert torch.equal(P.project_box(p, lo, hi), p)  # idempotent (exactly, it is a clamp)
    x64, p64 = x.double(), p.double()
    ys = box_samples(*x.shape, lo, hi)
    d_p = ((x64 - p64) ** 2).sum(dim=(0, 1))
    d_y = ((x64 - ys) ** 2).sum(dim=(1, 2))
    assert bool(torch.all(d_p <= d_y + _tol(x, 5.0)))
    vi = ((x64 - p64) * (ys - p64)).sum(dim=(1, 2))
    assert bool(torch.all(vi <= _tol(x, 5.0)))


# --------------------------------------------------------------------------- LMOs and FW gap
def test_lmo_hand_examples_and_ties():
    g = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 0.0, -3.0, -1.0], [0.0, 0.0, 2.0, 0.0]])
    s = P.lmo_simplex(g, 2.0)
    # column 0: tie between rows 1 and 2 → row 1; column 1: all equal → row 0
    want = torch.tensor([[0.0, 2.0, 0.0, 2.0], [2.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(s, want)
    assert torch.equal(P.lmo(g, "simplex", total=2.0), want)
    # box: lo where g > 0 and where g == 0, hi where g < 0
    b = P.lmo_box(g, -1.0, 3.0)
    assert torch.equal(b, torch.where(g < 0, 3.0, -1.0))
    zero = torch.zeros(2, 2)
    assert torch.equal(P.lmo(zero, "box", bounds=(0.25, 1.0)), torch.full((2, 2), 0.25))
    assert P.lmo_simplex(g.double()).dtype == torch.float64
    assert P.lmo_box(g.double()).dtype == torch.float64


@SETTINGS
@given(g=matrices(), total=totals, box=boxes())
def test_lmo_properties(g, total, box):
    lo, hi = box
    g64 = g.double()
    for name, ys, kwargs in [
        ("simplex", simplex_samples(*g.shape, total), {"total": total}),
        ("box", box_samples(*g.shape, lo, hi), {"bounds": box}),
    ]:
        s = P.lmo(g, name, **kwargs)
        assert s.dtype == g.dtype and s.shape == g.shape
        assert P.is_feasible(s, name, **kwargs)
        assert torch.equal(P.lmo(g.clone(), name, **kwargs), s)  # deterministic
        # <g, s> ≤ <g, y> for each sampled feasible y (per column, hence also in total)
        gs = (g64 * s.double()).sum(dim=0)
        gy = (g64 * ys).sum(dim=1)
        assert bool(torch.all(gs <= gy + _tol(g, total + abs(lo) + abs(hi))))
        # FW gap ≥ 0 at any feasible x, and 0 at the LMO's own answer (the minimiser)
        x = P.project(torch.randn(g.shape, generator=_gen(1), dtype=g.dtype), name, **kwargs)
        assert float(P.fw_gap(g, x, s)) >= -_tol(g, total + abs(lo) + abs(hi))
        gap = P.fw_gap(g, s, s)
        assert gap.dim() == 0 and float(gap) == 0.0


def test_fw_gap_zero_at_non_vertex_minimiser():
    # a linear function with a tie: every point of the edge between e_0 and e_1 is a minimiser
    g = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64)
    x = torch.tensor([[0.7], [1.3], [0.0]], dtype=torch.float64)  # total 2, on the edge
    assert float(P.fw_gap(g, x, P.lmo_simplex(g, 2.0))) == 0.0
    worst = torch.tensor([[0.0], [0.0], [2.0]], dtype=torch.float64)  # the maximiser, not an LMO
    assert float(P.fw_gap(g, x, worst)) < 0
    # box: g == 0 coordinates do not change the gap
    gb = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    xb = torch.tensor([[0.0, 0.4], [1.0, 0.9]])
    assert float(P.fw_gap(gb, xb, P.lmo_box(gb, 0.0, 1.0))) == 0.0
    mid = torch.full_like(xb, 0.5)
    assert float(P.fw_gap(gb, mid, P.lmo_box(gb, 0.0, 1.0))) == pytest.approx(1.5)


# --------------------------------------------------------------------------- is_feasible
def test_is_feasible():
    x = torch.tensor([[0.5, 1.0], [0.5, 0.0]])
    assert P.is_feasible(x, "simplex") and P.is_feasible(x, "box")
    assert not P.is_feasible(x, "simplex", total=2.0)
    assert not P.is_feasible(torch.tensor([[1.5], [-0.5]]), "simplex")
    assert not P.is_feasible(x, "box", bounds=(0.6, 1.0))
    assert not P.is_feasible(torch.tensor([[float("nan")], [1.0]]), "simplex")
    assert not P.is_feasible(torch.tensor([float("nan")]), "box")
    assert P.is_feasible(torch.tensor([[1.0 + 1e-7], [0.0]]), "simplex", atol=1e-5)


# --------------------------------------------------------------------------- bad arguments
def test_bad_arguments_raise_input_error():
    x = torch.rand(3, 2)
    for call in [
        lambda: P.project_box(x, 1.0, 0.0),
        lambda: P.project_box(x, float("nan"), 1.0),
        lambda: P.lmo_box(x, 2.0, 1.0),
        lambda: P.project(x, "box", bounds=(1.0, 0.5)),
        lambda: P.project(x, "box", bounds=(1.0,)),
        lambda: P.lmo(x, "box", bounds=(3.0, -3.0)),
        lambda: P.is_feasible(x, "box", bounds=(1.0, 0.0)),
        lambda: P.project_simplex(x, 0.0),
        lambda: P.project_simplex(x, -1.0),
        lambda: P.project_simplex(x, float("nan")),
        lambda: P.project_simplex(x, float("inf")),
        lambda: P.lmo_simplex(x, 0.0),
        lambda: P.project(x, "simplex", total=-2.0),
        lambda: P.lmo(x, "simplex", total=0.0),
        lambda: P.is_feasible(x, "simplex", total=0.0),
        lambda: P.project_simplex(torch.tensor(1.0)),
        lambda: P.project_simplex(torch.zeros(0, 3)),
        lambda: P.project_simplex(torch.ones(3, 2, dtype=torch.long)),
        lambda: P.fw_gap(x, x, x[:2]),
    ]:
        with pytest.raises(InputError):
            call()


@pytest.mark.parametrize("fn", [P.project, P.lmo, P.is_feasible])
def test_unknown_constraint_lists_choices(fn):
    with pytest.raises(InputError, match="box.*simplex"):
        fn(torch.rand(2, 2), "l2ball")
    assert P.CONSTRAINTS == ("box", "simplex")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_weighted_simplex_projection_is_nearest_in_its_metric(T, G, seed):
    from adamerge.solvers.projections import project_simplex_weighted

    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(T, G, generator=gen, dtype=torch.float64)
    x[0] = x[-1]  # ties
    d = 0.05 + 2 * torch.rand(T, G, generator=gen, dtype=torch.float64)
    y = project_simplex_weighted(x, d, 1.5)
    assert P.is_feasible(y, "simplex", total=1.5, atol=1e-9)
    assert torch.allclose(project_simplex_weighted(y, d, 1.5), y, atol=1e-12)  # idempotent
    assert torch.allclose(project_simplex_weighted(x, torch.ones_like(d), 1.5), P.project_simplex(x, 1.5), atol=1e-12)
    best = (d * (y - x) ** 2).sum(0)
    samples = 1.5 * torch.distributions.Dirichlet(torch.ones(T, dtype=torch.float64)).sample((200, G)).permute(0, 2, 1)
    assert bool(((d * (samples - x) ** 2).sum(1) >= best - 1e-12).all())
    with pytest.raises(InputError):
        project_simplex_weighted(x, -d, 1.0)
