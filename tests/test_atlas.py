"""aTLAS: the random element partition, the trusted set, test-time and few-shot runs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adamerge.cli import main
from adamerge.core.granularity import make_grouping
from adamerge.io.files import atomic_save_safetensors
from adamerge.methods.atlas import few_shot_indices, trusted_indices
from adamerge.train.runs import read_metrics
from adamerge.train.loop import MergeModule
from adamerge.zoo.tiny import make_tasks
from helpers import TASKS, crash_then_resume, write_config


def test_atlas_partition_is_seeded_uniform_and_leaves_vectors_whole():
    shapes = {"w": torch.Size([40, 50]), "b": torch.Size([40]), "conv": torch.Size([8, 3, 3, 3])}
    g = make_grouping("partition:4:atlas", shapes, seed=5)
    assert "b" not in g.chunks and g.group_names.count("b") == 1
    assert g.chunks["w"].count == 4 and sum(g.chunks["w"].sizes) == 2000
    assert all(350 < s < 650 for s in g.chunks["w"].sizes)  # uniform, not contiguous or equal
    coef = torch.arange(g.num_groups, dtype=torch.float32)[None]
    labels = g.chunks["w"].expand(coef)[0].reshape(40, 50) - g.chunks["w"].first
    assert not torch.equal(labels[:, :10], labels[:, :10].sort(dim=1).values)  # scattered
    again = make_grouping("partition:4:atlas", shapes, seed=5)
    assert torch.equal(again.chunks["w"].perm, g.chunks["w"].perm)
    assert not torch.equal(make_grouping("partition:4:atlas", shapes, seed=6).chunks["w"].perm, g.chunks["w"].perm)


def test_trusted_set_is_the_most_confident_per_predicted_class():
    logits = torch.tensor([[5.0, 0], [4, 0], [1, 0], [0, 9], [0, 1], [0, 2], [3, 0], [0, 8], [0, 7], [6, 0]])
    idx = trusted_indices(logits, fraction=0.6, cap=100)  # k = floor(10 / 2 * 0.6) = 3 per class
    assert idx.tolist() == sorted([9, 0, 1, 3, 7, 8])
    assert len(trusted_indices(logits, fraction=1.0, cap=2)) == 4
    y = torch.tensor([0, 1, 2] * 10)
    shots = few_shot_indices(y, 2, seed=0, task="a")
    assert len(shots) == 6 and torch.bincount(y[shots]).tolist() == [2, 2, 2]
    assert torch.equal(shots, few_shot_indices(y, 2, seed=0, task="a"))


def test_test_time_atlas_trusted_set_is_fixed_and_resume_is_exact(tiny_zoo_dir, tmp_path, monkeypatch):
    options = {"steps": 16, "lr": 0.05, "granularity": "partition:2:atlas", "objective": "weak_strong",
               "objective_args": {"confidence": 0.5}}
    full = write_config(tmp_path / "full", tiny_zoo_dir, method="atlas", options=options, checkpoint_every=5)
    assert main(["fit", "--config", str(full), "--no-progress"]) == 0
    run = tmp_path / "full" / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["uses_labels"] is False and results["atlas"]["mode"] == "test_time"
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert len(rows) == 16 and all(r["loss"] >= 0 for r in rows)
    state = load_file(str(run / "method_state.safetensors"))
    assert sorted(state) == sorted([f"trusted.{t}" for t in TASKS] + [f"trusted_label.{t}" for t in TASKS])
    # the trusted set is what the teacher's confidence says: by default each task's own expert
    from adamerge.config import build_all, load_config
    from adamerge.train.expert_targets import expert_logits

    parts = build_all(load_config(full))
    logits = expert_logits(parts["model"], parts["tv"], parts["heads"], parts["streams"], tmp_path / "c")
    for t in TASKS:
        assert torch.equal(state[f"trusted.{t}"], trusted_indices(logits[t]))
        # a trusted sample keeps the expert's prediction as its fixed pseudo-label
        assert torch.equal(state[f"trusted_label.{t}"], logits[t][state[f"trusted.{t}"]].argmax(-1))
    cut = write_config(tmp_path / "cut", tiny_zoo_dir, method="atlas", options=options, checkpoint_every=5)
    crash_then_resume(cut, 11, monkeypatch)
    cut_run = tmp_path / "cut" / "run"
    for name in ("coefficients.safetensors", "method_state.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(cut_run / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # every batch holds trusted samples at the configured share
    from adamerge.train.data import StepBatches

    pools = {t: [torch.tensor([i for i in range(len(s)) if i not in set(state[f"trusted.{t}"].tolist())]), state[f"trusted.{t}"]]
             for t, s in zip(TASKS, parts["streams"])}
    batch = StepBatches(parts["streams"], 16, 4, pools=pools, mix=[0.75, 0.25]).draw(2)
    trusted = set(state["trusted.task0"].tolist())
    assert sum(int(i) in trusted for i in batch.index["task0"]) == 4


def _labeled_split(folder, n=200):
    gen = torch.Generator().manual_seed(12345)
    paths = {}
    for task in make_tasks(3, 4, seed=0):
        x, y = task.sample(n, gen)
        paths[task.name] = {"tensors": str(folder / f"{task.name}.safetensors")}
        atomic_save_safetensors({"x": x, "y": y}, folder / f"{task.name}.safetensors")
    return paths


def test_few_shot_atlas_trains_on_the_labeled_split_only(tiny_zoo_dir, tmp_path, monkeypatch):
    labeled = _labeled_split(tmp_path / "labeled")
    cfg = write_config(tmp_path, tiny_zoo_dir, method="atlas", labeled=labeled,
                       options={"steps": 30, "lr": 0.05, "method_args": {"mode": "few_shot", "shots": 4, "penalty": 1e-4}})
    train_x = {t: load_file(labeled[t]["tensors"])["x"] for t in TASKS}
    scored_x = {t: load_file(str(tiny_zoo_dir / "data" / f"{t}.safetensors"))["x"] for t in TASKS}
    seen = []
    original = MergeModule.task_losses

    def spy(self, batch):
        seen.append({n: x.clone() for n, x in batch.inputs.items()})
        return original(self, batch)

    monkeypatch.setattr(MergeModule, "task_losses", spy)
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["uses_labels"] is True and results["options"]["objective"] == "cross_entropy"
    assert results["after"]["mean"] > results["before"]["mean"]
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])  # the cross-entropy falls
    state = load_file(str(tmp_path / "run" / "method_state.safetensors"))
    for t in TASKS:
        idx = state[f"fewshot.{t}"]
        assert len(idx) == 16  # 4 shots × 4 classes
        allowed = train_x[t][idx]
        for batch in seen:
            for x in batch[t]:
                assert (allowed - x).abs().flatten(1).amax(1).min() < 1e-6  # a labeled sample ...
                assert (scored_x[t] - x).abs().flatten(1).amax(1).min() > 1e-3  # ... never a scored one


def test_few_shot_without_a_labeled_split_is_refused(tiny_zoo_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_zoo_dir, method="atlas", options={"method_args": {"mode": "few_shot"}})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 2
    assert "labeled split" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [{"mode": "fewshot"}, {"shots": 0}, {"p": 0.5}, {"crop_min": 0.0}, {"crop_min": 1.5},
                                 {"flip": "no"}])
def test_atlas_options_are_checked(tiny_zoo_dir, tmp_path, capsys, bad):
    cfg = write_config(tmp_path, tiny_zoo_dir, method="atlas", options={"method_args": bad})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 2
    assert "atlas" in capsys.readouterr().err


def test_test_time_atlas_paper_teacher_is_the_pretrained_model(tiny_zoo_dir, tmp_path):
    """``teacher: pretrained`` (the paper's zero-shot teacher) labels the trusted set with the
    pretrained model through each task's head; the default labels it with the task's expert."""
    from adamerge.config import build_all, load_config
    from adamerge.train.expert_targets import expert_logits

    options = {"steps": 2, "lr": 0.05, "init": 0.0, "objective": "weak_strong", "method_args": {"teacher": "pretrained"}}
    cfg = write_config(tmp_path / "p", tiny_zoo_dir, method="atlas", options=options)
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    state = load_file(str(tmp_path / "p" / "run" / "method_state.safetensors"))
    parts = build_all(load_config(cfg))
    pre = expert_logits(parts["model"], parts["tv"], parts["heads"], parts["streams"], tmp_path / "c", pretrained=True)
    exp = expert_logits(parts["model"], parts["tv"], parts["heads"], parts["streams"], tmp_path / "c")
    differs = False
    for t in TASKS:
        assert torch.equal(state[f"trusted.{t}"], trusted_indices(pre[t]))
        assert torch.equal(state[f"trusted_label.{t}"], pre[t][state[f"trusted.{t}"]].argmax(-1))
        differs |= not torch.equal(trusted_indices(pre[t]), trusted_indices(exp[t]))
    assert differs  # the two teachers choose different trusted sets on this zoo


@pytest.mark.parametrize("objective", [None, "weak_strong"])
def test_test_time_atlas_raises_accuracy_over_its_start(tiny_zoo_dir, tmp_path, objective):
    """With its default objective (trusted_distill) and with the paper's (weak_strong, its default
    teacher: the experts), test-time aTLAS ends above where it started (the pretrained model, init
    0) on the tiny zoo; no label is read to train."""
    options = {"steps": 60, "lr": 0.05, "init": 0.0, "batch_size": 32, **({"objective": objective} if objective else {})}
    cfg = write_config(tmp_path / "a", tiny_zoo_dir, method="atlas", options=options)
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "a" / "run" / "results.json").read_text())
    before, after = results["before"], results["after"]
    assert results["uses_labels"] is False
    # (the paper's teacher, the pretrained model, gains 4.4 points here: 64.3 -> 68.8)
    assert after["mean"] > before["mean"] + 0.15, (before, after)


def test_strong_view_without_flip_is_the_same_crop_never_flipped():
    """``flip=False`` draws the same random numbers: the same crops, none of them mirrored."""
    from adamerge.train.data import strong_view

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2 * 3, 1, 8, 8).repeat(1, 3, 1, 1)
    flipped = strong_view(x, torch.Generator().manual_seed(5))
    plain = strong_view(x, torch.Generator().manual_seed(5), flip=False)
    mirrored = [i for i in range(len(x)) if not torch.equal(flipped[i], plain[i])]
    assert mirrored and len(mirrored) < len(x)  # some samples drew a flip, some did not
    for i in range(len(x)):
        assert torch.equal(flipped[i], plain[i].flip(-1) if i in mirrored else plain[i])


@pytest.mark.parametrize("args,expected", [({}, {"scale": (0.8, 1.0), "flip": False}),
                                           ({"flip": True, "crop_min": 0.5}, {"scale": (0.5, 1.0), "flip": True})])
def test_atlas_view_options_reach_the_strong_view(tiny_zoo_dir, tmp_path, monkeypatch, args, expected):
    """method_args crop_min and flip set every strong view the loop makes (by default a crop of
    0.8–1 and no flip; the paper's 0.5–1 and flip one option away)."""
    import adamerge.train.loop as loop

    seen, original = [], loop.strong_view

    def spy(x, generator, **kwargs):
        seen.append(kwargs)
        return original(x, generator, **kwargs)

    monkeypatch.setattr(loop, "strong_view", spy)
    cfg = write_config(tmp_path, tiny_zoo_dir, method="atlas", options={"steps": 3, "objective": "weak_strong", "method_args": args})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    assert seen and all(k == expected for k in seen)


def test_the_strong_view_defaults_depend_on_the_mode():
    """Test time: a crop of 0.8–1, no flip (measured on the demo's development settings); few-shot
    keeps the paper's 0.5–1 and flip; explicit values win."""
    from adamerge.methods.atlas import AtlasOptions

    assert (AtlasOptions().crop_min, AtlasOptions().flip) == (0.8, False)
    assert (AtlasOptions(mode="few_shot").crop_min, AtlasOptions(mode="few_shot").flip) == (0.5, True)
    assert (AtlasOptions(crop_min=0.5, flip=True).crop_min, AtlasOptions(flip=True).flip) == (0.5, True)


def test_weak_strong_options_with_another_objective_are_refused(tiny_zoo_dir, tmp_path, capsys):
    """The trusted set's teacher and the strong view belong to the paper's recipe: given with the
    default objective (trusted_distill) they would do nothing, so the fit is refused up front."""
    from adamerge.methods import create_method

    cfg = write_config(tmp_path, tiny_zoo_dir, method="atlas", options={"steps": 2, "method_args": {"teacher": "pretrained"}})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "weak_strong" in err and "teacher" in err and not (tmp_path / "run" / "results.json").exists()
    atlas = create_method("atlas")
    assert atlas.config({}).objective == "trusted_distill"
    assert atlas.config({"objective": "weak_strong", "method_args": {"teacher": "pretrained"}}).objective == "weak_strong"
    assert atlas.config({"method_args": {"mode": "few_shot", "flip": False}}).objective == "cross_entropy"
