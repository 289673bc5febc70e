"""No silent wrong answer (issue 21): every option is parsed by one typed parser (a quoted 'false'
is false, 'no' / 0 / '0' are errors), a merge whose options keep nothing is refused, T3's
coefficients stay finite for any finite option, a pool listed as paths keeps every candidate, and
a float64 (or bfloat16) model is merged in its own dtype, Fisher merging included."""
from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
import torch
from safetensors.torch import load_file, save_file

from adamerge.checks import check_bool, check_float, check_int, check_list, parse_options
from adamerge.cli import main
from adamerge.config import build_all, load_config, resolve_paths
from adamerge.core.merged import MergedModel
from adamerge.core.task_vectors import TaskVectors
from adamerge.core.test_time import T3Options, TestTimeMerger, t3_coefficients, t3_merged_model
from adamerge.errors import InputError
from adamerge.merges import get_merge, list_merges, run_merge
from adamerge.methods import build_data_free, create_method, list_methods
from adamerge.solvers import list_solvers, solver_class
from helpers import TASKS, write_config


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    text = str(err.value)
    assert text and "\n" not in text, text
    assert all(w in text for w in words), (words, text)
    return text


# --------------------------------------------------------------------------- the typed checks
@pytest.mark.parametrize("value, want", [(True, True), (False, False), ("false", False), ("TRUE", True), (" False ", False)])
def test_check_bool_takes_only_true_and_false(value, want):
    assert check_bool("flag", value) is want


@pytest.mark.parametrize("value", ["no", "yes", 0, 1, "0", "1", None, 0.0, [], "f"])
def test_check_bool_refuses_everything_else_naming_the_option(value):
    with pytest.raises(InputError) as err:
        check_bool("per_task", value, owner="concrete option")
    one_line(err, "'per_task'", "true or false", repr(value))


def test_check_int_and_float_types_and_ranges():
    assert check_int("n", 3) == 3 and check_int("n", 4.0) == 4 and isinstance(check_int("n", 4.0), int)
    for bad in (2.5, True, "3", None, math.inf, math.nan):
        with pytest.raises(InputError):
            check_int("n", bad)
    with pytest.raises(InputError, match=">= 1"):
        check_int("n", 0, low=1)
    assert check_float("x", 1) == 1.0 and check_float("x", 0.5, low=0, high=1) == 0.5
    for bad in (math.inf, -math.inf, math.nan, True, "0.5", None, [0.5], 10**400):
        with pytest.raises(InputError):
            check_float("x", bad)
    with pytest.raises(InputError, match="> 0"):
        check_float("x", 0.0, low=0, low_open=True)
    with pytest.raises(InputError, match="< 1"):
        check_float("x", 1.0, high=1, high_open=True)
    with pytest.raises(InputError, match="YAML reads as text"):
        check_float("lr", "1e-3")  # YAML 1.1 reads 1e-3 as a string: the error says so


def test_check_list_length_and_items():
    assert check_list("init", [0.1, 1]) == [0.1, 1.0]
    with pytest.raises(InputError) as err:
        check_list("init", [0.1, 0.2], length=3, what="one per task")
    one_line(err, "'init'", "3 values", "one per task", "got 2")
    with pytest.raises(InputError, match=r"init\[1\]"):
        check_list("init", [0.1, math.nan])
    with pytest.raises(InputError, match="must be a list"):
        check_list("init", 0.3)


# --------------------------------------------------------------------------- every options dataclass
def _options_classes() -> list[tuple[str, type]]:
    """Every dataclass an option mapping is parsed into: merges, solvers, methods' method_args."""
    out = [(f"merge {n}", get_merge(n).Options) for n in list_merges()]
    out += [(f"solver {n}", solver_class(n).Options) for n in list_solvers()]
    out += [(f"method {n}", create_method(n).method_args_class) for n in list_methods()
            if create_method(n).method_args_class is not None]
    return out


def _kinds(cls: type) -> dict[str, type]:
    """field -> bool / int / float (optional or not) for the typed fields of ``cls``."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if len(args) == 1 and args[0] in (bool, int, float):
            out[f.name] = args[0]
    return out


def _optional(cls: type, name: str) -> bool:
    """Whether ``None`` is a documented value of the field (``X | None``: "the default of ...")."""
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def test_the_matrix_sees_the_boolean_options():
    found = {(owner, name) for owner, cls in _options_classes() for name, kind in _kinds(cls).items() if kind is bool}
    assert {("method concrete_ta", "per_task"), ("solver doge", "per_task"), ("method fw_merging", "soft")} <= found


@pytest.mark.parametrize("owner, cls", _options_classes(), ids=[o for o, _ in _options_classes()])
def test_every_typed_option_is_parsed_by_its_type(owner, cls):
    for name, kind in _kinds(cls).items():
        if kind is bool:
            assert getattr(parse_options(cls, {name: "false"}, owner), name) is False
            assert getattr(parse_options(cls, {name: "True"}, owner), name) is True
            bad = ["no", 0, "0", 1] + ([] if _optional(cls, name) else [None])
        elif kind is int:
            bad = [2.5, True, "3", math.inf]
        else:
            bad = [math.inf, math.nan, True, "x", [1.0]]
        for value in bad:
            with pytest.raises(InputError) as err:
                parse_options(cls, {name: value}, owner)
            one_line(err, f"'{name}'", owner)


@pytest.mark.parametrize("method, options, read", [
    ("concrete_ta", {"method_args": {"per_task": "false"}}, lambda c: c.method_args["per_task"]),
    ("concrete_adamerging", {"method_args": {"per_task": "FALSE"}}, lambda c: c.method_args["per_task"]),
    ("doge", {"solver_args": {"per_task": "false"}}, lambda c: c.solver_args["per_task"]),
    ("doge_adamerging", {"prepare_args": {"per_task": "false"}}, lambda c: c.prepare_args["per_task"]),
    ("fw_merging", {"method_args": {"soft": "false"}}, lambda c: c.method_args["soft"]),
    ("adamerging", {"objective": "expert_distill", "objective_args": {"hard": "false"}}, lambda c: c.objective_args["hard"]),
    ("adamerging", {"micro_batch": "false"}, lambda c: c.micro_batch),
])
def test_a_quoted_false_is_false_in_every_args_mapping(method, options, read):
    cfg = create_method(method).config(options)
    assert read(cfg) is False
    if method.startswith("concrete"):
        assert create_method(method).method_options(cfg).per_task is False


@pytest.mark.parametrize("method, options, word", [
    ("concrete_ta", {"method_args": {"per_task": "no"}}, "per_task"),
    ("concrete_ta", {"method_args": {"per_task": 0}}, "per_task"),
    ("doge", {"solver_args": {"per_task": "0"}}, "per_task"),
    ("doge_adamerging", {"prepare_args": {"per_task": "yes"}}, "per_task"),
    ("fw_merging", {"method_args": {"soft": 1}}, "soft"),
    ("adamerging", {"objective": "expert_distill", "objective_args": {"hard": "no"}}, "hard"),
    ("adamerging", {"objective": "expert_distill", "objective_args": {"temperature": 0.0}}, "temperature"),
    ("adamerging", {"objective": "expert_distill", "objective_args": {"hardd": True}}, "did you mean 'hard'"),
    ("adamerging", {"objective": "infomax", "objective_args": {"floor": "0.9"}}, "floor"),
    ("adamerging", {"steps": 2.5}, "steps"),
    ("adamerging", {"steps": True}, "steps"),
    ("adamerging", {"lr": math.inf}, "lr"),
    ("adamerging", {"bounds": [0.0, math.nan]}, "bounds"),
    ("adamerging", {"solver": "pgd", "solver_args": {"betas": [0.9]}}, "betas"),
    ("adamerging", {"solver": "pgd", "solver_args": {"eps": "1e-8"}}, "eps"),
    ("adamerging", {"solver": "frank_wolfe", "solver_args": {"line_search_evals": 2.5}}, "line_search_evals"),
    ("adamerging", {"preprocess": {"merge": "ties", "density": "0.2"}}, "density"),
    ("adamerging", {"init": {"merge": "lines", "alpha": True}}, "alpha"),
    ("concrete_ta", {"method_args": {"temperature": 1e-300}}, "temperature"),
    ("atlas", {"method_args": {"shots": 2.5}}, "shots"),
    ("t3", {"method_args": {"gamma": math.inf}}, "gamma"),
    ("t3", {"method_args": {"lam_max": 1e300}}, "lam_max"),
    # a mapping the method never reads is refused, not ignored
    ("adamerging", {"method_args": {"per_task": True}}, "no method_args"),
    ("adamerging", {"prepare_args": {"per_task": True}}, "no prepare solver"),
    ("t3", {"solver_args": {"schedule": "cosine"}}, "would be ignored"),
])
def test_bad_options_are_one_line_errors_naming_the_option(method, options, word):
    with pytest.raises(InputError) as err:
        create_method(method).config(options)
    one_line(err, word)


# --------------------------------------------------------------------------- init: one per task
def test_init_lists_one_per_task_and_the_wrong_length_is_refused(make_zoo):
    model, base, experts = make_zoo("vit", 3)
    tv = TaskVectors.from_state_dicts(base, experts)
    method = create_method("adamerging")
    for granularity in ("task", "layer"):
        cfg = method.config({"init": [0.1, 0.2, 0.3], "granularity": granularity})
        merged = method.build(model, tv, cfg)
        coef = merged.applied_coefficients()
        assert torch.allclose(coef, torch.tensor([[0.1], [0.2], [0.3]]).expand_as(coef))
        for wrong in ([0.1, 0.2], [0.5], [0.1] * merged.grouping.num_groups):
            if len(wrong) == 3:
                continue
            with pytest.raises(InputError) as err:
                method.build(model, tv, method.config({"init": wrong, "granularity": granularity}))
            one_line(err, "'init'", "3 values", "one per task")
    mm = MergedModel(model, tv, "layer")
    for wrong in ([0.1, 0.2], torch.zeros(mm.grouping.num_groups), torch.zeros(2, 2)):
        with pytest.raises(InputError):
            mm.set_coefficients(wrong)


def test_fit_refuses_a_wrong_length_init_before_writing(tiny_zoo_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_zoo_dir, **{"options.init": [0.1, 0.2], "options.steps": 2})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'init'" in err[0] and "one per task" in err[0]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- merges that keep nothing
@pytest.fixture(scope="module")
def tiny_parts(tiny_zoo_dir, tmp_path_factory):
    return build_all(load_config(write_config(tmp_path_factory.mktemp("optrel"), tiny_zoo_dir)))


def _params(parts) -> list[str]:
    return [n for n, _ in parts["model"].named_parameters()]


@pytest.mark.parametrize("merge, options, words", [
    ("consensus", {"k": 9}, ["'k' = 9", "at most 3", "[0, 3]"]),
    ("consensus", {"k": 4}, ["'k' = 4", "[0, 3]"]),
    ("ties", {"density": 1e-9}, ["'density'", "keeps round"]),
    ("pcb", {"ratio": 1e-9}, ["'ratio'", "keeps none"]),
    ("dare", {"p": 1 - 1e-12}, ["keeps no entry", "pretrained model", "lower p"]),
    ("consensus", {"k": 3, "tall_lambda": 1e12}, ["keeps no entry", "lower k or tall_lambda"]),
])
def test_a_merge_that_keeps_nothing_is_refused(tiny_parts, merge, options, words):
    with pytest.raises(InputError) as err:
        run_merge(merge, tiny_parts["tv"], _params(tiny_parts), options)
    one_line(err, f"merge '{merge}'", *words)
    # as preprocess of a learned method, too
    method = create_method("adamerging")
    with pytest.raises(InputError) as err:
        method.build(tiny_parts["model"], tiny_parts["tv"], method.config({"preprocess": {"merge": merge, **options}}))
    one_line(err, f"merge '{merge}'")


def test_the_legitimate_edges_are_explicit(tiny_parts):
    tv, keys = tiny_parts["tv"], _params(tiny_parts)
    # consensus k = 0 keeps every entry: exactly task arithmetic
    k0 = run_merge("consensus", tv, keys, {"k": 0, "lam": 0.3}).delta()
    ta = run_merge("task_arithmetic", tv, keys, {"lam": 0.3}).delta()
    assert all(torch.equal(k0[k], ta[k]) for k in keys)
    # the smallest density / ratio the error names keeps something
    n = sum(tv.vectors[k][0].numel() for k in keys)
    kept = run_merge("ties", tv, keys, {"density": 1.0 / n}).vectors
    assert sum(int((kept[k] != 0).sum()) for k in keys) >= 1
    kept = run_merge("pcb", tv, keys, {"ratio": 2.0 / n}).vectors
    assert sum(int((kept[k] != 0).sum()) for k in keys) >= 1
    # the pure tensor function itself still returns what it computes (hand computations rely on it)
    spec = get_merge("consensus")
    assert not spec.run({"w": torch.ones(2, 3)}, spec.options({"k": 3})).vectors["w"].any()


def test_eval_and_fit_refuse_a_merge_that_keeps_nothing_in_one_line(tiny_zoo_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2})
    capsys.readouterr()
    assert main(["eval", "--config", str(cfg), "--method", "consensus", "--options.k", "9", "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'k' = 9" in err[0] and "[0, 3]" in err[0]
    assert not (tmp_path / "e.json").exists()
    fit_cfg = write_config(tmp_path / "fit", tiny_zoo_dir, **{"options.steps": 2, "options.preprocess": {"merge": "consensus", "k": 9}})
    assert main(["fit", "--config", str(fit_cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "merge 'consensus'" in err[0]
    assert not (tmp_path / "fit" / "run").exists()  # refused before anything is written
    pp = write_config(tmp_path / "pp", tiny_zoo_dir, **{"options.steps": 2, "method": "adamerging++", "options.ties_density": 1e-9})
    assert main(["fit", "--config", str(pp), "--no-progress"]) == 2
    assert "'density'" in capsys.readouterr().err and not (tmp_path / "pp" / "run").exists()


# --------------------------------------------------------------------------- T3: finite coefficients
@pytest.mark.parametrize("gamma", [1e6, 1e308, -1e308, 1e-300, 0.0])
@pytest.mark.parametrize("combine", ["softmax", "independent"])
@pytest.mark.parametrize("side", ["expert", "generalist"])
def test_t3_coefficients_are_finite_for_any_finite_gamma(gamma, combine, side):
    d = torch.tensor([[0.0, 0.3, 0.3], [1.0, 0.0, 1e-9], [0.0, 0.0, 0.0], [0.5, 0.5, 0.49999]])
    opts = T3Options(gamma=gamma, combine=combine, side=side, lam_min=-1e6, lam_max=1e6)
    c = t3_coefficients(d, opts)
    assert torch.isfinite(c).all() and (c >= -1e6).all() and (c <= 1e6).all()
    if combine == "softmax":  # the documented sum: λ_min·T + λ_max − λ_min
        assert torch.allclose(c.double().sum(-1), torch.full((4,), -1e6 * 3 + 2e6, dtype=torch.float64), atol=1.0)
    if gamma == 1e308 and combine == "softmax" and side == "expert":  # the limit: the argmax takes λ_max
        unit = t3_coefficients(d, T3Options(gamma=gamma, lam_min=0.0, lam_max=1.0))
        assert unit[1].tolist() == [1.0, 0.0, 0.0] and unit[0].tolist() == [0.0, 0.5, 0.5]


def test_t3_refuses_non_finite_options_and_predicts_finitely_at_extreme_gamma(make_zoo, inputs):
    for bad in ({"gamma": math.inf}, {"gamma": math.nan}, {"lam_min": -math.inf}, {"lam_max": 1e300}, {"log_base": math.inf}):
        with pytest.raises(InputError) as err:
            parse_options(T3Options, bad, "method 't3'")
        one_line(err, next(iter(bad)))
    model, base, experts = make_zoo("vit", 2)
    tv = TaskVectors.from_state_dicts(base, experts)
    from adamerge.train.data import LinearHead

    heads = {t: LinearHead(torch.randn(4, 16, generator=torch.Generator().manual_seed(i))) for i, t in enumerate(tv.task_names)}
    for per in ("sample", "batch"):
        merger = TestTimeMerger(t3_merged_model(model, tv), heads, T3Options(gamma=1e308, per=per))
        out = merger.predict(inputs("vit", 3), "t0")
        assert torch.isfinite(out.coefficients).all() and torch.isfinite(out.logits).all()


# --------------------------------------------------------------------------- pool names
def _pool_cfg(pool) -> dict:
    return {"base": "/z/base.safetensors", "experts": {}, "heads": {}, "model": {"source": "tiny_vit"},
            "run_dir": "/z/run", "pool": pool}


def test_a_pool_of_paths_keeps_every_candidate_with_readable_names(tmp_path):
    pool = resolve_paths(_pool_cfg(["a/x.safetensors", "b/x.safetensors", "c/y.safetensors"]), tmp_path)["pool"]
    root = tmp_path.resolve()
    assert pool == {"a_x": str(root / "a/x.safetensors"), "b_x": str(root / "b/x.safetensors"),
                    "y": str(root / "c/y.safetensors")}
    deep = resolve_paths(_pool_cfg(["r1/a/x.safetensors", "r2/a/x.safetensors"]), tmp_path)["pool"]
    assert list(deep) == ["r1_a_x", "r2_a_x"]
    for twice in (["a/x.safetensors", "a/x.safetensors"], ["a/x.safetensors", "a/../a/x.safetensors"],
                  {"one": "a/x.safetensors", "two": "a/x.safetensors"}):
        with pytest.raises(InputError) as err:
            resolve_paths(_pool_cfg(twice), tmp_path)
        one_line(err, "twice")


def test_fw_merging_with_a_pool_whose_file_names_repeat_keeps_both(tiny_zoo_dir, tmp_path):
    base = load_file(str(tiny_zoo_dir / "base.safetensors"))
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        save_file(load_file(str(tiny_zoo_dir / "experts" / "task1.safetensors")) if sub == "a" else base,
                  str(tmp_path / sub / "x.safetensors"))
    experts = [str(tiny_zoo_dir / "experts" / f"{t}.safetensors") for t in TASKS]
    cfg = write_config(tmp_path, tiny_zoo_dir, method="fw_merging", pool=[*experts, str(tmp_path / "a" / "x.safetensors"),
                       str(tmp_path / "b" / "x.safetensors")], options={"method_args": {"iterations": 1}, "batch_size": 16})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    pool = json.loads((tmp_path / "run" / "results.json").read_text())["fw_merging"]["pool"]
    assert {"a_x", "b_x", *TASKS} == set(pool)


# --------------------------------------------------------------------------- dtype
def _hand(tv: TaskVectors, mm: MergedModel, lam: torch.Tensor) -> dict:
    """θ0 + Σ_t λ[t, g(k)] τ_t in float64."""
    out = {}
    for k in mm.merge_keys:
        c = lam[:, mm.group_index(k)].to(torch.float64)
        out[k] = tv.base[k].to(torch.float64) + (c.reshape(-1, *[1] * tv.base[k].dim()) * tv.vectors[k].to(torch.float64)).sum(0)
    return out


def _as(sd: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_a_float64_merge_is_float64_end_to_end(make_zoo, inputs, granularity):
    model, base, experts = make_zoo("vit", 3)
    tv = TaskVectors.from_state_dicts(_as(base, torch.float64), {n: _as(e, torch.float64) for n, e in experts.items()},
                                      dtype=torch.float64)
    mm = MergedModel(model, tv, granularity, init=0.3, clamp=None)
    assert mm.coefficients.dtype == torch.float64
    lam = torch.rand(mm.coefficients.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mm.set_coefficients(lam)
    merged, want = mm.merged_parameters(), _hand(tv, mm, lam)
    for k in mm.merge_keys:
        assert merged[k].dtype == torch.float64
        assert torch.allclose(merged[k], want[k], rtol=0, atol=1e-12), k
    # a python-float coefficient is kept exactly (no float32 rounding of 0.3)
    mm.set_coefficients(0.3)
    want = _hand(tv, mm, torch.full(mm.coefficients.shape, 0.3, dtype=torch.float64))
    assert all(torch.allclose(mm.merged_parameters()[k], want[k], rtol=0, atol=1e-12) for k in mm.merge_keys)
    # a float32 batch goes through the float64 model, and the gradient is right
    x = inputs("vit", 1)
    assert mm(x).dtype == torch.float64
    proj = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def f(c):
        return torch.func.functional_call(mm, {"coefficients": c}, (x,)) @ proj

    c = lam.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (c,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=c.numel() > 100)


def test_bfloat16_task_vectors_are_merged_into_the_base_dtype(make_zoo):
    model, base, experts = make_zoo("vit", 2)
    tv16 = TaskVectors.from_state_dicts(base, experts, dtype="bfloat16")  # stored bf16, float32 base
    mm = MergedModel(model, tv16, "layer", init=0.3)
    assert mm.coefficients.dtype == torch.float32
    want = _hand(tv16, mm, mm.applied_coefficients().detach())
    for k, v in mm.merged_parameters().items():
        assert v.dtype == torch.float32 and torch.allclose(v.double(), want[k], atol=1e-6)
    # a bfloat16 model: computed in float32, returned in bfloat16
    tvb = TaskVectors.from_state_dicts(_as(base, torch.bfloat16), {n: _as(e, torch.bfloat16) for n, e in experts.items()},
                                       dtype="bfloat16")
    mmb = MergedModel(model, tvb, "layer", init=0.3)
    want = _hand(tvb, mmb, mmb.applied_coefficients().detach())
    for k, v in mmb.merged_parameters().items():
        # one rounding to bfloat16 at the end (2^-8 relative), not bfloat16 arithmetic throughout
        assert v.dtype == torch.bfloat16, k
        assert ((v.double() - want[k]).abs() <= want[k].abs() * 2.0**-8 + 1e-30).all(), k


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_fisher_merging_of_float64_and_bfloat16_models(tiny_parts, dtype):
    tv = tiny_parts["tv"]
    tvd = TaskVectors(_as(tv.base, dtype), {k: v.to(dtype) for k, v in tv.vectors.items()}, tv.task_names, tv.sources)
    opts = {"samples": 8, "chunk": 8, "mode": "expected"}  # no sampled labels: the dtypes see the same Fisher
    ref = build_data_free("fisher", tiny_parts["model"], tv, options=opts, heads=tiny_parts["heads"],
                          streams=tiny_parts["streams"]).merged_state_dict()
    got = build_data_free("fisher", tiny_parts["model"], tvd, options=opts, heads=tiny_parts["heads"],
                          streams=tiny_parts["streams"]).merged_state_dict()
    tol = 1e-4 if dtype == torch.float64 else 2e-2
    for k in _params(tiny_parts):
        assert got[k].dtype == dtype and torch.isfinite(got[k].float()).all(), k
        assert torch.allclose(got[k].float(), ref[k].float(), atol=tol, rtol=tol), k


def test_eval_on_float64_and_bfloat16_weight_files(tiny_zoo_dir, tmp_path):
    for dtype in (torch.float64, torch.bfloat16):
        zoo = tmp_path / str(dtype).split(".")[-1]
        (zoo / "experts").mkdir(parents=True)
        save_file(_as(load_file(str(tiny_zoo_dir / "base.safetensors")), dtype), str(zoo / "base.safetensors"))
        for t in TASKS:
            save_file(_as(load_file(str(tiny_zoo_dir / "experts" / f"{t}.safetensors")), dtype), str(zoo / "experts" / f"{t}.safetensors"))
        cfg = write_config(zoo, tiny_zoo_dir, base=str(zoo / "base.safetensors"),
                           experts={t: str(zoo / "experts" / f"{t}.safetensors") for t in TASKS})
        for method, extra in (("task_arithmetic", []), ("fisher", ["--options.samples", "8", "--options.chunk", "8"])):
            out = zoo / f"{method}.json"
            assert main(["eval", "--config", str(cfg), "--method", method, "--out", str(out), *extra]) == 0, (dtype, method)
            assert json.loads(out.read_text())["methods"]


def test_storage_dtype_auto_keeps_a_float64_base_in_float64(tiny_zoo_dir, tmp_path):
    """The config's default storage (``auto``) follows the base: a float64 model's task vectors
    are not rounded to float32 before the float64 merge."""
    from adamerge.plan import RunPlan

    zoo = tmp_path / "f64"
    (zoo / "experts").mkdir(parents=True)
    save_file(_as(load_file(str(tiny_zoo_dir / "base.safetensors")), torch.float64), str(zoo / "base.safetensors"))
    for t in TASKS:
        save_file(_as(load_file(str(tiny_zoo_dir / "experts" / f"{t}.safetensors")), torch.float64),
                  str(zoo / "experts" / f"{t}.safetensors"))
    cfg = write_config(zoo, tiny_zoo_dir, base=str(zoo / "base.safetensors"),
                       experts={t: str(zoo / "experts" / f"{t}.safetensors") for t in TASKS})
    plan = RunPlan.from_config(cfg).build()
    assert plan.cfg["storage_dtype"] == "auto" and plan.parts["tv"].dtype == torch.float64
    plan32 = RunPlan.from_config(cfg, [("storage_dtype", "float32")]).build()
    assert plan32.parts["tv"].dtype == torch.float32
    assert RunPlan.from_config(write_config(tmp_path / "f32", tiny_zoo_dir)).build().parts["tv"].dtype == torch.float32
