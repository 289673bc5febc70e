"""The experts' own predictions on their unlabeled streams: targets for ``expert_distill``.

Expert t's logits on every sample of task t's stream are computed once, through the one merged
model class with one-hot coefficients (θ0 + τ_t = θ_t exactly) and expert t's own buffers (e.g.
BatchNorm statistics), so no second copy of the model is built. The cost is one forward pass of
each expert over its own stream. They are cached as safetensors under a cache folder, keyed by a
digest of the expert (its file's sha256, or its task vector's bytes when it came from memory), the
base, the head and the stream, so a resume or another run over the same inputs never recomputes
them, and a changed expert file is never served stale predictions.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.errors import InputError
from adamerge.train.data import TaskStream, images_layout
from adamerge.io.files import atomic_save_safetensors, sha256_file
from adamerge.core.task_vectors import TaskVectors


def _tensor_digest(h, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too


def _source_digest(h, tv: TaskVectors, name: str, fallback: Mapping[str, Tensor]) -> None:
    path = tv.sources.get(name)
    if path and Path(path).is_file():
        h.update(sha256_file(path).encode())
    else:
        for key in sorted(fallback):
            _tensor_digest(h, fallback[key])


def cache_key(tv: TaskVectors, task: str | None, head: nn.Module, stream: TaskStream) -> str:
    """A digest of everything the expert's (``task``) or, with ``None``, the pretrained model's
    predictions on ``stream`` depend on."""
    h = hashlib.sha256(b"adamerge-expert-targets-v1")
    if task is not None:
        t = tv.task_names.index(task)
        _source_digest(h, tv, task, {k: v[t] for k, v in tv.vectors.items()})
    else:
        h.update(b"pretrained")
    _source_digest(h, tv, "base", tv.base)
    for key, value in sorted(head.state_dict().items()):
        h.update(key.encode())
        _tensor_digest(h, value)
    h.update(str(len(stream)).encode())
    ds = stream.dataset
    if hasattr(ds, "x"):  # a tensor stream: its inputs
        _tensor_digest(h, ds.x)
    else:
        h.update(str(stream.source).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_expert_logits(model: nn.Module, tv: TaskVectors, task: str | None, head: nn.Module, stream: TaskStream,
                          batch_size: int = 256) -> Tensor:
    """Expert ``task``'s (``None``: the pretrained model's) logits ``[N, C]`` on every sample of
    the stream (float32)."""
    from adamerge.core.merged import MergedModel

    onehot = torch.zeros(tv.num_tasks)
    if task is not None:
        t = tv.task_names.index(task)
        onehot[t] = 1.0
    expert = MergedModel(model, tv, "task", init=onehot, clamp=None).eval()
    for i, key in enumerate(expert.buffer_keys):  # the expert's own buffers (θ0's for the pretrained)
        if task is not None and key in tv.vectors:
            buf = expert._tensor("_buf", i)
            buf.copy_((tv.base[key].to(torch.float64) + tv.vectors[key][t].to(torch.float64)).to(buf.dtype))
    return stream_logits(expert, head, stream, batch_size)


SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))
"""The views of :func:`shifted_views`, in units of the shift: the image itself first, then the
four one-step shifts along an axis, then the four diagonal ones."""


def view_shift(size: int) -> int:
    """Pixels per unit of :data:`SHIFTS` for images ``size`` pixels high: 2 up to 64 px (the demo's
    images, where the shifted views were measured), then ``size / 32`` (7 at 224 px)."""
    return max(2, round(size / 32))


def shifted_views(x: Tensor, views: int) -> list[Tensor]:
    """The first ``views`` of :data:`SHIFTS` of an image batch ``[B, C, H, W]``: each image moved
    by whole pixels (:func:`view_shift`), its border pixels repeated into the gap, same shape."""
    if not 1 <= views <= len(SHIFTS):
        raise InputError(f"views must be in [1, {len(SHIFTS)}], got {views}")
    if views == 1:
        return [x]
    if x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"shifted views need float image batches [B, C, H, W]; got {tuple(x.shape)} {x.dtype}")
    h, w = x.shape[-2:]
    step = view_shift(h)
    pad = torch.nn.functional.pad(x, (step, step, step, step), mode="replicate")
    return [pad[..., step + dy * step: step + dy * step + h, step + dx * step: step + dx * step + w]
            for dx, dy in SHIFTS[:views]]


@torch.no_grad()
def stream_logits(model: nn.Module, head: nn.Module, stream: TaskStream, batch_size: int = 256, views: int = 1) -> Tensor:
    """``head(model(x))`` (float32) for every sample of the stream, in order, in batches. With
    ``views > 1``, the log of the mean predictive distribution over that many shifted copies of
    each image (:func:`shifted_views`): a prediction averaged over small translations."""
    out = []
    for lo in range(0, len(stream), batch_size):
        idx = torch.arange(lo, min(lo + batch_size, len(stream)))
        x = stream.inputs(idx)
        if views == 1:
            out.append(head(model(images_layout(x, model))).float())
            continue
        probs = [torch.softmax(head(model(images_layout(v, model))).float(), dim=-1) for v in shifted_views(x, views)]
        out.append(torch.log(torch.stack(probs).mean(0)))
    return torch.cat(out)


def merged_logits(merged: nn.Module, heads: Mapping[str, nn.Module], streams: Sequence[TaskStream],
                  batch_size: int = 256, views: int = 1) -> dict[str, Tensor]:
    """A merged model's logits ``[N, C]`` on every task's stream, in eval mode (the anchor of
    ``trusted_distill``: the fit's starting merge), over ``views`` shifted copies of each image."""
    merged.eval()
    return {s.name: stream_logits(merged, heads[s.name], s, batch_size, views) for s in streams}


def expert_logits(model: nn.Module, tv: TaskVectors, heads: Mapping[str, nn.Module], streams: Sequence[TaskStream],
                  cache_dir: str | Path, batch_size: int = 256, say=lambda msg: None, pretrained: bool = False) -> dict[str, Tensor]:
    """Every task's expert logits on its stream (``pretrained``: the pretrained model's, through
    each task's head), from the cache or computed (and cached) once."""
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    out: dict[str, Tensor] = {}
    for stream in streams:
        task = stream.name
        who = None if pretrained else task
        prefix = "pretrained_logits" if pretrained else "expert_logits"
        path = cache_dir / f"{prefix}-{task}-{cache_key(tv, who, heads[task], stream)}.safetensors"
        if path.is_file():
            try:
                out[task] = load_file(str(path))["logits"]
                continue
            except Exception:  # a corrupt cache entry is recomputed
                say(f"[expert targets] {path} is unreadable; recomputing")
        say(f"[expert targets] computing the {'pretrained model' if pretrained else 'expert'} on '{task}' ({len(stream)} samples)")
        out[task] = compute_expert_logits(model, tv, who, heads[task], stream, batch_size)
        atomic_save_safetensors({"logits": out[task].contiguous()}, path, {"task": task})
    return out
