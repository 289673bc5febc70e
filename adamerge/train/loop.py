"""Lightning wiring: the LightningModule, the step-indexed data module, ``fit`` (the solver
stages of a method) and ``evaluate``. The run folder's files are read and written by
:mod:`adamerge.train.runs`; how parameters move is the solver's business (:mod:`adamerge.solvers`).
Checkpoints hold coefficients, optimiser and loop state only: the task vectors are
non-persistent buffers and the heads are dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from lightning.pytorch.callbacks import ProgressBar
from torch.utils.data import DataLoader

from adamerge.train.data import StepBatch, StepBatches, TaskStream, images_layout, strong_view
from adamerge.errors import InputError, NonFiniteLossError
from adamerge.train.evaluation import evaluate, reestimate_batches  # noqa: F401  (re-exported)
from adamerge.core.merged import MergedModel
from adamerge.core.sharding import SHARD_STRATEGY
from adamerge.methods import MethodConfig
from adamerge.train.objectives import averages_over_samples, get_objective, target_kind
from adamerge.train.runs import RunFolder, is_launched_rank, read_metrics  # noqa: F401  (read_metrics re-exported)
from adamerge.core.task_vectors import TaskVectors


class _InjectGradients(torch.autograd.Function):
    """A zero scalar whose backward hands each input tensor its given gradient: the gradient of
    ``Σ_k <θ_k, G_k>`` without forming the products (two passes over the model saved, and the
    model-sized temporaries of the product and its backward)."""

    @staticmethod
    def forward(ctx, grads, done, *tensors):  # type: ignore[override]
        ctx.grads, ctx.done = grads, done
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, upstream):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        scale = None if float(upstream) == 1.0 else upstream
        out = (None, None, *(g if scale is None else g * scale.to(g.dtype) for g in grads))
        ctx.done()  # the gradients are read: the next step may write into them again
        return out


def _zero_gradients(leaves: Mapping[str, Tensor], reached: set[str], kept: Mapping[str, Tensor]) -> None:
    """Give every leaf a zero gradient before the first forward: the per-task backwards then add
    into it in place (0 + g is g: the same values), and the gradients sit in memory taken before
    any activation, instead of being allocated inside the first task's freed activations, where
    they split the free space every later task's forward would reuse (measured: −31 MiB peak on
    the small ViT of ``benchmarks/vs_fusionbench.py``). ``kept``: the previous step's gradients,
    zeroed and used again where they fit (``zero_`` of kept memory against ``zeros_like``: 0.015
    against 0.08-0.13 s at ViT-B-32, ``benchmarks/merge_alloc.py``). ``reached`` collects the
    leaves a backward reached (those with a gradient), as ``grad is not None`` did."""
    for k, v in leaves.items():
        old = kept.get(k)
        fits = old is not None and old.shape == v.shape and old.dtype == v.dtype and old.device == v.device
        v.grad = old.zero_() if fits else torch.zeros_like(v)
        v.register_post_accumulate_grad_hook(lambda _, k=k: reached.add(k))


AUTO_CHUNK_FLOOR = 64 * 2**20
"""``micro_batch: auto``: a chunk's activations may use the larger of this and the merged weights' size."""

PROBE = -1
""":meth:`MergeModule._chunk`'s answer while ``micro_batch: auto`` has not measured yet: run one
sample, and measure what autograd saves for it."""


class SavedBytes:
    """Counts the bytes of the tensors autograd saves for the backward while it is active (each
    tensor once; a view counts its own elements, an expanded one at most its storage), leaving
    out the storages in ``exclude`` (the weights: saved alike whatever the batch). The tensors
    are saved as usual, so the measured forward is an ordinary one, its backward included.
    ``micro_batch: auto`` measures the first task's first chunk (one sample) with it."""

    def __init__(self, exclude: Sequence[Tensor] = ()) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[tuple[int, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            key = (t.data_ptr(), t.numel())
            self.seen[key] = min(t.numel() * t.element_size(), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def chunk_size(chunking: Mapping[str, int], batch: int) -> int:
    """Samples per chunk for a batch of ``batch``: equal chunks, as few as keep each chunk's
    activations under the budget."""
    largest = max(1, chunking["budget_bytes"] // chunking["bytes_per_sample"])
    chunks = -(-batch // largest)
    return -(-batch // chunks)


class MergeModule(L.LightningModule):
    """Trains a method's parameters (the merge coefficients; masks for methods that add them).

    Manual optimisation: each step hands the batch to the solver (:mod:`adamerge.solvers`), which
    calls :meth:`batch_loss` (one batched forward of every task's samples through the merged
    backbone, the features split back per task into that task's frozen head, the loss summed
    over tasks), runs ONE backward and steps its one optimiser once.
    """

    def __init__(self, merged: MergedModel, heads: Mapping[str, nn.Module], cfg: MethodConfig, solver,
                 targets: Mapping[str, Tensor] | None = None, regularizer: Callable | None = None,
                 augment: bool = False, seed: int = 0, tasks: Sequence[str] | None = None,
                 view: Mapping | None = None) -> None:
        super().__init__()
        # the streams' tasks: the task vectors' names, unless those are something else (FW-Soft's
        # pool candidates)
        self.tasks = list(tasks or merged.task_names)
        missing = [t for t in self.tasks if t not in heads]
        if missing:
            raise InputError(f"no head for task '{missing[0]}' (heads given for {sorted(heads)})")
        self.automatic_optimization = False
        self.merged = merged
        # options.train_heads: trainable copies (the given heads stay as they are), else frozen
        self.train_heads = bool(cfg.train_heads)
        self.heads = nn.ModuleDict({t: heads[t].trainable() if self.train_heads else heads[t] for t in self.tasks})
        for p in self.heads.parameters():
            p.requires_grad_(self.train_heads)
        self.cfg = cfg
        self.solver = solver
        self.objective = functools.partial(get_objective(cfg.objective), **cfg.objective_args)
        self.target_kind = target_kind(cfg.objective)
        if self.target_kind in ("experts", "labels") and targets is None:
            raise InputError(f"objective '{cfg.objective}' needs per-sample {self.target_kind} (targets)")
        self.augment, self.seed, self.view = augment, seed, dict(view or {})
        for i, t in enumerate(self.tasks):  # per-sample targets move with the module
            self.register_buffer(f"_target{i}", None if targets is None else targets[t], persistent=False)
        self.strict_loading = False  # checkpoints leave frozen heads out
        self.stop_reason: str | None = None
        self._recent: list[float] = []  # the last losses, for options.early_stop
        self.regularizer = regularizer  # e.g. a mask-density penalty: merged -> (scalar, logs)
        self._batch_n = 1
        self.shard_task_vectors = False  # trainer.strategy: shard (see setup)
        # a sharded build: the start's merged weights, gathered after training (see on_train_end)
        self.keep_start = False
        self.start_parameters: dict[str, Tensor] | None = None
        self._start_raw: Tensor | None = None
        self.chunking: dict | None = None  # options.micro_batch: auto, measured at the first step
        self._kept_grads: dict[str, Tensor] = {}  # the per-task step's gradients, zeroed and used again

    def setup(self, stage: str) -> None:
        """``trainer.strategy: shard``: once the processes are connected, and before the module is
        moved to its device, each rank keeps only its shard of the task vectors (cut here, or
        built per rank and checked here against Lightning's rank and world)."""
        trainer, merged = self.trainer, self.merged
        if self.shard_task_vectors and trainer.world_size > 1 and not merged.is_sharded:
            from adamerge.memory import release_freed_memory

            merged.shard(trainer.global_rank, trainer.world_size)
            release_freed_memory()
        elif merged.is_sharded and ((got := merged.shard_summary())["rank"], got["world"]) != \
                (trainer.global_rank, trainer.world_size):
            raise InputError(f"this process built shard {got['rank']} of {got['world']} of the task vectors, but "
                             f"Lightning runs it as rank {trainer.global_rank} of {trainer.world_size} processes "
                             "(a launcher adamerge could not read before the build?)")
        if merged.is_sharded and self.keep_start:  # before a checkpoint is restored: the start's coefficients
            self._start_raw = merged.coefficients.detach().clone()

    def on_train_end(self) -> None:
        merged = self.merged
        self._kept_grads = {}  # two model sizes kept between steps, no longer needed
        merged.release_reused()
        if not merged.is_sharded:
            return
        # every rank takes part in the gathers; rank 0 then evaluates on its own
        if self._start_raw is not None:
            # the start's merge, for the scores before training: gathered here, not before the
            # first step, because scoring it inside setup slowed every step after by 20%
            # (ViT-B-32, T = 8, 2 gloo ranks: 12.1 against 9.4-9.8 s/step; cause not found)
            final = merged.coefficients.detach().clone()
            with torch.no_grad():
                merged.coefficients.copy_(self._start_raw.to(final.device))
            merged.gather_final()
            if self.trainer.is_global_zero:
                self.start_parameters = {k: v.cpu() for k, v in merged.merged_parameters().items()}
            merged.release_final()
            with torch.no_grad():
                merged.coefficients.copy_(final)
        merged.gather_final()

    def forward(self, x: Tensor) -> Tensor:
        return self.merged(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """The optimiser's groups: the method's parameters (coefficients, masks) at ``options.lr``
        and, with ``options.train_heads``, the heads at ``options.head_lr``."""
        heads = {id(p) for p in self.heads.parameters()}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in heads]}]
        if self.train_heads:
            groups.append({"params": list(self.heads.parameters()), "lr": self.cfg.head_lr, "name": "heads"})
        return groups

    def task_losses(self, batch: StepBatch | Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-task objective values of one batch (a :class:`StepBatch`, or ``{task: inputs}``
        for objectives without per-sample targets)."""
        inputs, index = (batch.inputs, batch.index) if isinstance(batch, StepBatch) else (batch, None)
        names = list(inputs)
        sizes = [inputs[n].shape[0] for n in names]
        self._batch_n = sum(sizes)
        x = torch.cat([inputs[n] for n in names])
        kind = self.target_kind
        weak = None
        if kind == "views" or self.augment:
            # the strong view: a function of (seed, step), the same for every call within a step
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.global_step))
            strong = strong_view(x.cpu(), gen, **self.view).to(x.device)
            if kind == "views":
                with torch.no_grad():
                    weak = self.merged(images_layout(x, self.merged)).split(sizes)
            x = strong
        features = self.merged(images_layout(x, self.merged)).split(sizes)
        out = {}
        for k, (n, f) in enumerate(zip(names, features)):
            logits = self.heads[n](f)
            if kind in ("experts", "labels"):
                if index is None:
                    raise InputError("per-sample targets need a StepBatch (inputs with their stream positions)")
                target = getattr(self, f"_target{self.tasks.index(n)}")[index[n].to(f.device)]
                out[n] = self.objective(logits, targets=target) if kind == "experts" else self.objective(logits, target)
            elif kind == "views":
                with torch.no_grad():
                    weak_logits = self.heads[n](weak[k]).float()
                    fixed = getattr(self, f"_target{self.tasks.index(n)}")
                    if fixed is not None and index is not None:
                        # trusted samples: their fixed pseudo-label (>= 0) replaces the weak view's
                        lab = fixed[index[n].to(f.device)]
                        sure = lab >= 0
                        if bool(sure.any()):
                            weak_logits[sure] = 100.0 * F.one_hot(lab[sure], weak_logits.shape[-1]).float()
                out[n] = self.objective(logits, targets=weak_logits)
            else:
                out[n] = self.objective(logits)
        return out

    def batch_loss(self, batch: Mapping[str, Tensor], check: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """The summed objective over tasks and the per-task values (error on a non-finite one)."""
        if self.cfg.micro_batch and self.target_kind != "views" and not self.augment:
            losses = self._micro_batch_losses(batch, check)
        else:
            losses = self.task_losses(batch)
        loss = torch.stack(list(losses.values())).sum()
        if self.regularizer is not None:
            penalty = self.regularizer(self.merged)
            if penalty is not None:
                losses = {**losses, "regularizer": penalty}
                loss = loss + penalty
        if check and not torch.isfinite(loss):
            bad = [n for n, v in losses.items() if not torch.isfinite(v)]
            raise NonFiniteLossError(f"non-finite loss at step {self.global_step} for task(s) {bad}")
        return loss, losses

    def _micro_batch_losses(self, batch, check: bool) -> dict[str, Tensor]:
        """``options.micro_batch``: merge once, then each task's forward and backward alone (in
        chunks of at most N samples with ``micro_batch: N``, each chunk's value weighted by its
        share of the task's samples) against leaves detached from the merged weights, so one
        chunk's activations are alive at a time; then a surrogate whose gradient is the true one,
        ``Σ_k <θ_k(λ), G_k>`` with G_k the accumulated gradient of merged tensor k (computed as
        :class:`_InjectGradients`: no product is formed), so the solver's ONE backward runs
        through the merge once. Without gradients (a line search's evaluations)
        it is the plain per-chunk forward."""
        inputs, index = (batch.inputs, batch.index) if isinstance(batch, StepBatch) else (batch, None)
        # the merge writes into the previous call's merged weights: nothing reads them after that
        # call returned (its chunks' graphs are gone; the carrier holds their gradients, not them)
        theta = self.merged.merged_parameters(reuse=True)
        grad = torch.is_grad_enabled()
        leaves = {k: v.detach().requires_grad_(grad) for k, v in theta.items()}
        reached: set[str] = set()
        if grad:
            # the previous step's gradients, unless a loss holding them still waits for its backward
            kept, self._kept_grads = self._kept_grads, {}
            _zero_gradients(leaves, reached, kept)
        values: dict[str, Tensor] = {}
        with self.merged.fixed_parameters(leaves):
            for n, x in inputs.items():
                size, lo = x.shape[0], 0
                while lo < size:
                    chunk = self._chunk(size)
                    part = slice(lo, min(size, lo + (1 if chunk == PROBE else chunk or size)))
                    one = StepBatch({n: x[part]}, {n: index[n][part]}) if index is not None else {n: x[part]}
                    # micro_batch: auto measures its first chunk (one sample) as it runs: no extra forward
                    with self._measure(leaves) if chunk == PROBE else contextlib.nullcontext() as meter:
                        value = self.task_losses(one)[n] * ((part.stop - part.start) / size)
                    if meter is not None:
                        budget = max(AUTO_CHUNK_FLOOR, sum(v.numel() * v.element_size() for v in leaves.values()))
                        self.chunking = {"bytes_per_sample": max(1, meter.bytes), "budget_bytes": int(budget)}
                    lo = part.stop
                    if check and not torch.isfinite(value):
                        raise NonFiniteLossError(f"non-finite loss at step {self.global_step} for task(s) ['{n}']")
                    if grad:
                        value.backward()
                    values[n] = value.detach() if n not in values else values[n] + value.detach()
                    # the chunk's graph (its nodes: thousands of small heap blocks scattered among
                    # the freed activations) goes now, not after the next chunk's forward
                    del value, one
        self._batch_n = sum(x.shape[0] for x in inputs.values())
        if not grad:
            return values
        keys = [k for k in theta if k in reached]
        grads = {k: v.grad for k, v in leaves.items()}

        def done() -> None:
            self._kept_grads = grads

        carrier = _InjectGradients.apply([grads[k] for k in keys], done, *[theta[k] for k in keys])
        # each task's exact value; the first entry also carries the whole gradient (value + 0)
        first = next(iter(values))
        return {n: v + carrier.to(v.dtype) if n == first else v for n, v in values.items()}

    def _chunk(self, size: int) -> int | None:
        """The samples per chunk of a task's micro-batch of ``size`` (``None``: the batch whole;
        :data:`PROBE`: one sample, measured, before ``micro_batch: auto`` knows its chunk)."""
        mb = self.cfg.micro_batch
        if mb is True or (mb == "auto" and not averages_over_samples(self.cfg.objective, self.cfg.objective_args)):
            return None
        if mb != "auto":
            return int(mb)
        if self.chunking is None:  # measured once, on the first task's first sample of a step with gradients
            return PROBE if torch.is_grad_enabled() and size > 1 else None
        return chunk_size(self.chunking, size)

    def _measure(self, leaves: Mapping[str, Tensor]) -> "SavedBytes":
        """A meter of the activations one chunk saves: the merged weights, the heads' and every
        other module tensor left out (their storages are saved whatever the batch)."""
        fixed = [*leaves.values(), *self.heads.parameters(), *self.heads.buffers(), *self.merged.buffers()]
        return SavedBytes(fixed)

    def log_step(self, loss: Tensor, losses: Mapping[str, Tensor]) -> None:
        """Per-task losses, the total and coefficient statistics (before this step's update)."""
        log = {f"loss/{n}": v.detach() for n, v in losses.items()}
        coef = self.merged.applied_coefficients().detach()
        log.update({"coef/mean": coef.mean(), "coef/min": coef.min(), "coef/max": coef.max()})
        if self.merged.mask_set is not None and self.merged.mask_set.frozen is None:
            log["mask_density"] = torch.tensor(self.merged.mask_set.density())  # expected kept fraction
        self.log_dict(log, on_step=True, prog_bar=False, batch_size=self._batch_n)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, batch_size=self._batch_n)

    def log_extra(self, values: Mapping[str, float]) -> None:
        """Solver-specific per-step values (e.g. ``fw_gap``), as metrics.csv columns."""
        self.log_dict({k: float(v) for k, v in values.items()}, on_step=True, batch_size=self._batch_n)

    def request_stop(self, reason: str) -> None:
        """End training after this step (e.g. Frank-Wolfe's gap fell below ``gap_tol``)."""
        self.stop_reason = reason
        self.trainer.should_stop = True

    def training_step(self, batch, batch_idx: int) -> Tensor:
        masks = self.merged.mask_set
        if masks is not None and masks.frozen is None:  # learnable masks: samples keyed by the step
            masks.set_step(self.global_step, self.global_step / max(1, self.trainer.max_steps))
        loss = self.solver.training_step(self, batch)
        if self.cfg.early_stop and loss is not None:
            value = loss.detach()
            if self.trainer.world_size > 1:  # every rank decides on the same (averaged) loss
                value = self.trainer.strategy.reduce(value, reduce_op="mean")
            self._check_settled(float(value))
        return loss

    def _check_settled(self, loss: float) -> None:
        """``options.early_stop``: stop once the mean loss of the last W steps is less than
        ``min_delta`` (relative) below the mean of the W steps before (labels are never used).
        The recent losses are checkpointed, so a resumed run stops where an uninterrupted one does."""
        w, delta = self.cfg.early_stop["window"], self.cfg.early_stop["min_delta"]
        self._recent = (self._recent + [loss])[-2 * w:]
        if len(self._recent) < 2 * w:
            return
        before, last = sum(self._recent[:w]) / w, sum(self._recent[w:]) / w
        if before - last < delta * abs(before):
            self.request_stop(f"the objective settled: mean loss {last:.5g} over the last {w} steps, "
                              f"{before:.5g} over the {w} before (min_delta {delta:g})")

    def configure_optimizers(self):
        return self.solver.configure_optimizers(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if not self.train_heads:  # frozen heads come from the config; trained ones are state
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("heads.")}
        checkpoint["adamerge_stop_reason"] = self.stop_reason
        checkpoint["adamerge_recent_losses"] = list(self._recent)
        checkpoint["adamerge_solver"] = self.solver.state_dict()
        # micro_batch: auto's measured chunking: a resumed run cuts its batches as the first run did
        checkpoint["adamerge_chunking"] = self.chunking

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.stop_reason = checkpoint.get("adamerge_stop_reason")
        self._recent = list(checkpoint.get("adamerge_recent_losses") or [])
        self.solver.load_state_dict(checkpoint.get("adamerge_solver") or {})
        self.chunking = checkpoint.get("adamerge_chunking") or self.chunking


class StepDataModule(L.LightningDataModule):
    """Serves :class:`StepBatches` from the trainer's current global step (so a resumed run
    continues with the very batches it would have seen) and this process's rank.

    The loader always has ``steps`` items (item i = step ``start + i``; the loop stops at
    ``max_steps``): Lightning restores a mid-epoch checkpoint with its batch counter at ``start``
    and ends the epoch when that counter reaches the loader's length, so a loader of
    ``steps − start`` items would end the restored epoch early and restart the stream at
    ``start`` in a second epoch (the resume bug this prevents).
    """

    def __init__(self, streams: Sequence[TaskStream], batch_size: int, steps: int, seed: int,
                 batches_per_step: int = 1, pools: dict | None = None, mix: list | None = None, num_workers: int = 0):
        super().__init__()
        self.streams, self.batch_size, self.steps, self.seed = list(streams), batch_size, steps, seed
        self.batches_per_step, self.pools, self.mix, self.num_workers = batches_per_step, pools, mix, num_workers

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        ds = StepBatches(self.streams, self.batch_size, self.steps + start, self.seed, start, rank, world,
                         self.batches_per_step, self.pools, self.mix)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers)


def _loggers(run_dir: Path, version: int) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(str(run_dir), name="logs", version=version)]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(run_dir), name="logs", version=version))
    except ImportError:
        pass
    return loggers


@dataclass
class DataFreeProblem:
    """What a data-free solver (``Solver.solve``) works on."""

    model: nn.Module
    tv: TaskVectors  # after the method's preprocessing
    cfg: MethodConfig
    run: RunFolder  # for partial checkpoints (an interrupted solve resumes)
    say: Callable[[str], None]
    seed: int = 0


@contextlib.contextmanager
def _deterministic_mode_restored() -> Iterator[None]:
    """Deterministic algorithms for the whole run, the scores before training included, then the
    caller's setting back. Lightning's ``Trainer(deterministic=True)`` turns them on (and sets
    ``CUBLAS_WORKSPACE_CONFIG``) for the whole process and leaves them on: a fit called from a
    notebook or a test changed how the caller's later code computed, and a run's scores before
    training depended on whether another run had come before it in the process."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    torch.use_deterministic_algorithms(True)
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # what Lightning sets: cuBLAS refuses deterministic mode without it
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def run_plan(plan) -> dict:
    """Run a checked plan's solver stages in order (data-free ones through ``Solver.solve``, data
    ones through Lightning) and write the run folder. Each finished stage saves the method state it
    produced, so a resumed plan continues at the first unfinished stage. Returns the results dict.
    The plan (:class:`adamerge.plan.RunPlan`) has run every check; nothing is checked again here.
    The process's deterministic-algorithms setting is as before when it returns."""
    with _deterministic_mode_restored():
        return _run_plan(plan)


def _run_plan(plan) -> dict:
    run, m, cfg, stages, plan_stages = plan.run, plan.method, plan.options, plan.solvers, plan.stages
    method, seed, resume, progress = plan.cfg["method"], plan.seed, plan.resume, plan.progress
    parts = plan.parts
    model, tv, heads, streams, labeled = parts["model"], parts["tv"], parts["heads"], parts["streams"], parts.get("labeled")
    tasks, cache_dir, eval_batch_size = plan.tasks, plan.cache_dir, plan.cfg["eval_batch_size"]
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    run.path.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, verbose=False)
    _quiet_lightning()
    if m.own_loop:  # T3, FW-Merging: the method runs its own loop (nested fits through Lightning)
        return _fit_own_loop(plan, say)

    start = time.perf_counter()
    rank_zero = not is_launched_rank()
    sharded_build = tv is not None and tv.is_sharded  # each rank built only its shard: no merge before connecting
    before = None
    if not sharded_build:
        before_model = m.build(model, tv, cfg, seed=seed)
        before = evaluate(before_model, heads, streams, eval_batch_size) if rank_zero else None
        del before_model
    state = run.load_state() or {}
    done = run.stages_done()
    merged, module, modules, steps_done, data = None, None, [], 0, None
    # options.train_heads: the heads as the last finished data stage left them (the given ones at
    # the start); the experts' targets and the start's scores keep the given heads
    trained_heads = run.load_heads(heads) if cfg.train_heads else heads
    for i, (solver, (_, _, steps)) in enumerate(zip(stages, plan_stages)):
        last = i == len(stages) - 1
        if i < done:  # finished before an interruption
            steps_done += steps if solver.needs_data else 0
            continue
        if not solver.needs_data:
            problem = DataFreeProblem(model, m.prepare(tv, cfg, model, state or None), cfg, run, say, seed)
            state = {**state, **solver.solve(problem)}
            if rank_zero:
                run.save_state(state, {"stages_done": i + 1, "solver": solver.name})
            continue
        merged = m.build(model, tv, cfg, seed=seed, state=state or None, stage=i)
        if steps > 0:
            if data is None:
                data = m.training_data(cfg, model, tv, heads, streams, labeled, cache_dir, say, seed, state,
                                       parts.get("experts"))
                if data.state:
                    state = {**state, **data.state}
                    if rank_zero:
                        run.save_state(state, {"stages_done": i, "solver": solver.name})
            module = MergeModule(merged, trained_heads, cfg, solver, data.targets, regularizer=m.regularizer(cfg),
                                 augment=data.augment, seed=seed, tasks=tasks, view=data.view)
            module.keep_start = sharded_build
            if plan.cfg["trainer"].get("strategy") == SHARD_STRATEGY:
                module.shard_task_vectors = True
                refusal = None if merged.is_sharded else merged.shard_refusal()
                if refusal:
                    raise InputError(f"trainer.strategy {SHARD_STRATEGY}: {refusal}")
                if last and plan.owns_parts:  # the shards are all this process keeps of them
                    parts["tv"] = tv = None
            ckpt_dir = run.stage_checkpoints(i)
            resuming = resume and (ckpt_dir / "last.ckpt").exists()
            trainer = _trainer(run, ckpt_dir, steps, progress, plan.cfg["trainer"], plan.cfg["checkpoint_every"])
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*LeafSpec.*")
                warnings.filterwarnings("ignore", ".*does not have many workers.*")
                warnings.filterwarnings("ignore", ".*IterableDataset.*|.*Checkpoint directory.*exists.*")
                # the state AFTER the step is what a checkpoint at global_step s must hold
                warnings.filterwarnings("ignore", ".*manual optimization and every_n_train_steps.*")
                # the loader starts at the restored global_step (StepDataModule): it is resumable
                warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
                try:
                    trainer.fit(
                        module,
                        datamodule=StepDataModule(data.streams, cfg.batch_size, steps, seed, solver.batches_per_step, data.pools, data.mix),
                        ckpt_path=str(ckpt_dir / "last.ckpt") if resuming else None,
                        weights_only=True,  # a checkpoint is read without unpickling code
                    )
                except SystemExit:
                    # Lightning turns Ctrl-C into exit(1) after its own clean-up: report it as the
                    # interruption it is (the CLI says how to resume and exits 130)
                    if trainer.interrupted:
                        raise KeyboardInterrupt from None
                    raise
                except NonFiniteLossError as err:  # stop; the checkpoints hold the last finite coefficients
                    kept = ckpt_dir / "last.ckpt"
                    where = f"the last good coefficients are in {kept}" if kept.exists() else "no checkpoint was reached yet"
                    raise NonFiniteLossError(f"{err}; training stopped and {where} (lower options.lr, or check the data)") from None
                if trainer.interrupted:  # a Ctrl-C that Lightning handled without exiting: not finished
                    raise KeyboardInterrupt
            merged = module.merged.cpu()
            if sharded_build and rank_zero and module.start_parameters is not None:
                with merged.fixed_parameters(module.start_parameters):  # the start's merge, gathered at the end
                    before = evaluate(merged, heads, streams, eval_batch_size)
            modules.append(module)
            steps_done += trainer.global_step
            if cfg.train_heads:
                trained_heads = {t: h.frozen() for t, h in module.heads.items()}
                if rank_zero:  # before the stage is marked done: a resume of the next stage reads them
                    run.save_heads(trained_heads)
        # every rank goes on to the next stage (its DDP fit needs them all) with the same state:
        # the coefficients are equal on every rank (gradients are averaged); rank 0 writes
        extra = m.stage_state(merged, cfg, i, last)
        if extra or not last:
            state = {**state, **extra}
            if rank_zero:
                run.save_state(state, {"stages_done": i + 1, "solver": solver.name})
    if not rank_zero:
        return {}
    if merged is None:  # the last stage was data-free: the final model comes from the state
        merged = m.build(model, tv, cfg, seed=seed, state=state or None)
    seconds = time.perf_counter() - start
    if cfg.buffer_policy == "reestimate":
        merged.reestimate_buffers(reestimate_batches(streams, eval_batch_size))
    after = evaluate(merged, trained_heads, streams, eval_batch_size)
    run.save_coefficients(merged)
    run.collect_metrics()
    results = {
        "method": method,
        "options": dataclasses.asdict(cfg),
        "solvers": [s.summary() for s in stages],
        "uses_labels": m.uses_labels_with(cfg),
        "seconds": seconds,
        "steps": steps_done,
        "stopped_early": next((mod.stop_reason for mod in modules if mod.stop_reason), None),
        **m.results(merged, cfg),
    }
    if cfg.train_heads:  # how far each head moved from the given one (Frobenius norm of W, relative)
        results["heads"] = {"trained": True, "head_lr": cfg.head_lr, "relative_change": {
            t: float((trained_heads[t].weight - heads[t].weight).norm() / heads[t].weight.norm().clamp_min(1e-12))
            for t in tasks}}
    chunking = next((mod.chunking for mod in modules if mod.chunking), None)
    if chunking is not None:  # micro_batch: auto's measured choice
        results["micro_batch"] = {**chunking, "chunk": chunk_size(chunking, cfg.batch_size), "batch_size": cfg.batch_size}
    if merged.is_sharded:  # what each rank held: its shard of the base and the task vectors
        results["sharding"] = {"strategy": SHARD_STRATEGY, **merged.shard_summary(),
                               # each rank read only its shard, or built the whole stack and cut it
                               "build": "per_rank_shard" if sharded_build else "whole_then_cut"}
    if before is not None and after is not None:
        results |= {"before": before, "after": after}
    run.write_results(results)
    return results


def _fit_own_loop(plan, say) -> dict:
    """A method with its own loop (``Method.run``); nested fits (e.g. FW-Soft's AdaMerging over the
    chosen checkpoints) are ordinary Lightning fits into sub-folders of the run, each its own plan."""
    from adamerge.methods.base import FitContext

    m, cfg, run, method, parts = plan.method, plan.options, plan.run, plan.cfg["method"], plan.parts

    def train(run_dir, sub_tv, sub_method: str, options: dict) -> dict:
        sub = RunFolder(run_dir)
        if sub.is_finished():  # a resumed parent reuses a finished nested fit
            return sub.read_results()
        started = sub.checkpoints.exists() or sub.state_path.exists()
        return plan.nested(run_dir, sub_tv, sub_method, options, resume=started).fit()

    start = time.perf_counter()
    pool = plan.cfg.get("pool")
    ctx = FitContext(run, parts["model"], parts["tv"], dict(parts["heads"]), list(parts["streams"]), parts.get("labeled"),
                     cfg, plan.seed, plan.resume, plan.progress, say, plan.cfg["eval_batch_size"], plan.cache_dir,
                     dict(pool) if pool else None, evaluate, train)
    results = m.run(ctx)
    results = {"method": method, "options": dataclasses.asdict(cfg), "solvers": [], "uses_labels": m.uses_labels_with(cfg),
               "seconds": time.perf_counter() - start, **results}
    run.write_results(results)
    return results


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no GPU/TPU banners, no tips


_EXTRA_CALLBACKS: list = []


@contextlib.contextmanager
def extra_trainer_callbacks(*callbacks) -> Iterator[None]:
    """Add Lightning callbacks to every trainer ``fit`` builds inside the block (e.g. a tuning
    study's pruning callback)."""
    _EXTRA_CALLBACKS.extend(callbacks)
    try:
        yield
    finally:
        for cb in callbacks:
            _EXTRA_CALLBACKS.remove(cb)


class LineProgressBar(ProgressBar):
    """Lightning's progress as one plain line every ``every_percent`` of the steps (with the
    loss), for output that is not a terminal: a CI log gets a few lines, not thousands of
    carriage-return bar redraws."""

    def __init__(self, every_percent: float = 5.0, stream=None) -> None:
        super().__init__()
        self.every_percent, self.stream, self._enabled, self._bar = every_percent, stream, True, None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        from adamerge.progress import Progress

        self._bar = Progress(trainer.max_steps, "fit", enabled=self._enabled and trainer.is_global_zero,
                             every_percent=self.every_percent, unit="steps", stream=self.stream or sys.stderr,
                             initial=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None or trainer.global_step <= self._bar.done:
            return
        loss = trainer.callback_metrics.get("loss")
        self._bar.note = "" if loss is None else f"loss {float(loss):.4g}"
        self._bar.update(trainer.global_step - self._bar.done)


def _trainer(run: RunFolder, ckpt_dir: Path, steps: int, progress: bool, trainer_options: dict | None,
             checkpoint_every: int) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0, every_n_train_steps=checkpoint_every)
    opts = {"accelerator": "cpu", "devices": 1, "strategy": "auto"} | dict(trainer_options or {})
    if opts["strategy"] in ("ddp", SHARD_STRATEGY):
        from lightning.pytorch.strategies import DDPStrategy

        # a bi-level step (Concrete masks) leaves some trainable tensors out of one backward; the
        # search for them walks a graph whose trainable leaves are a few coefficients: negligible.
        # The buffers (base, task vectors) are equal on every rank and never change while
        # training, and a shard differs by rank: DDP must not broadcast them before each forward.
        opts["strategy"] = DDPStrategy(find_unused_parameters=True, broadcast_buffers=False)
    # not a terminal (CI, a log file): plain lines every few percent instead of Lightning's bar
    lines = [LineProgressBar()] if progress and not sys.stderr.isatty() else []
    return L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        logger=_loggers(run.path, run.next_log_version()),  # one log version per attempt and stage
        callbacks=[ckpt, *lines, *_EXTRA_CALLBACKS],
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        deterministic=True,
        default_root_dir=str(run.path),
        **opts,
    )
