"""Concrete masks: the mask maths, what trains, a short run, sparsity, exact resume in each stage."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adamerge.cli import main
from adamerge.core.masks import ConcreteMasks, mask_values, rescale
from adamerge.core.merged import MergedModel
from adamerge.methods import create_method
from adamerge.train.runs import read_metrics
from adamerge.core.task_vectors import TaskVectors
from helpers import crash_then_resume, write_config


def test_masks_at_low_temperature_are_binary_and_rescaled_to_mean_one():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    cold = mask_values(logits, "sample", 1e-4, torch.Generator().manual_seed(1))
    assert bool(((cold < 1e-3) | (cold > 1 - 1e-3)).all())
    warm = mask_values(logits, "sample", 5.0, torch.Generator().manual_seed(1))
    assert bool(((warm > 0.05) & (warm < 0.95)).any())
    assert torch.equal(mask_values(logits, "hard", 0.5), (logits > 0).float())
    assert torch.allclose(mask_values(logits, "expectation", 0.5), torch.sigmoid(logits))
    assert abs(float(rescale(cold, per_task=False).mean()) - 1) < 1e-5
    per_task = rescale(torch.rand(3, 4, 5), per_task=True)
    assert torch.allclose(per_task.reshape(3, -1).mean(1), torch.ones(3), atol=1e-6)


def test_masked_merge_equals_the_hand_computation_and_only_masks_train(make_zoo, inputs):
    model, base, experts = make_zoo("vit", 2)
    tv = TaskVectors.from_state_dicts(base, experts, dtype=torch.float64)
    mm = MergedModel(model.double(), tv, "task", init=0.3, clamp=None).double()
    mm.coefficients.requires_grad_(False)
    shapes = {k: base[k].shape for k in mm.merge_keys}
    masks = ConcreteMasks(shapes, 2, per_task=True, seed=3)
    gen = torch.Generator().manual_seed(4)  # not the global generator: the same logits in any test order
    with torch.no_grad():
        for p in masks.logits:
            p.copy_(torch.randn(p.shape, generator=gen))
    mm.add_masks(masks.double())
    frozen = masks.freeze(mode="sample")
    merged = mm.merged_parameters()
    # the coefficients are float32 (a float32 base) cast to float64: 0.3 as float32, not 0.3
    lam = mm.applied_coefficients().detach()[:, 0]
    assert lam.dtype == torch.float64 and torch.all(lam == torch.tensor(0.3, dtype=torch.float32).double())
    for key in mm.merge_keys[:6]:
        taus = torch.stack([experts[t][key].double() - base[key].double() for t in experts])
        hand = base[key].double() + (lam[:, None] * (taus * frozen[key].double()).flatten(1)).sum(0).view(base[key].shape)
        assert torch.allclose(merged[key], hand, atol=1e-10), key
    # gradients reach the mask logits and nothing else
    masks.unfreeze()
    mm.train()
    out = mm(inputs("vit", 2, dtype=torch.float64)).sum()
    out.backward()
    assert mm.coefficients.grad is None
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in masks.logits)


def test_concrete_ta_lowers_its_objective_and_trains_only_the_mask(tiny_zoo_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_zoo_dir, method="concrete_ta", options={"steps": 40, "lr": 0.05})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert sum(r["loss"] for r in rows[-8:]) < sum(r["loss"] for r in rows[:8])
    coef = load_file(str(run / "coefficients.safetensors"))["coefficients"]
    assert torch.allclose(coef, torch.full_like(coef, 0.3))  # λ never moved
    state = load_file(str(run / "method_state.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in state.values())  # compact: bf16 logits and mask
    results = json.loads((run / "results.json").read_text())
    assert 0 < results["mask"]["expected_density"] < 1 and results["mask"]["eval_mode"] == "sample"


def test_sparsity_target_lowers_the_density(tiny_zoo_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_zoo_dir, method="concrete_ta", options={
        "steps": 30, "lr": 0.1, "method_args": {"sparsity": 0.2, "sparsity_weight": 50.0, "eval_mode": "hard"},
    })
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["mask"]["expected_density"] < 0.4
    assert 0 <= results["mask"]["kept_fraction"] < 0.5
    densities = [r["mask_density"] for r in read_metrics(tmp_path / "run") if "mask_density" in r]
    assert len(densities) == 30 and densities[-1] < densities[0]  # logged every step, falling
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    meta = json.loads((out / "adamerge.json").read_text())
    assert meta["mask"]["expected_density"] == results["mask"]["expected_density"] and meta["mask"]["eval_mode"] == "hard"


def test_concrete_adamerging_stages_and_what_each_trains(tiny_zoo_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_zoo_dir, method="concrete_adamerging",
                       options={"steps": 6, "lr": 0.05, "method_args": {"adamerging_steps": 8}})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert [s["name"] for s in results["solvers"]] == ["bilevel", "gradient"] and results["steps"] == 14
    rows = [r for r in read_metrics(run) if "inner_loss" in r]
    assert len(rows) == 6 and all("mask_density" in r for r in rows)
    # the final model: the frozen mask from the first stage and the AdaMerging coefficients
    m = create_method("concrete_adamerging")
    mcfg = m.config({"steps": 6, "method_args": {"adamerging_steps": 8}})
    with pytest.raises(Exception, match="frozen mask"):
        from adamerge.config import build_all, load_config

        parts = build_all(load_config(cfg))
        m.build(parts["model"], parts["tv"], mcfg, state={"unrelated": torch.zeros(1)}, stage=1)


@pytest.mark.parametrize("cut_stage,cut_at", [(0, 7), (1, 6)])
def test_concrete_adamerging_resume_in_either_stage(tiny_zoo_dir, tmp_path, monkeypatch, cut_stage, cut_at):
    options = {"steps": 10, "lr": 0.05, "method_args": {"adamerging_steps": 10}}
    full = write_config(tmp_path / "full", tiny_zoo_dir, method="concrete_adamerging", options=options, checkpoint_every=5)
    assert main(["fit", "--config", str(full), "--no-progress"]) == 0
    cut = write_config(tmp_path / "cut", tiny_zoo_dir, method="concrete_adamerging", options=options, checkpoint_every=5)
    crash_then_resume(cut, cut_at, monkeypatch, solver=["bilevel", "gradient"][cut_stage])
    for name in ("coefficients.safetensors", "method_state.safetensors"):
        a = load_file(str(tmp_path / "full" / "run" / name))
        b = load_file(str(tmp_path / "cut" / "run" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_concrete_adamerging_defaults_to_the_trusted_objective_in_both_stages(tiny_zoo_dir, tmp_path):
    """Issue 23: the default objective is ``trusted_distill`` (the experts where confident, else the
    starting merge) and its targets reach both stages: with ``confidence: 0`` every sample trusts
    its expert, so the fit equals one on ``expert_distill`` to the bit; the papers' entropy is
    one option away and drops the default's options."""
    m = create_method("concrete_adamerging")
    assert m.config().objective == "trusted_distill"
    paper = m.config({"objective": "entropy"})
    assert paper.objective == "entropy" and paper.objective_args == {}
    assert create_method("concrete_ta").config().objective == "infomax"  # concrete_ta keeps the collapse-safe one
    runs = {}
    for name, objective in [("trusted", {"objective": "trusted_distill", "objective_args": {"confidence": 0.0}}),
                            ("expert", {"objective": "expert_distill"})]:
        options = {"steps": 5, "lr": 0.05, "method_args": {"adamerging_steps": 5}, **objective}
        cfg = write_config(tmp_path / name, tiny_zoo_dir, method="concrete_adamerging", options=options)
        assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
        runs[name] = tmp_path / name / "run"
    for file in ("coefficients.safetensors", "method_state.safetensors"):
        a, b = (load_file(str(runs[n] / file)) for n in ("trusted", "expert"))
        if file == "method_state.safetensors":  # trusted_distill also keeps its anchor's logits (for a resume)
            assert {k for k in a if k.startswith("start_logits.")} == {f"start_logits.task{i}" for i in range(3)}
            a = {k: v for k, v in a.items() if not k.startswith("start_logits.")}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    coef = load_file(str(runs["trusted"] / "coefficients.safetensors"))["coefficients"]
    assert not torch.allclose(coef, torch.full_like(coef, 0.3))  # the AdaMerging stage moved λ
    default = write_config(tmp_path / "default", tiny_zoo_dir, method="concrete_adamerging",
                           options={"steps": 3, "lr": 0.05, "method_args": {"adamerging_steps": 3}})
    assert main(["fit", "--config", str(default), "--no-progress"]) == 0
    results = json.loads((tmp_path / "default" / "run" / "results.json").read_text())
    assert results["options"]["objective"] == "trusted_distill"
