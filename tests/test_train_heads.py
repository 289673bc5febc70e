"""``options.train_heads`` (SyMerge's task-specific layer, issue 24): each task's head trains with
the coefficients; what trains, the gradient against finite differences, the saved and exported
heads reproducing the run, exact resume, the refusals, and old runs staying the same run."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adamerge.cli import main
from adamerge.config import build_all, load_config
from adamerge.core.merged import MergedModel
from adamerge.methods import create_method
from adamerge.methods.base import MethodConfig, same_run
from adamerge.train.data import LinearHead
from helpers import assert_predict_matches_run, crash_then_resume, write_config

OPTIONS = {"granularity": "layer", "steps": 12, "lr": 0.05, "batch_size": 16, "objective": "expert_distill",
           "train_heads": True, "head_lr": 0.01}


def test_options_are_checked_and_default_off():
    cfg = MethodConfig()
    assert cfg.train_heads is False and cfg.head_lr == 1e-3
    assert MethodConfig(train_heads="true").train_heads is True
    with pytest.raises(Exception, match="head_lr"):
        MethodConfig(head_lr=0)
    with pytest.raises(Exception, match="train_heads"):
        MethodConfig(train_heads="yes please")


def test_trainable_copy_leaves_the_given_head_alone():
    head = LinearHead(torch.randn(3, 5), torch.randn(3))
    copy = head.trainable()
    assert {n for n, _ in copy.named_parameters()} == {"weight", "bias"} and not list(head.parameters())
    with torch.no_grad():
        copy.weight.add_(1.0)
    assert not torch.equal(copy.weight, head.weight)
    x = torch.randn(4, 5)
    assert torch.allclose(LinearHead(copy.weight.detach(), copy.bias.detach())(x), copy(x))


@pytest.mark.parametrize("micro_batch", [False, True])
def test_head_gradient_matches_finite_differences(tiny_zoo_dir, tmp_path, micro_batch):
    """float64: the gradient a step gives a trained head (through the module's own step path:
    one batched forward, or each task alone with one backward through the merge) against
    central differences of the same loss; the coefficients get theirs in the same backward."""
    from adamerge.solvers import create_solver
    from adamerge.train.loop import MergeModule

    cfg_path = write_config(tmp_path, tiny_zoo_dir, options={"granularity": "layer", "train_heads": True})
    parts = build_all(load_config(cfg_path))
    model, tv = parts["model"].double(), parts["tv"]
    tv.vectors = {k: v.double() for k, v in tv.vectors.items()}
    tv.base = {k: v.double() for k, v in tv.base.items()}
    heads = {t: LinearHead(h.weight.double(), None if h.bias is None else h.bias.double()) for t, h in parts["heads"].items()}
    mcfg = MethodConfig(granularity="layer", objective="entropy", train_heads=True, micro_batch=micro_batch)
    merged = MergedModel(model, tv, "layer", init=0.3, clamp=None).double()
    module = MergeModule(merged, heads, mcfg, create_solver("gradient", mcfg, {}))

    def entropy64(logits, **_):  # the library's objectives compute in float32; this one in float64
        logp = torch.log_softmax(logits.double(), dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()

    module.objective = entropy64
    batch = {s.name: s.inputs(torch.arange(6)).double() for s in parts["streams"]}
    loss, _ = module.batch_loss(batch)
    loss.backward()
    head = module.heads["task1"]
    grad, bias_grad = head.weight.grad.clone(), head.bias.grad.clone()
    assert merged.coefficients.grad is not None and float(merged.coefficients.grad.abs().sum()) > 0
    assert module.heads["task0"].weight.grad is not None

    def numeric(tensor, idx, eps=1e-6):
        with torch.no_grad():
            tensor[idx] += eps
            up = float(module.batch_loss(batch, check=False)[0])
            tensor[idx] -= 2 * eps
            down = float(module.batch_loss(batch, check=False)[0])
            tensor[idx] += eps
        return (up - down) / (2 * eps)

    for idx in [(0, 0), (1, 3), (2, 7)]:
        assert abs(numeric(head.weight, idx) - float(grad[idx])) < 1e-7, idx
    assert abs(numeric(head.bias, (1,)) - float(bias_grad[1])) < 1e-7


def test_trained_heads_are_saved_scored_exported_and_predicted(tiny_zoo_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_zoo_dir, options=OPTIONS)
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    trained = load_file(str(run / "heads.safetensors"))
    given = {t: load_file(str(tiny_zoo_dir / "heads" / f"{t}.safetensors")) for t in ("task0", "task1", "task2")}
    assert all(not torch.equal(trained[f"{t}.weight"], given[t]["weight"]) for t in given)  # every head moved
    assert results["heads"]["trained"] and all(v > 0 for v in results["heads"]["relative_change"].values())
    coef = load_file(str(run / "coefficients.safetensors"))["coefficients"]
    assert not torch.allclose(coef, torch.full_like(coef, 0.3))  # and the coefficients with them
    # the run is rescored with its trained heads, the export carries them, predict reproduces the run
    from adamerge.workflows.export import load_run

    _, parts, _ = load_run(run)
    assert all(torch.equal(parts["heads"][t].weight, trained[f"{t}.weight"]) for t in given)
    ev = tmp_path / "eval.json"
    assert main(["eval", "--run", str(run), "--out", str(ev)]) == 0
    assert json.loads(ev.read_text())["methods"]["run:run"] == results["after"]
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    exported = load_file(str(out / "heads.safetensors"))
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert_predict_matches_run(run, out, tmp_path)


def test_frozen_by_default_no_heads_file(tiny_zoo_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_zoo_dir, options={**OPTIONS, "train_heads": False, "steps": 4})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    assert not (tmp_path / "run" / "heads.safetensors").exists()
    assert "heads" not in json.loads((tmp_path / "run" / "results.json").read_text())


def test_resume_gives_the_uninterrupted_heads(tiny_zoo_dir, tmp_path, monkeypatch):
    full = write_config(tmp_path / "full", tiny_zoo_dir, options=OPTIONS, checkpoint_every=5)
    assert main(["fit", "--config", str(full), "--no-progress"]) == 0
    cut = write_config(tmp_path / "cut", tiny_zoo_dir, options=OPTIONS, checkpoint_every=5)
    crash_then_resume(cut, 7, monkeypatch)
    for name in ("coefficients.safetensors", "heads.safetensors"):
        a = load_file(str(tmp_path / "full" / "run" / name))
        b = load_file(str(tmp_path / "cut" / "run" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("changes,words", [
    ({"method": "concrete_adamerging"}, "solver 'bilevel'"),
    ({"options.solver": "pgd"}, "solver 'pgd'"),
    ({"method": "t3", "options.granularity": "task"}, "own loop"),
    ({"trainer.devices": 2, "trainer.strategy": "ddp"}, "one process"),
])
def test_refusals_write_nothing(tiny_zoo_dir, tmp_path, capsys, changes, words):
    cfg = write_config(tmp_path, tiny_zoo_dir, **{"options.train_heads": True, **changes})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train_heads" in err and words in err, err
    assert not (tmp_path / "run").exists()


def test_runs_recorded_before_the_option_are_the_same_run():
    m = create_method("adamerging")
    now = json.loads(json.dumps(m.settings(m.config({"lr": 0.01})), default=str))
    before = json.loads(json.dumps(now))
    for key in ("train_heads", "head_lr"):
        del before["config"][key]
    assert same_run(before, now)
    trained = json.loads(json.dumps(m.settings(m.config({"lr": 0.01, "train_heads": True})), default=str))
    assert not same_run(before, trained)


def test_a_cosine_schedule_scales_the_heads_group_too(tiny_zoo_dir, tmp_path):
    """With ``solver_args.schedule: cosine`` both groups follow the schedule and keep their ratio
    head_lr / lr (read from the last checkpoint's optimizer state)."""
    options = {**OPTIONS, "steps": 10, "solver_args": {"schedule": "cosine"}}
    cfg = write_config(tmp_path, tiny_zoo_dir, options=options, checkpoint_every=10)
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g.get("name") for g in groups] == [None, "heads"]
    assert groups[0]["lr"] < OPTIONS["lr"]  # annealed
    assert abs(groups[1]["lr"] / groups[0]["lr"] - OPTIONS["head_lr"] / OPTIONS["lr"]) < 1e-9
