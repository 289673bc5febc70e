"""Scoring without Lightning: accuracy per task of any backbone (a merged model, a plain module,
a test-time merger) with frozen per-task heads. Methods with their own loop (T3, FW-Merging) and
``predict`` use it; :mod:`adamerge.train.loop` re-exports it."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adamerge.train.data import TaskStream, images_layout


def reestimate_batches(streams: Sequence[TaskStream], batch_size: int):
    """Every task's inputs in order, in chunks, for BatchNorm re-estimation."""
    for s in streams:
        for lo in range(0, len(s), batch_size):
            yield s.inputs(torch.arange(lo, min(lo + batch_size, len(s))))


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
            logits = heads[s.name](backbone(images_layout(s.inputs(idx), backbone)))
            correct += int((logits.argmax(-1) == labels[s.name][idx]).sum())
        per_task[s.name] = correct / len(s)
    backbone.train(was_training)
    return {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task)}


def accuracy_table(correct: Mapping[str, int], totals: Mapping[str, int]) -> dict:
    """``{"per_task", "mean"}`` from per-task counts of correct predictions."""
    per_task = {t: correct[t] / totals[t] for t in totals}
    return {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task)}
