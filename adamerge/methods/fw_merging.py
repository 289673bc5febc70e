"""``fw_merging``: Frank-Wolfe over the convex hull of a pool of checkpoints (FW-Merging).

The merged weights live in the pool's coordinates, ``θ = θ0 + Σ_c λ[c, k] · (θ_c,k − θ0,k)``
(``λ`` is ``[candidates, tensors]``), starting from task arithmetic (``init`` on the experts
found in the pool, 0 elsewhere). Iteration t:

1. the gradient g of the objective (entropy on the unlabeled streams by default; ``cross_entropy``
   on a labeled split marks ``uses_labels``) at the current merged weights, one task at a time;
2. the oracle streams the pool (:class:`adamerge.core.pool.CheckpointPool`) and scores each candidate
   per tensor: ``cosine`` = cos(g_k, θ_c,k) against the candidate's full weights (the paper's), or
   ``linear`` = ⟨g_k, θ_c,k − θ0,k⟩ (the exact linear minimisation oracle of the hull); it picks
   one candidate per tensor (``oracle: layer``) or one checkpoint (``whole``: the lowest sum);
3. ``θ ← θ + γ_t · scale · (θ_sel − θ)`` with ``γ_t = 2/(t+2) · step_size``, i.e.
   ``λ ← (1 − γ_t·scale) λ + γ_t·scale · e_sel``. FW-Soft (``soft: true``) replaces θ_sel by a
   layer-wise AdaMerging over the ``soft_k`` best-scored checkpoints (a nested Lightning fit).

Every iteration saves λ and the choices (the run resumes at the next iteration); the chosen
candidates are recorded in results.json. Memory does not grow with the pool: one candidate
tensor is read at a time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

from adamerge.checks import check_fields, option
from adamerge.train.data import StepBatches, images_layout
from adamerge.errors import InputError, NonFiniteLossError
from adamerge.methods.base import FitContext, Method, MethodConfig, register_method
from adamerge.solvers.base import parse_options


@dataclass
class FWOptions:
    """Options of ``fw_merging`` (``options.method_args``); the paper's defaults."""

    iterations: int = option(10, low=0)
    step_size: float = option(0.1, low=0)
    scale: float = option(0.3, low=0)
    oracle: str = option("layer", choices=("layer", "whole"))  # layer (a candidate per tensor) | whole (one checkpoint)
    score: str = option("cosine", choices=("cosine", "linear"))  # cosine (vs the candidate's full weights) | linear (<g, θ_c − θ0>)
    init: float = option(0.3, low=0)  # task arithmetic's λ on the experts in the pool (the start)
    soft: bool = option(False)  # FW-Soft: AdaMerging over the soft_k best candidates each iteration
    soft_k: int = option(2, low=2)  # AdaMerging needs 2 task vectors
    soft_steps: int = option(50, low=0)
    soft_lr: float = option(1e-2, low=0, low_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "fw_merging option")
        if self.step_size * self.scale > 1:
            raise InputError("fw_merging needs step_size * scale <= 1 (the step stays inside the hull)")


def fw_options(cfg: MethodConfig) -> FWOptions:
    return parse_options(FWOptions, cfg.method_args, "method 'fw_merging'")


def oracle_scores(grad: dict[str, Tensor], pool, score: str) -> Tensor:
    """``[C, K]`` scores of every candidate and tensor (lower is better), streaming the pool."""
    out = torch.zeros(len(pool), len(pool.keys), dtype=torch.float64)
    for c in range(len(pool)):
        for i, (k, t) in enumerate(pool.tensors(c)):
            g = grad[k].to(torch.float64).reshape(-1)
            w = t.to(torch.float64).reshape(-1)
            if score == "cosine":
                out[c, i] = torch.dot(g, w) / (g.norm() * w.norm()).clamp_min(1e-30)
            else:
                out[c, i] = torch.dot(g, w - pool.base[k].to(torch.float64).reshape(-1))
    return out


def select(scores: Tensor, oracle: str) -> Tensor:
    """The oracle's vertex as a ``[C, K]`` 0/1 matrix: per tensor, or one whole checkpoint."""
    C, K = scores.shape
    if oracle == "whole":
        return torch.zeros(C, K, dtype=torch.float64).index_fill_(0, scores.sum(1).argmin().view(1), 1.0)
    return torch.zeros(C, K, dtype=torch.float64).scatter_(0, scores.argmin(0).view(1, K), 1.0)


def fw_step(lam: Tensor, target: Tensor, gamma: float) -> Tensor:
    """``λ ← (1 − γ) λ + γ · target`` (θ moves a fraction γ towards the target's weights)."""
    return (1.0 - gamma) * lam + gamma * target


class StateModule(torch.nn.Module):
    """A fixed state dict run through an architecture (for scoring without copying a model)."""

    def __init__(self, arch: torch.nn.Module, state: dict[str, Tensor]) -> None:
        super().__init__()
        object.__setattr__(self, "_arch", arch)
        self.state = state

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self._arch, self.state, (x,))


def open_pool(candidates: dict, base: dict, keys: list[str], experts: dict, tasks: list[str]):
    """The pool (headers checked) and the candidates that are experts (where FW starts: task
    arithmetic over them): a candidate whose file is an expert's, or that is named like a task."""
    from adamerge.core.pool import CheckpointPool

    if not candidates:
        raise InputError("fw_merging needs its pool as safetensors files: give 'pool:' in the config")
    pool = CheckpointPool(candidates, base, keys)
    expert_files = {str(Path(p).resolve()) for p in experts.values()}
    start = [i for i, (n, p) in enumerate(zip(pool.names, pool.paths)) if str(p.resolve()) in expert_files or n in tasks]
    if not start:
        raise InputError(f"the pool {pool.names} holds none of the experts {tasks}; FW-Merging starts from their"
                         " task-arithmetic merge (name a candidate like its task, or list the expert's file)")
    return pool, start


@register_method("fw_merging")
class FWMerging(Method):
    description = "Frank-Wolfe over a pool of checkpoints (memory-mapped), hard or soft (AdaMerging over the chosen)"
    own_loop = True
    defaults = {"granularity": "layer", "steps": 0, "batch_size": 100}
    method_args_class = FWOptions

    def check(self, cfg: MethodConfig) -> None:
        from adamerge.train.objectives import target_kind

        opts = fw_options(cfg)
        if target_kind(cfg.objective) == "views":
            raise InputError(f"fw_merging does not support the objective '{cfg.objective}' (it needs augmented views)")
        if opts.soft and target_kind(cfg.objective) == "experts":
            raise InputError("FW-Soft's AdaMerging runs over pool candidates, not one expert per task: it cannot use"
                             f" the objective '{cfg.objective}'")

    def solvers(self, cfg: MethodConfig) -> list:
        return []

    def validate(self, config: dict, model) -> None:
        """The pool's headers and its experts, before ``fit`` writes anything."""
        from adamerge.io.state_dicts import load_state_dict

        base = load_state_dict(config["base"], prefix=config.get("prefix"))
        keys = [n for n, _ in model.named_parameters()] if model is not None else [k for k, v in base.items() if v.is_floating_point()]
        pool, _ = open_pool(config.get("pool") or config["experts"], base, keys, config["experts"], list(config["experts"]))
        opts = fw_options(self.config(config.get("options")))
        if opts.soft and opts.soft_k > len(pool):
            raise InputError(f"fw_merging option 'soft_k' = {opts.soft_k} is more than the {len(pool)} candidates of the pool "
                             f"{pool.names}; choose soft_k in [2, {len(pool)}]")

    def run(self, ctx: FitContext) -> dict:
        from adamerge.core.merged import _meta_copy
        from adamerge.train.objectives import get_objective, target_kind

        opts, cfg, run = fw_options(ctx.cfg), ctx.cfg, ctx.run
        experts = {t: p for t, p in ctx.tv.sources.items() if t != "base"}
        keys = [n for n, _ in ctx.model.named_parameters()]
        pool, start_at = open_pool(ctx.pool or experts, ctx.tv.base, keys, experts, ctx.tv.task_names)
        names = pool.names
        state = run.load_state() if ctx.resume else None
        meta = json.loads(run.state_meta().get("fw", "{}")) if state else {}
        if state is not None and "pool_coefficients" in state:
            lam = state["pool_coefficients"].to(torch.float64)
            if tuple(lam.shape) != (len(pool), len(keys)):
                raise InputError(f"{run.state_path}: pool coefficients {tuple(lam.shape)} do not fit this pool")
        else:
            lam = torch.zeros(len(pool), len(keys), dtype=torch.float64)
            lam[start_at] = opts.init
        history: list = meta.get("history", [])
        start = len(history)

        data = self.training_data(cfg, ctx.model, ctx.tv, ctx.heads, ctx.streams, ctx.labeled, ctx.cache_dir,
                                  ctx.say, ctx.seed, {})
        batches = StepBatches(data.streams, cfg.batch_size, opts.iterations, ctx.seed)
        objective = functools.partial(get_objective(cfg.objective), **cfg.objective_args)
        kind = target_kind(cfg.objective)
        arch = _meta_copy(ctx.model)
        buffers = {k: v for k, v in ctx.tv.base.items() if k not in set(keys)}
        buffers.update({n: b for n, b in ctx.model.named_buffers() if n not in ctx.tv.base})

        def gradient(theta: dict[str, Tensor], step: int) -> tuple[float, dict[str, Tensor]]:
            leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            batch, total = batches.draw(step), 0.0
            for task, x in batch.inputs.items():  # one task's activations alive at a time
                logits = ctx.heads[task](functional_call(arch, {**leaves, **buffers}, (images_layout(x),)))
                if kind in ("experts", "labels"):
                    target = data.targets[task][batch.index[task]]
                    loss = objective(logits, targets=target) if kind == "experts" else objective(logits, target)
                else:
                    loss = objective(logits)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"fw_merging: non-finite loss at iteration {step} for task '{task}'")
                loss.backward()
                total += float(loss.detach())
            return total, {k: v.grad for k, v in leaves.items()}

        before = ctx.evaluate(StateModule(arch, {**pool.merge(lam), **buffers}), ctx.heads, ctx.streams, ctx.eval_batch_size)
        for t in range(start, opts.iterations):
            theta = pool.merge(lam)
            loss, grad = gradient(theta, t)
            del theta
            scores = oracle_scores(grad, pool, opts.score)
            del grad
            gamma = 2.0 / (t + 2) * opts.step_size * opts.scale
            entry: dict = {"iteration": t, "loss": loss, "gamma": gamma}
            if opts.soft:
                chosen = scores.sum(1).argsort()[: opts.soft_k].tolist()
                target = self._soft_target(ctx, pool, chosen, t, opts)
                entry["soft_set"] = [names[c] for c in chosen]
            else:
                target = select(scores, opts.oracle)
            counts = {names[c]: int(n) for c, n in enumerate((target != 0).sum(1).tolist()) if n}
            entry["chosen"] = counts if opts.oracle == "layer" or opts.soft else max(counts, key=counts.get)
            lam = fw_step(lam, target, gamma)
            history.append(entry)
            run.save_state({"pool_coefficients": lam}, {"stages_done": 0, "solver": "fw_merging",
                                                                "fw": json.dumps({"history": history})})
            ctx.say(f"[fw_merging] iteration {t + 1}/{opts.iterations}: loss {loss:.4f}, chose {entry['chosen']}")
        final = {**pool.merge(lam), **buffers}
        after = ctx.evaluate(StateModule(arch, final), ctx.heads, ctx.streams, ctx.eval_batch_size)
        weight = lam.sum(1)
        out = {
            "steps": len(history),
            "fw_merging": {
                "settings": dataclasses.asdict(opts),
                "pool": {n: str(p) for n, p in zip(names, pool.paths)},
                "history": history,
                "weight_per_candidate": {n: float(w) / len(keys) for n, w in zip(names, weight)},
                "pool_bytes_read": pool.bytes_read,
                "pool_peak_live_bytes": pool.peak_live_bytes,
            },
        }
        if before is not None and after is not None:
            out |= {"before": before, "after": after}
        return out

    def _soft_target(self, ctx: FitContext, pool, chosen: list[int], t: int, opts: FWOptions) -> Tensor:
        """FW-Soft's vertex: layer-wise AdaMerging over the chosen candidates (a nested fit)."""
        from adamerge.train.runs import RunFolder
        from adamerge.core.task_vectors import TaskVectors

        sub_tv = TaskVectors.from_state_dicts(ctx.tv.base, {pool.names[c]: pool.state_dict(c) for c in chosen},
                                              base_source="the base")
        options = {"granularity": "layer", "lr": opts.soft_lr, "steps": opts.soft_steps, "objective": ctx.cfg.objective,
                   "objective_args": ctx.cfg.objective_args, "batch_size": min(ctx.cfg.batch_size, 32)}
        sub_dir = ctx.run.path / "soft" / f"iteration{t}"
        ctx.train(sub_dir, sub_tv, "adamerging", options)
        coef = RunFolder(sub_dir).load_coefficients().to(torch.float64)  # [len(chosen), tensors]
        target = torch.zeros(len(pool), len(pool.keys), dtype=torch.float64)
        target[chosen] = coef
        return target

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
