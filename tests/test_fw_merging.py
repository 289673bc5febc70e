"""FW-Merging over a pool: the oracle, the pool's streaming merge and its memory, the run
(distractors never chosen, export, resume) and bad pools."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adamerge.cli import main
from adamerge.errors import InputError
from adamerge.methods.fw_merging import FWOptions, fw_step, oracle_scores, select
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
    assert all(h["chosen"] in TASKS for h in fw["history"])
    assert fw["weight_per_candidate"]["noise"] == fw["weight_per_candidate"]["anti"] == 0.0
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


def test_fw_soft_runs_adamerging_over_the_chosen_candidates(tiny_zoo_dir, tmp_path):
    cfg = _pool_config(tmp_path, tiny_zoo_dir, options={
        "method_args": {"iterations": 2, "soft": True, "soft_steps": 3}, "batch_size": 16})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    fw = json.loads((tmp_path / "run" / "results.json").read_text())["fw_merging"]
    assert [len(h["soft_set"]) for h in fw["history"]] == [2, 2]
    for t in range(2):
        assert (tmp_path / "run" / "soft" / f"iteration{t}" / "results.json").is_file()
    lam = load_file(str(tmp_path / "run" / "method_state.safetensors"))["pool_coefficients"]
    names = list(fw["pool"])
    touched = {n for h in fw["history"] for n in h["soft_set"]} | set(TASKS)
    for i, n in enumerate(names):
        assert bool((lam[i] != 0).any()) == (n in touched)


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

    cfg = write_config(tmp_path / "noexp", tiny_zoo_dir, method="fw_merging", pool=_distractors(tiny_zoo_dir, tmp_path / "d"))
    with pytest.raises(InputError, match="none of the experts"):
        create_method("fw_merging").validate(load_config(cfg), None)
    for bad in ({"oracle": "best"}, {"iterations": -1}, {"soft_k": 1}, {"step_size": 5.0, "scale": 1.0}):
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
