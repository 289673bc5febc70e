"""End to end on the tiny zoo: fit, eval, export, resume, DDP, and every user-error path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adamerge.cli import main
from adamerge.io.state_dicts import load_state_dict
from adamerge.train.runs import read_metrics
from helpers import TASKS, assert_export_reproduces, write_config


@pytest.fixture(scope="module")
def zoo_dir(tiny_zoo_dir) -> Path:
    return tiny_zoo_dir


@pytest.fixture(scope="module")
def layer_run(zoo_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("layer")
    cfg = write_config(folder, zoo_dir, **{"options.steps": 100})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    return folder / "run"


def test_fit_writes_run_folder_and_improves(layer_run):
    for name in ("config.yaml", "coefficients.safetensors", "groups.json", "metrics.csv", "results.json"):
        assert (layer_run / name).is_file(), name
    coef = load_file(str(layer_run / "coefficients.safetensors"))["coefficients"]
    groups = json.loads((layer_run / "groups.json").read_text())
    assert coef.shape == (3, len(groups["groups"]))
    assert groups["tasks"] == TASKS and groups["granularity"] == "layer"
    assert float(coef.min()) >= 0.0 and float(coef.max()) <= 1.0  # stored as applied (clamped)
    rows = [r for r in read_metrics(layer_run) if "loss/task0" in r]
    assert len(rows) == 100
    first = sum(r["loss/task0"] + r["loss/task1"] + r["loss/task2"] for r in rows[:10])
    last = sum(r["loss/task0"] + r["loss/task1"] + r["loss/task2"] for r in rows[-10:])
    assert last < 0.8 * first, (first, last)  # the entropy falls
    results = json.loads((layer_run / "results.json").read_text())
    # "before" is the initial merge, λ = 0.3 everywhere = task arithmetic (λ = 0.3)
    assert results["after"]["mean"] > results["before"]["mean"] + 0.01
    ckpts = list((layer_run / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(p.stat().st_size < 200_000 for p in ckpts)  # coefficients + optimizer, not models


def test_layerwise_beats_task_arithmetic(layer_run, zoo_dir, tmp_path, capsys):
    cfg = write_config(tmp_path, zoo_dir)
    out = tmp_path / "ta.json"
    assert main(["eval", "--config", str(cfg), "--method", "task_arithmetic", "--lam", "0.3", "--out", str(out)]) == 0
    ta = json.loads(out.read_text())["methods"]["task_arithmetic(lam=0.3)"]["mean"]
    learned = json.loads((layer_run / "results.json").read_text())["after"]["mean"]
    assert learned > ta
    assert main(["eval", "--run", str(layer_run)]) == 0
    assert "run:run" in capsys.readouterr().out


def test_export_reproduces_functional_outputs(layer_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(layer_run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adamerge.json", "heads.safetensors", "model.safetensors"]
    meta = json.loads((out / "adamerge.json").read_text())
    assert meta["method"] == "adamerging" and len(meta["inputs"]["experts"]) == 3
    assert all(len(e["sha256"]) == 64 for e in meta["inputs"]["experts"].values())
    assert_export_reproduces(layer_run, out)
    # a second export into a non-empty folder needs --force; nothing is overwritten without it
    assert main(["export", str(layer_run), str(out)]) == 2
    assert main(["export", str(layer_run), str(out), "--force"]) == 0


@pytest.mark.parametrize("method", ["adamerging", "concrete_adamerging"])
def test_ddp_two_processes_match_one(zoo_dir, tmp_path, method):
    """Two gloo processes, each with half of every task's batch, train the coefficients one
    process gets with the whole batch; concrete_adamerging has two data stages (masks, then
    AdaMerging on the frozen mask): every rank goes through both."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    exe = [sys.executable, "-m", "adamerge.cli"]
    coefs = []
    # the paper's entropy: a mean over samples, so half a batch per rank averages to the whole
    # batch's loss (infomax's batch-mean prediction, Concrete's default, is taken per rank)
    stages = ({"method": method, "options.method_args": {"adamerging_steps": 4}, "options.objective": "entropy"}
              if method != "adamerging" else {})
    for devices in (1, 2):
        cfg = write_config(tmp_path / f"d{devices}", zoo_dir, **{"options.steps": 10 if not stages else 4, **stages})
        cmd = exe + ["fit", "--config", str(cfg), "--no-progress", "--devices", str(devices)]
        if devices == 2:
            cmd += ["--strategy", "ddp"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        coefs.append(load_file(str(tmp_path / f"d{devices}" / "run" / "coefficients.safetensors"))["coefficients"])
    assert torch.allclose(coefs[0], coefs[1], atol=1e-5)


def _fails(capsys, args, needle):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("adamerge: error:") and "\n" not in err and "Traceback" not in err
    assert needle in err, err


def test_user_errors_one_line_exit_2(zoo_dir, tmp_path, capsys):
    _fails(capsys, ["fit", "--config", str(tmp_path / "missing.yaml")], "does not exist")
    cfg = write_config(tmp_path / "a", zoo_dir, **{"experts.task1": str(tmp_path / "nope.safetensors")})
    _fails(capsys, ["fit", "--config", str(cfg)], "nope.safetensors")
    assert not (tmp_path / "a" / "run").exists()  # nothing half-written
    # an expert with an extra key
    sd = load_state_dict(zoo_dir / "experts" / "task2.safetensors")
    sd["extra.weight"] = torch.zeros(2)
    from adamerge.io.files import atomic_save_safetensors

    atomic_save_safetensors(sd, tmp_path / "extra.safetensors")
    cfg = write_config(tmp_path / "b", zoo_dir, **{"experts.task2": str(tmp_path / "extra.safetensors")})
    _fails(capsys, ["fit", "--config", str(cfg)], "extra.weight")
    # task names that do not match the heads
    heads = {t: str(zoo_dir / "heads" / f"{t}.safetensors") for t in TASKS}
    heads["other"] = heads.pop("task2")
    cfg = write_config(tmp_path / "c", zoo_dir, heads=heads)
    _fails(capsys, ["fit", "--config", str(cfg)], "other")
    # an empty stream
    atomic_save_safetensors({"x": torch.zeros(0, 3, 16, 16)}, tmp_path / "empty.safetensors")
    cfg = write_config(tmp_path / "d", zoo_dir, **{"data.task0": {"tensors": str(tmp_path / "empty.safetensors")}})
    _fails(capsys, ["fit", "--config", str(cfg)], "empty")
    # a non-finite loss (a head with inf weights)
    atomic_save_safetensors({"weight": torch.full((4, 16), float("inf"))}, tmp_path / "badhead.safetensors")
    cfg = write_config(tmp_path / "e", zoo_dir, **{"heads.task0": str(tmp_path / "badhead.safetensors")})
    _fails(capsys, ["fit", "--config", str(cfg), "--no-progress"], "non-finite loss")
    # a wrong option name
    cfg = write_config(tmp_path / "f", zoo_dir)
    _fails(capsys, ["fit", "--config", str(cfg), "--options.stepz", "3"], "stepz")
    # two tasks pointing at the same checkpoint
    cfg = write_config(tmp_path / "g", zoo_dir, **{"experts.task1": str(zoo_dir / "experts" / "task0.safetensors")})
    _fails(capsys, ["fit", "--config", str(cfg)], "same file")


def test_console_script_error_has_no_traceback(tmp_path):
    exe = shutil.which("adamerge") or str(Path(sys.executable).parent / "adamerge")
    proc = subprocess.run([exe, "export", str(tmp_path / "norun"), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not a finished run" in proc.stderr


@pytest.mark.parametrize("granularity", ["task", "block", "partition:2"])
def test_other_granularities_and_adamerging_pp(zoo_dir, tmp_path, granularity):
    cfg = write_config(tmp_path, zoo_dir, method="adamerging++", **{"options.granularity": granularity, "options.steps": 5})
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["options"]["ties_density"] == 0.2 and results["steps"] == 5


def test_objective_and_its_arguments_come_from_options(zoo_dir, tmp_path):
    cfg = write_config(tmp_path, zoo_dir, **{"options.steps": 3, "options.objective": "infomax"})
    assert main(["fit", "--config", str(cfg), "--no-progress", "--options.objective_args.diversity", "0.5"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["options"]["objective"] == "infomax"
    assert results["options"]["objective_args"] == {"diversity": 0.5}


@pytest.mark.parametrize("before", [False, True])
def test_a_fit_leaves_the_callers_deterministic_setting_as_it_was(zoo_dir, tmp_path, monkeypatch, before):
    """Lightning's ``deterministic=True`` would leave deterministic algorithms on in the caller's
    process; a fit puts the setting (and ``CUBLAS_WORKSPACE_CONFIG``) back, and runs with it on."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    import adamerge.train.loop as loop

    seen = []
    evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: seen.append(torch.are_deterministic_algorithms_enabled())
                        or evaluate(*a, **k))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(before)
    try:
        cfg = write_config(tmp_path, zoo_dir, **{"options.steps": 2})
        assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
        assert torch.are_deterministic_algorithms_enabled() is before
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        assert seen and all(seen)  # the scores before and after training: deterministic
    finally:
        torch.use_deterministic_algorithms(was)


def test_early_stop_ends_training_when_the_unlabeled_objective_settles_and_resumes_the_same(tiny_zoo_dir, tmp_path, monkeypatch):
    """``options.early_stop``: with a huge min_delta the rule fires at the first full pair of
    windows (step 2W = 8); a run cut at step 6 restores the recent losses from its checkpoint and
    stops at the same step (without them it would need 8 more steps)."""
    from adamerge.methods import create_method
    from helpers import crash_then_resume

    changes = {"options.steps": 30, "options.early_stop": {"window": 4, "min_delta": 10.0}, "checkpoint_every": 1}
    cfg = write_config(tmp_path / "stop", tiny_zoo_dir, **changes)
    assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
    stopped = json.loads((tmp_path / "stop" / "run" / "results.json").read_text())
    assert stopped["steps"] == 8 and "settled" in stopped["stopped_early"]
    assert stopped["options"]["early_stop"] == {"window": 4, "min_delta": 10.0}
    crash_then_resume(write_config(tmp_path / "cut", tiny_zoo_dir, **changes), 6, monkeypatch)
    resumed = json.loads((tmp_path / "cut" / "run" / "results.json").read_text())
    assert resumed["steps"] == 8
    assert torch.equal(load_file(str(tmp_path / "stop" / "run" / "coefficients.safetensors"))["coefficients"],
                       load_file(str(tmp_path / "cut" / "run" / "coefficients.safetensors"))["coefficients"])
    for bad in ({"window": 1}, {"patience": 3}, {"window": 4, "min_delta": -1}, 5):
        with pytest.raises(Exception, match="early_stop"):
            create_method("adamerging").config({"early_stop": bad})
