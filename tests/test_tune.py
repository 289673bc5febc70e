"""`adamerge tune`: an optuna study on SQLite over the config's tune: space, resumable after an
interruption (an exception or a dead process), scored without labels, with pruning."""
from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from adamerge.cli import main
from adamerge.config import load_config
from helpers import write_config

SPACE = {"lr": {"low": 0.001, "high": 0.1, "log": True}, "granularity": ["task", "layer"], "init": {"low": 0.1, "high": 0.5}}


def _config(tmp_path, tiny_zoo_dir, **tune):
    return write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 6, "checkpoint_every": 3,
                                                   "tune": {"space": SPACE, "report_every": 2, **tune}})


def _tune(config, storage, out, trials, *extra) -> int:
    return main(["tune", "--config", str(config), "--study", "s", "--storage", storage, "--trials", str(trials),
                 "--out", str(out), "--no-progress", *extra])


def test_an_interrupted_study_continues_and_keeps_every_trial(tiny_zoo_dir, tmp_path, monkeypatch, capsys):
    import adamerge.tune as tune

    config = _config(tmp_path, tiny_zoo_dir, pruner="none")  # every trial that runs completes
    storage, out = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "tune"
    original, seen = tune.fit_cell, []

    def crash_second(cfg, parts, **kw):
        seen.append(cfg["run_dir"])
        if len(seen) == 2:
            raise RuntimeError("simulated crash")
        return original(cfg, parts, **kw)

    monkeypatch.setattr(tune, "fit_cell", crash_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _tune(config, storage, out, 3)
    monkeypatch.setattr(tune, "fit_cell", original)
    # a trial whose process was killed (kill -9): RUNNING in the storage, its process gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.load_study(study_name="s", storage=storage)
    ghost = study.ask()
    ghost.set_user_attr("host", __import__("socket").gethostname())
    ghost.set_user_attr("pid", dead.pid)
    capsys.readouterr()

    assert _tune(config, storage, out, 2) == 0
    captured = capsys.readouterr()
    assert f"trial {ghost.number} was running in a process that ended" in captured.err
    assert optuna.study.get_all_study_names(storage) == ["s"]
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 5 and states.count(TrialState.COMPLETE) == 3
    assert states[1] == TrialState.FAIL and states[2] == TrialState.FAIL and TrialState.RUNNING not in states
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert (out / "trials" / str(t.number) / "results.json").is_file()
            assert sorted(t.intermediate_values) == [2, 4, 6]  # the score so far, every report_every steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == {"complete": 3, "fail": 2}
    assert "held-out 25%" in summary["score"] and "held-out 25%" in captured.out
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert summary["best"]["trial"] == best.number and summary["best"]["value"] == pytest.approx(best.value)
    assert summary["importances"] and set(summary["importances"]) <= set(SPACE)
    assert (out / "tune.png").read_bytes()[:4] == b"\x89PNG"


def test_best_config_is_a_ready_fit_config_over_the_full_streams(tiny_zoo_dir, tmp_path):
    config = _config(tmp_path, tiny_zoo_dir)
    storage, out = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "tune"
    assert _tune(config, storage, out, 1) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "not computed" in (out / "summary.md").read_text() and summary["importances"] == {}  # one trial
    best = load_config(out / "best.yaml")
    assert "tune" not in best
    assert best["data"] == load_config(config)["data"]  # trained on the full streams, not the split
    for key, value in summary["best"]["params"].items():
        assert best["options"][key] == value
    trial = yaml.safe_load((out / "trials" / "0" / "config.yaml").read_text())
    assert all("split" in spec["tensors"] and spec["tensors"].endswith(".train.safetensors") for spec in trial["data"].values())
    from safetensors.torch import load_file

    for task, spec in trial["data"].items():  # the trials' streams carry no labels
        assert set(load_file(spec["tensors"])) == {"x"}
    assert main(["fit", "--config", str(out / "best.yaml"), "--no-progress"]) == 0


def test_pruned_trials_stop_training(tiny_zoo_dir, tmp_path, monkeypatch):
    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return True

    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kw: Always())
    config = _config(tmp_path, tiny_zoo_dir)
    storage, out = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "tune"
    assert _tune(config, storage, out, 2) == 0
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    for t in trials:
        assert list(t.intermediate_values) == [2]
        assert not (out / "trials" / str(t.number) / "results.json").exists()
    assert "best" not in json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("tune, message", [
    ({"space": {}}, "non-empty 'space:'"),
    ({"space": {"lr": {"low": 0.1, "high": 0.01}}}, "low < high"),
    ({"space": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}, "log range"),
    ({"space": {"lr": [0.01]}, "score": "labeled"}, "labeled split"),
    ({"space": {"lr": [0.01]}, "score_objective": "cross_entropy"}, "needs targets"),
    ({"space": {"lr": [0.01]}, "heldout": 1.5}, "fraction"),
])
def test_bad_tune_sections_are_one_line_errors(tiny_zoo_dir, tmp_path, capsys, tune, message):
    config = write_config(tmp_path, tiny_zoo_dir, tune=tune)
    assert _tune(config, f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "out", 1) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adamerge: error:") and len(err.splitlines()) == 1 and message in err


def test_labeled_score_is_declared_and_reported(tiny_zoo_dir, tmp_path, capsys):
    cfg = {"space": {"lr": [0.01, 0.05]}, "score": "labeled"}
    config = write_config(tmp_path, tiny_zoo_dir, tune=cfg, labeled={t: {"tensors": str(tiny_zoo_dir / "data" / f"{t}.safetensors")}
                                                                     for t in ("task0", "task1", "task2")},
                          **{"options.steps": 4})
    assert _tune(config, f"sqlite:///{tmp_path / 'l.db'}", tmp_path / "out", 1) == 0
    assert "accuracy on the labeled split" in capsys.readouterr().out
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'l.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and 0 <= study.best_value <= 1
