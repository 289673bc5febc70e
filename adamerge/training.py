"""Lightning wiring: the LightningModule, the step-indexed data module, fit, evaluate, run folders.

A run directory holds ``config.yaml`` (written by the caller), ``coefficients.safetensors``,
``groups.json``, ``metrics.csv``, ``results.json`` and ``checkpoints/`` (coefficients, optimizer
and loop state only: the task vectors are non-persistent buffers and the heads are dropped).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from adamerge.data import StepBatches, TaskStream
from adamerge.errors import InputError, NonFiniteLossError
from adamerge.io.files import atomic_save_safetensors, atomic_write_json, atomic_write_text
from adamerge.merged import MergedModel
from adamerge.methods.base import MethodConfig, create_method
from adamerge.objectives import get_objective
from adamerge.task_vectors import TaskVectors


class MergeModule(L.LightningModule):
    """Trains the merge coefficients (and masks, for methods that add them) of a MergedModel.

    Each step is one batched forward of every task's samples through the merged backbone, the
    features split back per task into that task's frozen head, and the loss is the sum over
    tasks of the per-task objective. One backward per step, never one per task.
    """

    def __init__(self, merged: MergedModel, heads: Mapping[str, nn.Module], cfg: MethodConfig) -> None:
        super().__init__()
        missing = [t for t in merged.task_names if t not in heads]
        if missing:
            raise InputError(f"no head for task '{missing[0]}' (heads given for {sorted(heads)})")
        self.merged = merged
        self.heads = nn.ModuleDict({t: heads[t] for t in merged.task_names})
        for p in self.heads.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.objective = functools.partial(get_objective(cfg.objective), **cfg.objective_args)
        self.strict_loading = False  # checkpoints leave the frozen heads out

    def forward(self, x: Tensor) -> Tensor:
        return self.merged(x)

    def task_losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        names = list(batch)
        sizes = [batch[n].shape[0] for n in names]
        features = self.merged(_images_layout(torch.cat([batch[n] for n in names])))
        return {n: self.objective(self.heads[n](f)) for n, f in zip(names, features.split(sizes))}

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        losses = self.task_losses(batch)
        loss = torch.stack(list(losses.values())).sum()
        if not torch.isfinite(loss):
            bad = [n for n, v in losses.items() if not torch.isfinite(v)]
            raise NonFiniteLossError(f"non-finite loss at step {self.global_step} for task(s) {bad}")
        log = {f"loss/{n}": v.detach() for n, v in losses.items()}
        coef = self.merged.applied_coefficients().detach()
        log.update({"coef/mean": coef.mean(), "coef/min": coef.min(), "coef/max": coef.max()})
        n = sum(v.shape[0] for v in batch.values())
        self.log_dict(log, on_step=True, prog_bar=False, batch_size=n)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        name = self.cfg.optimizer
        if name == "adam":
            return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if name == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        raise InputError(f"unknown optimizer '{name}'; choose adam, adamw or sgd")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("heads.")}


class StepDataModule(L.LightningDataModule):
    """Serves :class:`StepBatches` from the trainer's current global step (so a resumed run
    continues with the very batches it would have seen) and this process's rank."""

    def __init__(self, streams: Sequence[TaskStream], batch_size: int, steps: int, seed: int, num_workers: int = 0):
        super().__init__()
        self.streams, self.batch_size, self.steps, self.seed = list(streams), batch_size, steps, seed
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        ds = StepBatches(self.streams, self.batch_size, self.steps, self.seed, start, rank, world)
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


def fit(
    run_dir: str | Path,
    model: nn.Module,
    tv: TaskVectors,
    heads: Mapping[str, nn.Module],
    streams: Sequence[TaskStream],
    method: str = "adamerging",
    options: dict | None = None,
    *,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    trainer_options: dict | None = None,
    checkpoint_every: int = 50,
    eval_batch_size: int = 256,
) -> dict:
    """Train a learned merge and write the run folder. Returns the results dict."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.exists():
        raise InputError(f"cannot resume: no checkpoint at {last}")
    if not resume and last.exists():
        raise InputError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    names = [s.name for s in streams]
    if sorted(names) != sorted(tv.task_names):
        raise InputError(f"data streams {names} do not match the experts' tasks {tv.task_names}")
    streams = sorted(streams, key=lambda s: tv.task_names.index(s.name))
    run_dir.mkdir(parents=True, exist_ok=True)
    m = create_method(method)
    cfg = m.config(options)
    L.seed_everything(seed, verbose=False)
    merged = m.build(model, tv, cfg, seed=seed)
    module = m.lightning_module(merged, heads, cfg)
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0, every_n_train_steps=checkpoint_every)
    opts = {"accelerator": "cpu", "devices": 1, "strategy": "auto"} | dict(trainer_options or {})
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no GPU/TPU banners, no tips
    trainer = L.Trainer(
        max_steps=cfg.steps,
        max_epochs=-1,
        logger=_loggers(run_dir, len(list((run_dir / "logs").glob("version_*"))) if resume else 0),
        callbacks=[ckpt],
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        gradient_clip_val=cfg.grad_clip,
        deterministic=True,
        default_root_dir=str(run_dir),
        **opts,
    )
    before = evaluate(merged, heads, streams, eval_batch_size) if trainer.is_global_zero else None
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*IterableDataset.*|.*Checkpoint directory.*exists.*")
        trainer.fit(module, datamodule=StepDataModule(streams, cfg.batch_size, cfg.steps, seed), ckpt_path=str(last) if resume else None)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return {}
    merged = module.merged.cpu()
    if cfg.buffer_policy == "reestimate":
        merged.reestimate_buffers(reestimate_batches(streams, eval_batch_size))
    after = evaluate(merged, heads, streams, eval_batch_size)
    save_coefficients(run_dir, merged)
    _collect_metrics(run_dir)
    results = {"method": method, "options": dataclasses.asdict(cfg), "seconds": seconds, "steps": trainer.global_step}
    if before is not None and after is not None:
        results |= {"before": before, "after": after}
    atomic_write_json(run_dir / "results.json", results)
    return results


def save_coefficients(run_dir: Path, merged: MergedModel) -> None:
    """``coefficients.safetensors`` (applied values, [T, G]) and ``groups.json``."""
    coef = merged.applied_coefficients().detach().cpu().float().contiguous()
    atomic_save_safetensors(
        {"coefficients": coef},
        run_dir / "coefficients.safetensors",
        {"tasks": json.dumps(merged.task_names), "granularity": json.dumps(merged.grouping.spec)},
    )
    members = merged.grouping.members()
    atomic_write_json(
        run_dir / "groups.json",
        {
            "tasks": merged.task_names,
            "granularity": merged.grouping.spec,
            "groups": [{"name": n, "parameters": members[i]} for i, n in enumerate(merged.group_names)],
        },
    )


def _collect_metrics(run_dir: Path) -> None:
    """Join the CSV logs of the first run and of every resume into ``metrics.csv``."""
    parts = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    rows: list[dict] = []
    fields: list[str] = []
    for part in parts:
        with open(part, newline="") as f:
            reader = csv.DictReader(f)
            fields += [c for c in reader.fieldnames or [] if c not in fields]
            rows += list(reader)
    if not rows:
        return
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of ``metrics.csv`` (empty cells dropped)."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def reestimate_batches(streams: Sequence[TaskStream], batch_size: int):
    """Every task's inputs in order, in chunks, for BatchNorm re-estimation."""
    for s in streams:
        for lo in range(0, len(s), batch_size):
            yield s.inputs(torch.arange(lo, min(lo + batch_size, len(s))))


def _images_layout(x: Tensor) -> Tensor:
    """Image batches go channels-last: convolutions on CPU run about 1.7x faster that way
    (EfficientNet-Lite0, 80 images at 64 px: 0.31 s vs 0.53 s per merged training step)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def evaluate(
    backbone: nn.Module,
    heads: Mapping[str, nn.Module],
    streams: Sequence[TaskStream],
    batch_size: int = 256,
) -> dict | None:
    """Accuracy per task and their mean, or ``None`` when some stream has no labels."""
    labels = {s.name: s.labels() for s in streams}
    if any(v is None for v in labels.values()):
        return None
    was_training = backbone.training
    backbone.eval()
    per_task = {}
    for s in streams:
        correct = 0
        for lo in range(0, len(s), batch_size):
            idx = torch.arange(lo, min(lo + batch_size, len(s)))
            logits = heads[s.name](backbone(_images_layout(s.inputs(idx))))
            correct += int((logits.argmax(-1) == labels[s.name][idx]).sum())
        per_task[s.name] = correct / len(s)
    backbone.train(was_training)
    return {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task)}
