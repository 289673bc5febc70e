"""expert_distill: the objective against a hand computation, zero loss and gradient at the
expert, the cache of the experts' predictions (reused, invalidated), and a short fit."""
from __future__ import annotations

import json
import math
import shutil

import torch
import torch.nn.functional as F

from adamerge.train import expert_targets
from adamerge.cli import main
from adamerge.config import build_all, load_config
from adamerge.train.objectives import expert_distill
from helpers import write_config


def test_expert_distill_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    T = 2.0
    hand = 0.0
    for i in range(6):
        q = [math.exp(v / T) for v in t[i].tolist()]
        p = [math.exp(v / T) for v in z[i].tolist()]
        q = [v / sum(q) for v in q]
        p = [v / sum(p) for v in p]
        hand += sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    assert abs(float(expert_distill(z, targets=t, temperature=T)) - T * T * hand / 6) < 1e-5
    assert torch.allclose(expert_distill(z, targets=t, hard=True), F.cross_entropy(z, t.argmax(-1)))
    # the confidence filter keeps only confident expert samples
    conf = F.softmax(t, -1).amax(-1)
    keep = conf >= conf.median()
    assert torch.allclose(expert_distill(z, targets=t, confidence=float(conf.median())), expert_distill(z[keep], targets=t[keep]))
    assert float(expert_distill(z, targets=t, confidence=1.0)) == 0.0  # nothing kept: zero, not NaN


def test_zero_loss_and_zero_gradient_at_the_expert():
    t = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    z = t.clone().requires_grad_()
    loss = expert_distill(z, targets=t, temperature=1.5)
    (grad,) = torch.autograd.grad(loss, z)
    assert abs(float(loss.detach())) < 1e-6 and float(grad.abs().max()) < 1e-6


def test_expert_logits_equal_the_expert_and_are_cached(tiny_zoo_dir, tmp_path, monkeypatch):
    from adamerge.io.state_dicts import load_state_dict
    from adamerge.zoo.tiny import tiny_vit

    zoo = tmp_path / "zoo"
    shutil.copytree(tiny_zoo_dir, zoo)
    cfg = load_config(write_config(tmp_path, zoo))
    parts = build_all(cfg)
    calls = []
    real = expert_targets.compute_expert_logits
    monkeypatch.setattr(expert_targets, "compute_expert_logits", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    cache = tmp_path / "cache"
    logits = expert_targets.expert_logits(parts["model"], parts["tv"], parts["heads"], parts["streams"], cache)
    assert sorted(calls) == sorted(parts["tasks"])
    # the one-hot merged model is the expert itself
    expert = tiny_vit()
    expert.load_state_dict(load_state_dict(zoo / "experts" / "task1.safetensors"))
    expert.eval()
    s = parts["streams"][1]
    with torch.no_grad():
        direct = parts["heads"]["task1"](expert(s.inputs(torch.arange(len(s)))))
    assert torch.allclose(logits["task1"], direct, atol=1e-5)
    # a second call computes nothing
    calls.clear()
    again = expert_targets.expert_logits(parts["model"], parts["tv"], parts["heads"], parts["streams"], cache)
    assert calls == [] and all(torch.equal(again[t], logits[t]) for t in logits)
    # a changed expert file invalidates its entry only
    from adamerge.io.files import atomic_save_safetensors

    sd = load_state_dict(zoo / "experts" / "task2.safetensors")
    sd = {k: v * 1.01 if v.is_floating_point() else v for k, v in sd.items()}
    atomic_save_safetensors(sd, zoo / "experts" / "task2.safetensors")
    parts = build_all(cfg)
    expert_targets.expert_logits(parts["model"], parts["tv"], parts["heads"], parts["streams"], cache)
    assert calls == ["task2"]


def test_a_short_fit_lowers_the_divergence_and_raises_accuracy(tiny_zoo_dir, tmp_path, monkeypatch):
    cfg = write_config(tmp_path, tiny_zoo_dir, **{
        "options.objective": "expert_distill", "options.steps": 60, "options.lr": 0.02, "checkpoint_every": 20,
    })
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    from adamerge.train.runs import read_metrics

    rows = [r for r in read_metrics(run) if "loss" in r]
    assert sum(r["loss"] for r in rows[-5:]) < 0.7 * sum(r["loss"] for r in rows[:5])
    results = json.loads((run / "results.json").read_text())
    assert results["after"]["mean"] > results["before"]["mean"]
    assert results["uses_labels"] is False and list((run / "cache").glob("expert_logits-*.safetensors"))
    # a resume reads the cached predictions: no expert forward
    monkeypatch.setattr(expert_targets, "compute_expert_logits", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    cut = write_config(tmp_path / "cut", tiny_zoo_dir, **{
        "options.objective": "expert_distill", "options.steps": 60, "options.lr": 0.02, "checkpoint_every": 20,
        "cache_dir": str(run / "cache"),
    })
    from helpers import crash_then_resume

    crash_then_resume(cut, 27, monkeypatch)
    from safetensors.torch import load_file

    a = load_file(str(run / "coefficients.safetensors"))["coefficients"]
    b = load_file(str(tmp_path / "cut" / "run" / "coefficients.safetensors"))["coefficients"]
    assert torch.equal(a, b)


def test_cache_key_handles_batchnorm_scalars(make_zoo):
    """A BatchNorm model holds 0-dim buffers (num_batches_tracked): the digest must read them."""
    from adamerge.train.data import LinearHead, stream_from_tensors
    from adamerge.core.task_vectors import TaskVectors

    model, base, experts = make_zoo("cnn", 2)
    tv = TaskVectors.from_state_dicts(base, experts)
    assert any(v.dim() == 0 for v in base.values())
    head = LinearHead(torch.randn(3, 8))
    stream = stream_from_tensors("t0", torch.randn(4, 3, 32, 32))
    a = expert_targets.cache_key(tv, "t0", head, stream)
    assert a == expert_targets.cache_key(tv, "t0", head, stream) != expert_targets.cache_key(tv, None, head, stream)
