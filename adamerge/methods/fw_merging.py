"""``fw_merging``: Frank-Wolfe over the convex hull of a pool of checkpoints (FW-Merging).

The merged weights live in the pool's coordinates, ``θ = θ0 + Σ_c μ[c, k] · (θ_c,k − θ0,k)``
(``μ`` is ``[candidates, tensors]``). A *vertex* is a point of those coordinates the oracle can
choose: a candidate (``e_c``), the start (hard mode), or per tensor a mix of them
(``oracle: layer``).

Start (``start``): by default each mode's original one: task arithmetic for hard (``init`` on
the pool's experts; ``fw_hard.py``'s default, over the whole pool there) and the pretrained model
for soft (``μ = 0``; FW-Soft's start and the authors' evaluation scripts'). In hard mode the start
also joins the candidates, as in ``fw_hard.py``, so a step can lead back to it. (Hard from the
pretrained model takes a full first step, and one task's uninformative gradient there can put
0.3 on a distractor: on the full seed-1 demo textile's, at a chance-level pretrained model, chose
the anti-expert, 66.5 against task arithmetic's 78.5.)

Iteration t:

1. the gradient of the objective at θ, one per task (``choose: per_task``: the authors' FW-Soft
   and evaluation scripts) or one of the tasks' sum (``summed``: ``fw_hard.py``), by default of the
   library's collapse-safe objective on the unlabeled streams (``infomax``, floor 0.9) in hard
   mode and ``trusted_distill`` in FW-Soft (the oracle and the nested AdaMerging: each task's own
   expert's predictions, passed into the nested fit), ``entropy`` the paper's; ``cross_entropy`` on
   a labeled split marks ``uses_labels``;
2. the oracle streams the pool (:class:`adamerge.core.pool.CheckpointPool`) once and every
   gradient scores every candidate per tensor: ``linear`` = ⟨g_k, θ_c,k − θ0,k⟩ (the exact linear
   minimisation oracle; the default) or ``cosine`` = cos(g_k, θ_c,k) against the full weights (the
   paper's: dominated by θ0, it preferred an anti-expert to the task's own expert on the tiny zoo);
   each gradient picks one vertex, a whole checkpoint (``oracle: whole``, the lowest sum: the
   original default) or a candidate per tensor (``layer``). The chosen set S is the union of those
   vertices (a vertex chosen by two tasks counts once; the original makes a later task take its
   next-best instead, which can force a distractor in);
3. hard: ``θ ← θ + a Σ_{v∈S} (θ_v − θ)``; the paper's schedule (``step_rule: schedule``) takes
   ``a = a_t = scale · γ_t``, ``γ_t = 2/(t+2) · step_size``, except ``γ_0 = 1`` from the pretrained
   model (a full first step: task arithmetic over S, as the authors' scripts); the default
   ``line_search`` takes the one of ``{0, a_t/2, a_t, 2a_t, 4a_t}`` (at most 1/|S|) with the lowest
   objective on the iteration's batch. Soft: a layer-wise AdaMerging over S anchored at θ (task vectors
   ``θ_v − θ``, coefficients starting at ``init`` in the first iteration and ``soft_init`` after;
   a nested Lightning fit), and θ is *replaced* by its result:
   ``μ ← μ + Σ_{v∈S} λ_v ⊙ (μ_v − μ)`` with the learned per-tensor ``λ_v`` (no damping).

Every iteration saves μ and the choices (the run resumes at the next iteration); results.json
records them. Memory does not grow with the pool: one candidate tensor is read at a time (the
gradients, one per task, and FW-Soft's chosen set are model-sized, not pool-sized).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

from adamerge.checks import check_fields, option
from adamerge.train.data import StepBatches, images_layout
from adamerge.errors import InputError, NonFiniteLossError
from adamerge.methods.base import FitContext, Method, MethodConfig, register_method
from adamerge.methods.concrete import COLLAPSE_SAFE
from adamerge.solvers.base import parse_options

START = "<start>"  # the start's name among the vertices (a pool candidate may not take it)


@dataclass
class FWOptions:
    """Options of ``fw_merging`` (``options.method_args``); ``iterations: null`` takes the mode's
    default. Where they differ from the originals (oracle score, union, nested budget), the
    module's docstring and the docs say why."""

    iterations: int | None = option(None, low=0)  # None: 10 hard (the paper's), 2 soft (the authors' scaling runs)
    step_size: float = option(0.1, low=0)
    scale: float = option(0.3, low=0)
    # whole: one checkpoint per gradient (the original's default) | layer: a candidate per tensor
    oracle: str = option("whole", choices=("whole", "layer"))
    # linear: <g, θ_c − θ0>, the exact linear minimisation oracle | cosine: cos(g, θ_c) against the full
    # weights (the paper's; dominated by θ0, it chose an anti-expert over the task's expert on the tiny zoo)
    score: str = option("linear", choices=("linear", "cosine"))
    choose: str = option("per_task", choices=("per_task", "summed"))  # a vertex per task's gradient | one for their sum
    # None: the mode's original start, task_arithmetic hard (fw_hard.py's) and pretrained soft (fw_soft.py's)
    start: str | None = option(None, choices=("pretrained", "task_arithmetic"))
    init: float = option(0.3, low=0)  # task arithmetic's λ (start) and FW-Soft's first AdaMerging init
    soft: bool = option(False)  # FW-Soft: the model is replaced by AdaMerging over the chosen set
    soft_steps: int = option(200, low=0)  # the nested AdaMerging's Adam steps per iteration
    soft_lr: float = option(1e-2, low=0, low_open=True)
    soft_init: float = option(0.0, low=0)  # the nested coefficients after the first iteration (the original: 1e-8)
    # hard mode's step: line_search takes the candidate of {0, a_t/2, a_t, 2a_t, 4a_t} (at most 1/|S|,
    # so θ stays between θ and the vertices) with the lowest objective on the iteration's batch
    # (a step that raises the unlabeled objective is not taken); schedule: always a_t (the paper's)
    step_rule: str = option("line_search", choices=("line_search", "schedule"))

    def __post_init__(self) -> None:
        check_fields(self, "fw_merging option")
        if self.step_size * self.scale > 1:
            raise InputError("fw_merging needs step_size * scale <= 1 (a step stays between θ and the vertex)")
        if self.iterations is None:
            self.iterations = 2 if self.soft else 10
        if self.start is None:
            self.start = "pretrained" if self.soft else "task_arithmetic"


def fw_options(cfg: MethodConfig) -> FWOptions:
    return parse_options(FWOptions, cfg.method_args, "method 'fw_merging'")


def _score(g: Tensor, w: Tensor, base: Tensor, score: str) -> float:
    """One candidate tensor's score against one gradient (lower is better)."""
    if score == "cosine":
        return float(torch.dot(g, w) / (g.norm() * w.norm()).clamp_min(1e-30))
    return float(torch.dot(g, w - base))


def oracle_scores(grads: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]], pool, score: str,
                  start: Mapping[str, Tensor] | None = None) -> Tensor:
    """Scores (lower is better) of every candidate and tensor: ``[C, K]`` for one gradient,
    ``[G, C, K]`` for G gradients (each candidate tensor is read once for all of them). With
    ``start`` (the start's weights) a last row scores the start as one more candidate."""
    one = isinstance(grads, Mapping)
    grads = [grads] if one else list(grads)
    rows = len(pool) + (start is not None)
    out = torch.zeros(len(grads), rows, len(pool.keys), dtype=torch.float64)
    flat = lambda t: t.to(torch.float64).reshape(-1)  # noqa: E731
    for c in range(len(pool)):
        for i, (k, t) in enumerate(pool.tensors(c)):
            w, b = flat(t), flat(pool.base[k])
            for j, g in enumerate(grads):
                out[j, c, i] = _score(flat(g[k]), w, b, score)
    if start is not None:
        for i, k in enumerate(pool.keys):
            w, b = flat(start[k]), flat(pool.base[k])
            for j, g in enumerate(grads):
                out[j, -1, i] = _score(flat(g[k]), w, b, score)
    return out[0] if one else out


def select(scores: Tensor, oracle: str) -> Tensor:
    """The oracle's vertex as a ``[V, K]`` 0/1 matrix: per tensor, or one whole checkpoint."""
    C, K = scores.shape
    if oracle == "whole":
        return torch.zeros(C, K, dtype=torch.float64).index_fill_(0, scores.sum(1).argmin().view(1), 1.0)
    return torch.zeros(C, K, dtype=torch.float64).scatter_(0, scores.argmin(0).view(1, K), 1.0)


def distinct(choices: Sequence[Tensor]) -> list[int]:
    """Indices of the first occurrence of each distinct choice (the union over tasks)."""
    keep: list[int] = []
    for i, c in enumerate(choices):
        if not any(torch.equal(c, choices[j]) for j in keep):
            keep.append(i)
    return keep


def vertex_coordinates(choice: Tensor, start: Tensor | None) -> Tensor:
    """A ``[V, K]`` choice as pool coordinates ``[C, K]``: a candidate row is ``e_c``; the start's
    row (the last, when ``start`` — its coordinates — is given) contributes ``start[:, k]``."""
    if start is None:
        return choice.clone()
    return choice[:-1] + choice[-1] * start


def fw_update(mu: Tensor, vertices: Tensor, weights: Tensor) -> Tensor:
    """``μ + Σ_s weights[s] ⊙ (vertices[s] − μ)`` (``vertices`` ``[S, C, K]``, ``weights``
    ``[S, K]``): θ moves towards each chosen vertex by its per-tensor weight. Hard mode's weights
    are ``a_t`` everywhere; FW-Soft's are the nested AdaMerging's coefficients."""
    return mu + (weights[:, None, :].to(mu.dtype) * (vertices - mu)).sum(0)


LINE_SEARCH_FACTORS = (0.0, 0.5, 1.0, 2.0, 4.0)
"""Hard mode's ``step_rule: line_search``: the multiples of the schedule's ``a_t`` it tries."""


def line_search_steps(a_t: float, vertices: int) -> list[float]:
    """The steps hard mode's line search tries: multiples of ``a_t`` up to ``1/|S|`` (beyond it
    θ would leave the hull of θ and the chosen vertices), 0 (no move) first."""
    cap = 1.0 / max(1, vertices)
    return sorted({min(f * a_t, cap) for f in LINE_SEARCH_FACTORS})


def step_weight(t: int, opts: FWOptions) -> float:
    """Hard mode's ``a_t = scale · γ_t``: ``γ_t = 2/(t+2) · step_size``, and ``γ_0 = 1`` from the
    pretrained model (the authors' scripts: the first step is task arithmetic over the chosen)."""
    gamma = 1.0 if t == 0 and opts.start == "pretrained" else 2.0 / (t + 2) * opts.step_size
    return gamma * opts.scale


class StateModule(torch.nn.Module):
    """A fixed state dict run through an architecture (for scoring without copying a model)."""

    def __init__(self, arch: torch.nn.Module, state: dict[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_arch", arch)
        self.state = state

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self._arch, self.state, (x,))


def open_pool(candidates: dict, base: dict, keys: list[str], experts: dict, tasks: list[str], need_experts: bool = True):
    """The pool (headers checked) and the candidates that are experts (task arithmetic's start):
    a candidate whose file is an expert's, or that is named like a task. Starting from task
    arithmetic needs at least one; starting from the pretrained model needs none."""
    from adamerge.core.pool import CheckpointPool

    if not candidates:
        raise InputError("fw_merging needs its pool as safetensors files: give 'pool:' in the config")
    if START in candidates:
        raise InputError(f"pool candidate name '{START}' is reserved for FW-Merging's start; rename it")
    pool = CheckpointPool(candidates, base, keys)
    expert_files = {str(Path(p).resolve()) for p in experts.values()}
    start = [i for i, (n, p) in enumerate(zip(pool.names, pool.paths)) if str(p.resolve()) in expert_files or n in tasks]
    if not start and need_experts:
        raise InputError(f"the pool {pool.names} holds none of the experts {tasks}; start: task_arithmetic starts from"
                         " their task-arithmetic merge (name a candidate like its task, list the expert's file, or use"
                         " start: pretrained)")
    return pool, start


def vertex_name(choice: Tensor, names: list[str], group: str) -> str:
    """A vertex's name: the candidate's (or the start's) when it is one whole checkpoint, else
    a composite named after the gradient that chose it."""
    rows = (choice != 0).any(1).nonzero().flatten().tolist()
    return names[rows[0]] if len(rows) == 1 else f"composite_{group}"


def chosen_summary(choice: Tensor, names: list[str]) -> str | dict[str, int]:
    """What one gradient chose: a checkpoint's name, or per candidate the tensors it won."""
    counts = {names[c]: int(n) for c, n in enumerate((choice != 0).sum(1).tolist()) if n}
    return next(iter(counts)) if len(counts) == 1 else counts


@register_method("fw_merging")
class FWMerging(Method):
    description = "Frank-Wolfe over a pool of checkpoints (memory-mapped), hard or soft (AdaMerging over the chosen)"
    own_loop = True
    # the library's collapse-safe objective for the oracle's gradients and FW-Soft's AdaMerging (the
    # originals: labelled cross-entropy and entropy; `objective: entropy` is the unlabelled paper's)
    defaults = {"granularity": "layer", "steps": 0, "batch_size": 100, **COLLAPSE_SAFE}
    method_args_class = FWOptions
    # FW-Soft's default (issue 23, chosen on the development settings): the experts' predictions
    # where they are sure, else the nested fit's start. With the collapse-safe objective its first
    # nested AdaMerging collapsed textile on sub2 (78.5 against task arithmetic's 79.7)
    soft_objective = "trusted_distill"

    def config(self, overrides: dict | None = None) -> MethodConfig:
        """Hard mode's objective defaults to the collapse-safe one, soft mode's to
        :attr:`soft_objective`; an ``objective`` given always wins."""
        overrides = dict(overrides or {})
        if "objective" not in overrides:
            args = overrides.get("method_args")
            if isinstance(args, Mapping) and parse_options(FWOptions, args, "method 'fw_merging'").soft:
                overrides["objective"] = self.soft_objective
        return super().config(overrides)

    def check(self, cfg: MethodConfig) -> None:
        from adamerge.train.objectives import target_kind

        fw_options(cfg)  # the options parse
        if target_kind(cfg.objective) == "views":
            raise InputError(f"fw_merging does not support the objective '{cfg.objective}' (it needs augmented views)")

    def solvers(self, cfg: MethodConfig) -> list:
        return []

    def validate(self, config: dict, model) -> None:
        """The pool's headers and, when starting from task arithmetic, its experts, before ``fit``
        writes anything."""
        from adamerge.io.state_dicts import load_state_dict

        opts = fw_options(self.config(config.get("options")))
        base = load_state_dict(config["base"], prefix=config.get("prefix"))
        keys = [n for n, _ in model.named_parameters()] if model is not None else [k for k, v in base.items() if v.is_floating_point()]
        open_pool(config.get("pool") or config["experts"], base, keys, config["experts"], list(config["experts"]),
                  need_experts=opts.start == "task_arithmetic")

    def run(self, ctx: FitContext) -> dict:
        from adamerge.core.merged import _meta_copy

        opts = fw_options(ctx.cfg)
        experts = {t: p for t, p in ctx.tv.sources.items() if t != "base"}
        keys = [n for n, _ in ctx.model.named_parameters()]
        pool, experts_at = open_pool(ctx.pool or experts, ctx.tv.base, keys, experts, ctx.tv.task_names,
                                     need_experts=opts.start == "task_arithmetic")
        start_candidate = not opts.soft  # as the originals: fw_hard.py adds its start, fw_soft.py does not
        names = pool.names + ([START] if start_candidate else [])
        mu0 = torch.zeros(len(pool), len(keys), dtype=torch.float64)
        if opts.start == "task_arithmetic":
            mu0[experts_at] = opts.init
        mu, history = self._resumed(ctx, mu0)
        arch = _meta_copy(ctx.model)
        buffers = {k: v for k, v in ctx.tv.base.items() if k not in set(keys)}
        buffers.update({n: b for n, b in ctx.model.named_buffers() if n not in ctx.tv.base})
        objective = self._gradients(ctx, arch, buffers, opts)
        start_theta = pool.merge(mu0)
        before = ctx.evaluate(StateModule(arch, {**start_theta, **buffers}), ctx.heads, ctx.streams, ctx.eval_batch_size)
        start_state = start_theta if start_candidate else None  # the start's weights, to score it as a candidate
        del start_theta
        vertex_start = mu0 if start_candidate else None
        for t in range(len(history), opts.iterations):
            mu, entry = self._iteration(ctx, pool, mu, t, objective, start_state, vertex_start, names, opts)
            history.append(entry)
            ctx.run.save_state({"pool_coefficients": mu}, {"stages_done": 0, "solver": "fw_merging",
                                                           "fw": json.dumps({"history": history})})
            ctx.say(f"[fw_merging] iteration {t + 1}/{opts.iterations}: loss {entry['loss']:.4f}, chose {entry['set']}")
        after = ctx.evaluate(StateModule(arch, {**pool.merge(mu), **buffers}), ctx.heads, ctx.streams, ctx.eval_batch_size)
        out = {"steps": len(history), "fw_merging": {
            "settings": dataclasses.asdict(opts), "start_candidate": start_candidate,
            "pool": {n: str(p) for n, p in zip(pool.names, pool.paths)}, "history": history,
            "weight_per_candidate": {n: float(w) / len(keys) for n, w in zip(pool.names, mu.sum(1))},
            "pool_bytes_read": pool.bytes_read, "pool_peak_live_bytes": pool.peak_live_bytes}}
        return out | ({"before": before, "after": after} if before is not None and after is not None else {})

    @staticmethod
    def _resumed(ctx: FitContext, mu0: Tensor) -> tuple[Tensor, list]:
        """μ and the history to continue from: the saved ones when resuming, else the start."""
        state = ctx.run.load_state() if ctx.resume else None
        if state is None or "pool_coefficients" not in state:
            return mu0.clone(), []
        mu = state["pool_coefficients"].to(torch.float64)
        if tuple(mu.shape) != tuple(mu0.shape):
            raise InputError(f"{ctx.run.state_path}: pool coefficients {tuple(mu.shape)} do not fit this pool")
        return mu, json.loads(ctx.run.state_meta().get("fw", "{}")).get("history", [])

    def _iteration(self, ctx: FitContext, pool, mu: Tensor, t: int, objective, start_state: dict | None,
                   vertex_start: Tensor | None, names: list[str], opts: FWOptions) -> tuple[Tensor, dict]:
        """Iteration t: the gradients at θ, each one's vertex, their union S, and the move (hard:
        the step towards each vertex of S; soft: θ replaced by the nested AdaMerging over S).
        ``objective`` is :meth:`_gradients`' pair. Returns the new μ and the history entry."""
        theta = pool.merge(mu)
        gradients, value = objective
        losses, grads = gradients(theta, t)
        groups = list(grads)
        scores = oracle_scores([grads[g] for g in groups], pool, opts.score, start_state)
        del grads
        choices = [select(s, opts.oracle) for s in scores]
        keep = distinct(choices)
        vertices = torch.stack([vertex_coordinates(choices[i], vertex_start) for i in keep])
        vnames = [vertex_name(choices[i], names, groups[i]) for i in keep]
        entry: dict = {"iteration": t, "loss": sum(losses.values()), "losses": losses,
                       "chosen": {g: chosen_summary(c, names) for g, c in zip(groups, choices)}, "set": vnames}
        if opts.soft:
            weights = self._soft_weights(ctx, pool, theta, vertices, vnames, t, opts)
            entry["soft_coefficients"] = {n: float(w.mean()) for n, w in zip(vnames, weights)}
        else:
            entry["step"] = step_weight(t, opts)
            if opts.step_rule == "line_search":  # the tried steps' objective on this iteration's batch
                tried = {}
                for a in line_search_steps(entry["step"], len(keep)):
                    ones = torch.full((len(keep), len(pool.keys)), a, dtype=torch.float64)
                    tried[a] = value(pool.merge(fw_update(mu, vertices, ones)), t) if a > 0 else sum(losses.values())
                entry["line_search"] = {f"{a:.6g}": v for a, v in tried.items()}
                entry["step"] = min(tried, key=lambda a: (tried[a], a))  # ties: the smaller step
            weights = torch.full((len(keep), len(pool.keys)), entry["step"], dtype=torch.float64)
        return fw_update(mu, vertices, weights), entry

    def _gradients(self, ctx: FitContext, arch, buffers: dict, opts: FWOptions):
        """``(gradients, value)``: ``gradients(θ, t) -> ({task: loss}, {group: gradient})``, the
        objective's gradient at θ on iteration t's batch, one per task (``per_task``) or of their
        sum (``summed``: group ``all``), one task's activations alive at a time; ``value(θ, t)``,
        the objective summed over tasks on the same batch (no gradient: the line search)."""
        from adamerge.train.objectives import get_objective, target_kind

        cfg = ctx.cfg
        data = self.training_data(cfg, ctx.model, ctx.tv, ctx.heads, ctx.streams, ctx.labeled, ctx.cache_dir,
                                  ctx.say, ctx.seed, {})
        batches = StepBatches(data.streams, cfg.batch_size, opts.iterations, ctx.seed)
        draw = functools.lru_cache(maxsize=1)(batches.draw)  # an iteration's batch, read once for its gradients and line search
        objective = functools.partial(get_objective(cfg.objective), **cfg.objective_args)
        kind = target_kind(cfg.objective)

        def task_loss(leaves: dict, task: str, x: Tensor, index: Tensor) -> Tensor:
            logits = ctx.heads[task](functional_call(arch, {**leaves, **buffers}, (images_layout(x, arch),)))
            if kind in ("experts", "labels"):
                target = data.targets[task][index]
                return objective(logits, targets=target) if kind == "experts" else objective(logits, target)
            return objective(logits)

        def gradients(theta: dict[str, Tensor], step: int) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
            batch, losses, grads = draw(step), {}, {}
            for task, x in batch.inputs.items():
                leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
                loss = task_loss(leaves, task, x, batch.index[task])
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"fw_merging: non-finite loss at iteration {step} for task '{task}'")
                loss.backward()
                losses[task] = float(loss.detach())
                grads[task] = {k: v.grad for k, v in leaves.items()}
            if opts.choose == "summed":
                grads = {"all": {k: sum(g[k] for g in grads.values()) for k in theta}}
            return losses, grads

        @torch.no_grad()
        def value(theta: dict[str, Tensor], step: int) -> float:
            batch, total = draw(step), 0.0
            for task, x in batch.inputs.items():
                loss = task_loss(theta, task, x, batch.index[task])
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"fw_merging: non-finite loss in the line search at iteration {step} for task '{task}'")
                total += float(loss)
            return total

        return gradients, value

    def _soft_weights(self, ctx: FitContext, pool, theta: dict, vertices: Tensor, vnames: list[str], t: int,
                      opts: FWOptions) -> Tensor:
        """FW-Soft: a layer-wise AdaMerging (a nested fit in ``RUN/soft/iteration<t>``) over the
        chosen vertices, anchored at the current θ (task vectors ``θ_v − θ``); returns its applied
        coefficients ``[S, K]`` (tensor k's coefficient of each vertex), which replace θ."""
        from adamerge.core.task_vectors import TaskVectors
        from adamerge.train.runs import RunFolder

        rest = {k: v for k, v in ctx.tv.base.items() if k not in theta}
        sub_tv = TaskVectors.from_state_dicts({**rest, **theta}, {n: {**rest, **pool.merge(v)} for n, v in zip(vnames, vertices)},
                                              base_source="the current merged model")
        options = {"granularity": "layer", "lr": opts.soft_lr, "steps": opts.soft_steps, "objective": ctx.cfg.objective,
                   "objective_args": ctx.cfg.objective_args, "init": opts.init if t == 0 else opts.soft_init}
        sub_dir = ctx.run.path / "soft" / f"iteration{t}"
        ctx.train(sub_dir, sub_tv, "adamerging", options)
        del sub_tv
        sub = RunFolder(sub_dir)
        coef = sub.load_coefficients().to(torch.float64)  # [S, groups]
        groups = json.loads((sub_dir / "groups.json").read_text())["groups"]
        group_of = {k: g for g, entry in enumerate(groups) for k in entry["parameters"]}
        return coef[:, [group_of[k] for k in pool.keys]]

    def export(self, folder: Path, run_dir, cfg: dict, results: dict) -> str:
        from adamerge.config import build_heads, build_model
        from adamerge.io.export_files import write_merged_export
        from adamerge.io.state_dicts import load_state_dict
        from adamerge.core.pool import CheckpointPool
        from adamerge.train.runs import RunFolder

        model, _ = build_model(cfg["model"])
        base = load_state_dict(cfg["base"], prefix=cfg["prefix"])
        keys = [n for n, _ in model.named_parameters()]
        pool = CheckpointPool(results["fw_merging"]["pool"], base, keys)
        lam = RunFolder(run_dir).load_state()["pool_coefficients"]
        state = {**base, **pool.merge(lam)}
        write_merged_export(folder, state, build_heads(cfg, Path(cfg["run_dir"]) / "cache"), cfg, results, {
            "granularity": "layer", "pool": pool.names, "groups": keys, "coefficients": lam.tolist()})
        return "a merged checkpoint (model.safetensors, heads.safetensors) from the pool"
