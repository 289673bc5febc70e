"""`adamerge tune`: an optuna study on SQLite over the config's tune: space, resumable after an
interruption (an exception or a dead process), scored without labels, with pruning."""
from __future__ import annotations

import json
import os
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
    import adamerge.workflows.tune as tune

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


# ---------------------------------------------------------------------------------------------
# issue 21: workers started together, a search space checked before the study, refusals that
# leave nothing behind

_WORKER = """
import os, sys, time
from adamerge.cli import main
import adamerge.workflows.tune, adamerge.train.loop, optuna  # the slow imports before the start line
ready, go = sys.argv[1], sys.argv[2]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
sys.exit(main(sys.argv[3:]))
"""


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("round_", [0, 1])
def test_three_workers_started_together_on_a_new_sqlite_study_keep_every_trial(tiny_zoo_dir, tmp_path, round_):
    """Three `adamerge tune` processes released at the same instant on one new SQLite study and
    one --out (as docs/ablate_and_tune.md recommends): every trial is counted exactly once, every
    worker exits 0, the split is written once (same bytes), no temporary file is left."""
    workers, per_worker = 3, 2
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2, "checkpoint_every": 2, "options.batch_size": 8,
                                                     "tune": {"space": SPACE, "report_every": 2, "pruner": "none"}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # three processes on a few cores
    storage, out = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "tune"
    go = tmp_path / "go"
    procs = []
    for i in range(workers):
        args = ["tune", "--config", str(config), "--study", "s", "--storage", storage, "--trials", str(per_worker),
                "--out", str(out), "--no-progress"]
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / f"ready{i}"), str(go), *args],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    import time

    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # all three start now
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=storage)
    trials = study.get_trials()
    assert optuna.study.get_all_study_names(storage) == ["s"]
    assert sorted(t.number for t in trials) == list(range(workers * per_worker))
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state, t.user_attrs) for t in trials]
    for t in trials:
        assert json.loads((out / "trials" / str(t.number) / "results.json").read_text())["status"] == "finished"
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)  # no worker repeats another
    assert sorted({t.user_attrs["pid"] for t in trials}) == sorted(p.pid for p in procs)
    assert study.user_attrs["score"].startswith("the unsupervised objective 'entropy'")
    summary = json.loads((out / "summary.json").read_text())  # written last by the last worker: the whole study
    assert summary["trials"] == {"complete": workers * per_worker}
    assert summary["best"]["trial"] == study.best_trial.number
    assert (out / "tune.png").read_bytes()[:4] == b"\x89PNG"
    assert not [f for f in _files(out) if f.endswith(".tmp") or ".tmp." in f]
    split = json.loads((out / "split" / "split.json").read_text())
    assert sorted(p.name for p in (out / "split").iterdir()) == sorted(
        ["split.json", *split["sha256"]])


def _refused(capsys, code: int, *needles: str) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adamerge: error:") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("space, message", [
    ({"lrr": {"low": 0.001, "high": 0.1}}, "unknown method option 'lrr' (did you mean 'lr'?)"),
    ({"options.bogus": [1, 2]}, "unknown method option 'bogus'"),
    ({"lr": [0.01], "objective_args.floorr": {"low": 0.5, "high": 1.0}}, "objective_args.floorr"),
    ({"trainer.bogus": [1]}, "trainer.bogus"),
    ({"granularity": ["task", "layr"]}, "tune.space.granularity: the choice 'layr'"),
    ({"method": ["adamerging", "t3"]}, "tune.space.method: the choice 't3'"),
    ({"lr": {"low": 0.0, "high": 0.1}}, "lr"),
    ({"init": {"low": 0.1, "high": 0.5}, "batch_size": {"low": 8, "high": 200}}, "tune.space.batch_size: the high end 200"),
    ({"lr": [0.01, 0.1], "options.lr": [0.2]}, "set the same option"),
    ({"objective_args": [{"floor": 0.9}], "objective_args.floor": [0.5]}, "set the same option"),
    ({"lr": {"low": 0.001, "high": 0.1, "log": True, "step": 0.01}}, "log range cannot have a step"),
    ({"lr": {"low": 0.001, "high": 0.1, "log": "yes"}}, "log must be true or false"),
    ({"granularity": ["task", "task"]}, "repeat"),
    ({"data.task0.tensors": ["a.safetensors"]}, "split of the config's data"),
])
def test_a_search_space_no_trial_could_use_is_refused_before_the_study(tiny_zoo_dir, tmp_path, capsys, space, message):
    """A misspelled key or a value no trial could use: one line, exit 2, before the study starts
    (no storage file, no --out, no split), never a study whose every trial fails."""
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2, "tune": {"space": space}})
    before = _files(tmp_path)
    _refused(capsys, _tune(config, f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "out", 2), message)
    assert _files(tmp_path) == before


def test_a_refused_run_leaves_nothing_behind(tiny_zoo_dir, tmp_path, capsys):
    """Refusals after the config is read (a study scored or directed otherwise, an --out of another
    study, data changed under an existing split): no new --out, no split, the old one untouched."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_zoo_dir / "data", data)
    heldout = write_config(tmp_path / "a", tiny_zoo_dir, **{"options.steps": 2, "tune": {"space": SPACE}},
                           data={t: {"tensors": str(data / f"{t}.safetensors")} for t in ("task0", "task1", "task2")})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert _tune(heldout, storage, tmp_path / "first", 0) == 0  # the study exists, scored by entropy (minimize)
    capsys.readouterr()
    kept = {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file()}

    other_score = write_config(tmp_path / "b", tiny_zoo_dir, tune={"space": SPACE, "score_objective": "infomax"})
    _refused(capsys, _tune(other_score, storage, tmp_path / "second", 1), "is scored by")
    labeled = write_config(tmp_path / "c", tiny_zoo_dir, tune={"space": SPACE, "score": "labeled"},
                           labeled={t: {"tensors": str(tiny_zoo_dir / "data" / f"{t}.safetensors")} for t in ("task0", "task1", "task2")})
    _refused(capsys, _tune(labeled, storage, tmp_path / "nested" / "third", 1), "was created to minimize")
    assert not (tmp_path / "second").exists() and not (tmp_path / "nested").exists()

    # the same --out for another study
    _refused(capsys, main(["tune", "--config", str(heldout), "--study", "other", "--storage", storage, "--trials", "1",
                           "--out", str(tmp_path / "first"), "--no-progress"]), "holds the trials of study 's'")
    # the data changed under the split of an existing study
    from safetensors.torch import load_file, save_file

    sd = load_file(str(data / "task1.safetensors"))
    save_file({"x": sd["x"].flip(0).contiguous(), "y": sd["y"]}, str(data / "task1.safetensors"))
    _refused(capsys, _tune(heldout, storage, tmp_path / "first", 1), "split from other data")
    assert {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file()} == kept
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 0


@pytest.mark.parametrize("case", ["trials", "out_is_file", "not_a_url", "missing_folder", "memory", "no_driver", "empty_study"])
def test_bad_arguments_are_one_line_errors_and_write_nothing(tiny_zoo_dir, tmp_path, capsys, case):
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2, "tune": {"space": SPACE}})
    (tmp_path / "a_file").write_text("not a folder")
    storage, out, trials, study = f"sqlite:///{tmp_path / 'x.db'}", tmp_path / "out", "1", "s"
    if case == "trials":
        trials, message = "-1", "--trials"
    elif case == "out_is_file":
        out, message = tmp_path / "a_file", "is a file, not a folder"
    elif case == "not_a_url":
        storage, message = str(tmp_path / "x.db"), "must be a URL"
    elif case == "missing_folder":
        storage, message = f"sqlite:///{tmp_path / 'missing' / 'x.db'}", "does not exist"
    elif case == "memory":
        storage, message = "sqlite://", "in-memory"
    elif case == "no_driver":
        storage, message = "nosuchdb://user:secret@host/db", "cannot open the optuna storage"
    else:
        study, message = " ", "--study"
    before = _files(tmp_path)
    err = _refused(capsys, main(["tune", "--config", str(config), "--study", study, "--storage", storage, "--trials", trials,
                                 "--out", str(out), "--no-progress"]), message)
    assert "secret" not in err  # a storage password is never printed
    assert _files(tmp_path) == before


def test_save_fig_from_many_writers_at_once(tmp_path):
    """Every writer of one plot gets its own temporary file; the last rename wins, none fails."""
    import threading

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adamerge.workflows.demo import _save_fig

    figs = []
    for i in range(6):
        fig, ax = plt.subplots()
        ax.plot([0, i])
        figs.append(fig)
    errors = []

    def save(fig):
        try:
            _save_fig(fig, tmp_path / "tune.png")
        except Exception as err:  # pragma: no cover - the failure this test guards against
            errors.append(err)

    threads = [threading.Thread(target=save, args=(f,)) for f in figs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["tune.png"]
    assert (tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"
