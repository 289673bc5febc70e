"""Solvers: convex problems with known optima, and a matrix generated from the registries
(every data solver × constraint × granularity on the tiny zoo: the objective falls, every
iterate is feasible, a run cut at a random step and resumed ends where an uninterrupted one does)."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adamerge.cli import main
from adamerge.errors import InputError
from adamerge.methods import MethodConfig
from adamerge.train.runs import read_metrics
from adamerge.solvers import create_solver, list_solvers, solver_class
from adamerge.solvers.frank_wolfe import FrankWolfe, average_weight, golden_section
from adamerge.solvers.pgd import ProjectedGradient
from adamerge.solvers.projections import is_feasible, project
from helpers import crash_then_resume, write_config

GRANULARITIES = ["task", "block", "layer", "partition:2"]
BOUNDS = (0.0, 1.0)


# ---------------------------------------------------------------------------- convex problems
def _quadratic(seed: int, T: int = 4, G: int = 3):
    """f(x) = ½ Σ w ⊙ (x − c)², w > 0 per entry (separable, strongly convex)."""
    gen = torch.Generator().manual_seed(seed)
    c = 1.5 * torch.randn(T, G, generator=gen, dtype=torch.float64)
    w = 0.5 + torch.rand(T, G, generator=gen, dtype=torch.float64)
    return c, w


def _optimum(c, w, constraint):
    """The exact minimiser: clamp for the box; for the simplex, x = max(0, c − ν/w) per column
    with ν found by bisection so that the column sums to 1 (KKT)."""
    if constraint == "box":
        return c.clamp(*BOUNDS)
    lo = torch.full((c.shape[1],), -1e3, dtype=c.dtype)
    hi = torch.full((c.shape[1],), 1e3, dtype=c.dtype)
    for _ in range(200):
        nu = (lo + hi) / 2
        s = (c - nu / w).clamp_min(0).sum(0)
        lo = torch.where(s > 1, nu, lo)
        hi = torch.where(s > 1, hi, nu)
    return (c - (lo + hi) / 2 / w).clamp_min(0)


def _f(x, c, w):
    return 0.5 * (w * (x - c) ** 2).sum()


@pytest.mark.parametrize("constraint", ["box", "simplex"])
@pytest.mark.parametrize("preconditioner,schedule,steps,tol", [("none", "constant", 300, 1e-8), ("adam", "decay", 3000, 1e-3)])
def test_pgd_reaches_the_optimum_and_stays_feasible(constraint, preconditioner, schedule, steps, tol):
    for seed in range(3):
        c, w = _quadratic(seed)
        x = nn.Parameter(project(torch.full_like(c, 0.3), constraint))
        lr = 0.5 if preconditioner == "none" else 0.1
        opt = ProjectedGradient([x], lr, constraint, BOUNDS, 1.0, preconditioner, schedule)
        for _ in range(steps):
            opt.zero_grad()
            _f(x, c, w).backward()
            opt.step()
            assert is_feasible(x.detach(), constraint, BOUNDS, 1.0, atol=1e-9)
        x_star = _optimum(c, w, constraint)
        assert float(_f(x.detach(), c, w) - _f(x_star, c, w)) < tol
        assert torch.allclose(x.detach(), x_star, atol=10 * tol**0.5)


def test_adam_with_the_euclidean_simplex_projection_stalls():
    """Why pgd projects in Adam's metric: with the Euclidean projection, Adam's fixed points are not
    the constrained optimum (README: excess loss 1.36 on this quadratic, seed 0)."""
    from adamerge.solvers.projections import project_simplex

    c, w = _quadratic(0)
    x = nn.Parameter(project_simplex(torch.full_like(c, 0.3)))
    opt = torch.optim.Adam([x], lr=0.1)
    for t in range(3000):
        for g in opt.param_groups:
            g["lr"] = 0.1 / (t + 1) ** 0.5
        opt.zero_grad()
        _f(x, c, w).backward()
        opt.step()
        with torch.no_grad():
            x.copy_(project_simplex(x))
    excess = float(_f(x.detach(), c, w) - _f(_optimum(c, w, "simplex"), c, w))
    assert excess > 1.0, excess
    assert round(excess, 2) == 1.36


@pytest.mark.parametrize("constraint", ["box", "simplex"])
@pytest.mark.parametrize("line_search", [False, True])
def test_frank_wolfe_gap_goes_to_zero_and_iterates_stay_feasible(constraint, line_search):
    c, w = _quadratic(7)
    x = nn.Parameter(project(torch.full_like(c, 0.3), constraint))
    fw = FrankWolfe([x], constraint, BOUNDS, 1.0)
    gaps = []
    for t in range(2000):
        fw.zero_grad()
        _f(x, c, w).backward()
        gaps.append(fw.direction())
        assert gaps[-1] >= -1e-12  # the gap is non-negative
        if line_search:
            start = x.detach().clone()

            def trial(gamma):
                with torch.no_grad():
                    x.copy_(start)
                    fw.move(gamma)
                    return float(_f(x, c, w))

            gamma = golden_section(trial, 30)
            with torch.no_grad():
                x.copy_(start)
            fw.param_groups[0]["gamma"] = gamma
        fw.step()
        assert is_feasible(x.detach(), constraint, BOUNDS, 1.0, atol=1e-9)
    x_star = _optimum(c, w, constraint)
    excess = float(_f(x.detach(), c, w) - _f(x_star, c, w))
    assert excess < 2e-3
    # the gap bounds the excess loss (convexity) and falls towards zero
    assert min(gaps[-100:]) < 0.05 and min(gaps[-100:]) < 0.02 * gaps[0]


def test_frank_wolfe_running_average_and_golden_section():
    assert average_weight(1.0, 5) == 1.0 and average_weight(0.3, 5) == 0.3
    assert average_weight("decaying", 0) == 1.0 and 0 < average_weight("decaying", 100) < 0.2
    assert abs(golden_section(lambda g: (g - 0.37) ** 2, 30) - 0.37) < 1e-4
    assert golden_section(lambda g: -g, 20) > 0.99  # a monotone function: the end point


def test_solver_options_are_checked():
    cfg = MethodConfig(solver="pgd", constraint="simplex")
    with pytest.raises(InputError, match="preconditionr.*did you mean 'preconditioner'"):
        create_solver("pgd", cfg, {"preconditionr": "adam"})
    with pytest.raises(InputError, match="schedule"):
        create_solver("pgd", cfg, {"schedule": "cosine"})
    with pytest.raises(InputError, match="does not support constraint 'none'"):
        create_solver("frank_wolfe", MethodConfig(constraint="none"))
    with pytest.raises(InputError, match="did you mean 'frank_wolfe'"):
        MethodConfig(solver="frank_wolf")
    with pytest.raises(InputError, match="lo <= hi"):
        MethodConfig(bounds=[1.0, 0.0])
    with pytest.raises(InputError, match="total"):
        MethodConfig(constraint="simplex", total=0)
    with pytest.raises(InputError, match="steps"):
        MethodConfig(steps=-1)
    with pytest.raises(InputError, match="lr"):
        MethodConfig(lr="fast")


# ---------------------------------------------------------------------------- the registry matrix
DATA_CASES = [
    (s, c, g)
    for s in list_solvers(needs_data=True)
    for c in solver_class(s).constraints
    if c != "none"
    for g in GRANULARITIES
]


def _methods_running(solver: str) -> list[str]:
    from adamerge.methods import create_method, list_methods

    return [m for m in list_methods() if solver in [n for n, _, _ in create_method(m).solvers(create_method(m).config({}))]]


# every data-free solver, run by each registered method whose stages use it
FREE_CASES = [(s, m) for s in list_solvers(needs_data=False) for m in _methods_running(s)]


def test_matrix_covers_every_registered_solver():
    assert {s for s, _, _ in DATA_CASES} == set(list_solvers(needs_data=True)) >= {"gradient", "pgd", "frank_wolfe", "bilevel"}
    assert {s for s, _ in FREE_CASES} == set(list_solvers(needs_data=False)) >= {"doge"}


@pytest.mark.parametrize("solver,method", FREE_CASES, ids=["-".join(c) for c in FREE_CASES])
def test_data_free_solver_matrix(tiny_zoo_dir, tmp_path, solver, method):
    """A data-free stage: its own loss falls, its state is saved, the run exports."""
    options = {"steps": 3, "lr": 0.01, "prepare_args": {"steps_per_layer": 15}} if method != solver else {"steps": 15}
    cfg = write_config(tmp_path, tiny_zoo_dir, method=method, options=options)
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    stage = next(s for s in results["solvers"] if s["name"] == solver)
    assert stage["loss_last"] < stage["loss_first"]
    assert (tmp_path / "run" / "method_state.safetensors").is_file()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0


def _coefficients(run):
    return load_file(str(run / "coefficients.safetensors"))["coefficients"]


@pytest.mark.parametrize("solver,constraint,granularity", DATA_CASES, ids=["-".join(c) for c in DATA_CASES])
def test_solver_matrix(tiny_zoo_dir, tmp_path, monkeypatch, solver, constraint, granularity):
    steps, every = 24, 5
    needs_masks = solver_class(solver).needs_masks
    changes = {
        "method": "concrete_adamerging" if needs_masks else "adamerging",
        "options.method_args": {"adamerging_steps": 0} if needs_masks else {},
        "options.steps": steps,
        "options.granularity": granularity,
        "options.solver": solver,
        "options.constraint": constraint,
        "options.lr": 0.02,
        "checkpoint_every": every,
    }
    full = write_config(tmp_path / "full", tiny_zoo_dir, **changes)
    assert main(["fit", "--config", str(full), "--no-progress"]) == 0
    run = tmp_path / "full" / "run"
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert len(rows) == steps
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first, (first, last)  # the objective falls
    total = 1.0
    for r in rows:  # every iterate the model used was feasible
        assert r["coef/min"] >= BOUNDS[0] - 1e-6
        assert r["coef/max"] <= (BOUNDS[1] if constraint == "box" else total) + 1e-6
    coef = _coefficients(run)
    assert is_feasible(coef, constraint, BOUNDS, total, atol=1e-5)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["steps"] == steps
    assert results["solvers"][0]["name"] == solver and results["solvers"][0]["constraint"] == constraint
    if solver == "frank_wolfe":
        assert "fw_gap" in rows[0] and results["solvers"][-1]["final_gap"] is not None

    # cut at a random step after the first checkpoint, resume, compare
    cut_at = random.Random(f"{solver}-{constraint}-{granularity}").randint(every + 1, steps - 1)
    cut = write_config(tmp_path / "cut", tiny_zoo_dir, **changes)
    crash_then_resume(cut, cut_at, monkeypatch)
    cut_run = tmp_path / "cut" / "run"
    assert torch.equal(_coefficients(run), _coefficients(cut_run)), f"cut at {cut_at}"
    steps_logged = [int(r["step"]) for r in read_metrics(cut_run) if "loss" in r]
    resumed_from = (cut_at // every) * every
    assert steps_logged == list(range(cut_at)) + list(range(resumed_from, steps))


def test_resume_at_every_cut_point_of_a_long_run(tiny_zoo_dir, tmp_path, monkeypatch):
    """The reported defect: a run cut well before its middle diverged after step (steps − cut)."""
    steps, every = 60, 10
    changes = {"options.steps": steps, "checkpoint_every": every, "options.granularity": "task"}
    full = write_config(tmp_path / "full", tiny_zoo_dir, **changes)
    assert main(["fit", "--config", str(full), "--no-progress"]) == 0
    reference = _coefficients(tmp_path / "full" / "run")
    for cut_at in (13, 41, 58):
        folder = tmp_path / f"cut{cut_at}"
        crash_then_resume(write_config(folder, tiny_zoo_dir, **changes), cut_at, monkeypatch)
        assert torch.equal(reference, _coefficients(folder / "run")), f"cut at {cut_at}"


def test_frank_wolfe_stops_on_gap_tol(tiny_zoo_dir, tmp_path):
    cfg = write_config(tmp_path, tiny_zoo_dir, **{
        "options.solver": "frank_wolfe", "options.constraint": "simplex", "options.steps": 30,
        "options.solver_args": {"gap_tol": 1e9},
    })
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 1 and "gap_tol" in results["stopped_early"]


def test_default_solver_equals_a_plain_adam_loop(tiny_zoo_dir, tmp_path):
    """The ``gradient`` solver through Lightning = today's AdaMerging: Adam on the raw coefficients
    with the clamp in the forward, one batch per step (a hand-written loop, same batches)."""
    import functools

    from adamerge.config import build_all, load_config
    from adamerge.train.data import StepBatches
    from adamerge.methods import create_method
    from adamerge.train.objectives import get_objective

    steps = 12
    path = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": steps, "options.grad_clip": 0.05, "options.optimizer": "adamw", "options.weight_decay": 0.1})
    assert main(["fit", "--config", str(path), "--no-progress"]) == 0
    cfg = load_config(path)
    parts = build_all(cfg)
    m = create_method("adamerging")
    mcfg = m.config(cfg["options"])
    merged = m.build(parts["model"], parts["tv"], mcfg, seed=0)
    opt = torch.optim.AdamW([merged.coefficients], lr=mcfg.lr, weight_decay=mcfg.weight_decay)
    objective = functools.partial(get_objective(mcfg.objective))
    batches = StepBatches(parts["streams"], mcfg.batch_size, steps, seed=0)
    for s in range(steps):
        batch = batches[s].inputs
        names = list(batch)
        feats = merged(torch.cat([batch[n] for n in names])).split([batch[n].shape[0] for n in names])
        loss = sum(objective(parts["heads"][n](f)) for n, f in zip(names, feats))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([merged.coefficients], mcfg.grad_clip)
        opt.step()
    assert torch.allclose(merged.applied_coefficients().detach(), _coefficients(tmp_path / "run"), atol=1e-6)


def test_methods_and_solvers_do_not_import_the_training_loop():
    """The data path's layering: methods and solvers are plain Python; Lightning and the
    LightningModule's module are imported only by training (no import circle)."""
    import subprocess
    import sys

    code = (
        "import sys, adamerge, adamerge.methods, adamerge.solvers, adamerge.train.runs, adamerge.sources\n"
        "from adamerge.methods import create_method\n"
        "m = create_method('doge_adamerging'); cfg = m.config({})\n"
        "bad = [k for k in sys.modules if k == 'adamerge.train.loop' or k.startswith('lightning')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cosine_schedule_sets_every_step_rate_and_resumes_exactly(tiny_zoo_dir, tmp_path, monkeypatch):
    import math

    options = {"options.steps": 12, "options.lr": 0.05, "options.solver_args": {"schedule": "cosine"}, "checkpoint_every": 4}
    full = write_config(tmp_path / "full", tiny_zoo_dir, **options)
    assert main(["fit", "--config", str(full), "--no-progress"]) == 0
    rates = [r["lr"] for r in read_metrics(tmp_path / "full" / "run") if "lr" in r]
    assert rates == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * t / 12)) for t in range(12)])
    cut = write_config(tmp_path / "cut", tiny_zoo_dir, **options)
    crash_then_resume(cut, 7, monkeypatch)
    assert torch.equal(_coefficients(tmp_path / "full" / "run"), _coefficients(tmp_path / "cut" / "run"))
    from adamerge.methods import create_method

    few = create_method("atlas").config({"method_args": {"mode": "few_shot"}})
    assert few.objective == "cross_entropy" and few.lr == 0.1 and few.solver_args == {"schedule": "cosine"}
