"""FW-Merging over a pool: the oracle (one gradient per task, the start as a candidate), the
pool's streaming merge and its memory, hard mode's start and steps and FW-Soft's replacement
against hand computations, the run (distractors never chosen, export, resume) and bad pools."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adamerge.cli import main
from adamerge.errors import InputError
from adamerge.methods.fw_merging import (START, FWOptions, distinct, fw_update, line_search_steps, oracle_scores,
                                         select, vertex_coordinates)
from adamerge.core.pool import CheckpointPool
from helpers import TASKS, write_config


def _write_pool(folder: Path, base: dict, deltas: dict[str, dict]) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, delta in deltas.items():
        path = folder / f"{name}.safetensors"
        save_file({k: (base[k] + delta[k]).contiguous() for k in base}, str(path))
        out[name] = str(path)
    return out


@pytest.mark.parametrize("score", ["cosine", "linear"])
@pytest.mark.parametrize("oracle", ["layer", "whole"])
def test_oracle_picks_the_descent_candidate_and_never_a_distractor(tmp_path, score, oracle):
    gen = torch.Generator().manual_seed(0)
    g = {"a": torch.randn(6, 4, generator=gen), "b": torch.randn(8, generator=gen)}
    # θ0 orthogonal to the gradient, so the cosine against full weights sees only the task vectors
    base = {k: (lambda r: r - (r * v).sum() / (v * v).sum() * v)(torch.randn(v.shape, generator=gen)) for k, v in g.items()}
    noise = {}
    for k, v in g.items():  # a distractor orthogonal to the gradient
        r = torch.randn(v.shape, generator=gen)
        noise[k] = 0.5 * (r - (r * v).sum() / (v * v).sum() * v)
    deltas = {"ascent": {k: 0.3 * v for k, v in g.items()}, "noise": noise,
              "expert": {k: -0.3 * v for k, v in g.items()}, "zero": {k: torch.zeros_like(v) for k, v in g.items()}}
    pool = CheckpointPool(_write_pool(tmp_path, base, deltas), base, ["a", "b"])
    chosen = select(oracle_scores(g, pool, score), oracle)
    assert chosen.sum(0).tolist() == [1.0, 1.0]  # one vertex per tensor
    assert chosen[pool.names.index("expert")].tolist() == [1.0, 1.0]


def fw_step(lam: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """By hand: ``λ ← (1 − γ) λ + γ · target`` (θ moves a fraction γ towards the target)."""
    return (1.0 - gamma) * lam + gamma * target


def test_pool_merge_is_the_hand_computed_combination_and_fw_step_moves_theta_towards_the_target(tmp_path, make_zoo):
    _, base, experts = make_zoo("vit", 3)
    keys = [k for k, v in base.items() if v.is_floating_point()]
    paths = {}
    for n, sd in experts.items():
        paths[n] = str(tmp_path / f"{n}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, paths[n])
    pool = CheckpointPool(paths, base, keys)
    lam = torch.rand(3, len(keys), dtype=torch.float64)
    merged = pool.merge(lam)
    for i, k in enumerate(keys):
        expected = base[k].double() + sum(lam[c, i] * (experts[n][k].double() - base[k].double()) for c, n in enumerate(experts))
        assert torch.allclose(merged[k].double(), expected, atol=1e-6)
    # θ + γ(θ_sel − θ) in weights = the step on λ
    target = select(torch.randn(3, len(keys), dtype=torch.float64), "layer")
    stepped = pool.merge(fw_step(lam, target, 0.25))
    theta_sel = pool.merge(target)
    for k in keys:
        assert torch.allclose(stepped[k], merged[k] + 0.25 * (theta_sel[k] - merged[k]), atol=1e-6)


def test_every_task_gradient_is_scored_in_one_pass_and_the_start_is_one_more_candidate(tmp_path):
    gen = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(5, 3, generator=gen), "b": torch.randn(4, generator=gen)}
    deltas = {n: {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for n in ("x", "y", "z")}
    pool = CheckpointPool(_write_pool(tmp_path, base, deltas), base, ["a", "b"])
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    start = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    for score in ("linear", "cosine"):
        one_pass_before = pool.bytes_read
        together = oracle_scores(grads, pool, score, start)
        assert pool.bytes_read - one_pass_before == sum(v.numel() * 4 for v in base.values()) * 3  # each candidate once
        assert together.shape == (3, 4, 2)
        for j, g in enumerate(grads):
            assert torch.equal(together[j, :3], oracle_scores(g, pool, score))
            for i, k in enumerate(["a", "b"]):  # the start's row: the same score as a candidate with its weights
                gk, w = g[k].double().flatten(), start[k].double().flatten()
                expected = (gk @ (w - base[k].double().flatten()) if score == "linear"
                            else gk @ w / (gk.norm() * w.norm()))
                assert torch.isclose(together[j, 3, i], expected, rtol=1e-9)


def test_the_chosen_set_is_the_union_of_the_tasks_vertices_and_a_step_moves_towards_each():
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # candidate 0 for both tensors
    b = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # a composite (layer oracle)
    assert distinct([a, b, a.clone(), b]) == [0, 1]
    # the start's row (the last) stands for the start's coordinates
    start = torch.tensor([[0.3, 0.3], [0.3, 0.3]], dtype=torch.float64)
    chose_start = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.equal(vertex_coordinates(chose_start, start), torch.tensor([[0.3, 1.0], [0.3, 0.0]], dtype=torch.float64))
    assert torch.equal(vertex_coordinates(a, None), a)
    mu = torch.tensor([[0.2, 0.1], [0.4, 0.0]], dtype=torch.float64)
    v = torch.stack([torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])]).double()
    w = torch.tensor([[0.5, 0.1], [0.25, 0.0]], dtype=torch.float64)
    expected = mu + w[0] * (v[0] - mu) + w[1] * (v[1] - mu)
    assert torch.allclose(fw_update(mu, v, w), expected, atol=0)
    assert torch.allclose(fw_update(mu, v[:1], torch.full((1, 2), 0.25, dtype=torch.float64)), fw_step(mu, v[0], 0.25))


def test_the_pool_reads_one_tensor_at_a_time_whatever_its_size(tmp_path, make_zoo):
    _, base, experts = make_zoo("vit", 2)
    keys = [k for k, v in base.items() if v.is_floating_point()]
    largest = max(base[k].numel() * base[k].element_size() for k in keys)
    one = experts["t0"]
    peaks, reads = {}, {}
    for size in (4, 16):
        deltas = {f"c{i}": {k: (one[k] - base[k]) * (i + 1) for k in base} for i in range(size)}
        pool = CheckpointPool(_write_pool(tmp_path / str(size), base, deltas), base, keys)
        grad = {k: torch.randn(base[k].shape) for k in keys}
        oracle_scores(grad, pool, "cosine")
        pool.merge(torch.full((size, len(keys)), 1.0 / size, dtype=torch.float64))
        peaks[size], reads[size] = pool.peak_live_bytes, pool.bytes_read
    assert peaks[4] == peaks[16] == largest  # flat in the pool size: never more than one tensor
    assert reads[16] == 4 * reads[4]  # every candidate was read (twice: the oracle and the merge)


def _distractors(zoo: Path, folder: Path) -> dict[str, str]:
    base = load_file(str(zoo / "base.safetensors"))
    e0 = load_file(str(zoo / "experts" / "task0.safetensors"))
    gen = torch.Generator().manual_seed(0)
    deltas = {
        # a random perturbation of the base, as large as an expert's task vector per tensor
        "noise": {k: (e0[k] - v).norm() / max(1, v.numel()) ** 0.5 * torch.randn(v.shape, generator=gen)
                  if v.is_floating_point() else torch.zeros_like(v) for k, v in base.items()},
        # an anti-expert: the base minus task0's task vector (it unlearns task0)
        "anti": {k: (v - e0[k]) if v.is_floating_point() else torch.zeros_like(v) for k, v in base.items()},
    }
    return _write_pool(folder, base, deltas)


def _pool_config(tmp_path: Path, zoo: Path, **changes) -> Path:
    pool = {t: str(zoo / "experts" / f"{t}.safetensors") for t in TASKS} | _distractors(zoo, tmp_path / "distractors")
    return write_config(tmp_path, zoo, method="fw_merging", pool=pool, **changes)


def test_fw_merging_never_selects_a_distractor_and_its_export_reproduces_the_run(tiny_zoo_dir, tmp_path):
    cfg = _pool_config(tmp_path, tiny_zoo_dir, options={"method_args": {"oracle": "whole", "iterations": 4}, "batch_size": 32})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    fw = results["fw_merging"]
    assert len(fw["history"]) == 4
    # one choice per task's gradient (was: one for their sum); the default linear oracle picks each
    # task's own expert (the paper's cosine against full weights chose `anti` for task2 here)
    assert all(h["chosen"] == {t: t for t in TASKS} for h in fw["history"])
    assert fw["weight_per_candidate"]["noise"] == fw["weight_per_candidate"]["anti"] == 0.0
    # hard mode starts from task arithmetic by default (fw_hard.py's start, over the experts only)
    assert fw["settings"]["start"] == "task_arithmetic" and fw["start_candidate"] is True
    # the default line search: the steps tried are multiples of the schedule's a_t (capped at 1/|S|),
    # the one taken has the lowest objective on the iteration's batch, and no move scores the loss
    for t, h in enumerate(fw["history"]):
        a_t = 0.3 * 0.1 * 2 / (t + 2)
        tried = {float(a): v for a, v in h["line_search"].items()}
        assert sorted(tried) == pytest.approx(line_search_steps(a_t, len(h["set"])))
        assert h["step"] == pytest.approx(min(tried, key=tried.get)) and tried[0.0] == pytest.approx(h["loss"])
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    meta = json.loads((out / "adamerge.json").read_text())
    assert meta["pool"] == list(fw["pool"]) and meta["fw_merging"]["history"] == fw["history"]
    # the exported checkpoint scores what the run scored
    from adamerge.config import build_all, load_config
    from adamerge.train.loop import evaluate

    parts = build_all(load_config(cfg))
    model = parts["model"]
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert evaluate(model, parts["heads"], parts["streams"])["per_task"] == results["after"]["per_task"]


def test_fw_merging_resumes_at_the_next_iteration_with_the_same_result(tiny_zoo_dir, tmp_path, monkeypatch):
    import adamerge.methods.fw_merging as fw

    opts = {"options": {"method_args": {"iterations": 4}, "batch_size": 16}}
    ref = _pool_config(tmp_path / "ref", tiny_zoo_dir, **opts)
    assert main(["fit", "--config", str(ref), "--no-progress"]) == 0
    cut = _pool_config(tmp_path / "cut", tiny_zoo_dir, **opts)
    original, calls = fw.oracle_scores, []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(fw, "oracle_scores", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", "--config", str(cut), "--no-progress"])
    monkeypatch.setattr(fw, "oracle_scores", original)
    assert not (tmp_path / "cut" / "run" / "results.json").exists()
    assert main(["fit", "--config", str(cut), "--resume", "--no-progress"]) == 0
    a = load_file(str(tmp_path / "ref" / "run" / "method_state.safetensors"))["pool_coefficients"]
    b = load_file(str(tmp_path / "cut" / "run" / "method_state.safetensors"))["pool_coefficients"]
    assert torch.equal(a, b)
    hist = lambda p: json.loads((p / "run" / "results.json").read_text())["fw_merging"]["history"]  # noqa: E731
    assert hist(tmp_path / "ref") == hist(tmp_path / "cut")


def _two_task_config(tmp_path: Path, zoo: Path, method_args: dict, **changes) -> Path:
    """Two tasks (task0, task1) over a pool of their experts and two distractors (noise and an
    anti-expert of task0): each task's descent vertex is its own expert."""
    two = TASKS[:2]
    pool = {t: str(zoo / "experts" / f"{t}.safetensors") for t in two} | _distractors(zoo, tmp_path / "distractors")
    return write_config(tmp_path, zoo, method="fw_merging", pool=pool,
                        experts={t: str(zoo / "experts" / f"{t}.safetensors") for t in two},
                        heads={t: str(zoo / "heads" / f"{t}.safetensors") for t in two},
                        data={t: {"tensors": str(zoo / "data" / f"{t}.safetensors")} for t in two},
                        options={"method_args": method_args, "batch_size": 100}, **changes)


def _nested(run: Path, t: int, pool: list[str], keys: list[str]) -> tuple[list[str], torch.Tensor]:
    """FW-Soft's nested AdaMerging of iteration t: its tasks (the chosen vertices) and its
    coefficients as ``[vertices, tensors]`` in the pool's tensor order."""
    sub = run / "soft" / f"iteration{t}"
    groups = json.loads((sub / "groups.json").read_text())
    col = {k: g for g, e in enumerate(groups["groups"]) for k in e["parameters"]}
    coef = load_file(str(sub / "coefficients.safetensors"))["coefficients"].double()
    return groups["tasks"], coef[:, [col[k] for k in keys]]


def _keys() -> list[str]:
    from adamerge.zoo.tiny import tiny_vit

    return [n for n, _ in tiny_vit().named_parameters()]


def test_fw_soft_chooses_each_tasks_expert_and_replaces_the_model_by_the_nested_adamerging(tiny_zoo_dir, tmp_path):
    cfg = _two_task_config(tmp_path, tiny_zoo_dir, {"soft": True, "iterations": 2, "soft_steps": 4})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    fw = json.loads((run / "results.json").read_text())["fw_merging"]
    names, keys = list(fw["pool"]), _keys()
    assert fw["settings"]["start"] == "pretrained" and fw["start_candidate"] is False
    # each task's own gradient chooses its own expert; AdaMerging runs over exactly that set
    for h in fw["history"]:
        assert h["chosen"] == {"task0": "task0", "task1": "task1"} and h["set"] == ["task0", "task1"]
    # iteration 0 from the pretrained model (μ = 0): the merge IS the nested AdaMerging (its init 0.3
    # moved by training), not a damped step towards it
    tasks0, coef0 = _nested(run, 0, names, keys)
    assert tasks0 == ["task0", "task1"] and not torch.allclose(coef0, torch.full_like(coef0, 0.3))
    mu1 = torch.zeros(len(names), len(keys), dtype=torch.float64)
    for i, n in enumerate(tasks0):
        mu1[names.index(n)] = coef0[i]
    # iteration 1 is anchored at the merged model: θ ← θ + Σ_v λ_v (θ_v − θ), μ ← μ + Σ_v λ_v (e_v − μ)
    tasks1, coef1 = _nested(run, 1, names, keys)
    mu2 = mu1.clone()
    for i, n in enumerate(tasks1):
        e = torch.zeros_like(mu1)
        e[names.index(n)] = 1.0
        mu2 += coef1[i] * (e - mu1)
    lam = load_file(str(run / "method_state.safetensors"))["pool_coefficients"]
    assert torch.allclose(lam, mu2, atol=1e-6)
    assert lam[names.index("noise")].abs().max() == lam[names.index("anti")].abs().max() == 0


def test_fw_hard_starts_from_the_pretrained_model_with_a_full_first_step(tiny_zoo_dir, tmp_path):
    cfg = _two_task_config(tmp_path, tiny_zoo_dir, {"iterations": 3, "start": "pretrained", "step_rule": "schedule"})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    fw = results["fw_merging"]
    names, keys = list(fw["pool"]), _keys()
    assert fw["start_candidate"] is True
    # by hand: μ0 = 0 (the pretrained model, which is also a candidate: coordinates 0);
    # a_0 = 0.3 · 1 (a full first step), a_t = 0.3 · 2/(t+2) · 0.1 after
    mu = torch.zeros(len(names), len(keys), dtype=torch.float64)
    for t, h in enumerate(fw["history"]):
        a = 0.3 if t == 0 else 0.3 * 2 / (t + 2) * 0.1
        step = torch.zeros_like(mu)
        for v in h["set"]:
            e = torch.zeros_like(mu)
            if v != START:
                e[names.index(v)] = 1.0
            step += a * (e - mu)
        mu = mu + step
        if t == 0:  # the first step is task arithmetic (λ = 0.3) over the tasks' experts
            assert h["set"] == ["task0", "task1"]
            experts = [names.index("task0"), names.index("task1")]
            assert torch.equal(mu[experts], torch.full((2, len(keys)), 0.3, dtype=torch.float64))
            assert mu.sum() == 0.3 * 2 * len(keys)  # nothing on the distractors
    lam = load_file(str(run / "method_state.safetensors"))["pool_coefficients"]
    assert torch.allclose(lam, mu, atol=1e-12)
    # the start's score is the pretrained model's: accuracy before = pretrained + heads
    from adamerge.config import build_all, load_config
    from adamerge.train.loop import evaluate

    parts = build_all(load_config(cfg))
    parts["model"].load_state_dict(load_file(str(tiny_zoo_dir / "base.safetensors")), strict=True)
    assert results["before"]["per_task"] == evaluate(parts["model"], parts["heads"], parts["streams"])["per_task"]


def test_fw_hard_from_task_arithmetic_with_one_summed_gradient_is_fw_hard_py(tiny_zoo_dir, tmp_path):
    cfg = _two_task_config(tmp_path, tiny_zoo_dir, {"iterations": 2, "start": "task_arithmetic", "choose": "summed",
                                                           "step_rule": "schedule"})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    fw = json.loads((tmp_path / "run" / "results.json").read_text())["fw_merging"]
    names, keys = list(fw["pool"]), _keys()
    mu0 = torch.zeros(len(names), len(keys), dtype=torch.float64)
    mu0[[names.index("task0"), names.index("task1")]] = 0.3
    mu = mu0.clone()
    for t, h in enumerate(fw["history"]):
        assert list(h["chosen"]) == ["all"] and len(h["set"]) == 1  # one vertex for the summed gradient
        target = mu0.clone() if h["set"][0] == START else torch.zeros_like(mu)
        if h["set"][0] != START:
            target[names.index(h["set"][0])] = 1.0
        mu = fw_step(mu, target, 0.3 * 2 / (t + 2) * 0.1)  # γ_0 = step_size: no full first step from task arithmetic
    lam = load_file(str(tmp_path / "run" / "method_state.safetensors"))["pool_coefficients"]
    assert torch.allclose(lam, mu, atol=1e-12)


def test_bad_pools_are_refused_before_anything_is_written(tiny_zoo_dir, tmp_path):
    base = load_file(str(tiny_zoo_dir / "base.safetensors"))
    wrong = {k: (torch.zeros(3) if i == 0 else v) for i, (k, v) in enumerate(base.items())}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    missing = dict(list(base.items())[1:])
    save_file(missing, str(tmp_path / "missing.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tiny_zoo_dir / "base.safetensors").read_bytes()[:100])
    for bad in ("wrong", "missing", "cut", "absent"):
        pool = {"task0": str(tiny_zoo_dir / "experts" / "task0.safetensors"), bad: str(tmp_path / f"{bad}.safetensors")}
        cfg = write_config(tmp_path / bad, tiny_zoo_dir, method="fw_merging", pool=pool)
        assert main(["fit", "--config", str(cfg), "--no-progress"]) == 2
        assert not (tmp_path / bad / "run").exists()
    from adamerge.config import load_config
    from adamerge.methods import create_method

    # starting from task arithmetic (hard mode's default) needs the experts in the pool; from the
    # pretrained model (soft mode's default) a pool of unknown checkpoints is fine
    pool = _distractors(tiny_zoo_dir, tmp_path / "d")
    for name, args in (("noexp", {}), ("noexp_ta", {"start": "task_arithmetic", "soft": True})):
        cfg = write_config(tmp_path / name, tiny_zoo_dir, method="fw_merging", pool=pool, options={"method_args": args})
        with pytest.raises(InputError, match="none of the experts"):
            create_method("fw_merging").validate(load_config(cfg), None)
    for name, args in (("noexp_pre", {"start": "pretrained"}), ("noexp_soft", {"soft": True})):
        cfg = write_config(tmp_path / name, tiny_zoo_dir, method="fw_merging", pool=pool, options={"method_args": args})
        create_method("fw_merging").validate(load_config(cfg), None)
    for bad in ({"oracle": "best"}, {"iterations": -1}, {"choose": "best"}, {"start": "zero"}, {"soft_lr": 0.0},
                {"step_size": 5.0, "scale": 1.0}):
        with pytest.raises(InputError):
            FWOptions(**bad)


def test_fw_merging_with_labeled_cross_entropy_says_it_uses_labels(tiny_zoo_dir, tmp_path):
    labeled = {t: {"tensors": str(tiny_zoo_dir / "data" / f"{t}.safetensors")} for t in TASKS}
    cfg = _pool_config(tmp_path, tiny_zoo_dir, labeled=labeled, options={
        "objective": "cross_entropy", "method_args": {"iterations": 2}, "batch_size": 16})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["uses_labels"] is True and len(results["fw_merging"]["history"]) == 2
    unlabeled = _pool_config(tmp_path / "nolabels", tiny_zoo_dir, options={"objective": "cross_entropy"})
    assert main(["fit", "--config", str(unlabeled), "--no-progress"]) == 2  # no labeled split: refused


@pytest.mark.parametrize("objective", ["expert_distill", "trusted_distill"])
def test_fw_soft_nested_fits_distill_each_tasks_own_expert(tiny_zoo_dir, tmp_path, monkeypatch, objective):
    """FW-Soft's nested AdaMerging runs over pool vertices, yet an expert objective's targets stay
    each task's own expert's predictions (computed once, by hand here) and, for trusted_distill,
    the anchor is the nested fit's own start (θ + 0.3 Σ_v (θ_v − θ) from the pretrained model)."""
    from adamerge.config import build_all, load_config
    from adamerge.methods.base import Method
    from adamerge.zoo.tiny import tiny_vit

    seen: list[dict] = []
    real = Method.training_data

    def spy(self, *args, **kwargs):
        data = real(self, *args, **kwargs)
        seen.append({t: v.clone() for t, v in (data.targets or {}).items()})
        return data

    monkeypatch.setattr(Method, "training_data", spy)
    two = TASKS[:2]
    # the candidates are named unlike the tasks: the nested fit's "tasks" are checkpoints ckpt_*
    pool = {f"ckpt_{t}": str(tiny_zoo_dir / "experts" / f"{t}.safetensors") for t in two}
    pool |= _distractors(tiny_zoo_dir, tmp_path / "distractors")
    cfg = write_config(tmp_path, tiny_zoo_dir, method="fw_merging", pool=pool,
                       experts={t: str(tiny_zoo_dir / "experts" / f"{t}.safetensors") for t in two},
                       heads={t: str(tiny_zoo_dir / "heads" / f"{t}.safetensors") for t in two},
                       data={t: {"tensors": str(tiny_zoo_dir / "data" / f"{t}.safetensors")} for t in two},
                       options={"method_args": {"soft": True, "iterations": 1, "soft_steps": 3}, "batch_size": 100,
                                "objective": objective})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    fw = json.loads((run / "results.json").read_text())["fw_merging"]
    assert fw["history"][0]["set"] == ["ckpt_task0", "ckpt_task1"]
    assert len(seen) == 2  # the oracle's gradients (the outer run) and the nested fit
    parts = build_all(load_config(cfg))
    base = load_file(str(tiny_zoo_dir / "base.safetensors"))
    experts = {t: load_file(str(tiny_zoo_dir / "experts" / f"{t}.safetensors")) for t in ("task0", "task1")}

    def logits(state, s):
        model = tiny_vit()
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            return parts["heads"][s.name](model(s.inputs(torch.arange(len(s)))))

    ta = {k: base[k] + 0.3 * sum(e[k] - base[k] for e in experts.values()) if base[k].is_floating_point() else base[k]
          for k in base}
    for s in parts["streams"]:
        want = logits(experts[s.name], s)
        for targets in seen:
            got = targets[s.name]
            assert torch.allclose(got[:, 0] if objective == "trusted_distill" else got, want, atol=1e-4), s.name
        if objective == "trusted_distill":  # the nested fit's anchor: its start, task arithmetic over the set
            assert torch.allclose(seen[1][s.name][:, 1], logits(ta, s), atol=1e-4), s.name


def test_fw_soft_defaults_to_the_trusted_expert_objective_and_hard_to_the_collapse_safe_one():
    """Issue 23's defaults: FW-Soft's oracle and nested AdaMerging on ``trusted_distill`` (its
    collapse-safe default collapsed a task on the seed-2 subset), hard mode unchanged; an objective
    given always wins, and the default's options never carry over to another objective."""
    from adamerge.methods import create_method

    m = create_method("fw_merging")
    assert (m.config({}).objective, m.config({}).objective_args) == ("infomax", {"floor": 0.9})
    for soft in (True, "true"):
        cfg = m.config({"method_args": {"soft": soft}})
        assert (cfg.objective, cfg.objective_args) == ("trusted_distill", {})
    assert m.config({"method_args": {"soft": True}, "objective": "entropy"}).objective == "entropy"
    assert m.config({"method_args": {"soft": True}, "objective_args": {"confidence": 0.8}}).objective_args == {"confidence": 0.8}
    with pytest.raises(InputError):
        m.config({"method_args": {"soft": "maybe"}})


@pytest.mark.parametrize("slope", [1.0, -1.0])
def test_fw_hard_line_search_refuses_a_step_that_raises_the_objective(tmp_path, slope):
    """Hard mode's default ``step_rule: line_search``: the oracle chooses a vertex; if the
    objective rises along the move (slope +1) θ stays where it is (step 0), if it falls (slope −1)
    the largest step tried is taken (4·a_t here, under the cap 1/|S|). ``schedule`` always takes a_t."""
    from adamerge.methods.fw_merging import FWMerging, fw_options

    base = {"w": torch.zeros(4)}
    pool = CheckpointPool(_write_pool(tmp_path, base, {"x": {"w": torch.ones(4)}, "y": {"w": -torch.ones(4)}}), base, ["w"])
    mu = torch.zeros(2, 1, dtype=torch.float64)

    def gradients(theta, t):  # descent towards x
        return {"task": 1.0}, {"task": {"w": -torch.ones(4)}}

    def value(theta, t):  # the objective along the move: 1 + slope · (distance moved)
        return 1.0 + slope * float(theta["w"].sum())

    for rule in ("line_search", "schedule"):
        opts = fw_options(create_method_config({"method_args": {"step_rule": rule, "start": "pretrained"}}))
        new, entry = FWMerging()._iteration(None, pool, mu, 1, (gradients, value), None, None, ["x", "y"], opts)
        a_t = 0.3 * 0.1 * 2 / 3
        want = a_t if rule == "schedule" else (0.0 if slope > 0 else 4 * a_t)
        assert entry["set"] == ["x"] and entry["step"] == pytest.approx(want)
        assert new[0, 0] == pytest.approx(want) and new[1, 0] == 0


def create_method_config(options: dict):
    from adamerge.methods import create_method

    return create_method("fw_merging").config(options)
