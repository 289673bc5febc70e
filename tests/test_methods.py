"""The shared method matrix (every registered method, on the tiny zoo) and DOGE end to end.

Each registered method needs a row in CASES (short options): a new method without one fails
``test_every_method_has_a_case``. The contract: ``fit`` writes a finished run, the exported
checkpoint reproduces the functional merged model, ``adamerge predict`` on the export scores every
task as the run did, and ``eval --run`` reads it back.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adamerge.cli import main
from adamerge.io.state_dicts import load_state_dict
from adamerge.methods import create_method, list_methods
from adamerge.solvers import doge_ops
from helpers import assert_export_reproduces, assert_predict_matches_run, write_config

CASES: dict[str, dict] = {
    "adamerging": {"steps": 6},
    "adamerging++": {"steps": 6},
    "doge": {"steps": 15},
    "doge_adamerging": {"steps": 6, "prepare_args": {"steps_per_layer": 10}},
    "concrete_ta": {"steps": 6},
    "atlas": {"steps": 6, "granularity": "partition:2:atlas"},
    "concrete_adamerging": {"steps": 4, "method_args": {"adamerging_steps": 4}},
    "t3": {"method_args": {"batch_size": 64}},
    "fw_merging": {"method_args": {"iterations": 2}, "batch_size": 16},
}


def test_every_method_has_a_case():
    assert sorted(CASES) == list_methods()


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_contract(tiny_zoo_dir, tmp_path, method):
    cfg = write_config(tmp_path, tiny_zoo_dir, method=method, options={"lr": 0.01, **CASES[method]})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["method"] == method
    assert [s["name"] for s in results["solvers"]] == [n for n, _, _ in create_method(method).solvers(create_method(method).config(CASES[method]))]
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    if not create_method(method).own_loop:  # T3's export is a package, FW-Merging's weights come from its pool
        assert_export_reproduces(run, out)
    assert_predict_matches_run(run, out, tmp_path)
    meta = json.loads((out / "adamerge.json").read_text())
    assert meta["method"] == method and meta["solvers"] == results["solvers"]
    assert main(["eval", "--run", str(run)]) == 0


def _hand_doge(base, experts, tasks, state, trim, per_task, params, c=0.07, lam_mean=None, cap=None, others=0.0):
    """θ0 + Σ_t λ_t,l · ((τ_t + δ) ⊙ M_t) on weight matrices, θ0 + others · Σ_t τ_t on the other
    parameters (float64). λ_t,l = min(c_l / ‖τ_t,l‖, cap) with c_l = c, or with ``lam_mean`` the
    c_l for which the tasks' c_l / ‖τ_t,l‖ average ``lam_mean``."""
    taus = {k: torch.stack([experts[t][k].double() - base[k].double() for t in tasks]) for k in base}
    keys = [k for k in base if k.endswith("weight") and base[k].dim() >= 2 and f"delta.{k}" in state]
    out = {k: base[k].double().clone() for k in base}
    for k in params:
        if k not in keys:
            out[k] += others * taus[k].sum(0)
    for t in range(len(tasks)):
        flat = torch.cat([taus[k][t].abs().reshape(-1) for k in keys])
        thr = flat.kthvalue(flat.numel() - int(trim * flat.numel())).values
        for k in keys:
            tau = taus[k][t]
            delta = state[f"delta.{k}"].double()
            delta = delta[t] if per_task else delta
            norms = [float(taus[k][i].norm()) for i in range(len(tasks))]
            c_l = c if lam_mean is None else lam_mean * len(tasks) / sum(1.0 / n for n in norms)
            lam = c_l / norms[t]
            lam = lam if cap is None else min(lam, cap)
            out[k] += lam * (tau + delta) * (tau.abs() > thr)
    return out


PORT = {"lam_mean": None, "others": 0.0, "cap": None}  # the FusionBench port's reading of DOGE


@pytest.mark.parametrize("reading", ["default", "port"])
def test_doge_merge_equals_the_hand_computation_and_its_loss_falls(tiny_zoo_dir, tmp_path, reading):
    """The default (λ averaging 0.3 per matrix, capped at 1; the other parameters at task
    arithmetic's 0.3) and the port's reading (c = 0.07, the others at θ0), each against the hand merge."""
    from adamerge.workflows.export import load_run

    args = {"lr": 1e-3, **(PORT if reading == "port" else {})}
    cfg = write_config(tmp_path, tiny_zoo_dir, method="doge", options={"steps": 40, "solver_args": args})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    doge = results["solvers"][0]
    assert doge["name"] == "doge" and doge["loss_last"] < doge["loss_first"]
    state = load_file(str(run / "method_state.safetensors"))
    assert state and all(k.startswith("delta.") for k in state)
    merged, parts, config = load_run(run)
    base = load_state_dict(config["base"])
    experts = {t: load_state_dict(p) for t, p in config["experts"].items()}
    params = [n for n, _ in parts["model"].named_parameters()]
    rule = {} if reading == "port" else {"lam_mean": 0.3, "cap": 1.0, "others": 0.3}
    hand = _hand_doge(base, experts, list(experts), state, 0.3, False, params, **rule)
    got = merged.merged_state_dict()
    for k, v in hand.items():
        if v.is_floating_point():
            assert torch.allclose(got[k].double(), v, atol=1e-6), k


def test_doge_resumes_after_an_interruption_between_layers(tiny_zoo_dir, tmp_path, monkeypatch):
    options = {"steps": 10}
    full = write_config(tmp_path / "full", tiny_zoo_dir, method="doge", options=options)
    assert main(["fit", "--config", str(full), "--no-progress"]) == 0
    cut = write_config(tmp_path / "cut", tiny_zoo_dir, method="doge", options=options)
    original, calls = doge_ops.solve_layer, {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(doge_ops, "solve_layer", crash)
    assert main(["fit", "--config", str(cut), "--no-progress"]) == 130
    partial = tmp_path / "cut" / "run" / "checkpoints" / "doge.partial.safetensors"
    assert partial.is_file() and not (tmp_path / "cut" / "run" / "results.json").exists()
    calls["n"] = -10**9  # no more crashes; count the layers solved after the resume
    assert main(["fit", "--config", str(cut), "--resume", "--no-progress"]) == 0
    solved_after = calls["n"] + 10**9
    n_layers = len(load_file(str(tmp_path / "full" / "run" / "method_state.safetensors")))
    assert 0 < solved_after < n_layers  # the finished layers were not solved again
    a = load_file(str(tmp_path / "full" / "run" / "coefficients.safetensors"))["coefficients"]
    b = load_file(str(tmp_path / "cut" / "run" / "coefficients.safetensors"))["coefficients"]
    assert torch.equal(a, b)
    sa = load_file(str(tmp_path / "full" / "run" / "method_state.safetensors"))
    sb = load_file(str(tmp_path / "cut" / "run" / "method_state.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("keep", ["orthogonal", "subspace"])
def test_doge_both_readings_of_the_projection_run(tiny_zoo_dir, tmp_path, keep):
    cfg = write_config(tmp_path, tiny_zoo_dir, method="doge", options={"steps": 10, "solver_args": {"keep": keep, "project": "update"}})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["solvers"][0]["args"]["keep"] == keep


def test_doge_rejects_other_granularities(tiny_zoo_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_zoo_dir, method="doge", options={"granularity": "task"})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 2
    assert "granularity must be 'layer'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
