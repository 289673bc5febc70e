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

Everything is checked before the study starts, and a refused run writes nothing (no ``--out``, no
split, no study): the arguments, the ``tune:`` section, the storage URL, the inputs (built once), and
the search space (a trial config for every categorical combination, each range at its low end, then
each high end, through the same checks as ``adamerge fit``; a key no trial could use is refused).

Several workers may start at once on one new study (SQLite or another RDB): opening the storage and
creating the study are retried on the races of a new database, only the worker that created the
study records its score, every worker writes the same split (atomically), each trial samples with
its own seed, and the summary is written under a lock on ``--out``.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import random
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adamerge.checks import is_number
from adamerge.io.files import check_folder_path, folder_lock, make_folders, remove_folders
from adamerge.workflows.ablate import _Parts, axis_label, check_distinct_keys, check_not_overridden, fit_cell, option_key
from adamerge.errors import AdamergeError, InputError, NonFiniteLossError
from adamerge.io.files import atomic_write_bytes, atomic_write_json, atomic_write_text

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

    def end(self, which: str) -> Any:
        """The lowest or highest value optuna can sample (``which``: low | high)."""
        if which == "low":
            return int(self.low) if self.kind == "int" else float(self.low)
        if self.kind == "int":
            step = int(self.step or 1)
            return int(self.low) + step * ((int(self.high) - int(self.low)) // step)
        if self.step:
            return float(self.low) + self.step * math.floor((self.high - self.low) / self.step + 1e-9)
        return float(self.high)


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
        if set(spec) != {"choices"}:
            raise InputError(f"tune.space.{name}: give either choices or a range (low, high), not both")
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise InputError(f"tune.space.{name}: choices must be a non-empty list")
        encoded = [c if isinstance(c, _PRIMITIVE) else json.dumps(c, sort_keys=True) for c in spec["choices"]]
        if len({json.dumps(e) for e in encoded}) != len(encoded):
            raise InputError(f"tune.space.{name}: choices repeat a value")
        return Param(key, "categorical", choices=list(spec["choices"]))
    low, high = spec.get("low"), spec.get("high")
    if not all(is_number(v, finite=True) for v in (low, high)) or not low < high:
        raise InputError(f"tune.space.{name}: needs finite numbers low < high, got low={low!r} high={high!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise InputError(f"tune.space.{name}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise InputError(f"tune.space.{name}: a log range needs low > 0")
    kind = spec.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) and not log else "float")
    if kind not in ("int", "float"):
        raise InputError(f"tune.space.{name}: type must be int or float")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
        raise InputError(f"tune.space.{name}: an int range needs whole-number bounds, got low={low!r} high={high!r}")
    step = spec.get("step")
    if step is not None:
        if not is_number(step, finite=True) or step <= 0 or (kind == "int" and not float(step).is_integer()):
            raise InputError(f"tune.space.{name}: step must be a positive {'whole ' if kind == 'int' else ''}number, got {step!r}")
        if log:
            raise InputError(f"tune.space.{name}: a log range cannot have a step")
        if step > high - low:
            raise InputError(f"tune.space.{name}: step {step} is larger than the range {low}..{high}")
    return Param(key, kind, low, high, log, step)


def read_spec(cfg: dict) -> TuneSpec:
    """The ``tune:`` section of a resolved config (a clear error for every mistake)."""
    from adamerge.train.objectives import get_objective, target_kind

    section = cfg.get("tune")
    if not isinstance(section, dict) or not isinstance(section.get("space"), dict) or not section["space"]:
        raise InputError("tune needs a 'tune:' section with a non-empty 'space:' mapping (see docs/ablate_and_tune.md)")
    unknown = set(section) - {"space", "score", "heldout", "score_objective", "report_every", "pruner"}
    if unknown:
        raise InputError(f"tune: unknown key '{sorted(unknown)[0]}'")
    spec = TuneSpec([_param(str(n), s) for n, s in section["space"].items()],
                    **{k: section[k] for k in ("score", "heldout", "score_objective", "report_every", "pruner") if k in section})
    check_distinct_keys([p.key for p in spec.space], "tune.space keys")
    names = [p.name for p in spec.space]
    if len(set(names)) != len(names):
        raise InputError(f"tune.space: two keys have the name '{next(n for n in names if names.count(n) > 1)}'")
    if spec.score not in ("heldout", "labeled"):
        raise InputError(f"tune.score must be 'heldout' or 'labeled', got '{spec.score}'")
    if spec.score == "labeled" and not cfg.get("labeled"):
        raise InputError("tune.score 'labeled' needs a labeled split declared in the config (labeled:)")
    if not is_number(spec.heldout, finite=True) or not 0 < spec.heldout < 1:
        raise InputError(f"tune.heldout must be a fraction in (0, 1), got {spec.heldout!r}")
    for p in spec.space:
        if spec.score == "heldout" and p.key.split(".")[0] == "data":
            raise InputError(f"tune.space.{p.name}: with score 'heldout' the trials train on the split of the config's"
                             " data; tune the data with one study per data set")
    if not isinstance(spec.score_objective, str):
        raise InputError(f"tune.score_objective must be an objective's name, got {spec.score_objective!r}")
    get_objective(spec.score_objective)
    if target_kind(spec.score_objective) is not None:
        raise InputError(f"tune.score_objective '{spec.score_objective}' needs targets; use one that reads only the"
                         " predictions (entropy, entropy_norm, reliable_entropy, infomax)")
    if isinstance(spec.report_every, bool) or not isinstance(spec.report_every, int) or spec.report_every < 1:
        raise InputError(f"tune.report_every must be a positive integer, got {spec.report_every!r}")
    if spec.pruner not in ("median", "none"):
        raise InputError(f"tune.pruner must be 'median' or 'none', got '{spec.pruner}'")
    return spec


# ---------------------------------------------------------------------------------- data and score
def _tensor_digest(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    x = x.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{x.dtype}:{tuple(x.shape)}:".encode())
    if x.numel():
        digest.update(x.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _file_digest(path: Path) -> str | None:
    """The digest of the ``x`` tensor of a split file (``None`` if it is missing or unreadable)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return _tensor_digest(f.get_tensor("x"))
    except Exception:
        return None


@dataclass
class Split:
    """The train and held-out parts of each stream, computed in memory (``prepare_split``) and
    written to ``folder`` once the study is accepted (``write``)."""

    folder: Path
    settings: dict
    tensors: dict[str, dict[str, torch.Tensor]]  # task -> {"train": x, "heldout": x}
    paths: dict[str, dict[str, str]]
    digests: dict[str, str]  # file name -> digest of its x

    @property
    def marker(self) -> Path:
        return self.folder / "split.json"

    def _marker_data(self) -> dict:
        return {"settings": self.settings, "paths": self.paths, "sha256": self.digests}

    def write(self) -> dict[str, dict[str, str]]:
        """Write the missing (or damaged) files, then the marker; every write is atomic and every
        worker writes the same bytes, so workers starting together share the split safely."""
        from safetensors.torch import save

        for task, parts in self.tensors.items():
            for part, x in parts.items():
                path = Path(self.paths[task][part])
                if _file_digest(path) != self.digests[path.name]:
                    atomic_write_bytes(path, save({"x": x}))
        data = self._marker_data()
        if _read_marker(self.marker) != json.loads(json.dumps(data)):
            atomic_write_json(self.marker, data)
        return self.paths

    def streams(self, part: str) -> list:
        """In-memory streams of one part, named after the files they are written to."""
        from adamerge.train.data import stream_from_tensors

        return [stream_from_tensors(t, p[part], None, source=self.paths[t][part]) for t, p in self.tensors.items()]


def _read_marker(marker: Path) -> dict | None:
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        raise InputError(f"{marker} cannot be read; remove {marker.parent} or use another --out") from None
    if not isinstance(data, dict):
        raise InputError(f"{marker} is not a split marker; remove {marker.parent} or use another --out")
    return data


def prepare_split(cfg: dict, spec: TuneSpec, streams: Sequence, folder: Path) -> Split:
    """Split each stream (seeded permutation) into a train part without labels and a held-out
    part, in memory. A split already in ``folder`` must have been made from the same streams
    (content, not only names) and settings; a mismatch is refused before anything is written."""
    settings = json.loads(json.dumps({"data": cfg["data"], "seed": cfg["seed"], "heldout": spec.heldout}))
    tensors, paths, digests = {}, {}, {}
    for s in streams:
        n = len(s)
        if n < 2:
            raise InputError(f"data.{s.name}: a stream of {n} sample cannot be split into train and held-out parts")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"]))
        k = max(1, min(n - 1, math.ceil(spec.heldout * n)))
        tensors[s.name], paths[s.name] = {}, {}
        for part, idx in (("heldout", order[:k].sort().values), ("train", order[k:].sort().values)):
            x = s.inputs(idx).contiguous()
            path = folder / f"{s.name}.{part}.safetensors"
            tensors[s.name][part], paths[s.name][part], digests[path.name] = x, str(path), _tensor_digest(x)
    split = Split(folder, settings, tensors, paths, digests)
    old = _read_marker(split.marker)
    if old is not None:
        if old.get("settings") != settings:
            raise InputError(f"{folder} holds a split of other data or settings; use another --out for this study")
        recorded = old.get("sha256") or {}
        for name, digest in digests.items():
            on_disk = recorded.get(name) or _file_digest(folder / name)
            if on_disk is not None and on_disk != digest:
                raise InputError(f"{folder / name} was split from other data than the config's streams hold now (the"
                                 " data changed since the study started); use another --out and --study")
    return split


def write_split(cfg: dict, spec: TuneSpec, folder: Path) -> dict[str, dict[str, str]]:
    """Split the config's streams into ``folder`` (see :func:`prepare_split`); returns
    ``{task: {"train": path, "heldout": path}}``."""
    from adamerge.config import build_model, build_streams

    _, transform = build_model(cfg["model"])
    return prepare_split(cfg, spec, build_streams(cfg, transform), Path(folder)).write()


@torch.no_grad()
def objective_score(backbone: torch.nn.Module, heads: dict, streams: Sequence, objective: str,
                    batch_size: int = 256) -> float:
    """Mean over tasks of the objective (a label-free one) on every sample of each stream."""
    from adamerge.train.data import images_layout
    from adamerge.train.objectives import get_objective

    fn = get_objective(objective)
    was_training = backbone.training
    backbone.eval()
    values = []
    for s in streams:
        total = 0.0
        for lo in range(0, len(s), batch_size):
            idx = torch.arange(lo, min(lo + batch_size, len(s)))
            logits = heads[s.name](backbone(images_layout(s.inputs(idx), backbone)))
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
        from adamerge.train.evaluation import evaluate

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


# ---------------------------------------------------------------------------------- the storage
_TRANSIENT = ("locked", "busy", "already exists", "unique constraint", "duplicate", "deadlock", "could not serialize")


def _transient(err: BaseException) -> bool:
    """An error of a race between workers on one storage (a new database's tables or version row
    made by two at once, a lock held a moment too long): worth another try."""
    import optuna
    import sqlalchemy.exc as sx

    if isinstance(err, optuna.exceptions.DuplicatedStudyError):
        return False
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, sx.IntegrityError):
            return True
        if isinstance(seen, sx.DBAPIError) and any(w in str(seen).lower() for w in _TRANSIENT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry(fn: Callable[[], Any], attempts: int = 40) -> Any:
    """``fn()``, tried again (with a growing, jittered pause; about 30 s in all) on the transient
    errors of workers that start together on one storage."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:
            if i + 1 == attempts or not _transient(err):
                raise
            time.sleep(min(1.0, 0.02 * 1.3**i) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def check_storage_url(url: Any) -> tuple[str, Path | None]:
    """The URL with its password hidden (for messages), and the SQLite file it names (``None`` for
    another database). A URL that cannot work is refused before anything is opened."""
    from sqlalchemy.engine import make_url

    if not isinstance(url, str) or "://" not in url:
        raise InputError(f"--storage must be a URL such as sqlite:///adamerge.db, got '{url}'")
    try:
        parsed = make_url(url)
    except Exception as err:
        raise InputError(f"--storage '{url}' is not a database URL ({str(err).splitlines()[0]})") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() != "sqlite":
        return shown, None
    db = parsed.database or ""
    if db in ("", ":memory:") or "mode=memory" in db or parsed.query.get("mode") == "memory":
        raise InputError(f"--storage {shown} is an in-memory SQLite database: it keeps nothing between workers or"
                         " runs; give a file, e.g. sqlite:///adamerge.db")
    if db.startswith("file:"):  # a SQLite URI: left to SQLite
        return shown, None
    path = Path(db)
    if path.exists() and not path.is_file():
        raise InputError(f"--storage {shown}: {path} is a folder, not a SQLite file")
    if not path.parent.is_dir():
        raise InputError(f"--storage {shown}: the folder {path.parent} of the SQLite file does not exist")
    return shown, path


def _storage(url: str):
    """The optuna RDB storage of ``url``, opened race-safely (several workers may create a new
    database at once), with a heartbeat so that another worker can fail a dead process's trials."""
    import optuna

    shown, sqlite_file = check_storage_url(url)
    engine = {"connect_args": {"timeout": 60}} if sqlite_file is not None else {}  # wait for locks, not 5 s

    def open_it():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=60, grace_period=180)

    try:
        return _retry(open_it)
    except Exception as err:  # bad URL, missing driver, unreachable server, not a database
        raise InputError(f"cannot open the optuna storage {shown}: {str(err).splitlines()[0]}") from None


def _study_exists(storage, name: str) -> bool:
    try:
        _retry(lambda: storage.get_study_id_from_name(name))
    except KeyError:
        return False
    return True


def open_study(storage, name: str, spec: "TuneSpec", wait_s: float = 20.0):
    """Create the study, or load it when it exists (another worker may create it at the same
    moment: exactly one creates it, the others load it). The study's direction is set when it is
    created; its score is recorded by the worker that created it, and checked by every other."""
    import optuna
    from optuna.study import StudyDirection

    direction = StudyDirection.MINIMIZE if spec.direction == "minimize" else StudyDirection.MAXIMIZE
    try:
        study_id = _retry(lambda: storage.create_new_study([direction], name))
        _retry(lambda: storage.set_study_user_attr(study_id, "score", spec.describe()))
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = _retry(lambda: optuna.load_study(study_name=name, storage=storage))
    if study.direction != direction:
        raise InputError(f"study '{name}' was created to {study.direction.name.lower()}; this config's score"
                         f" ({spec.score}) needs {spec.direction}: use another --study")
    deadline = time.monotonic() + wait_s
    while "score" not in study.user_attrs and not study.get_trials(deepcopy=False) and time.monotonic() < deadline:
        time.sleep(0.2)  # the worker that created the study is recording its score
    recorded = study.user_attrs.get("score")
    if recorded is None:  # a study made by other means, or whose creator died at once: adopt it
        _retry(lambda: study.set_user_attr("score", spec.describe()))
    elif recorded != spec.describe():
        raise InputError(f"study '{name}' is scored by {recorded}; this config scores by {spec.describe()}: use another --study")
    return study


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
        _retry(lambda: optuna.storages.fail_stale_trials(study))
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get("host") == host and isinstance(attrs.get("pid"), int) and attrs["pid"] != os.getpid() and not _alive(attrs["pid"]):
            try:
                if not _retry(lambda: study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker marked it at the same moment
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


# ---------------------------------------------------------------------------------- checks before the study
_MAX_COMBINATIONS = 64
def trial_refusal(cfg: dict, parts: dict | None) -> str | None:
    """Why a trial of ``cfg`` could not run (``None``: it can): the checks of ``adamerge fit`` on
    the config and, with ``parts`` (built for the same inputs), on the inputs."""
    from adamerge.plan import RunPlan

    try:
        plan = RunPlan.from_config(cfg, resume=None, progress=False)
        if plan.method.own_loop:
            raise InputError(f"tune needs a method that learns coefficients; '{cfg['method']}' runs its own loop")
        if parts is not None:
            plan.build(parts)
    except AdamergeError as err:
        return str(err)
    return None


def _show(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def check_space(base: dict, spec: TuneSpec, trial_cfg: Callable[[dict], dict], parts: dict | None,
                same_inputs: Callable[[dict], bool]) -> int:
    """Refuse a search space with a value no trial could use, before the study starts: a trial
    config for every combination of the categorical choices (at most 64; beyond, one choice at a
    time) with each range at its low end, then each range's high end. A key that is not an option,
    a choice every combination refuses, or a range end the checks refuse is one clear error.
    Returns how many trial configs were checked."""
    cats = [p for p in spec.space if p.kind == "categorical"]
    nums = [p for p in spec.space if p.kind != "categorical"]
    low = {p.name: p.end("low") for p in nums}
    if math.prod(len(p.choices) for p in cats) <= _MAX_COMBINATIONS:
        points = [{**low, **{p.name: c for p, c in zip(cats, combo)}} for combo in itertools.product(*(p.choices for p in cats))]
    else:
        first = {p.name: p.choices[0] for p in cats}
        points = [{**low, **first}] + [{**low, **first, p.name: c} for p in cats for c in p.choices[1:]]

    def refusal(point: dict) -> str | None:
        cfg = trial_cfg(point)
        return trial_refusal(cfg, parts if same_inputs(cfg) else None)

    errors = [refusal(pt) for pt in points]
    good = [pt for pt, e in zip(points, errors) if e is None]
    if not good:
        raise InputError(f"tune.space: no trial could run; with {_show(points[0])}: {errors[0]}")
    for p in cats:
        for c in p.choices:
            tried = [(pt, e) for pt, e in zip(points, errors) if pt[p.name] == c]
            if tried and all(e is not None for _, e in tried):
                raise InputError(f"tune.space.{p.name}: the choice {c!r} is refused ({_show(tried[0][0])}): {tried[0][1]}")
    checked = len(points)
    for p in nums:
        point = {**good[0], p.name: p.end("high")}
        err = refusal(point)
        checked += 1
        if err is not None:
            raise InputError(f"tune.space.{p.name}: the high end {point[p.name]} is refused: {err}")
    return checked


def _build_inputs(cfg: dict) -> dict:
    """The inputs of the config (as ``build_all``, heads without a cache: nothing is written)."""
    from adamerge.config import build_all, check_tasks

    check_tasks(cfg)  # task names become file names (the split): checked before any file is read
    return build_all(cfg, cache_heads=False)


def _check_out(out: Path, study_name: str) -> None:
    check_folder_path(out, "--out")
    for sub in ("split", "trials"):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise InputError(f"--out {out}: {out / sub} is a file, not a folder")
    marker = out / "study.json"
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text()).get("study")
        except (OSError, ValueError, AttributeError):
            owner = None
        if owner is not None and owner != study_name:
            raise InputError(f"--out {out} holds the trials of study '{owner}'; use another --out for study '{study_name}'")


def _old_trials(out: Path) -> int:
    folder = out / "trials"
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def run_study(config: str | Path, study_name: str, storage: str, trials: int, *, out: str | Path | None = None,
              overrides: Sequence[tuple[str, Any]] = (), progress: bool = True) -> dict:
    """Add ``trials`` trials to the study (created or continued), then write and print the summary.
    Everything is checked first; a refused run leaves nothing behind."""
    import optuna

    from adamerge.config import load_config
    from adamerge.plan import RunPlan
    from adamerge.train.loop import extra_trainer_callbacks
    from adamerge.workflows.export import load_run

    # ---- the arguments, the config, the tune: section (nothing read but the config)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise InputError(f"--trials must be a whole number >= 0, got {trials!r}")
    if not isinstance(study_name, str) or not study_name.strip():
        raise InputError("--study must be a non-empty name")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    shown, sqlite_file = check_storage_url(storage)
    base = load_config(config, list(overrides))
    spec = read_spec(base)
    check_not_overridden([p.key for p in spec.space], overrides, "tune.space key")
    out = Path(out or f"tune-{study_name}")
    _check_out(out, study_name)

    # ---- the inputs (built once), the split (in memory), the search space
    inputs = _build_inputs(base)
    if spec.score == "heldout":
        split = prepare_split(base, spec, inputs["streams"], out / "split")
        train_data = {t: {"tensors": p["train"]} for t, p in split.paths.items()}
        inputs["streams"] = split.streams("train")  # what the trials read from train_data
        score_streams = split.streams("heldout")
    else:
        split, train_data = None, None
        score_streams = inputs["labeled"] or []
        unlabeled = [s.name for s in score_streams if s.labels() is None]
        if unlabeled:
            raise InputError(f"tune.score 'labeled': the labeled split of task '{unlabeled[0]}' has no labels (y)")
    parts_cache = _Parts()
    inputs_cfg = trial_config(base, spec, {}, out / "trials" / "check", train_data)
    parts_cache.put(inputs_cfg, inputs)
    key = parts_cache._key(inputs_cfg)
    check_space(base, spec, lambda point: trial_config(base, spec, point, out / "trials" / "check", train_data),
                inputs, lambda cfg: parts_cache._key(cfg) == key)
    scorer = _Scorer(spec, copy.deepcopy(inputs["heads"]), score_streams, base["eval_batch_size"])  # its own heads

    # ---- the storage and the study (created, or loaded and checked)
    def refuse_old_trials() -> None:  # trial folders of a study this storage does not hold
        if _old_trials(out):
            raise InputError(f"--out {out} holds {_old_trials(out)} trial folders of a study that {shown} does not"
                             " have; use another --out (or the storage that holds that study)")

    if sqlite_file is not None and not sqlite_file.exists():
        refuse_old_trials()  # before opening the storage would create the database file
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = _storage(storage)
    if not _study_exists(rdb, study_name):
        refuse_old_trials()
    study = open_study(rdb, study_name, spec)

    # ---- accepted: write the folder's marker and the split (the same bytes from every worker)
    made = make_folders(out)
    try:
        if not (out / "study.json").is_file():
            atomic_write_json(out / "study.json", {"study": study_name})
        if split is not None:
            split.write()
    except BaseException:
        remove_folders(made)
        raise

    fail_dead_trials(study, lambda msg: print(msg, file=sys.stderr, flush=True))  # shown even with --no-progress
    study.pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=spec.report_every)
                    if spec.pruner == "median" else optuna.pruners.NopPruner())
    say(f"[tune] study '{study_name}' ({shown}): {len(study.trials)} trials so far; adding {trials}."
        f" Score: {spec.describe()}")

    def objective(trial) -> float:
        # each trial samples with its own seed: workers that start together do not repeat each other
        study.sampler = optuna.samplers.TPESampler(seed=(int(base["seed"]) + trial.number) % 2**32)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {p.name: p.suggest(trial) for p in spec.space}
        run_dir = out / "trials" / str(trial.number)
        cfg = trial_config(base, spec, params, run_dir, train_data)
        try:
            plan = RunPlan.from_config(cfg, resume=False, progress=progress)
            parts = parts_cache.get(cfg)
            plan.build(parts)
        except InputError as err:  # a combination the method refuses: a failed trial, not a crash
            trial.set_user_attr("error", str(err))
            raise InvalidTrial(f"trial {trial.number}: {err}") from None
        try:  # claimed by this trial alone (a trial number the storage gave twice would share it)
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            trial.set_user_attr("error", f"its folder {run_dir} exists already")
            raise InvalidTrial(f"trial {trial.number}: its folder {run_dir} exists already") from None
        say(f"[tune] trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        with extra_trainer_callbacks(_pruning_callback(trial, scorer, spec.report_every, say)):
            fit_cell(cfg, parts, resume=False, progress=progress, plan=plan)
        merged, _, _ = load_run(run_dir)
        value = scorer(merged)
        say(f"[tune] trial {trial.number}: score {value:.4g}")
        return value

    if trials:
        # a refused combination or a diverging trial fails that trial; the study goes on
        study.optimize(objective, n_trials=trials, catch=(InvalidTrial, NonFiniteLossError))
    with folder_lock(out, None):  # workers finishing together: the last one writes the whole study
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
             "Trials: " + (", ".join(f"{v} {k}" for k, v in summary["trials"].items()) or "none yet") + "."]
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

    from adamerge.workflows.demo import _save_fig

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


__all__ = ["Param", "TuneSpec", "Split", "read_spec", "prepare_split", "write_split", "objective_score", "run_study",
           "write_summary", "fail_dead_trials", "trial_config", "plot_study", "check_space", "check_storage_url",
           "open_study", "trial_refusal"]
