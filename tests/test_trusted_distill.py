"""trusted_distill: the objective against a hand computation, a bad (unsure) expert losing its
weight to the anchor, the anchor being the fit's own starting merge, labels never read, and the
expert cache and resume guarantees."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from adamerge.cli import main
from adamerge.errors import InputError
from adamerge.train import expert_targets
from adamerge.train.objectives import averages_over_samples, expert_distill, needs_start, trusted_distill
from helpers import crash_then_resume, write_config


def _kl(q_logits: list[float], p_logits: list[float], T: float) -> float:
    q = [math.exp(v / T) for v in q_logits]
    p = [math.exp(v / T) for v in p_logits]
    q = [v / sum(q) for v in q]
    p = [v / sum(p) for v in p]
    return sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))


def test_trusted_distill_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, generator=gen)
    expert = torch.randn(8, 4, generator=gen) * 3
    start = torch.randn(8, 4, generator=gen)
    targets = torch.stack([expert, start], dim=1)
    for conf, T in ((0.9, 1.0), (0.6, 2.0), (0.0, 1.0), (1.0, 0.5)):
        hand = 0.0
        for i in range(8):
            sure = max(torch.softmax(expert[i], -1).tolist()) >= conf
            hand += _kl((expert if sure else start)[i].tolist(), z[i].tolist(), T)
        got = float(trusted_distill(z, targets=targets, confidence=conf, temperature=T))
        assert abs(got - T * T * hand / 8) < 1e-5, (conf, T)
    # confidence 0 trusts every expert: expert_distill; an impossible confidence: the anchor alone
    assert torch.allclose(trusted_distill(z, targets=targets, confidence=0.0), expert_distill(z, targets=expert))
    assert torch.allclose(trusted_distill(z, targets=targets, confidence=1.0), expert_distill(z, targets=start))
    # hard: cross-entropy against the chosen target's argmax
    sure = torch.softmax(expert, -1).amax(-1) >= 0.9
    chosen = torch.where(sure, expert.argmax(-1), start.argmax(-1))
    assert torch.allclose(trusted_distill(z, targets=targets, hard=True), F.cross_entropy(z, chosen))
    assert needs_start("trusted_distill") and not needs_start("expert_distill")
    assert averages_over_samples("trusted_distill")  # micro-batch chunks give the same step


def test_the_unsure_targets_match_a_hand_computation():
    """``unsure``: where the expert is unsure, the start (default), the expert all the same, the mean
    of the two distributions, or the expert only where the start predicts its class (the others
    count as zero in the mean over all samples)."""
    gen = torch.Generator().manual_seed(1)
    n, c = 12, 4
    z = torch.randn(n, c, generator=gen, dtype=torch.float64)
    expert = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    expert[:4, 0] += 8.0  # four sure samples
    start = torch.randn(n, c, generator=gen, dtype=torch.float64)
    start[4:8] = expert[4:8] + 0.3 * torch.randn(4, c, generator=gen, dtype=torch.float64)  # agree with the unsure expert
    targets = torch.stack([expert, start], dim=1)
    sure = [max(torch.softmax(expert[i], -1).tolist()) >= 0.9 for i in range(n)]
    agree = [int(expert[i].argmax()) == int(start[i].argmax()) for i in range(n)]
    assert 4 <= sum(sure) < n - 2 and sum(agree) > 4 and not all(agree)

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    for unsure in ("start", "expert", "mean", "agree"):
        hand = 0.0
        for i in range(n):
            if sure[i] or unsure == "expert":
                hand += _kl(expert[i].tolist(), z[i].tolist(), 1.0)
            elif unsure == "start":
                hand += _kl(start[i].tolist(), z[i].tolist(), 1.0)
            elif unsure == "mean":
                q = [(a + b) / 2 for a, b in zip(softmax(expert[i].tolist()), softmax(start[i].tolist()))]
                hand += _kl([math.log(v) for v in q], z[i].tolist(), 1.0)
            elif agree[i]:
                hand += _kl(expert[i].tolist(), z[i].tolist(), 1.0)
        got = float(trusted_distill(z, targets=targets, unsure=unsure))
        assert abs(got - hand / n) < 1e-5, unsure  # the objective computes in float32
        # a mean over independent samples: two chunks weighted by their share give the whole batch's
        halves = sum(float(trusted_distill(z[k], targets=targets[k], unsure=unsure)) * len(k) / n
                     for k in (torch.arange(0, 5), torch.arange(5, n)))
        assert abs(halves - got) < 1e-5, unsure
    assert torch.allclose(trusted_distill(z, targets=targets, unsure="expert"), expert_distill(z, targets=expert))
    # no sure sample and no agreement: no target, a zero loss with a zero gradient
    zz = z.clone().requires_grad_(True)
    lonely = torch.stack([torch.zeros(n, c, dtype=torch.float64), -F.one_hot(expert.argmax(-1), c).double() * 5 + 1], 1)
    lonely[:, 0] += F.one_hot(expert.argmax(-1), c).double() * 0.1
    loss = trusted_distill(zz, targets=lonely, unsure="agree")
    assert float(loss) == 0.0 and float(torch.autograd.grad(loss, zz)[0].abs().sum()) == 0.0
    with pytest.raises(InputError, match="unsure"):
        trusted_distill(z, targets=targets, unsure="median")


def test_a_weak_unsure_expert_weighs_less_than_a_good_one_under_every_fallback():
    """The issue's toy case: a good expert (sure, right) and a bad one (unsure, wrong) over the same
    samples, the start right but unsure. For every ``unsure`` choice but ``expert``, the bad expert
    pulls the merge towards its wrong classes less than the good one pulls towards the right ones."""
    n, c = 16, 3
    truth = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(4))
    wrong = (truth + 1) % c
    good = 8.0 * F.one_hot(truth, c).float()
    bad = 0.6 * F.one_hot(wrong, c).float()  # max probability about 0.48: unsure
    start = 1.0 * F.one_hot(truth, c).float()
    for unsure in ("start", "mean", "agree"):
        z = torch.zeros(n, c, requires_grad=True)
        g_good, = torch.autograd.grad(trusted_distill(z, targets=torch.stack([good, start], 1), unsure=unsure), z)
        z = torch.zeros(n, c, requires_grad=True)
        g_bad, = torch.autograd.grad(trusted_distill(z, targets=torch.stack([bad, start], 1), unsure=unsure), z)
        pull_good = float(-g_good.gather(1, truth[:, None]).sum())  # descent raises the expert's class
        pull_bad = float(-g_bad.gather(1, wrong[:, None]).sum())
        assert pull_good > 0 and pull_bad < 0.5 * pull_good, unsure


def test_trusted_distill_refuses_targets_without_the_anchor():
    z = torch.randn(3, 4)
    with pytest.raises(InputError, match=r"\[N, 2, C\]"):
        trusted_distill(z, targets=torch.randn(3, 4))
    with pytest.raises(InputError, match="confidence"):
        trusted_distill(z, targets=torch.randn(3, 2, 4), confidence=1.5)


def test_an_unsure_expert_gets_less_weight_than_a_sure_one():
    """Two experts that predict the same (wrong for the bad one) classes: the sure one is copied,
    the unsure one is replaced by the anchor, so its mistakes do not pull the merge."""
    n, c = 16, 3
    start = torch.zeros(n, c)
    start[:, 0] = 2.0  # the start predicts class 0 everywhere
    guess = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(3))
    sure = 8.0 * F.one_hot(guess, c).float()  # max probability > 0.99
    unsure = 0.5 * F.one_hot(guess, c).float()  # max probability 0.45
    z = torch.zeros(n, c, requires_grad=True)
    g_sure, = torch.autograd.grad(trusted_distill(z, targets=torch.stack([sure, start], 1)), z)
    g_unsure, = torch.autograd.grad(trusted_distill(z, targets=torch.stack([unsure, start], 1)), z)
    g_anchor, = torch.autograd.grad(expert_distill(z, targets=start), z)
    # the unsure expert's guesses have no weight at all: the gradient is the anchor's
    assert torch.allclose(g_unsure, g_anchor)
    # the sure expert's: descending raises the guessed class's logit on every sample
    assert bool((-g_sure.gather(1, guess[:, None]) > 0).all())
    assert float((g_sure - g_anchor).abs().max()) > 0.5 * float(g_anchor.abs().max())


def _fit(folder, zoo, steps=30, **changes):
    cfg = write_config(folder, zoo, **{"options.objective": "trusted_distill", "options.steps": steps,
                                       "options.lr": 0.02, "checkpoint_every": 10, **changes})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    return cfg, folder / "run"


def _hand_start(zoo):
    """Task arithmetic λ = 0.3 (AdaMerging's init) over the tiny zoo's three experts, built by hand,
    and the experts' state dicts."""
    from safetensors.torch import load_file

    from adamerge.zoo.tiny import tiny_vit

    base = load_file(str(zoo / "base.safetensors"))
    experts = [load_file(str(zoo / "experts" / f"task{i}.safetensors")) for i in range(3)]
    ta = tiny_vit()
    ta.load_state_dict({k: base[k] + 0.3 * sum(e[k] - base[k] for e in experts) if base[k].is_floating_point() else base[k]
                        for k in base})
    return ta.eval(), experts


def test_the_anchor_is_the_fits_own_start_and_a_short_fit_helps(tiny_zoo_dir, tmp_path, monkeypatch):
    from adamerge.config import build_all, load_config
    from adamerge.methods import create_method

    seen = {}
    real = expert_targets.merged_logits

    def spy(merged, heads, streams, **kw):
        out = real(merged, heads, streams, **kw)
        seen.update(out)
        return out

    monkeypatch.setattr(expert_targets, "merged_logits", spy)
    cfg, run = _fit(tmp_path, tiny_zoo_dir, steps=40)
    results = json.loads((run / "results.json").read_text())
    assert results["uses_labels"] is False and results["after"]["mean"] >= results["before"]["mean"]
    # the anchor = task arithmetic at the method's init (AdaMerging's 0.3), computed by hand
    parts = build_all(load_config(cfg))
    ta, _ = _hand_start(tiny_zoo_dir)
    for s in parts["streams"]:
        with torch.no_grad():
            want = parts["heads"][s.name](ta(s.inputs(torch.arange(len(s)))))
        assert torch.allclose(seen[s.name], want, atol=1e-4), s.name
    assert create_method("adamerging").uses_labels_with(create_method("adamerging").config({"objective": "trusted_distill"})) is False


ARGS = [{"unsure": "start"}, {"unsure": "mean"}, {"unsure": "agree"}, {"unsure": "mean", "start_views": 9}]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_garbage_labels_leave_the_fit_unchanged(tiny_zoo_dir, tmp_path, args):
    """The scored streams' labels only score: replaced by garbage, the coefficients are the same
    (whatever the target where the expert is unsure)."""
    from safetensors.torch import load_file, save_file

    zoo = tmp_path / "garbage_zoo"
    shutil.copytree(tiny_zoo_dir, zoo)
    for f in (zoo / "data").glob("*.safetensors"):
        d = load_file(str(f))
        d["y"] = torch.randint(0, 1000, d["y"].shape, generator=torch.Generator().manual_seed(9)) % (int(d["y"].max()) + 1)
        save_file(d, str(f))
    _, a = _fit(tmp_path / "clean", tiny_zoo_dir, steps=12, **{"options.objective_args": args})
    _, b = _fit(tmp_path / "garbage", zoo, steps=12, **{"options.objective_args": args})
    ca = load_file(str(a / "coefficients.safetensors"))["coefficients"]
    cb = load_file(str(b / "coefficients.safetensors"))["coefficients"]
    assert torch.equal(ca, cb)
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert ra["after"]["mean"] != rb["after"]["mean"] or ra["before"]["mean"] != rb["before"]["mean"]  # labels did score


@pytest.mark.parametrize("args", ARGS, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_cached_experts_and_a_resume_give_the_same_coefficients(tiny_zoo_dir, tmp_path, monkeypatch, args):
    from safetensors.torch import load_file

    _, run = _fit(tmp_path / "full", tiny_zoo_dir, steps=30, **{"options.objective_args": args})
    assert list((run / "cache").glob("expert_logits-*.safetensors"))
    # the resumed run reads the experts from the cache: no expert forward; the anchor is recomputed
    monkeypatch.setattr(expert_targets, "compute_expert_logits",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    cut = write_config(tmp_path / "cut", tiny_zoo_dir, **{
        "options.objective": "trusted_distill", "options.steps": 30, "options.lr": 0.02, "checkpoint_every": 10,
        "options.objective_args": args, "cache_dir": str(run / "cache")})
    crash_then_resume(cut, 17, monkeypatch)
    a = load_file(str(run / "coefficients.safetensors"))["coefficients"]
    b = load_file(str(tmp_path / "cut" / "run" / "coefficients.safetensors"))["coefficients"]
    assert torch.equal(a, b)


def _hand_shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``x`` moved by (dx, dy) pixels by indexing: pixel (i, j) of the view is pixel
    (i + dy, j + dx) of the image, clamped to its border."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h) + dy).clamp(0, h - 1)
    cols = (torch.arange(w) + dx).clamp(0, w - 1)
    return x[..., rows[:, None], cols[None, :]]


def test_shifted_views_match_a_hand_computation():
    x = torch.randn(3, 2, 16, 12, generator=torch.Generator().manual_seed(4))
    views = expert_targets.shifted_views(x, 9)
    assert len(views) == 9 and torch.equal(views[0], x)
    step = expert_targets.view_shift(16)
    assert step == 2 and expert_targets.view_shift(224) == 7
    for v, (dx, dy) in zip(views, expert_targets.SHIFTS):
        assert v.shape == x.shape and torch.equal(v, _hand_shift(x, dx * step, dy * step)), (dx, dy)
    assert expert_targets.shifted_views(x, 1) == [x]
    with pytest.raises(InputError, match="views must be in"):
        expert_targets.shifted_views(x, 10)
    with pytest.raises(InputError, match=r"image batches \[B, C, H, W\]"):
        expert_targets.shifted_views(torch.randint(0, 9, (3, 7)), 3)  # token ids: no images to shift


def test_stream_logits_over_views_is_the_log_of_the_mean_distribution():
    from adamerge.train.data import stream_from_tensors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(6)).eval()
    head = torch.nn.Linear(6, 3)
    x = torch.randn(5, 1, 10, 10)
    model(x)  # materialise the lazy layer
    stream = stream_from_tensors("t", x)
    got = expert_targets.stream_logits(model, head, stream, batch_size=2, views=5)
    with torch.no_grad():
        probs = [torch.softmax(head(model(_hand_shift(x, 2 * dx, 2 * dy))), -1) for dx, dy in expert_targets.SHIFTS[:5]]
    assert torch.allclose(got, torch.log(torch.stack(probs).mean(0)), atol=1e-6)
    assert torch.allclose(expert_targets.stream_logits(model, head, stream, views=1), head(model(x)).detach(), atol=1e-6)


def test_the_anchor_over_shifted_views_is_the_start_averaged_by_hand(tiny_zoo_dir, tmp_path, monkeypatch):
    """``start_views: 5``: the anchor is task arithmetic λ = 0.3's distribution averaged over five
    shifted copies of each image (computed here by indexing), the expert's stays single-view."""
    from adamerge.config import build_all, load_config
    from adamerge.zoo.tiny import tiny_vit

    seen, experts_seen = {}, {}
    real, real_expert = expert_targets.merged_logits, expert_targets.expert_logits

    def spy(merged, heads, streams, **kw):
        out = real(merged, heads, streams, **kw)
        seen.update(out)
        return out

    def spy_expert(*a, **kw):
        out = real_expert(*a, **kw)
        experts_seen.update(out)
        return out

    monkeypatch.setattr(expert_targets, "merged_logits", spy)
    monkeypatch.setattr(expert_targets, "expert_logits", spy_expert)
    cfg, run = _fit(tmp_path, tiny_zoo_dir, steps=10, **{"options.objective_args": {"unsure": "mean", "start_views": 5}})
    assert json.loads((run / "results.json").read_text())["uses_labels"] is False
    parts = build_all(load_config(cfg))
    ta, experts = _hand_start(tiny_zoo_dir)
    for i, s in enumerate(parts["streams"]):
        x = s.inputs(torch.arange(len(s)))
        with torch.no_grad():
            probs = [torch.softmax(parts["heads"][s.name](ta(_hand_shift(x, 2 * dx, 2 * dy))), -1)
                     for dx, dy in expert_targets.SHIFTS[:5]]
            want = torch.log(torch.stack(probs).mean(0))
            ex = tiny_vit()
            ex.load_state_dict(experts[i])
            expert_single = parts["heads"][s.name](ex.eval()(x))
        assert torch.allclose(seen[s.name], want, atol=1e-4), s.name
        assert torch.allclose(experts_seen[s.name], expert_single, atol=1e-4), s.name


@pytest.mark.parametrize("bad", [0, 10, 2.5])
def test_a_bad_start_views_is_refused_before_anything_is_written(tiny_zoo_dir, tmp_path, bad):
    cfg = write_config(tmp_path, tiny_zoo_dir, **{"options.objective": "trusted_distill",
                                                 "options.objective_args": {"start_views": bad}})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) != 0
    assert not (tmp_path / "run").exists()
