"""``adamerge tune``: an optuna study over a search space declared in the config's ``tune:``
section, scored without test labels, resumable, with pruning on intermediate values.

Config::

    tune:
      score: heldout        # heldout (default): the unsupervised objective `score_objective` on a
                            # held-out part of each stream (lower is better; the trials train on
                            # the rest); labeled: mean accuracy on the config's `labeled:` split
      heldout: 0.25         # the held-out fraction of each stream (score: heldout)
      score_objective: entropy
      report_every: 10      # steps between intermediate values (the score so far), for pruning
      pruner: median        # median | none
      space:                # keys as in `adamerge ablate`: bare names are options.NAME
        lr: {low: 0.001, high: 0.1, log: true}
        init: {low: 0.1, high: 0.5}
        granularity: [task, layer, block]       # a list: categorical
        solver: [gradient, pgd]
        objective_args.floor: {low: 0.5, high: 1.0}

Layout of ``--out DIR``: ``split/`` (the train and held-out tensors, written once), ``trials/<n>/``
(each trial an ordinary run folder whose ``config.yaml`` reruns it with ``adamerge fit``),
``best.yaml`` (the best trial's options over the full streams, ready for ``adamerge fit``),
``summary.json``, ``summary.md`` and ``tune.png``.

A rerun with the same ``--study`` and ``--storage`` continues the study (``load_if_exists``);
``--trials N`` adds N trials. A trial that was running when its process died (``kill -9``) is
marked failed on the next run (same host: its process is gone; other hosts: optuna's heartbeat),
never counted complete.
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from adamerge.ablate import _Parts, axis_label, fit_cell, option_key
from adamerge.errors import InputError, NonFiniteLossError
from adamerge.io.files import atomic_save_safetensors, atomic_write_json, atomic_write_text

_PRIMITIVE = (str, int, float, bool, type(None))


class InvalidTrial(InputError):
    """A sampled combination the method refuses (the trial fails; the study continues)."""


@dataclass
class Param:
    """One search-space entry: a config key and how optuna samples it."""

    key: str
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return axis_label(self.key)

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            encoded = [c if isinstance(c, _PRIMITIVE) else json.dumps(c, sort_keys=True) for c in self.choices]
            picked = trial.suggest_categorical(self.name, encoded)
            return self.choices[encoded.index(picked)]
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log, step=self.step)

    def decode(self, value: Any) -> Any:
        """A stored optuna value back to the config value (categorical JSON text → object)."""
        if self.kind == "categorical" and value not in self.choices:
            return json.loads(value)
        return value


@dataclass
class TuneSpec:
    """The config's ``tune:`` section, checked."""

    space: list[Param]
    score: str = "heldout"
    heldout: float = 0.25
    score_objective: str = "entropy"
    report_every: int = 10
    pruner: str = "median"

    @property
    def direction(self) -> str:
        return "minimize" if self.score == "heldout" else "maximize"

    def describe(self) -> str:
        if self.score == "heldout":
            return (f"the unsupervised objective '{self.score_objective}' on a held-out {100 * self.heldout:g}% of each"
                    " stream (lower is better; no labels are read)")
        return "mean accuracy on the labeled split the config declares (labeled:), never the scored streams"


def _param(name: str, spec: Any) -> Param:
    key = option_key(name)
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise InputError(f"tune.space.{name}: give a list of choices or {{low, high[, log, step, type]}}")
    unknown = set(spec) - {"choices", "low", "high", "log", "step", "type"}
    if unknown:
        raise InputError(f"tune.space.{name}: unknown key '{sorted(unknown)[0]}'")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise InputError(f"tune.space.{name}: choices must be a non-empty list")
        return Param(key, "categorical", choices=list(spec["choices"]))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise InputError(f"tune.space.{name}: needs numbers low < high, got low={low!r} high={high!r}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise InputError(f"tune.space.{name}: a log range needs low > 0")
    kind = spec.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) and not log else "float")
    if kind not in ("int", "float"):
        raise InputError(f"tune.space.{name}: type must be int or float")
    return Param(key, kind, low, high, log, spec.get("step"))


def read_spec(cfg: dict) -> TuneSpec:
    """The ``tune:`` section of a resolved config (a clear error for every mistake)."""
    from adamerge.objectives import get_objective, target_kind

    section = cfg.get("tune")
    if not isinstance(section, dict) or not isinstance(section.get("space"), dict) or not section["space"]:
        raise InputError("tune needs a 'tune:' section with a non-empty 'space:' mapping (see docs/ablate_and_tune.md)")
    unknown = set(section) - {"space", "score", "heldout", "score_objective", "report_every", "pruner"}
    if unknown:
        raise InputError(f"tune: unknown key '{sorted(unknown)[0]}'")
    spec = TuneSpec([_param(str(n), s) for n, s in section["space"].items()],
                    **{k: section[k] for k in ("score", "heldout", "score_objective", "report_every", "pruner") if k in section})
    if spec.score not in ("heldout", "labeled"):
        raise InputError(f"tune.score must be 'heldout' or 'labeled', got '{spec.score}'")
    if spec.score == "labeled" and not cfg.get("labeled"):
        raise InputError("tune.score 'labeled' needs a labeled split declared in the config (labeled:)")
    if not isinstance(spec.heldout, (int, float)) or not 0 < spec.heldout < 1:
        raise InputError(f"tune.heldout must be a fraction in (0, 1), got {spec.heldout!r}")
    get_objective(spec.score_objective)
    if target_kind(spec.score_objective) is not None:
        raise InputError(f"tune.score_objective '{spec.score_objective}' needs targets; use one that reads only the"
                         " predictions (entropy, entropy_norm, reliable_entropy, infomax)")
    if not isinstance(spec.report_every, int) or spec.report_every < 1:
        raise InputError(f"tune.report_every must be a positive integer, got {spec.report_every!r}")
    if spec.pruner not in ("median", "none"):
        raise InputError(f"tune.pruner must be 'median' or 'none', got '{spec.pruner}'")
    return spec


# ---------------------------------------------------------------------------------- data and score
def write_split(cfg: dict, spec: TuneSpec, folder: Path) -> dict[str, dict[str, str]]:
    """Split each stream (seeded permutation) into a train part without labels and a held-out
    part, written once to ``folder`` as tensors; returns ``{task: {"train": path, "heldout": path}}``.
    A rerun checks that the split it finds was made from the same streams and settings."""
    from adamerge.config import build_model, build_streams

    marker = folder / "split.json"
    settings = {"data": cfg["data"], "seed": cfg["seed"], "heldout": spec.heldout}
    paths = {t: {"train": str(folder / f"{t}.train.safetensors"), "heldout": str(folder / f"{t}.heldout.safetensors")}
             for t in cfg["data"]}
    if marker.is_file():
        if json.loads(marker.read_text()).get("settings") != json.loads(json.dumps(settings)):
            raise InputError(f"{folder} holds a split of other data or settings; use another --out for this study")
        return paths
    _, transform = build_model(cfg["model"])
    for s in build_streams(cfg, transform):
        n = len(s)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"]))
        k = max(1, min(n - 1, math.ceil(spec.heldout * n)))
        if n < 2:
            raise InputError(f"data.{s.name}: a stream of {n} sample cannot be split into train and held-out parts")
        for part, idx in (("heldout", order[:k].sort().values), ("train", order[k:].sort().values)):
            atomic_save_safetensors({"x": s.inputs(idx).contiguous()}, paths[s.name][part])
    atomic_write_json(marker, {"settings": settings, "paths": paths})
    return paths


@torch.no_grad()
def objective_score(backbone: torch.nn.Module, heads: dict, streams: Sequence, objective: str,
                    batch_size: int = 256) -> float:
    """Mean over tasks of the objective (a label-free one) on every sample of each stream."""
    from adamerge.data import images_layout
    from adamerge.objectives import get_objective

    fn = get_objective(objective)
    was_training = backbone.training
    backbone.eval()
    values = []
    for s in streams:
        total = 0.0
        for lo in range(0, len(s), batch_size):
            idx = torch.arange(lo, min(lo + batch_size, len(s)))
            logits = heads[s.name](backbone(images_layout(s.inputs(idx))))
            total += float(fn(logits)) * len(idx)
        values.append(total / len(s))
    backbone.train(was_training)
    return statistics.fmean(values)


class _Scorer:
    """The trial score of a backbone: held-out objective, or labeled accuracy."""

    def __init__(self, spec: TuneSpec, heads: dict, streams: Sequence, batch_size: int) -> None:
        self.spec, self.heads, self.streams, self.batch_size = spec, heads, list(streams), batch_size

    def __call__(self, backbone: torch.nn.Module) -> float:
        if self.spec.score == "heldout":
            return objective_score(backbone, self.heads, self.streams, self.spec.score_objective, self.batch_size)
        from adamerge.evaluation import evaluate

        scores = evaluate(backbone, self.heads, self.streams, self.batch_size)
        if scores is None:
            raise InputError("tune.score 'labeled': the labeled split has no labels")
        return scores["mean"]


def _pruning_callback(trial, scorer: _Scorer, every: int, say: Callable[[str], None]):
    """A Lightning callback: every ``every`` steps, the score of the model so far is reported to
    the trial; a trial the pruner stops raises ``optuna.TrialPruned``."""
    import optuna
    from lightning.pytorch.callbacks import Callback

    class Prune(Callback):
        def __init__(self) -> None:
            self.reported = 0  # steps over all stages (each stage restarts its global step)
            self.offset = 0

        def on_train_start(self, trainer, pl_module) -> None:
            self.offset = self.reported - trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = self.offset + trainer.global_step
            if step <= self.reported or step % every:
                return
            self.reported = step
            value = scorer(pl_module.merged)
            trial.report(value, step)
            if trial.should_prune():
                say(f"[tune] trial {trial.number}: pruned at step {step} (score so far {value:.4g})")
                raise optuna.TrialPruned(f"pruned at step {step} (score {value:.4g})")

    return Prune()


# ---------------------------------------------------------------------------------- the study
def _storage(url: str):
    import optuna

    if "://" not in url:
        raise InputError(f"--storage must be a URL such as sqlite:///adamerge.db, got '{url}'")
    try:  # a heartbeat lets another worker fail the trials of a process that died
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except Exception as err:  # bad URL, missing driver, unreachable server
        raise InputError(f"cannot open the optuna storage {url}: {str(err).splitlines()[0]}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study, say: Callable[[str], None]) -> int:
    """Mark failed the RUNNING trials whose process (on this host) is gone; other hosts' dead
    trials are failed by optuna's heartbeat. Returns how many were marked."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get("host") == host and isinstance(attrs.get("pid"), int) and attrs["pid"] != os.getpid() and not _alive(attrs["pid"]):
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            say(f"[tune] trial {t.number} was running in a process that ended (pid {attrs['pid']}): marked failed")
            n += 1
    return n


def trial_config(base: dict, spec: TuneSpec, params: dict[str, Any], run_dir: Path, data: dict | None) -> dict:
    """The resolved fit config of a trial: ``base`` with the sampled values (``params`` by optuna
    name), ``data`` (the train split) and ``run_dir``; the ``tune:`` section dropped."""
    from adamerge.config import set_dotted

    cfg = json.loads(json.dumps({k: v for k, v in base.items() if k != "tune"}))
    for p in spec.space:
        if p.name in params:
            set_dotted(cfg, p.key, p.decode(params[p.name]))
    if data is not None:
        cfg["data"] = data
    cfg["run_dir"] = str(Path(run_dir).resolve())
    return cfg


def run_study(config: str | Path, study_name: str, storage: str, trials: int, *, out: str | Path | None = None,
              overrides: Sequence[tuple[str, Any]] = (), progress: bool = True) -> dict:
    """Add ``trials`` trials to the study (created or continued), then write and print the summary."""
    import optuna

    from adamerge.cli import _check_method
    from adamerge.config import build_all, load_config
    from adamerge.export import load_run
    from adamerge.methods import create_method
    from adamerge.runs import RunFolder
    from adamerge.training import extra_trainer_callbacks

    if trials < 0:
        raise InputError(f"--trials must be >= 0, got {trials}")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    base = load_config(config, list(overrides))
    spec = read_spec(base)
    if create_method(base["method"]).own_loop:
        raise InputError(f"tune needs a method that learns coefficients; '{base['method']}' runs its own loop")
    out = Path(out or f"tune-{study_name}")
    out.mkdir(parents=True, exist_ok=True)
    if spec.score == "heldout":
        split = write_split(base, spec, out / "split")
        train_data = {t: {"tensors": p["train"]} for t, p in split.items()}
        score_cfg = dict(base, data={t: {"tensors": p["heldout"]} for t, p in split.items()})
    else:
        train_data, score_cfg = None, dict(base, data=base["labeled"])
    score_parts = build_all(score_cfg)
    scorer = _Scorer(spec, score_parts["heads"], score_parts["streams"], base["eval_batch_size"])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=_storage(storage), direction=spec.direction,
                                load_if_exists=True)
    if study.direction.name.lower() != spec.direction:
        raise InputError(f"study '{study_name}' was created to {study.direction.name.lower()}; this config's score"
                         f" ({spec.score}) needs {spec.direction}: use another --study")
    recorded = study.user_attrs.get("score")
    if recorded is not None and recorded != spec.describe():
        raise InputError(f"study '{study_name}' is scored by {recorded}; this config scores by {spec.describe()}: use another --study")
    study.set_user_attr("score", spec.describe())
    fail_dead_trials(study, lambda msg: print(msg, file=sys.stderr, flush=True))  # shown even with --no-progress
    study.sampler = optuna.samplers.TPESampler(seed=int(base["seed"]) + len(study.trials))
    study.pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=spec.report_every)
                    if spec.pruner == "median" else optuna.pruners.NopPruner())
    say(f"[tune] study '{study_name}' ({storage}): {len(study.trials)} trials so far; adding {trials}."
        f" Score: {spec.describe()}")
    parts = _Parts()

    def objective(trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {p.name: p.suggest(trial) for p in spec.space}
        run_dir = out / "trials" / str(trial.number)
        cfg = trial_config(base, spec, params, run_dir, train_data)
        try:
            _check_method(cfg)
        except InputError as err:  # a combination the method refuses: a failed trial, not a crash
            trial.set_user_attr("error", str(err))
            raise InvalidTrial(f"trial {trial.number}: {err}") from None
        run = RunFolder(run_dir)
        run.write_config(cfg)
        say(f"[tune] trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        with extra_trainer_callbacks(_pruning_callback(trial, scorer, spec.report_every, say)):
            fit_cell(cfg, parts.get(cfg), resume=False, progress=progress)
        merged, _, _ = load_run(run_dir)
        value = scorer(merged)
        say(f"[tune] trial {trial.number}: score {value:.4g}")
        return value

    if trials:
        # a refused combination or a diverging trial fails that trial; the study goes on
        study.optimize(objective, n_trials=trials, catch=(InvalidTrial, NonFiniteLossError))
    summary = write_summary(study, spec, base, out)
    print(summary["text"])
    return summary


def write_summary(study, spec: TuneSpec, base: dict, out: Path) -> dict:
    """``best.yaml``, ``summary.json``, ``summary.md`` and ``tune.png`` of the study so far."""
    from optuna.trial import TrialState

    from adamerge.config import dump_config

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {"study": study.study_name, "score": spec.describe(), "direction": spec.direction,
                               "trials": {k: v for k, v in counts.items() if v}}
    lines = [f"# Study {study.study_name}", "", f"Score: {spec.describe()}.", "",
             "Trials: " + ", ".join(f"{v} {k}" for k, v in summary["trials"].items()) + "."]
    if complete:
        best = study.best_trial
        cfg = trial_config(base, spec, best.params, out / "best-run", None)  # the full streams
        atomic_write_text(out / "best.yaml", dump_config(cfg))
        summary["best"] = {"trial": best.number, "value": best.value,
                           "params": {p.name: p.decode(best.params[p.name]) for p in spec.space if p.name in best.params},
                           "config": str(out / "best.yaml")}
        lines += ["", f"Best trial: {best.number}, score {best.value:.6g}, with "
                  + ", ".join(f"{k}={v}" for k, v in summary["best"]["params"].items()) + ".",
                  f"Its config (over the full streams): {out / 'best.yaml'} (adamerge fit --config {out / 'best.yaml'})."]
    importances, reason = _importances(study, complete)
    summary["importances"] = importances
    if importances:
        lines += ["", "Parameter importances (optuna, fANOVA): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in importances.items()) + "."]
    else:
        lines += ["", f"Parameter importances: not computed ({reason})."]
    text = "\n".join(lines) + "\n"
    summary["text"] = text
    atomic_write_text(out / "summary.md", text)
    atomic_write_json(out / "summary.json", summary)
    plot_study(trials, study.direction.name.lower(), importances, out / "tune.png")
    return summary


def _importances(study, complete: list) -> tuple[dict[str, float], str]:
    import optuna

    if len(complete) < 2:
        return {}, f"{len(complete)} complete trial(s); it needs at least 2"
    varied = {k for t in complete for k, v in t.params.items() if v != complete[0].params.get(k)}
    if not varied:
        return {}, "no parameter varied between the complete trials"
    try:
        imp = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as err:
        return {}, str(err).splitlines()[0]
    return {k: float(v) for k, v in imp.items()}, ""


def plot_study(trials: list, direction: str, importances: dict[str, float], path: Path) -> None:
    """Score per trial (complete and pruned) with the best so far, and the importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    from adamerge.demo import _save_fig

    fig, axes = plt.subplots(1, 2 if importances else 1, figsize=(11 if importances else 6, 4), squeeze=False)
    ax = axes[0, 0]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete", zorder=3)
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
               marker="x", c="grey", label="pruned (last report)")
    best, xs, ys = None, [], []
    for t in done:
        best = t.value if best is None else (min if direction == "minimize" else max)(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", c="k", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("score")
    ax.set_title(f"trials ({direction})")
    ax.legend(fontsize=8)
    if importances:
        ax2 = axes[0, 1]
        names = list(importances)[::-1]
        ax2.barh(names, [importances[n] for n in names])
        ax2.set_xlabel("importance")
        ax2.set_title("parameter importances")
    fig.tight_layout()
    _save_fig(fig, path)


__all__ = ["Param", "TuneSpec", "read_spec", "write_split", "objective_score", "run_study", "write_summary",
           "fail_dead_trials", "trial_config", "plot_study"]
