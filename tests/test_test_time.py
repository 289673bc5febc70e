"""T3 / T3_B: the divergence, the coefficient rule, exact reductions, the run folder, the package
and ``adamerge predict`` on it."""
from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adamerge.cli import main
from adamerge.train.data import LinearHead
from adamerge.errors import InputError
from adamerge.core.merged import MergedModel
from adamerge.core.task_vectors import TaskVectors
from adamerge.core.test_time import T3Options, TestTimeMerger, js_divergence, t3_coefficients, t3_merged_model
from helpers import write_config


def test_js_divergence_matches_hand_computation():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.3, 0.6]])
    m = 0.5 * (p + q)
    kl = lambda a, b: float((a * (a / b).log()).sum())  # noqa: E731
    expected = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    assert float(js_divergence(p, q)) == pytest.approx(expected, rel=1e-6)
    assert float(js_divergence(p, q, 2.0)) == pytest.approx(expected / math.log(2), rel=1e-6)
    assert float(js_divergence(q, p)) == pytest.approx(expected, rel=1e-6)  # symmetric
    assert float(js_divergence(p, p)) == 0.0
    one_hot = torch.eye(3)
    assert float(js_divergence(one_hot[:1], one_hot[1:2], 2.0)) == pytest.approx(1.0)  # the maximum: 1 bit


@pytest.mark.parametrize("combine", ["independent", "softmax"])
@pytest.mark.parametrize("side", ["expert", "generalist"])
def test_coefficients_at_zero_divergence_are_the_documented_ones(combine, side):
    opts = T3Options(combine=combine, side=side, lam_min=0.1, lam_max=0.7)
    coef = t3_coefficients(torch.zeros(4, 3), opts)
    # σ(0) = 1/2: the middle of [λ_min, λ_max]; a softmax over equal divergences: uniform
    expected = 0.1 + 0.6 * (0.5 if combine == "independent" else 1 / 3)
    assert torch.allclose(coef, torch.full((4, 3), expected))


@pytest.mark.parametrize("combine", ["independent", "softmax"])
def test_coefficient_direction_follows_the_side(combine):
    d = torch.tensor([[0.0, 0.5, 1.0]])
    up = t3_coefficients(d, T3Options(side="expert", combine=combine))
    down = t3_coefficients(d, T3Options(side="generalist", combine=combine))
    assert bool((up.diff() > 0).all()) and bool((down.diff() < 0).all())
    lo, hi = T3Options().lam_min, T3Options().lam_max
    if combine == "independent":  # mirrored inside [λ_min, λ_max]
        assert torch.allclose(up + down, torch.full_like(up, lo + hi))
    else:  # a router: the coefficients sum to T·λ_min + λ_max − λ_min
        assert torch.allclose(up.sum(-1), torch.tensor([3 * lo + hi - lo]))


def test_the_default_batch_router_sends_a_batch_to_the_most_divergent_expert():
    d = torch.tensor([[0.05, 0.9, 0.1]])  # expert 1 changed its prediction most: its task's batch
    coef = t3_coefficients(d, T3Options(per="batch"))
    assert int(coef.argmax()) == 1 and float(coef[0, 1]) > 0.99


def test_router_defaults_depend_on_per_and_the_paper_is_one_option_away():
    """Per batch: the hard router (γ = 10, λ ∈ [0, 1]); per input: a softer one in a band around
    task arithmetic (γ = 5, λ ∈ [0.2, 0.8]); both softmax over divergences in bits, side expert.
    ``preset: paper``: one σ per expert, γ = 0.5 in nats, side generalist. Explicit settings win."""
    router = lambda o: (o.gamma, o.lam_min, o.lam_max, o.log_base, o.side, o.combine)  # noqa: E731
    assert router(T3Options()) == (5.0, 0.2, 0.8, 2.0, "expert", "softmax")
    assert router(T3Options(per="sample")) == router(T3Options())
    assert router(T3Options(per="batch")) == (10.0, 0.0, 1.0, 2.0, "expert", "softmax")
    for per in ("sample", "batch"):
        assert router(T3Options(per=per, preset="paper")) == (0.5, 0.0, 1.0, math.e, "generalist", "independent")
    assert router(T3Options(gamma=10.0, lam_min=0.0, lam_max=1.0)) == router(T3Options(per="batch"))  # the old T3
    assert T3Options(per="batch", gamma=2.0).gamma == 2.0 and T3Options(preset="paper", side="expert").side == "expert"
    with pytest.raises(InputError, match="lam_min <= lam_max"):
        T3Options(lam_min=0.9)  # above the per-input default λ_max 0.8


def test_per_input_default_coefficients_by_hand():
    """One input with divergences (0.1, 0.5, 0.2) bits: w = softmax(5·d), c = 0.2 + 0.6·w.
    By hand: e^0.5 = 1.648721, e^2.5 = 12.182494, e^1 = 2.718282, sum 16.549497;
    w = (0.099624, 0.736125, 0.164251); c = (0.259774, 0.641675, 0.298551)."""
    coef = t3_coefficients(torch.tensor([[0.1, 0.5, 0.2]]), T3Options())
    assert coef[0].tolist() == pytest.approx([0.259774, 0.641675, 0.298551], abs=1e-6)
    assert float(coef.sum()) == pytest.approx(3 * 0.2 + 0.6)  # T·λ_min + λ_max − λ_min


def test_one_input_merged_by_the_default_per_input_router_equals_the_hand_merge(make_zoo, inputs):
    """On a BatchNorm network, one input: its divergences from the pretrained model and each
    expert (θ0's BatchNorm statistics), the default coefficients and the merged model's logits,
    each computed by hand."""
    model, base, experts = make_zoo("cnn", 3)
    model = copy.deepcopy(model).float()
    tv = TaskVectors.from_state_dicts(base, experts)
    x = inputs("cnn", n=1, seed=3)
    head = LinearHead(torch.randn(4, model(x).shape[-1], generator=torch.Generator().manual_seed(1)))
    params = {n for n, _ in model.named_parameters()}

    def logits(coefs: list[float]) -> torch.Tensor:
        state = {k: base[k] + sum(c * (experts[t][k] - base[k]) for c, t in zip(coefs, experts)) if k in params else base[k]
                 for k in base}
        model.load_state_dict(state)
        with torch.no_grad():
            return head(model(x))

    p0 = torch.softmax(logits([0.0, 0.0, 0.0]), -1)[0].double()
    d = []
    for j in range(3):
        pj = torch.softmax(logits([float(i == j) for i in range(3)]), -1)[0].double()
        m = 0.5 * (p0 + pj)
        d.append(float(0.5 * (p0 * (p0 / m).log()).sum() + 0.5 * (pj * (pj / m).log()).sum()) / math.log(2))
    e = [math.exp(5.0 * v) for v in d]
    coefs = [0.2 + 0.6 * v / sum(e) for v in e]
    out = TestTimeMerger(t3_merged_model(model, tv), {"t0": head}, T3Options()).predict(x, "t0")
    assert out.divergences[0].tolist() == pytest.approx(d, abs=1e-5)
    assert out.coefficients[0].tolist() == pytest.approx(coefs, abs=1e-5)
    assert max(d) > 1e-3 and max(coefs) - min(coefs) > 1e-4  # the router is not at its uniform point
    assert torch.allclose(out.logits, logits(coefs), atol=1e-5)


@pytest.mark.parametrize("bad", [{"per": "token"}, {"lam_min": 1.0, "lam_max": 0.5}, {"log_base": 1}, {"chunk": 0}, {"gamma": "x"}])
def test_bad_t3_options_are_refused(bad):
    with pytest.raises(InputError):
        T3Options(**bad)


def _zoo(make_zoo, n: int):
    model, base, experts = make_zoo("vit", n)
    return copy.deepcopy(model).float(), TaskVectors.from_state_dicts(base, experts)  # the cached model may be float64


@pytest.mark.parametrize("per", ["sample", "batch"])
@pytest.mark.parametrize("bound", [0.0, 1.0])
def test_one_expert_at_a_bound_is_exactly_the_pretrained_model_or_the_expert(make_zoo, inputs, per, bound):
    model, full = _zoo(make_zoo, 2)
    name = full.task_names[0]
    tv = TaskVectors(full.base, {k: v[:1] for k, v in full.vectors.items()}, [name])  # one expert
    x = inputs("vit", n=6)
    head = LinearHead(torch.randn(5, model(x).shape[-1]))
    merger = TestTimeMerger(t3_merged_model(model, tv), {name: head}, T3Options(per=per, lam_min=bound, lam_max=bound, chunk=4))
    out = merger.predict(x, name)
    reference = model
    reference.load_state_dict(tv.base if bound == 0.0 else tv.expert_state_dict(name))
    expected = head(reference(x))
    assert torch.allclose(out.coefficients, torch.full((6, 1), bound))
    assert torch.allclose(out.logits, expected, atol=1e-5)


def test_forward_many_equals_the_merged_forward(make_zoo, inputs):
    model, tv = _zoo(make_zoo, 3)
    merged = MergedModel(model, tv, "layer", init=0.0, clamp=None)
    x = inputs("vit", n=3)
    sets = torch.rand(3, 3, merged.grouping.num_groups)
    for vectorize in (False, True):
        shared = merged.forward_many(sets, x, vectorize=vectorize)
        single = merged.forward_many(sets, x, per_input=True, vectorize=vectorize)
        for m in range(3):
            merged.set_coefficients(sets[m])
            with torch.no_grad():
                ref = merged(x)
            assert torch.allclose(shared[m], ref, atol=1e-5)
            assert torch.allclose(single[m], ref[m], atol=1e-5)
    with pytest.raises(InputError, match="whole-tensor"):
        MergedModel(model, tv, "partition:2", clamp=None).forward_many(torch.zeros(1, 3, 2), x)


def test_identical_pretrained_and_expert_predictions_give_the_middle_coefficient(make_zoo, inputs):
    model, tv = _zoo(make_zoo, 2)
    names = tv.task_names
    zero = TaskVectors(tv.base, {k: torch.zeros_like(v) for k, v in tv.vectors.items()}, names)
    x = inputs("vit", n=4)
    head = LinearHead(torch.randn(3, model(x).shape[-1]))
    opts = T3Options(lam_min=0.2, lam_max=0.6)
    out = TestTimeMerger(t3_merged_model(model, zero), {n: head for n in names}, opts).predict(x, names[0])
    assert torch.allclose(out.divergences, torch.zeros(4, 2), atol=1e-7)
    assert torch.allclose(out.coefficients, torch.full((4, 2), 0.4), atol=1e-6)


@pytest.mark.parametrize("per", ["sample", "batch"])
def test_t3_fit_export_predict(tiny_zoo_dir, tmp_path, per):
    cfg = write_config(tmp_path, tiny_zoo_dir, method="t3", options={"method_args": {"per": per, "batch_size": 32}})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["uses_labels"] is False
    stats = results["t3"]["coefficients"]["task0"]["task0"]
    defaults = T3Options(per=per)
    assert results["t3"]["settings"]["lam_max"] == defaults.lam_max  # the router defaults of ``per``, recorded
    assert defaults.lam_min <= stats["min"] <= stats["mean"] <= stats["max"] <= defaults.lam_max
    lambdas = load_file(str(run / "lambdas.safetensors"))
    data = load_file(str(tiny_zoo_dir / "data" / "task0.safetensors"))
    assert lambdas["task0"].shape == (data["x"].shape[0], 3)
    if per == "batch":  # one coefficient row per batch
        assert torch.equal(lambdas["task0"][0], lambdas["task0"][31])
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    meta = json.loads((out / "adamerge.json").read_text())
    assert meta["kind"] == "t3" and not (out / "model.safetensors").exists()
    assert "test-time merging package" in (out / "README.md").read_text()
    # predict serves the package: the accuracy equals the run's
    csv_path = tmp_path / "p.csv"
    assert main(["predict", str(out), str(tiny_zoo_dir / "data" / "task0.safetensors"), "--task", "task0",
                 "--out", str(csv_path), "--batch-size", "32", "--no-progress"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["index", "prediction", "confidence", "label"]
    acc = sum(r["prediction"] == r["label"] for r in rows) / len(rows)
    assert acc == pytest.approx(results["after"]["per_task"]["task0"])
    assert main(["predict", str(out), str(tiny_zoo_dir / "data" / "task0.safetensors"), "--task", "task0",
                 "--out", str(csv_path)]) == 2  # exists, no --force
    assert main(["predict", str(out), str(tiny_zoo_dir / "data" / "task0.safetensors"), "--task", "nope",
                 "--out", str(tmp_path / "q.csv")]) == 2
    assert not (tmp_path / "q.csv").exists()
    assert main(["eval", "--run", str(run)]) == 0  # the recorded scores


def test_predict_on_a_merged_export_matches_the_model(tiny_zoo_dir, tmp_path):
    from adamerge.workflows.export import load_run

    cfg = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 4})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    data = tiny_zoo_dir / "data" / "task1.safetensors"
    unlabeled = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    x = load_file(str(data))["x"][:20]
    save_file({"x": x.contiguous()}, str(unlabeled))
    csv_path = tmp_path / "p.csv"
    assert main(["predict", str(out), str(unlabeled), "--task", "task1", "--out", str(csv_path), "--no-progress"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["index", "prediction", "confidence"] and len(rows) == 20
    merged, parts, _ = load_run(tmp_path / "run")
    with torch.no_grad():
        probs = torch.softmax(parts["heads"]["task1"](merged(x)), -1)
    assert [int(r["prediction"]) for r in rows] == probs.argmax(-1).tolist()
    assert [float(r["confidence"]) for r in rows] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


def test_predict_refuses_untrusted_or_broken_exports(tiny_zoo_dir, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    x = str(tiny_zoo_dir / "data" / "task0.safetensors")
    assert main(["predict", str(folder), x, "--task", "task0", "--out", str(tmp_path / "a.csv")]) == 2  # no metadata
    (folder / "adamerge.json").write_text("{not json")
    assert main(["predict", str(folder), x, "--task", "task0", "--out", str(tmp_path / "a.csv")]) == 2
    (folder / "adamerge.json").write_text(json.dumps({"kind": "t3", "tasks": ["task0"],
                                                       "model": {"source": "python", "target": "os:system"}}))
    assert main(["predict", str(folder), x, "--task", "task0", "--out", str(tmp_path / "a.csv")]) == 2  # code refused
    (folder / "adamerge.json").write_text(json.dumps({"kind": "pickle", "tasks": ["task0"], "model": {"source": "tiny_vit"}}))
    assert main(["predict", str(folder), x, "--task", "task0", "--out", str(tmp_path / "a.csv")]) == 2
    assert not (tmp_path / "a.csv").exists()
    assert Path(x).exists()


def test_predict_reads_an_image_folder_with_the_exports_preprocessing(tmp_path):
    """An image folder (class sub-folders give labels) through the model source's transform."""
    from PIL import Image
    from safetensors.torch import save_file

    from adamerge.workflows.predict import load_export
    from adamerge.sources import build_model

    spec = {"source": "timm", "name": "test_efficientnet"}
    model, transform = build_model(spec)
    model.eval()
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(export / "model.safetensors"))
    x0 = transform(Image.new("RGB", (40, 40))).unsqueeze(0)
    dim = model(x0).shape[-1]
    save_file({"digits.weight": torch.randn(2, dim), "digits.bias": torch.zeros(2)}, str(export / "heads.safetensors"))
    (export / "adamerge.json").write_text(json.dumps({"kind": "merged", "tasks": ["digits"], "model": spec}))
    gen = torch.Generator().manual_seed(0)
    images = tmp_path / "images"
    for label, cls in enumerate(("a", "b")):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(images / cls / f"{i}.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(export), str(images), "--task", "digits", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == ["0", "0", "0", "1", "1", "1"]
    predictor = load_export(export, "digits")
    files = sorted((images / "a").glob("*.png")) + sorted((images / "b").glob("*.png"))
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    expected = torch.softmax(predictor.logits(x, "digits"), -1).argmax(-1).tolist()
    assert [int(r["prediction"]) for r in rows] == expected


def test_predict_serves_a_tasks_own_model_from_tall_masks(tiny_zoo_dir, tmp_path):
    from adamerge.workflows.predict import load_export, read_heads
    from adamerge.io.task_masks import load_task_state
    from adamerge.zoo.tiny import tiny_vit

    cfg = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 4})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), str(out), "--task-masks"]) == 0
    x = load_file(str(tiny_zoo_dir / "data" / "task2.safetensors"))["x"][:16]
    model = tiny_vit()
    model.load_state_dict(load_task_state(out, "task2"), strict=True)
    model.eval()
    with torch.no_grad():
        expected = read_heads(out / "heads.safetensors", ["task2"])["task2"](model(x))
    served = load_export(out, "task2")
    assert served.kind == "merged with task masks"
    assert torch.allclose(served.logits(x, "task2"), expected, atol=1e-6)
    plain = load_export(out, "task2", task_masks=False)
    assert plain.kind == "merged" and not torch.allclose(plain.logits(x, "task2"), expected, atol=1e-6)
