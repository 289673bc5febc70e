"""The run plan: one unit of work from a config to a run folder.

``RunPlan`` is made from a config file (or a dict) plus dotted overrides, or from models already in
memory (the Python API). It resolves the config once, builds the parts once (model, task vectors,
heads, streams), runs every check that must pass before anything is written, and then fits (or
resumes). ``adamerge fit``, ``ablate`` (one plan per cell), ``tune`` (one per trial), ``demo`` (one
per row), ``export`` (the plan of a finished run) and :func:`fit` all go through it; the command
line only parses arguments and prints.

Checks come in two groups, each run at most once per plan (``RunPlan.checks_run`` says which ran):

- on the config alone (:meth:`RunPlan.check_config`, before anything is built): the method and
  its options, the solvers, labels where the method needs them, the seed, task names, the run
  folder's state against ``resume``;
- on the built parts (:meth:`RunPlan.check_parts`): the weights against the architecture, streams
  and heads against the tasks, labels against the heads' classes, the granularity against the
  model, batch sizes against the streams, and the method's own checks (e.g. FW-Merging's pool).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from adamerge.config import DEFAULTS, build_all, check_labels, check_tasks, load_config, resolve_config
from adamerge.core.sharding import SHARD_STRATEGY
from adamerge.errors import InputError
from adamerge.io.files import check_folder_path
from adamerge.methods import MethodConfig, create_method
from adamerge.solvers import create_solver
from adamerge.train.runs import RunFolder, is_launched_rank

__all__ = ["RunPlan", "fit"]

CONFIG_CHECKS = ("method", "labels_needed", "settings", "tasks", "run_folder")
# Trainer arguments adamerge sets itself (a config's trainer: section may not)
_TRAINER_RESERVED = ("max_steps", "max_epochs", "logger", "callbacks", "enable_progress_bar", "enable_model_summary",
                     "log_every_n_steps", "num_sanity_val_steps", "use_distributed_sampler", "deterministic",
                     "default_root_dir", "gradient_clip_val", "accumulate_grad_batches")
PARTS_CHECKS = ("architecture", "streams", "label_range", "granularity", "batch_size", "method_inputs")


class RunPlan:
    """A resolved config, its method, options and solvers, its built parts, and its checks."""

    def __init__(self, cfg: dict, *, resume: bool | None = False, progress: bool = True, parts: dict | None = None,
                 from_file: bool = True, tasks: Sequence[str] | None = None, fitting: bool = True) -> None:
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.parts = parts
        self._owns_parts = False
        self.from_file = from_file  # a config with file inputs (written as the run's config.yaml)
        self._tasks = list(tasks) if tasks else None  # the streams' tasks, when not one per task vector
        self.checks_run: list[str] = []
        self.fitting = fitting  # False: a plan of the inputs only (data-free evaluation), no method
        if fitting:
            self.method = create_method(cfg["method"])
            self.options: MethodConfig = self.method.config(cfg.get("options"))
            self.stages = self.method.solvers(self.options)  # (solver name, solver args, steps) per stage
            self.solvers = [create_solver(name, self.options, args) for name, args, _ in self.stages]

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: str | Path | Mapping, overrides: Sequence[tuple[str, Any]] = (), *,
                    resume: bool | None = False, progress: bool = True, root: str | Path | None = None) -> "RunPlan":
        """A plan from a YAML file or a dict (relative paths from ``root``, default the working
        folder), overrides applied. With ``resume`` the run continues with the config it started
        with (read from its folder); ``resume=None`` leaves that open (set ``plan.resume`` before
        :meth:`fit`). The config-only checks run here."""
        if isinstance(config, Mapping):
            cfg = resolve_config(dict(config), list(overrides), Path(root or ".").resolve())
        else:
            cfg = load_config(config, list(overrides))
        if resume:
            run = RunFolder(cfg["run_dir"])
            if not run.config_path.exists():
                raise InputError(f"cannot resume: {run.config_path} does not exist")
            cfg = run.read_config()
        plan = cls(cfg, resume=resume, progress=progress)
        plan.check_config()
        return plan

    @classmethod
    def for_inputs(cls, config: str | Path, overrides: Sequence[tuple[str, Any]] = ()) -> "RunPlan":
        """The inputs of a config, built and checked against each other, with no method (what a
        data-free evaluation merges): task names, weights against the architecture, streams and
        heads, labels against the heads' classes."""
        return cls(load_config(config, list(overrides)), resume=None, progress=False, fitting=False).build()

    @classmethod
    def for_run(cls, run_dir: str | Path) -> "RunPlan":
        """The plan of a finished run (for export and evaluation): its saved config, built."""
        run = RunFolder(run_dir)
        run.require_finished()
        plan = cls(run.read_config(), resume=True, progress=False)
        plan.build()
        return plan

    @classmethod
    def from_parts(cls, run_dir: str | Path, model: nn.Module, tv, heads: Mapping[str, nn.Module], streams: Sequence,
                   method: str = "adamerging", options: dict | None = None, *, seed: int = 0, resume: bool = False,
                   progress: bool = True, trainer_options: dict | None = None, checkpoint_every: int = 50,
                   eval_batch_size: int = 256, cache_dir: str | Path | None = None, labeled: Sequence | None = None,
                   pool: Mapping[str, str] | None = None, tasks: Sequence[str] | None = None,
                   experts=None) -> "RunPlan":
        """A plan over models and streams already in memory (the Python API, nested fits).
        ``experts``: task vectors with one expert per task, for objectives that read the experts'
        predictions when ``tv`` holds other checkpoints (FW-Soft's nested fits); ``tv`` by default."""
        cfg = copy.deepcopy(DEFAULTS) | {
            "seed": seed, "method": method, "options": dict(options or {}), "run_dir": str(run_dir),
            "trainer": {**DEFAULTS["trainer"], **(trainer_options or {})}, "checkpoint_every": checkpoint_every,
            "eval_batch_size": eval_batch_size, "cache_dir": None if cache_dir is None else str(cache_dir),
            "pool": dict(pool) if pool else None,
        }
        parts = {"model": model, "tv": tv, "heads": dict(heads), "streams": list(streams),
                 "labeled": list(labeled) if labeled else None, "tasks": list(tasks or tv.task_names),
                 "experts": experts}
        plan = cls(cfg, resume=resume, progress=progress, parts=parts, from_file=False, tasks=tasks)
        plan.check_config()
        plan.check_parts()
        return plan

    # ---------------------------------------------------------------- properties
    @property
    def run(self) -> RunFolder:
        return RunFolder(self.cfg["run_dir"])

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg["run_dir"])

    @property
    def seed(self) -> int:
        return self.cfg["seed"]

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks or self.parts["tv"].task_names)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg["cache_dir"]) if self.cfg.get("cache_dir") else self.run_dir / "cache"

    @property
    def needs_data(self) -> bool:
        return any(s.needs_data for s in self.solvers) and self.options.steps > 0

    # ---------------------------------------------------------------- checks
    def _once(self, name: str) -> bool:
        if name in self.checks_run:
            return False
        self.checks_run.append(name)
        return True

    def check_config(self) -> None:
        """Everything that the config alone decides, before anything is built or written."""
        cfg = self.cfg
        if self._once("method"):
            pass  # the method, its options and solvers were resolved in __init__ (an error there is this check)
        if self._once("labels_needed") and self.method.uses_labels_with(self.options) and not cfg.get("labeled") \
                and not (self.parts and self.parts.get("labeled")):
            raise InputError(f"method '{cfg['method']}' with objective '{self.options.objective}' needs labels: give a"
                             " labeled split (config 'labeled:'); the scored streams are never trained on with labels")
        if self._once("settings"):
            _check_settings(cfg)
        if self.fitting and cfg["trainer"].get("strategy") == SHARD_STRATEGY and self._once("shard_strategy"):
            self._check_shard_strategy()
        if self.options.train_heads and self._once("train_heads"):
            self._check_train_heads()
        self._check_task_names()
        if self.resume is not None:  # None: decided later (an ablation cell), checked by fit()
            self.check_run_folder()

    def _check_shard_strategy(self) -> None:
        """``trainer.strategy: shard`` (task vectors sharded across ranks, see
        :mod:`adamerge.core.sharding`) fits methods whose one data stage comes last, without masks,
        on whole-tensor groups; anything else is refused before a file is written."""
        why = None
        data = [i for i, s in enumerate(self.solvers) if s.needs_data]
        if self.method.own_loop:
            why = f"method '{self.cfg['method']}' runs its own loop"
        elif self.method.has_masks:
            why = f"method '{self.cfg['method']}' learns masks"
        elif data != [len(self.solvers) - 1]:
            why = f"method '{self.cfg['method']}' needs one data stage, the last (it has {len(data)})"
        elif str(self.options.granularity).startswith("partition"):
            why = f"granularity '{self.options.granularity}' splits tensors; use task, block or layer"
        if why:
            raise InputError(f"trainer.strategy {SHARD_STRATEGY} (task vectors sharded across processes): {why}")

    def _check_train_heads(self) -> None:
        """``options.train_heads`` trains the heads with the coefficients in this process's
        gradient steps: a method with its own loop, a data stage of another solver (whose update
        would project or line-search the heads too) or several processes are refused before a
        file is written."""
        why = None
        devices = self.cfg["trainer"].get("devices", 1)
        other = [s.name for s in self.solvers if s.needs_data and s.name != "gradient"]
        if self.method.own_loop:
            why = f"method '{self.cfg['method']}' runs its own loop"
        elif other:
            why = f"method '{self.cfg['method']}' trains with solver '{other[0]}' (only 'gradient' steps train heads)"
        elif devices != 1 or self.cfg["trainer"].get("num_nodes", 1) != 1:
            why = f"trainer.devices {devices}: heads train in one process only"
        if why:
            raise InputError(f"option 'train_heads': {why}")

    def shard_build(self) -> tuple[int, int] | None:
        """``(rank, world)`` when this process of a sharded run reads only its shard of the task
        vectors (``trainer.strategy: shard`` on one machine, a method that never reads them whole
        before training: :meth:`Method.whole_task_vectors`), else ``None`` (the whole stack is
        built, and cut once the processes are connected). The rank is Lightning's (its launcher
        sets ``LOCAL_RANK`` in the processes it starts; the first process is rank 0); the module
        checks it against the trainer's once connected."""
        trainer = self.cfg["trainer"]
        if not self.fitting or trainer.get("strategy") != SHARD_STRATEGY:
            return None
        devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 2 or nodes != 1:
            return None
        if "LOCAL_RANK" not in os.environ and any(k in os.environ for k in ("SLURM_PROCID", "RANK")):
            return None  # another launcher's ranks: cut after connecting, where Lightning knows them
        if self.method.whole_task_vectors(self.options) is not None or self.stages[-1][2] < 1:
            return None  # (no steps: no process group is ever connected to gather the merge)
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        return (rank, devices) if 0 <= rank < devices else None

    @property
    def owns_parts(self) -> bool:
        """Whether this plan built its parts itself (nothing else holds them: a sharded run may
        release the full task vectors once each rank has its shard)."""
        return self._owns_parts

    def check_run_folder(self) -> None:
        """``run_dir`` is a folder (or absent) and holds a run exactly when resuming."""
        if self._once("run_folder"):
            _check_run_folder(self.run, bool(self.resume))

    def check_granularity(self, shapes: Mapping[str, Any] | None = None) -> None:
        """The granularity makes groups over the model's parameters (``shapes``: name → shape,
        default the built model's)."""
        from adamerge.core.granularity import make_grouping

        if self._once("granularity"):
            if shapes is None:
                shapes = {n: t.shape for n, t in self.parts["model"].named_parameters()}
            make_grouping(self.options.granularity, shapes, seed=self.seed)

    def _check_task_names(self) -> None:
        if self._once("tasks") and self.from_file:
            check_tasks(self.cfg)  # task names become file names: checked before any file is read

    def build(self, parts: dict | None = None) -> "RunPlan":
        """Build the parts once (or take ``parts`` already built for an equal config, e.g. an
        ablation's shared inputs), then run the checks on them."""
        self._check_task_names()
        if self.parts is None:
            self._owns_parts = parts is None
            self.parts = parts if parts is not None else build_all(self.cfg, shard=self.shard_build())
        self.check_parts()
        return self

    def check_parts(self) -> None:
        """Everything that needs the built parts, before anything is written."""
        from adamerge.core.merged import MergedModel
        from adamerge.train.data import check_batch_size

        p = self.parts
        model, heads = p["model"], p["heads"]
        if self._once("architecture"):
            MergedModel._check_keys(model, p["tv"])  # the weights fit the architecture
        if self._once("streams"):
            names, tasks = [s.name for s in p["streams"]], self.tasks
            if sorted(names) != sorted(tasks):
                raise InputError(f"data streams {names} do not match the experts' tasks {tasks}")
            missing = [t for t in tasks if t not in heads]
            if missing:
                raise InputError(f"no head for task '{missing[0]}' (heads given for {sorted(heads)})")
            if p.get("labeled") and sorted(s.name for s in p["labeled"]) != sorted(tasks):
                raise InputError(f"labeled tasks {sorted(s.name for s in p['labeled'])} do not match experts {sorted(tasks)}")
            p["streams"] = sorted(p["streams"], key=lambda s: tasks.index(s.name))
        if self._once("label_range"):
            check_labels(heads, list(p["streams"]) + list(p.get("labeled") or []))
        if not self.fitting:
            return
        self.check_granularity()
        if self._once("batch_size") and self.needs_data:
            check_batch_size(p["streams"], self.options.batch_size)
        if self._once("method_inputs") and self.from_file:
            self.method.validate(self.cfg, model)

    # ---------------------------------------------------------------- actions
    def fit(self) -> dict:
        """Write the run's ``config.yaml`` (a new run from a config file), then fit or resume.
        Returns the results (``{}`` on a DDP rank other than 0)."""
        from adamerge.train.loop import run_plan

        if self.parts is None:
            self.build()
        self.check_run_folder()
        if self.from_file and not self.resume:
            self.run.write_config(self.cfg)
        return run_plan(self)

    def nested(self, run_dir: str | Path, tv, method: str, options: dict, *, resume: bool) -> "RunPlan":
        """A plan for a fit inside this run (FW-Soft's AdaMerging over chosen checkpoints): same
        model, heads, streams and settings, other task vectors, method and options; this run's
        experts still give expert objectives their targets."""
        return RunPlan.from_parts(
            run_dir, self.parts["model"], tv, self.parts["heads"], self.parts["streams"], method, options,
            seed=self.seed, resume=resume, progress=self.progress, trainer_options=self.cfg["trainer"],
            checkpoint_every=max(1, options.get("steps", 1)), eval_batch_size=self.cfg["eval_batch_size"],
            cache_dir=self.cache_dir, labeled=self.parts.get("labeled"), tasks=self.tasks,
            experts=self.parts["tv"] if self.parts.get("experts") is None else self.parts["experts"])


def fit(run_dir: str | Path, model: nn.Module, tv, heads: Mapping[str, nn.Module], streams: Sequence,
        method: str = "adamerging", options: dict | None = None, **settings) -> dict:
    """Fit a method on models and streams already in memory and write the run folder (the Python
    API of ``adamerge fit``: the same checks, the same loop). ``settings``: ``seed``, ``resume``,
    ``progress``, ``trainer_options``, ``checkpoint_every``, ``eval_batch_size``, ``cache_dir``,
    ``labeled``, ``pool``, ``tasks`` (see :meth:`RunPlan.from_parts`)."""
    return RunPlan.from_parts(run_dir, model, tv, heads, streams, method, options, **settings).fit()


def _check_settings(cfg: dict) -> None:
    """The run's own settings: seed, batch sizes, checkpoint period, storage dtype, Trainer options."""
    import inspect

    from adamerge.checks import check_choice, check_int
    from adamerge.core.task_vectors import STORAGE_DTYPES

    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
        raise InputError(f"seed must be a whole number in [0, 2**32 - 1], got {seed!r}")
    check_int("eval_batch_size", cfg.get("eval_batch_size"), low=1, owner="config")
    check_int("checkpoint_every", cfg.get("checkpoint_every"), low=1, owner="config")
    check_choice("storage_dtype", cfg.get("storage_dtype"), ("auto", *STORAGE_DTYPES), owner="config")
    trainer = cfg.get("trainer")
    if not isinstance(trainer, Mapping):
        raise InputError(f"config 'trainer' must be a mapping of Lightning Trainer options, got {trainer!r}")
    import lightning as L

    known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in trainer:
        if key in _TRAINER_RESERVED:
            raise InputError(f"trainer.{key} is set by adamerge (from options: steps, checkpoint_every, the solver)")
        if key not in known:
            from adamerge.registry import did_you_mean

            raise InputError(f"unknown Lightning Trainer option trainer.{key}{did_you_mean(key, sorted(known))}")


def _check_run_folder(run: RunFolder, resume: bool) -> None:
    """``run_dir`` is a folder (or absent) and holds a run exactly when resuming."""
    check_folder_path(run.path, "run_dir")
    if is_launched_rank():
        # a DDP/shard process started by rank 0's launcher re-runs the command after rank 0 made
        # this check and may already have saved method state (aTLAS's trusted labels, a finished
        # data-free stage): it joins that run
        return
    started = run.checkpoints.exists() or run.state_path.exists()
    if resume and not started:
        raise InputError(f"cannot resume: nothing to resume in {run.path} (no checkpoint, no saved method state)")
    if not resume and (started or run.results_path.exists()):
        raise InputError(f"{run.path} already holds a run; pass --resume to continue it or choose another --run-dir")
