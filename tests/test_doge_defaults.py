"""DOGE's defaults on a BatchNorm network (issue 23): the non-matrix parameters (BatchNorm affine)
are merged like task arithmetic, λ_t,l = min(c_l/‖τ_t,l‖, cap) on weight matrices with a
scale-free c_l (the mean over tasks of c_l/‖τ_t,l‖ is ``lam_mean``), and the port's reading
(``others: 0``, no cap, the fixed c = 0.07) stays one option away. Every merged tensor against a
hand computation."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from adamerge.core.task_vectors import TaskVectors
from adamerge.errors import InputError
from adamerge.methods import create_method
from adamerge.solvers import doge_ops

C, CAP, OTHERS, LAM_MEAN = 0.07, 1.0, 0.3, 0.3  # the documented defaults of method doge (c: the port's)
FIXED_C = {"lam_mean": None}  # method doge with the port's fixed c = 0.07 (and the other defaults)
SPAN, PROJECT = True, "update"  # method doge keeps only the part of δ its loss sees, projected every step
PORT = {"others": 0.0, "cap": None, "lam_mean": None, "span": False, "project": "gradient"}


def _cnn(make_zoo):
    """The tiny BatchNorm CNN with two experts; expert t0's task vector in the first depthwise
    kernel is shrunk to norm c/2 (c/‖τ‖ = 2 > cap: the small-kernel case of the demo zoo)."""
    model, base, experts = make_zoo("cnn", 2)
    model = copy.deepcopy(model).float()
    small = next(k for k in _matrix_keys(model, base) if base[k].dim() == 4 and base[k].shape[1] == 1)
    tau = experts["t0"][small] - base[small]
    experts["t0"] = {**experts["t0"], small: base[small] + tau * (C / 2 / float(tau.norm()))}
    return model, base, experts


def _matrix_keys(model, base) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith("weight") and base[n].dim() >= 2]


def _random_deltas(model, base) -> dict[str, torch.Tensor]:
    """A δ per weight matrix, as the solver's state would hold it (shared by the tasks)."""
    gen = torch.Generator().manual_seed(7)
    return {f"delta.{k}": 0.01 * torch.randn(base[k].shape, generator=gen) for k in _matrix_keys(model, base)}


def _hand_merge(model, base, experts, state, c, cap, others, trim=0.3, lam_mean=None) -> dict[str, torch.Tensor]:
    """θ0 + Σ_t min(c/‖τ_t‖, cap)·((τ_t + δ) ⊙ M_t) on weight matrices, θ0 + others·Σ_t τ_t on every
    other parameter, θ0's buffers (float64; M_t: the top ``trim`` of |τ_t| over all matrices).
    With ``lam_mean`` the matrix's c is lam_mean · T / Σ_t 1/‖τ_t‖ instead of ``c``."""
    tasks = list(experts)
    keys = _matrix_keys(model, base)
    params = [n for n, _ in model.named_parameters()]
    taus = {k: [experts[t][k].double() - base[k].double() for t in tasks] for k in params}
    out = {k: v.double().clone() for k, v in base.items() if v.is_floating_point()}
    for t in range(len(tasks)):
        flat = torch.cat([taus[k][t].abs().reshape(-1) for k in keys])
        threshold = flat.kthvalue(flat.numel() - int(trim * flat.numel())).values if trim < 1 else -1.0
        for k in params:
            tau = taus[k][t]
            if k in keys:
                c_k = c if lam_mean is None else lam_mean * len(tasks) / sum(1 / float(x.norm()) for x in taus[k])
                lam = c_k / float(tau.norm())
                lam = lam if cap is None else min(lam, cap)
                out[k] += lam * (tau + state[f"delta.{k}"].double()) * (tau.abs() > threshold)
            else:
                out[k] += others * tau
    return out


def _merged_state(model, base, experts, state, options: dict | None = None) -> dict[str, torch.Tensor]:
    method = create_method("doge")
    cfg = method.config({"steps": 1, **(options or {})})
    tv = TaskVectors.from_state_dicts(base, experts)
    return method.build(model, tv, cfg, state=state).merged_state_dict()


def test_doge_defaults_merge_batchnorm_affine_deltas_like_task_arithmetic(make_zoo):
    model, base, experts = _cnn(make_zoo)
    state = _random_deltas(model, base)
    got = _merged_state(model, base, experts, state)
    hand = _hand_merge(model, base, experts, state, C, CAP, OTHERS, lam_mean=LAM_MEAN)
    bn = [k for k in hand if k.split(".")[-2].startswith("bn") and k.endswith(("weight", "bias"))]
    assert bn, "the test network has BatchNorm affine parameters"
    for k in bn:  # kept: θ0 + 0.3·Σ τ, not θ0
        assert not torch.allclose(got[k].double(), base[k].double(), atol=1e-6), k
    for k, v in hand.items():
        assert torch.allclose(got[k].double(), v, atol=1e-6), k
    buffers = [k for k in base if k.endswith(("running_mean", "running_var"))]
    assert buffers and all(torch.equal(got[k], base[k]) for k in buffers)  # θ0's statistics


def test_doge_cap_binds_exactly_where_c_over_the_norm_exceeds_it(make_zoo):
    """With the fixed c = 0.07 and without the trim (which would drop the shrunk kernel's small entries), the default merge
    differs from the uncapped one in the one matrix where c/‖τ_t‖ > 1, and equals the hand merge."""
    model, base, experts = _cnn(make_zoo)
    keys = _matrix_keys(model, base)
    capped = [k for k in keys if max(C / float((experts[t][k] - base[k]).norm()) for t in experts) > CAP]
    assert len(capped) == 1
    state = _random_deltas(model, base)
    default = _merged_state(model, base, experts, state, {"solver_args": {**FIXED_C, "trim": 1.0}})
    uncapped = _merged_state(model, base, experts, state, {"solver_args": {**FIXED_C, "trim": 1.0, "cap": None}})
    for k in keys:
        assert torch.allclose(default[k], uncapped[k], atol=1e-7) == (k not in capped), k
    hand = _hand_merge(model, base, experts, state, C, CAP, OTHERS, trim=1.0)
    assert all(torch.allclose(default[k].double(), v, atol=1e-6) for k, v in hand.items())


def test_doge_port_reading_is_one_option_away(make_zoo):
    """``others: 0`` leaves every non-matrix parameter at θ0 (the FusionBench port); with
    ``cap: null`` and ``lam_mean: null`` too, λ = 0.07/‖τ‖ uncapped."""
    model, base, experts = _cnn(make_zoo)
    state = _random_deltas(model, base)
    port = _merged_state(model, base, experts, state, {"solver_args": PORT})
    hand = _hand_merge(model, base, experts, state, C, None, 0.0)
    for k, v in hand.items():
        assert torch.allclose(port[k].double(), v, atol=1e-6), k
    matrices = set(_matrix_keys(model, base))
    params = [n for n, _ in model.named_parameters() if n not in matrices]
    assert params and all(torch.equal(port[k], base[k]) for k in params)


def test_doge_solver_trains_delta_with_the_capped_coefficients(make_zoo, monkeypatch, tmp_path):
    """The λ in each layer's data-free loss is the default rule: min(c_l/‖τ‖, cap), c_l scale-free
    (the mean over the tasks of the uncapped λ is lam_mean)."""
    from adamerge.solvers.doge import DOGESolver

    model, base, experts = _cnn(make_zoo)
    seen, options = [], []

    def record(taus, lam, **kwargs):
        seen.append((taus.clone(), lam.clone()))
        options.append(kwargs)
        return torch.zeros(taus.shape[1:], dtype=taus.dtype), []

    monkeypatch.setattr(doge_ops, "solve_layer", record)
    cfg = create_method("doge").config({"steps": 1})
    problem = SimpleNamespace(tv=TaskVectors.from_state_dicts(base, experts), model=model, say=lambda msg: None,
                              run=SimpleNamespace(checkpoints=tmp_path))
    DOGESolver(cfg, cfg.solver_args).solve(problem)
    assert len(seen) == len(_matrix_keys(model, base))
    for taus, lam in seen:
        c_l = LAM_MEAN * len(taus) / sum(1 / float(t.norm()) for t in taus)
        hand = torch.tensor([min(c_l / float(t.norm()), CAP) for t in taus], dtype=lam.dtype)
        assert torch.allclose(lam, hand, rtol=1e-6)
    assert all(abs(float(lam.mean()) - LAM_MEAN) < 1e-6 for _, lam in seen if bool((lam < CAP).all()))
    assert all(o["span"] is SPAN and o["project"] == PROJECT for o in options)  # the documented defaults
    port = create_method("doge").config({"solver_args": PORT}).solver_args
    assert port["span"] is False and port["project"] == "gradient"  # the port: Adam's δ as it comes


def test_doge_coefficients_cap_by_hand():
    taus = torch.zeros(3, 2, 2)
    taus[0, 0, 0] = 0.035  # c/‖τ‖ = 2: capped
    taus[1, 1, 1] = 0.14  # 0.5: below the cap
    taus[2] = 0.0  # zero task vector: 0
    assert torch.allclose(doge_ops.doge_coefficients(taus, 0.07), torch.tensor([2.0, 0.5, 0.0]))
    assert torch.allclose(doge_ops.doge_coefficients(taus, 0.07, cap=1.0), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(doge_ops.doge_coefficients(taus, 0.07, cap=0.25), torch.tensor([0.25, 0.25, 0.0]))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError):
            doge_ops.doge_coefficients(taus, 0.07, cap=bad)


def test_scale_free_c_by_hand():
    """‖τ‖ = 0.1, 0.2, 0.4: Σ 1/‖τ‖ = 17.5, c = 0.3 · 3 / 17.5, λ = c/‖τ‖ = (0.514, 0.257, 0.129),
    mean 0.3; the 4 : 2 : 1 ratios of DOGE's c/‖τ‖ are kept, c = 0.07 is ignored."""
    taus = torch.zeros(3, 2, 2)
    taus[0, 0, 0], taus[1, 0, 1], taus[2, 1, 0] = 0.1, 0.2, 0.4
    c = 0.3 * 3 / 17.5
    assert doge_ops.scale_free_c(taus, 0.3) == pytest.approx(c)
    lam = doge_ops.doge_coefficients(taus, 0.07, lam_mean=0.3)
    assert torch.allclose(lam, torch.tensor([c / 0.1, c / 0.2, c / 0.4]))
    assert float(lam.mean()) == pytest.approx(0.3)
    # the same λ whatever the layer's scale (the fixed c gives 100× larger λ on a 100× smaller τ)
    assert torch.allclose(doge_ops.doge_coefficients(taus / 100, 0.07, lam_mean=0.3), lam)
    # the cap applies afterwards: 0.514 -> 0.4
    assert torch.allclose(doge_ops.doge_coefficients(taus, 0.07, lam_mean=0.3, cap=0.4), torch.tensor([0.4, c / 0.2, c / 0.4]))
    # a zero task vector gets 0 and is left out of the mean
    taus0 = torch.cat([taus[:2], torch.zeros(1, 2, 2)])
    c2 = 0.3 * 2 / 15.0
    assert torch.allclose(doge_ops.doge_coefficients(taus0, 0.07, lam_mean=0.3), torch.tensor([c2 / 0.1, c2 / 0.2, 0.0]))
    assert torch.equal(doge_ops.doge_coefficients(torch.zeros(2, 2, 2), 0.07, lam_mean=0.3), torch.zeros(2))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError):
            doge_ops.doge_coefficients(taus, 0.07, lam_mean=bad)


def test_doge_default_coefficients_have_mean_lam_mean_in_every_matrix(make_zoo):
    """Method doge's coefficients by default: per weight matrix, the tasks' λ average to lam_mean
    (where the cap does not bind) in the ratio 1/‖τ_t‖; with the fixed c they do not."""
    model, base, experts = _cnn(make_zoo)
    method = create_method("doge")
    tv = TaskVectors.from_state_dicts(base, experts)
    keys = _matrix_keys(model, base)
    for args, scale_free in (({}, True), (FIXED_C, False)):
        cfg = method.config({"steps": 1, "solver_args": args})
        merged = method.build(model, tv, cfg, state={})
        coef = method.initial_coefficients(merged, cfg, tv)
        means = []
        for k in keys:
            lam = coef[:, merged.group_index(k)].double()
            norms = torch.tensor([float((experts[t][k] - base[k]).norm()) for t in experts], dtype=torch.float64)
            if scale_free:
                c_l = LAM_MEAN * len(norms) / float((1 / norms).sum())
                assert torch.allclose(lam, (c_l / norms).clamp(max=CAP), rtol=1e-5), k
            else:
                assert torch.allclose(lam, (C / norms).clamp(max=CAP), rtol=1e-5), k
            if bool((lam < CAP).all()):
                means.append(float(lam.mean()))
        assert means
        if scale_free:
            assert all(m == pytest.approx(LAM_MEAN, rel=1e-5) for m in means)
        else:
            assert any(abs(m - LAM_MEAN) > 0.01 for m in means)
