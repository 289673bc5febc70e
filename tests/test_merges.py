"""Data-free merges as registered plug-ins: each against a hand computation, the registry matrix on
the tiny zoo, ``preprocess`` / ``init`` composition with learned methods, the eval CLI and the
TALL task-mask round trip through ``export --task-masks``."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from adamerge.cli import main
from adamerge.config import build_all, load_config
from adamerge.errors import InputError
from adamerge.merges import (
    coefficients_for_groups,
    get_merge,
    list_merges,
    merge_request,
    register_merge,
    tall_masks,
    ties_vectors,
)
from adamerge.merges.fisher import diagonal_fisher
from adamerge.methods import build_data_free, create_method
from adamerge.core.granularity import make_grouping
from adamerge.core.task_vectors import TaskVectors
from helpers import TASKS, write_config

REGISTERED = ["breadcrumbs", "consensus", "dare", "fisher", "lines", "pcb", "task_arithmetic", "ties", "weight_average"]
FAST = {"fisher": {"samples": 8, "chunk": 8}}  # options that keep the matrix fast on the tiny zoo


def run(name: str, stacks: dict, **options) -> dict:
    spec = get_merge(name)
    return spec.run(stacks, spec.options(options)).delta()


# --------------------------------------------------------------------------- hand computations
def test_weight_average_and_task_arithmetic_by_hand():
    s = {"w": torch.tensor([[1.0, -2.0], [3.0, 4.0], [-1.0, 1.0]])}
    assert torch.allclose(run("weight_average", s)["w"], torch.tensor([1.0, 1.0]))
    assert torch.allclose(run("task_arithmetic", s, lam=0.5)["w"], torch.tensor([1.5, 1.5]))


def test_ties_registered_form_matches_the_toy_by_hand():
    s = {"w": torch.tensor([[3.0, -1.0, 0.5, 2.0], [-4.0, 2.0, 0.1, 1.0]])}
    # top-2 per task: t0 {3, 2}, t1 {-4, 2}; signs of the trimmed sum [-, +, +, +];
    # agreeing: t1 -4, t1 2, t0 2 -> disjoint mean [-4, 2, 0, 2], times λ 0.5
    assert torch.allclose(run("ties", s, lam=0.5, density=0.5)["w"], torch.tensor([-2.0, 1.0, 0.0, 1.0]))


def test_lines_scales_each_residual_block_by_depth():
    names = ["conv1.weight", "blocks.0.w", "blocks.1.w", "blocks.2.w", "head.weight"]
    s = {n: torch.tensor([[1.0], [3.0]]) for n in names}  # Σ_t τ_t = 4 everywhere, T = 2
    got = run("lines", s, beta=0.6)  # α = 1/T = 0.5
    want = {"conv1.weight": 0.5, "blocks.0.w": 0.5, "blocks.1.w": 0.8, "blocks.2.w": 1.1, "head.weight": 0.5}
    for n, scale in want.items():
        assert got[n].item() == pytest.approx(4 * scale), n
    assert run("lines", s, alpha=0.1, beta=0.0)["blocks.2.w"].item() == pytest.approx(0.4)


def test_consensus_keeps_entries_two_tall_masks_agree_on():
    # τ_MTL = [3, 0, 0.3, 6]; λ = 0.5: m_t = |τ_t| > 0.5 |τ_MTL − τ_t|
    s = {"w": torch.tensor([[1.0, 1.0, 0.1, 2.0],
                            [1.0, -1.0, 0.1, 2.0],
                            [1.0, 0.0, 0.1, 2.0]])}
    # entry 0: 1 > 0.5·2 = 1? no (strict) for every task -> 0 masks
    # entry 1: t0 1 > 0.5·1, t1 1 > 0.5·1, t2 0 > 0 no -> 2 masks
    # entry 2: 0.1 > 0.5·0.2 = 0.1? no -> 0 masks;  entry 3: 2 > 0.5·4 = 2? no -> 0 masks
    masks = tall_masks(s, lam=0.5)["w"]
    assert masks.tolist() == [[False, True, False, False], [False, True, False, False], [False, False, False, False]]
    assert torch.allclose(run("consensus", s, lam=1.0, k=2, tall_lambda=0.5)["w"], torch.tensor([0.0, 0.0, 0.0, 0.0]))
    # λ = 0.4: entry 0: 1 > 0.8 for all (3 masks); entry 3: 2 > 1.6 for all -> kept with k = 2
    assert torch.allclose(run("consensus", s, lam=1.0, k=2, tall_lambda=0.4)["w"], torch.tensor([3.0, 0.0, 0.3, 6.0]))
    assert torch.allclose(run("consensus", s, lam=1.0, k=4, tall_lambda=0.4)["w"], torch.zeros(4))


def test_breadcrumbs_drops_the_top_and_bottom_magnitudes_per_tensor():
    t0 = torch.tensor([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0])
    s = {"w": torch.stack([t0, t0.flip(0)])}
    # n = 10: top 0.1 -> drop 1 largest, bottom 0.5 -> drop 5 smallest; keep magnitudes 0.6..0.9
    got = get_merge("breadcrumbs").run(s, get_merge("breadcrumbs").options({"top": 0.1, "bottom": 0.5}))
    keep0 = torch.tensor([0, 0, 0, 0, 0, -0.6, 0.7, -0.8, 0.9, 0.0])
    assert torch.equal(got.vectors["w"][0], keep0)
    assert torch.equal(got.vectors["w"][1], keep0.flip(0))
    assert torch.allclose(got.delta()["w"], 0.3 * (keep0 + keep0.flip(0)))
    with pytest.raises(InputError, match="top \\+ bottom must be < 1"):
        get_merge("breadcrumbs").options({"top": 0.5, "bottom": 0.5})


def test_dare_drops_with_p_rescales_and_is_reproducible_from_its_seed():
    gen = torch.Generator().manual_seed(0)
    s = {"a": torch.randn(3, 200, 50, generator=gen), "b": torch.randn(3, 7, generator=gen)}
    spec = get_merge("dare")
    one = spec.run(s, spec.options({"p": 0.7, "seed": 5})).vectors
    again = spec.run(dict(reversed(list(s.items()))), spec.options({"p": 0.7, "seed": 5})).vectors
    other = spec.run(s, spec.options({"p": 0.7, "seed": 6})).vectors
    for k in s:
        assert torch.equal(one[k], again[k])  # same seed, any key order: the same drop
    assert not torch.equal(one["a"], other["a"])
    kept = one["a"] != 0
    assert torch.allclose(one["a"][kept], s["a"][kept] / 0.3)  # survivors rescaled by 1/(1 − p)
    assert abs(1 - kept.float().mean().item() - 0.7) < 0.01  # 30000 entries: drop rate ≈ p
    assert torch.allclose(spec.run(s, spec.options({"p": 0.7, "seed": 5, "lam": 1.0})).delta()["b"], one["b"].sum(0))


def _pcb_by_hand(rows: list[list[float]], ratio: float, lam: float) -> list[float]:
    """PCB with no clipping (clip 0), written element by element."""
    T, n = len(rows), len(rows[0])

    def minmax(xs):
        lo, hi = min(xs), max(xs)
        return [(x - lo) / (hi - lo) for x in xs]

    col = [sum(r[j] for r in rows) for j in range(n)]
    scales = []
    for r in rows:
        intra = [math.exp(T * m ** 2) for m in minmax([abs(x) for x in r])]
        score = [intra[j] * math.tanh(r[j] * col[j]) for j in range(n)]
        floor = sorted(score)[int(n * (1 - ratio))]
        scales.append(minmax([max(x, floor) for x in score]))
    out = []
    for j in range(n):
        den = sum(s[j] for s in scales)
        out.append(lam * sum(s[j] * r[j] for s, r in zip(scales, rows)) / max(den, 1e-12))
    return out


def test_pcb_by_hand():
    rows = [[0.5, -1.0, 2.0, 0.1, -0.3, 1.5], [1.0, 1.0, -0.5, 0.2, -0.4, 0.3]]
    s = {"a": torch.tensor(rows)[:, :4], "b": torch.tensor(rows)[:, 4:]}  # the whole model competes
    got = run("pcb", s, ratio=0.5, clip=0.0, lam=0.8)
    want = _pcb_by_hand(rows, 0.5, 0.8)
    assert torch.allclose(torch.cat([got["a"], got["b"]]), torch.tensor(want), atol=1e-6)


def test_pcb_clips_outliers_to_the_quantiles():
    row = [0.01 * (i + 1) for i in range(100)]
    row[0], row[99] = 1e-6, 50.0
    s = {"w": torch.tensor([row, row])}
    res = get_merge("pcb").run(s, get_merge("pcb").options({"clip": 0.01, "ratio": 1.0}))
    # clipped to positions int(100·0.01) = 1 and int(100·0.99 − 1) = 98 of the sorted magnitudes;
    # entry 0 keeps the lowest score (its inter-task term uses the unclipped 1e-6), which
    # min-max scaling maps to weight 0
    v = res.vectors["w"][0]
    assert v[99].item() == pytest.approx(0.99) and v[98].item() == pytest.approx(0.99)
    assert v[0].item() == 0.0 and v[1].item() == pytest.approx(0.02) and v[2].item() == pytest.approx(0.03)


def test_fisher_weights_by_hand():
    s = {"w": torch.tensor([[1.0, 1.0], [3.0, -1.0]])}
    spec = get_merge("fisher")
    fishers = {"w": torch.tensor([[1.0, 0.0], [3.0, 0.0]])}
    got = spec.run(s, spec.options({"floor": 1e-3}), fishers=fishers).delta()["w"]
    # entry 0: (1·1 + 3·3)/4 = 2.5; entry 1: both floored to 1e-3 -> plain mean 0
    assert torch.allclose(got, torch.tensor([2.5, 0.0]))


def test_expected_fisher_of_softmax_regression_is_p_one_minus_p_x_squared():
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    x = torch.randn(10, 4)
    got = diagonal_fisher(model, nn.Identity(), x, ["weight"], mode="expected", chunk=4)["weight"]
    p = torch.softmax(x @ model.weight.detach().T, -1)  # [N, C]
    want = (p * (1 - p)).T @ (x ** 2) / x.shape[0]  # F[i, j] = mean_x p_i (1 − p_i) x_j²
    assert torch.allclose(got, want, atol=1e-6)
    sampled = diagonal_fisher(model, nn.Identity(), x.repeat(200, 1), ["weight"], mode="sample",
                              generator=torch.Generator().manual_seed(0), chunk=500)["weight"]
    assert torch.allclose(sampled, want, rtol=0.15, atol=1e-3)  # unbiased: close with 2000 draws


# --------------------------------------------------------------------------- the registry
def test_registry_lists_every_merge_and_refuses_duplicates_and_typos():
    assert list_merges() == REGISTERED
    with pytest.raises(InputError, match="already registered"):
        register_merge("ties", get_merge("ties").Options)(lambda stacks, options: None)
    with pytest.raises(InputError, match="did you mean 'ties'"):
        get_merge("tiess")
    with pytest.raises(InputError, match="unknown option 'bta' for merge 'lines' \\(did you mean 'beta'\\?\\)"):
        get_merge("lines").options({"bta": 0.3})
    for name, bad in [("ties", {"density": 1.5}), ("dare", {"p": 1.0}), ("consensus", {"k": 1.5}),
                      ("fisher", {"mode": "exact"}), ("pcb", {"ratio": 0}), ("lines", {"beta": "x"})]:
        with pytest.raises(InputError) as err:
            get_merge(name).options(bad)
        assert "\n" not in str(err.value) and f"merge '{name}'" in str(err.value)


@pytest.fixture(scope="module")
def tiny_parts(tiny_zoo_dir, tmp_path_factory):
    cfg = load_config(write_config(tmp_path_factory.mktemp("merges"), tiny_zoo_dir))
    return build_all(cfg)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_merge_on_the_tiny_zoo_gives_finite_weights_that_differ_from_the_base(tiny_parts, name):
    model, tv = tiny_parts["model"], tiny_parts["tv"]
    mm = build_data_free(name, model, tv, options=FAST.get(name), heads=tiny_parts["heads"], streams=tiny_parts["streams"])
    assert not mm.coefficients.requires_grad
    state = mm.merged_state_dict()
    assert set(state) == set(tv.base)
    params = [n for n, _ in model.named_parameters()]
    assert all(torch.isfinite(state[k]).all() for k in params)
    moved = sum(not torch.equal(state[k], tv.base[k]) for k in params)
    assert moved >= len(params) // 2, f"{name} moved only {moved} of {len(params)} tensors"


def test_the_registry_matrix_covers_every_registered_merge():
    assert sorted(REGISTERED) == list_merges() and set(FAST) <= set(REGISTERED)


# --------------------------------------------------------------------------- composition
def _build(parts, options):
    method = create_method("adamerging")
    cfg = method.config(options)
    return method.build(parts["model"], parts["tv"], cfg), cfg


def test_preprocess_rewrites_only_the_parameters_task_vectors(tiny_parts):
    tv, model = tiny_parts["tv"], tiny_parts["model"]
    params = [n for n, _ in model.named_parameters()]
    merged, _ = _build(tiny_parts, {"preprocess": {"merge": "dare", "p": 0.5, "seed": 3}})
    spec = get_merge("dare")
    want = spec.run({k: tv.vectors[k] for k in params}, spec.options({"p": 0.5, "seed": 3})).vectors
    for i, k in enumerate(merged.merge_keys):
        assert torch.equal(merged._tensor("_tau", i), want[k]), k
    assert torch.allclose(merged.applied_coefficients(), torch.tensor(0.3))  # init untouched
    plain, _ = _build(tiny_parts, {})
    assert torch.equal(plain._tensor("_tau", 0), tv.vectors[plain.merge_keys[0]])


def test_preprocess_ties_is_the_adamerging_plus_plus_preset(tiny_parts):
    model, tv = tiny_parts["model"], tiny_parts["tv"]
    pp = create_method("adamerging++")
    preset = pp.build(model, tv, pp.config({}))
    via, _ = _build(tiny_parts, {"preprocess": {"merge": "ties", "density": 0.2}})
    params = [n for n, _ in model.named_parameters()]
    by_hand = ties_vectors({k: tv.vectors[k] for k in params}, 0.2)
    for i, k in enumerate(preset.merge_keys):
        assert torch.equal(preset._tensor("_tau", i), by_hand[k])
        assert torch.equal(via._tensor("_tau", i), by_hand[k])


def test_init_from_lines_sets_the_depth_profile_and_leaves_the_task_vectors(tiny_parts):
    tv = tiny_parts["tv"]
    merged, _ = _build(tiny_parts, {"init": {"merge": "lines", "beta": 0.5}})
    from adamerge.merges.lines import depth_scales

    scales = depth_scales(merged.merge_keys, 1.0 / len(TASKS), 0.5)
    coef = merged.applied_coefficients()
    for i, k in enumerate(merged.merge_keys):
        assert torch.allclose(coef[:, merged.group_index(k)], torch.tensor(scales[k])), k
        assert torch.equal(merged._tensor("_tau", i), tv.vectors[k])
    # the tiny ViT has two residual blocks: α = 1/3 outside and in block 0, α + β in block 1
    assert {round(v, 6) for v in scales.values()} == {round(1 / 3, 6), round(1 / 3 + 0.5, 6)}
    assert scales["transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(1 / 3 + 0.5)
    ta, _ = _build(tiny_parts, {"granularity": "task", "init": {"merge": "task_arithmetic", "lam": 0.25}})
    assert torch.allclose(ta.applied_coefficients(), torch.full((len(TASKS), 1), 0.25))


def test_coefficients_for_groups_take_the_size_weighted_mean():
    shapes = {"a": torch.Size([2, 3]), "b": torch.Size([2])}
    coef = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([5.0, 6.0])}
    task = coefficients_for_groups(coef, make_grouping("task", shapes), shapes)
    assert torch.allclose(task, torch.tensor([[(6 * 1 + 2 * 5) / 8], [(6 * 2 + 2 * 6) / 8]]))
    part = coefficients_for_groups(coef, make_grouping("partition:2", shapes), shapes)
    assert torch.allclose(part, torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 6.0, 6.0]]))


def test_bad_preprocess_and_init_are_one_line_errors():
    method = create_method("adamerging")
    for options, match in [
        ({"preprocess": "lines"}, "does not rewrite the task vectors"),
        ({"preprocess": "fisher"}, "needs data"),
        ({"init": {"merge": "fisher"}}, "needs data"),
        ({"init": {"merge": "line"}}, "did you mean 'lines'"),
        ({"init": {"merge": "lines", "gamma": 1}}, "unknown option 'gamma'"),
        ({"preprocess": {"density": 0.2}}, "must be a merge name"),
    ]:
        with pytest.raises(InputError, match=match) as err:
            method.config(options)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="either 'ties_density' or 'preprocess'"):
        create_method("adamerging++").config({"preprocess": "dare"})
    assert merge_request("ties", "preprocess")[1].density == 0.2


def test_fit_with_preprocess_and_init_from_merges(tiny_zoo_dir, tmp_path):
    options = {"granularity": "layer", "steps": 2, "lr": 0.01, "preprocess": {"merge": "breadcrumbs", "bottom": 0.5},
               "init": {"merge": "lines", "beta": 0.4}}
    cfg = write_config(tmp_path, tiny_zoo_dir, options=options)
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["options"]["init"] == {"merge": "lines", "beta": 0.4}
    assert main(["eval", "--run", str(tmp_path / "run")]) == 0


# --------------------------------------------------------------------------- the eval CLI
@pytest.mark.parametrize("name", REGISTERED)
def test_eval_cli_accepts_every_registered_merge(tiny_zoo_dir, tmp_path, name):
    cfg = write_config(tmp_path, tiny_zoo_dir)
    extra = [arg for k, v in FAST.get(name, {}).items() for arg in (f"--options.{k}", str(v))]
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", str(cfg), "--method", name, "--out", str(out), *extra]) == 0
    rows = json.loads(out.read_text())["methods"]
    assert len(rows) == 1 and next(iter(rows)).startswith(name)


def test_eval_cli_options_grid_and_errors(tiny_zoo_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_zoo_dir)
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", str(cfg), "--method", "lines", "--options.beta", "0.7", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["methods"]) == ["lines(beta=0.7)"]
    assert main(["eval", "--config", str(cfg), "--method", "dare", "--lam", "0.2", "0.4", "--options.p", "0.3", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["methods"]) == ["dare(lam=0.2,p=0.3)", "dare(lam=0.4,p=0.3)"]
    capsys.readouterr()
    assert main(["eval", "--config", str(cfg), "--method", "lines", "--options.bta", "0.7"]) == 2
    assert "did you mean 'beta'" in capsys.readouterr().err
    assert main(["eval", "--config", str(cfg), "--method", "weight_average", "--lam", "0.3"]) == 2
    assert "has no λ" in capsys.readouterr().err


# --------------------------------------------------------------------------- TALL task masks
def test_pack_bits_round_trip():
    from adamerge.io.task_masks import pack_bits, unpack_bits

    mask = torch.rand(1001, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bits(packed, 1001), mask)
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist() == [129, 128]


def test_task_masks_round_trip_through_export(tiny_zoo_dir, tmp_path, capsys):
    from adamerge.io.state_dicts import load_state_dict
    from adamerge.io.task_masks import MASKS_FILE, load_task_state

    cfg = write_config(tmp_path, tiny_zoo_dir, options={"granularity": "layer", "steps": 2, "lr": 0.01})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), str(out), "--task-masks", "--mask-lambda", "0.5"]) == 0
    merged = load_state_dict(out / "model.safetensors")
    base = load_state_dict(tiny_zoo_dir / "base.safetensors")
    experts = {t: load_state_dict(tiny_zoo_dir / "experts" / f"{t}.safetensors") for t in TASKS}
    from adamerge.zoo.tiny import tiny_vit

    params = [n for n, _ in tiny_vit().named_parameters()]
    for t in TASKS:
        got = load_task_state(out, t)
        assert set(got) == set(base)
        for k in params:  # by hand, in float64: |τ_t| > λ |Δ − τ_t| -> merged, else base
            tau = experts[t][k].double() - base[k].double()
            delta = merged[k].double() - base[k].double()
            want = torch.where(tau.abs() > 0.5 * (delta - tau).abs(), merged[k], base[k])
            assert torch.equal(got[k], want), (t, k)
    # the masks cost one bit per parameter and task
    n_params = sum(base[k].numel() for k in params)
    size = (out / MASKS_FILE).stat().st_size
    assert size < len(TASKS) * n_params / 8 + 64 * len(TASKS) * len(params) + 4096
    with pytest.raises(InputError, match="did you mean 'task1'"):
        load_task_state(out, "task_1")
    with pytest.raises(InputError, match="export the run with --task-masks"):
        load_task_state(tmp_path, "task0")
