"""The method registry and what every learned method starts from.

A method declares its defaults (:class:`MethodConfig` fields), how it prepares the task vectors,
how it builds the one :class:`~adamerge.core.merged.MergedModel`, and which solver trains it
(``options.solver``; the default ``gradient`` is AdaMerging's Adam with the clamp in the forward).
A method may also name a data-free ``prepare_solver`` whose result (method state, saved in the run
folder) feeds :meth:`Method.build`. Methods import neither Lightning nor the training module.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from adamerge.checks import check_bool, check_float, check_int, check_list, check_number, check_typed, parse_options
from adamerge.errors import InputError
from adamerge.core.merged import BUFFER_POLICIES, MergedModel
from adamerge.registry import Registry, did_you_mean
from adamerge.core.task_vectors import TaskVectors
from adamerge.train.expert_targets import SHIFTS
from adamerge.train.objectives import UNSURE

CONSTRAINTS = ("none", "box", "simplex")


# the ranges of the objectives' own options (objective_args); their types come from the objective's
# signature (adamerge.train.objectives), so a new objective's options are typed without an entry here
OBJECTIVE_RANGES: dict[str, dict[str, dict]] = {
    "reliable_entropy": {"e0": {"low": 0, "low_open": True}},
    "infomax": {"diversity": {"low": 0}, "floor": {"low": 0, "high": 1}},
    # the logits are divided by the temperature (and the loss scaled by its square) in float32
    "expert_distill": {"temperature": {"low": 1e-4, "high": 1e4}, "confidence": {"low": 0, "high": 1}},
    "trusted_distill": {"temperature": {"low": 1e-4, "high": 1e4}, "confidence": {"low": 0, "high": 1},
                        "unsure": {"choices": UNSURE}, "start_views": {"low": 1, "high": len(SHIFTS)}},
    "weak_strong": {"confidence": {"low": 0, "high": 1}},
}
_FIXED_ARGUMENTS = ("logits", "labels", "targets")  # what the training loop passes, not options


def check_objective_args(objective: str, args: dict) -> dict:
    """``objective_args`` parsed by the objective's keyword parameters (type from the annotation,
    range from :data:`OBJECTIVE_RANGES`): an unknown name or a bad value is a one-line error
    (``hard: 'false'`` is False, not true)."""
    import inspect
    import typing

    from adamerge.train.objectives import get_objective

    fn = get_objective(objective)
    params = {n: p for n, p in inspect.signature(fn).parameters.items()
              if n not in _FIXED_ARGUMENTS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    out = {}
    for key, value in args.items():
        if key not in params:
            known = sorted(params)
            raise InputError(f"unknown option '{key}' for objective '{objective}' (objective_args){did_you_mean(str(key), known)}; "
                             f"known: {known}")
        out[key] = check_typed(key, value, hints.get(key, Any), OBJECTIVE_RANGES.get(objective, {}).get(key, {}),
                               f"objective '{objective}' option")
    return out


EXECUTION_OPTIONS = ("micro_batch",)
"""Options of how a step is computed, not of what it computes: the chunked, per-task and batched
steps give the same step to float rounding (tests/test_micro_batch.py). Two finished runs whose
settings differ only in these are the same run (:func:`same_run`; the demo reuses such a row)."""

ADDED_OPTIONS = {"train_heads": False, "head_lr": 1e-3}
"""Options added after runs were recorded, with their defaults: a record without one ran as the
default does, so a setting at its default is left out of the comparison (:func:`same_run`)."""


def same_run(a: Mapping, b: Mapping) -> bool:
    """Whether two resolved settings (:meth:`Method.settings`, or records holding them under
    ``resolved``) describe the same run: equal once the :data:`EXECUTION_OPTIONS` and the
    :data:`ADDED_OPTIONS` at their defaults are left out."""

    def strip(d):
        if isinstance(d, Mapping):
            return {k: strip(v) for k, v in d.items() if k not in EXECUTION_OPTIONS
                    and not (k in ADDED_OPTIONS and v == ADDED_OPTIONS[k])}
        return d

    return strip(a) == strip(b)


@dataclass
class MethodConfig:
    """Options of a learned merge. Each field is also a ``--options.<field>`` CLI override."""

    granularity: Any = "layer"
    init: Any = 0.3  # a float, one per task, or {merge: NAME, ...options}: a registered merge's coefficients
    constraint: str = "box"  # none | box | simplex: the feasible set of the coefficients
    bounds: tuple[float, float] = (0.0, 1.0)  # the box
    total: float = 1.0  # the simplex: per group, the T coefficients sum to this
    objective: str = "entropy"
    objective_args: dict = field(default_factory=dict)  # e.g. {"diversity": 0.5} for infomax
    solver: str = "gradient"
    solver_args: dict = field(default_factory=dict)  # the solver's own options (see its Options)
    prepare_args: dict = field(default_factory=dict)  # options of the method's data-free prepare solver
    method_args: dict = field(default_factory=dict)  # the method's own options (e.g. Concrete masks)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = None
    steps: int = 500
    # stop when the unlabeled objective has settled: {window: W, min_delta: d} ends training once
    # the mean loss over the last W steps is less than d (relative) below the mean of the W before
    early_stop: dict | None = None
    batch_size: int = 16
    # auto (default): each task's forward + backward alone against the merged weights, then ONE
    # backward through the merge, each task's batch cut into equal chunks whose activations stay
    # under the larger of 64 MiB and the merged weights' size (measured on the first step's first
    # sample as it runs: adamerge.train.loop.SavedBytes; objectives that average over samples,
    # others one task at a time); true: one task at a time, never cut; N: chunks of at most N
    # samples (sample means only); false: one batched forward over every task (wide GPUs with
    # memory to spare). How a step is computed, not what: see EXECUTION_OPTIONS
    micro_batch: bool | int | str = "auto"
    ties_density: float | None = None
    preprocess: Any = None  # a registered merge that rewrites the task vectors: NAME or {merge: NAME, ...options}
    buffer_policy: str = "base"
    # SyMerge's task-specific layer (issue 24): each task's head trains with the coefficients on
    # the same objective (its own Adam learning rate ``head_lr``), is saved with the run and
    # exported in place of the given heads; off by default (the heads stay the experts')
    train_heads: bool = False
    head_lr: float = 1e-3
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from adamerge.train.objectives import OBJECTIVES
        from adamerge.solvers import list_solvers
        from adamerge.solvers.optimizers import list_optimizers

        if isinstance(self.init, dict):
            from adamerge.merges import merge_request

            merge_request(self.init, "init")
        elif hasattr(self.init, "shape"):
            if not torch.isfinite(torch.as_tensor(self.init, dtype=torch.float64)).all():
                raise InputError("option 'init' must be finite")
        elif isinstance(self.init, (list, tuple)):
            # one per task: the length is checked against the tasks in initial_coefficients
            self.init = check_list("init", self.init)
            if not self.init:
                raise InputError("option 'init' must be a number, one number per task, or {merge: NAME, ...}, got []")
        else:
            self.init = check_number("init", self.init)
        self.steps = check_int("steps", self.steps, low=0)
        self.batch_size = check_int("batch_size", self.batch_size, low=1)
        self.lr = check_float("lr", self.lr, low=0, low_open=True)
        self.weight_decay = check_float("weight_decay", self.weight_decay, low=0)
        if self.grad_clip is not None:
            self.grad_clip = check_float("grad_clip", self.grad_clip, low=0, low_open=True)
        if self.ties_density is not None:
            self.ties_density = check_float("ties_density", self.ties_density, low=0, low_open=True, high=1)
        if self.preprocess is not None:
            from adamerge.merges import merge_request

            if self.ties_density is not None:
                raise InputError("set either 'ties_density' or 'preprocess', not both (ties_density d = preprocess {merge: ties, density: d})")
            merge_request(self.preprocess, "preprocess")
        for name in ("constraint", "objective", "solver", "optimizer", "buffer_policy"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"option '{name}' must be a name, got {getattr(self, name)!r}")
        if self.early_stop is not None:
            if not isinstance(self.early_stop, dict) or set(self.early_stop) - {"window", "min_delta"}:
                raise InputError(f"option 'early_stop' must be a mapping with keys window and min_delta, got {self.early_stop!r}")
            self.early_stop = {"window": 20, "min_delta": 0.01} | self.early_stop
            self.early_stop["window"] = check_int("early_stop.window", self.early_stop["window"], low=2)
            self.early_stop["min_delta"] = check_float("early_stop.min_delta", self.early_stop["min_delta"], low=0)
        if isinstance(self.micro_batch, str) and self.micro_batch.strip().lower() in ("true", "false"):
            self.micro_batch = check_bool("micro_batch", self.micro_batch)
        if isinstance(self.micro_batch, str) and self.micro_batch.strip().lower() == "auto":
            self.micro_batch = "auto"
        elif not isinstance(self.micro_batch, bool):
            try:
                self.micro_batch = check_int("micro_batch", self.micro_batch, low=1)
            except InputError:
                raise InputError(f"option 'micro_batch' must be auto, true, false or a number of samples >= 1, got {self.micro_batch!r}") from None
        if self.constraint not in CONSTRAINTS:
            raise InputError(f"option 'constraint' must be one of {list(CONSTRAINTS)}, got {self.constraint!r}{did_you_mean(self.constraint, list(CONSTRAINTS))}")
        if not (isinstance(self.bounds, (list, tuple)) and len(self.bounds) == 2):
            raise InputError(f"option 'bounds' must be [lo, hi], got {self.bounds!r}")
        self.bounds = tuple(check_list("bounds", self.bounds, length=2))
        if self.bounds[0] > self.bounds[1]:
            raise InputError(f"option 'bounds' needs lo <= hi, got {list(self.bounds)}")
        self.total = check_float("total", self.total, low=0, low_open=True)
        self.train_heads = check_bool("train_heads", self.train_heads)
        self.head_lr = check_float("head_lr", self.head_lr, low=0, low_open=True)
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown objective '{self.objective}'{did_you_mean(self.objective, sorted(OBJECTIVES))}; choose from {sorted(OBJECTIVES)}")
        if self.solver not in list_solvers():
            raise InputError(f"unknown solver '{self.solver}'{did_you_mean(self.solver, list_solvers())}; registered: {list_solvers()}")
        if self.optimizer not in list_optimizers():
            raise InputError(f"unknown optimizer '{self.optimizer}'{did_you_mean(self.optimizer, list_optimizers())}; choose from {list_optimizers()}")
        if self.buffer_policy not in BUFFER_POLICIES:
            raise InputError(f"option 'buffer_policy' must be one of {list(BUFFER_POLICIES)}, got {self.buffer_policy!r}")
        for name in ("objective_args", "solver_args", "prepare_args", "method_args", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise InputError(f"option '{name}' must be a mapping, got {getattr(self, name)!r}")
        self.objective_args = check_objective_args(self.objective, self.objective_args)
        if not (isinstance(self.micro_batch, bool) or self.micro_batch == "auto"):
            from adamerge.train.objectives import averages_over_samples

            if not averages_over_samples(self.objective, self.objective_args):
                raise InputError(f"option 'micro_batch' {self.micro_batch} splits a task's batch into chunks, but objective "
                                 f"'{self.objective}' (with {self.objective_args}) depends on the whole batch at once; "
                                 f"use micro_batch: true (one task at a time)")

    @classmethod
    def from_dict(cls, values: dict) -> "MethodConfig":
        values = dict(values)
        # the names before solvers existed: clamp [lo, hi] | null, simplex: true
        if "clamp" in values:
            clamp = values.pop("clamp")
            values.setdefault("constraint", "none" if clamp is None else "box")
            if clamp is not None:
                values.setdefault("bounds", tuple(clamp))
        if values.pop("simplex", False):
            values["constraint"] = "simplex"
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise InputError(f"unknown method option '{unknown[0]}'{did_you_mean(unknown[0], names)}; known: {sorted(names)}")
        return cls(**values)


@dataclass
class TrainingData:
    """What a data stage trains on: streams (the scored ones, or a labeled few-shot split),
    per-sample targets, optional pools with their batch shares, augmentation, and state to save
    with the run (e.g. aTLAS's trusted set)."""

    streams: list
    targets: dict | None = None
    pools: dict | None = None
    mix: list | None = None
    augment: bool = False
    view: dict = field(default_factory=dict)  # strong_view's options (scale, flip); empty: aTLAS's crop 0.5–1 + flip
    state: dict = field(default_factory=dict)


@dataclass
class FitContext:
    """What ``fit`` hands a method with its own loop (``Method.own_loop``: T3, FW-Merging)."""

    run: Any  # adamerge.train.runs.RunFolder
    model: nn.Module
    tv: TaskVectors
    heads: dict
    streams: list
    labeled: list | None
    cfg: MethodConfig
    seed: int
    resume: bool
    progress: bool
    say: Callable[[str], None]
    eval_batch_size: int
    cache_dir: Any
    pool: dict | None  # FW-Merging's candidates {name: safetensors path}
    evaluate: Callable  # adamerge.train.evaluation.evaluate
    train: Callable  # (run_dir, tv, method, options) -> results: a nested Lightning fit


class Method:
    """Default learned method: coefficients trained by ``options.solver`` on an objective."""

    name = "base"
    defaults: dict = {}
    prepare_solver: str | None = None  # a data-free solver run first; its state feeds build()
    uses_labels = False
    has_masks = False  # learnable masks (solvers with needs_masks need them)
    own_loop = False  # runs :meth:`run` instead of solver stages, and writes its own export
    description = ""
    method_args_class: type | None = None  # the dataclass of ``options.method_args`` (None: the method has none)

    def validate(self, config: dict, model: nn.Module | None) -> None:
        """Check inputs beyond the options (e.g. FW-Merging's pool) before ``fit`` writes anything.
        Here: the merges named by ``preprocess`` / ``ties_density`` / ``init`` fit the experts
        (consensus ``k <= T``, a density or ratio that keeps an entry of the model's parameters)."""
        if model is None or not isinstance(config.get("experts"), dict):
            return
        from adamerge.merges import merge_request

        cfg = self.config(config.get("options"))
        tasks, entries = len(config["experts"]), sum(p.numel() for p in model.parameters())
        if isinstance(cfg.init, (list, tuple)):
            check_list("init", cfg.init, length=tasks, what=f"one per task: {list(config['experts'])}")
        requests = [("preprocess", cfg.preprocess if cfg.preprocess is not None else
                     ({"merge": "ties", "density": cfg.ties_density} if cfg.ties_density else None)),
                    ("init", cfg.init if isinstance(cfg.init, dict) else None)]
        for role, request in requests:
            if request is not None and entries:
                spec, opts = merge_request(request, role)
                spec.check_fit(opts, tasks, entries)

    def run(self, ctx: FitContext) -> dict:
        """The whole fit of an own-loop method; returns entries for results.json."""
        raise NotImplementedError(f"method '{self.name}' trains through solver stages")

    def export(self, folder, run_dir, cfg: dict, results: dict) -> str:
        """Write an own-loop method's export into ``folder``; returns what was written (for the CLI)."""
        raise NotImplementedError(f"method '{self.name}' exports through adamerge.workflows.export.write_export")

    def config(self, overrides: dict | None = None) -> MethodConfig:
        """Defaults, then overrides (the ``*_args`` mappings are merged key by key). Every
        ``*_args`` mapping is parsed by its dataclass here (the method's, each solver stage's), its
        values stored typed (``per_task: 'false'`` becomes ``False``), and one the method never
        reads (``method_args`` of a method without options, ``prepare_args`` without a prepare
        solver, ``solver_args`` of a method with its own loop) is an error, not ignored."""
        values = {**self.defaults}
        overrides = overrides or {}
        if overrides.get("objective", values.get("objective")) != values.get("objective"):
            values.pop("objective_args", None)  # the default objective's options do not carry to another
        for key, value in overrides.items():
            if key.endswith("_args") and isinstance(value, dict) and isinstance(values.get(key), dict):
                value = {**values[key], **value}
            values[key] = value
        cfg = MethodConfig.from_dict(values)
        self.parse_args(cfg)
        self.check(cfg)
        return cfg

    def settings(self, cfg: MethodConfig) -> dict:
        """Everything a fit with ``cfg`` depends on, every default filled in: the config, the
        parsed ``method_args`` and each solver stage's parsed options. Two runs with equal settings
        are the same run (the demo reuses a finished row only then: a changed default of a
        method's or a solver's option class changes this, not ``cfg``)."""
        from adamerge.solvers import solver_class

        opts = self.method_options(cfg)
        return {"config": dataclasses.asdict(cfg),
                "method_args": None if opts is None else dataclasses.asdict(opts),
                "solvers": [{"solver": name, "steps": steps,
                             "options": dataclasses.asdict(parse_options(solver_class(name).Options, args, f"solver '{name}'"))}
                            for name, args, steps in self.solvers(cfg)]}

    def method_options(self, cfg: MethodConfig) -> Any:
        """``cfg.method_args`` parsed by :attr:`method_args_class` (``None`` without one)."""
        if self.method_args_class is None:
            return None
        return parse_options(self.method_args_class, cfg.method_args, f"method '{self.name}' (method_args)")

    def parse_args(self, cfg: MethodConfig) -> None:
        """Parse (and store typed) ``method_args`` and the solver stages' ``solver_args`` /
        ``prepare_args``; refuse a mapping the method never reads."""
        from adamerge.solvers import solver_class

        def typed(args: dict, parsed: Any) -> dict:  # (lists, not tuples: the options are saved as YAML and JSON)
            return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(parsed, k)) for k in args)}

        if self.method_args_class is None:
            if cfg.method_args:
                raise InputError(f"method '{self.name}' has no method_args (it reads none), got {cfg.method_args!r}")
        else:
            cfg.method_args = typed(cfg.method_args, self.method_options(cfg))
        if cfg.prepare_args and self.prepare_solver is None:
            raise InputError(f"method '{self.name}' has no prepare solver: prepare_args {cfg.prepare_args!r} would be ignored")
        stages = self.solvers(cfg)
        if cfg.solver_args and not stages:
            raise InputError(f"method '{self.name}' runs its own loop without a solver: solver_args {cfg.solver_args!r} would be ignored")
        for name, args, _ in stages:
            parsed = parse_options(solver_class(name).Options, args, f"solver '{name}'")
            if args is cfg.solver_args and name == cfg.solver:
                cfg.solver_args = typed(args, parsed)
            elif args is cfg.prepare_args:
                cfg.prepare_args = typed(args, parsed)

    def check(self, cfg: MethodConfig) -> None:
        """Refuse solver choices this method cannot use (before anything is written)."""
        from adamerge.solvers import solver_class

        for name, _, _ in self.solvers(cfg):
            if solver_class(name).needs_masks and not self.has_masks:
                raise InputError(f"solver '{name}' trains learnable masks; method '{self.name}' has none (use concrete_adamerging)")

    def whole_task_vectors(self, cfg: MethodConfig) -> str | None:
        """Why a fit with ``cfg`` reads the task vectors whole before training (so a sharded run
        builds them whole and cuts its shard after), or ``None``: then each rank of a sharded run
        builds only its shard. Here: a stage before the data stage, a preprocessing merge, an
        ``init`` merge, or the experts' predictions as targets."""
        from adamerge.train.objectives import target_kind

        if len(self.solvers(cfg)) > 1:
            return f"method '{self.name}' runs a data-free stage on them first"
        if cfg.preprocess is not None or cfg.ties_density:
            return "options.preprocess rewrites them"
        if isinstance(cfg.init, dict):
            return "options.init takes a merge of them"
        if target_kind(cfg.objective) == "experts":
            return f"objective '{cfg.objective}' needs each expert's predictions"
        return None

    def solvers(self, cfg: MethodConfig) -> list[tuple[str, dict, int]]:
        """The solver stages of a fit, in order: (solver name, its options, its steps)."""
        stages = [(self.prepare_solver, cfg.prepare_args, 0)] if self.prepare_solver else []
        return stages + [(cfg.solver, cfg.solver_args, cfg.steps)]

    def uses_labels_with(self, cfg: MethodConfig) -> bool:
        """Whether a fit with ``cfg`` reads labels (from a labeled split, never the scored streams)."""
        from adamerge.train.objectives import target_kind

        return self.uses_labels or target_kind(cfg.objective) == "labels"

    def training_data(self, cfg: MethodConfig, model: nn.Module, tv: TaskVectors, heads: dict, streams: list,
                      labeled: list | None, cache_dir, say, seed: int, state: dict,
                      experts: TaskVectors | None = None) -> TrainingData:
        """The data of a training stage. Default: the scored streams, unlabeled, with the experts'
        predictions when the objective needs them, or a labeled split for a labeled objective.
        ``experts``: the task vectors holding one expert per task, when ``tv`` holds something
        else (a nested fit over FW-Soft's chosen checkpoints); ``tv`` by default."""
        from adamerge.train.objectives import target_kind

        kind = target_kind(cfg.objective)
        if kind == "experts":
            from adamerge.train.expert_targets import expert_logits, merged_logits
            from adamerge.train.objectives import needs_start

            targets = expert_logits(model, tv if experts is None else experts, heads, streams, cache_dir, say=say)
            keep: dict = {}
            if needs_start(cfg.objective):
                # the anchor: this fit's own starting merge (its initial coefficients), computed
                # once and saved with the method state, so a run resumed in a later stage (whose
                # state then holds, e.g., a frozen mask) keeps the anchor it started with
                saved = {t: state[f"start_logits.{t}"] for t in targets if state and f"start_logits.{t}" in state}
                if len(saved) == len(targets):
                    start = saved
                else:
                    say(f"[expert targets] computing the starting merge's predictions for '{cfg.objective}'")
                    views = cfg.objective_args.get("start_views", 1)
                    start = merged_logits(self.build(model, tv, cfg, seed=seed, state=state), heads, streams, views=views)
                    keep = {f"start_logits.{t}": start[t] for t in start}
                targets = {t: torch.stack([targets[t], start[t].to(targets[t].dtype)], dim=1) for t in targets}
            return TrainingData(streams, targets, state=keep)
        if kind == "labels":
            if not labeled:
                raise InputError(f"objective '{cfg.objective}' needs labels: give a labeled split (config 'labeled:'); the scored streams are never trained on with labels")
            labels = {s.name: s.labels() for s in labeled}
            missing = [n for n, y in labels.items() if y is None]
            if missing:
                raise InputError(f"the labeled split of task '{missing[0]}' has no labels")
            return TrainingData(list(labeled), labels)
        return TrainingData(streams)

    def stage_state(self, merged: MergedModel, cfg: MethodConfig, stage: int, last: bool) -> dict:
        """Method state to save after data stage ``stage`` (e.g. a frozen mask); none by default."""
        return {}

    def regularizer(self, cfg: MethodConfig):
        """A penalty added to the objective, ``merged -> scalar`` (or ``None``)."""
        return None

    def results(self, merged: MergedModel, cfg: MethodConfig) -> dict:
        """Extra entries for results.json (e.g. the achieved mask density)."""
        return {}

    def prepare(self, tv: TaskVectors, cfg: MethodConfig, model: nn.Module, state: dict | None = None) -> TaskVectors:
        """Task-vector preprocessing of the parameters (buffers untouched): the registered merge
        named by ``preprocess`` rewrites them (``ties_density`` d is ``{merge: ties, density: d}``);
        none by default."""
        request = cfg.preprocess if cfg.preprocess is not None else (
            {"merge": "ties", "density": cfg.ties_density} if cfg.ties_density else None)
        if request is None:
            return tv
        from adamerge.merges import rewrite_task_vectors

        return rewrite_task_vectors(tv, [n for n, _ in model.named_parameters()], request)

    def initial_coefficients(self, merged: MergedModel, cfg: MethodConfig, tv: TaskVectors, state: dict | None = None):
        """The applied coefficients to start from (a float or a ``[T, G]`` tensor); ``tv`` are
        the task vectors before :meth:`prepare`. ``init: {merge: NAME, ...}`` takes the merge's
        per-tensor coefficients on ``tv`` (e.g. LiNeS's depth profile), averaged per group."""
        if isinstance(cfg.init, dict):
            from adamerge.merges import initial_coefficients

            return initial_coefficients(cfg.init, tv, merged.grouping, merged.merge_keys)
        if isinstance(cfg.init, (list, tuple)):
            check_list("init", cfg.init, length=merged.num_tasks, what=f"one per task: {merged.task_names}")
        return cfg.init

    def build(self, model: nn.Module, tv: TaskVectors, cfg: MethodConfig, seed: int = 0, state: dict | None = None,
              stage: int | None = None) -> MergedModel:
        """The merged model: for training data stage ``stage``, or (``None``) the final model that
        ``state`` and the saved coefficients describe."""
        from adamerge.solvers import create_solver

        solver = create_solver(cfg.solver, cfg)
        merged = MergedModel(
            model,
            self.prepare(tv, cfg, model, state),
            granularity=cfg.granularity,
            init=1.0,
            buffer_policy=cfg.buffer_policy,
            seed=seed,
            **solver.parametrisation(),
        )
        merged.set_coefficients(self.initial_coefficients(merged, cfg, tv, state))
        solver.prepare(merged)
        return merged


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str) -> Callable:
    """Class decorator: ``@register_method("adamerging")``. A duplicate name is an error."""
    return METHODS.decorator(name)


def list_methods() -> list[str]:
    return METHODS.names()


def create_method(name: str) -> Method:
    return METHODS.get(name)()
