"""Per-task TALL masks next to one merged checkpoint, so each task's model can be rebuilt from it.

TALL masks (Wang et al., ICML 2024): with θ_merged − θ0 the merged update,
``m_t = |τ_t| > λ · |(θ_merged − θ0) − τ_t|`` and task t's model is
``θ̂_t = θ0 + m_t ⊙ (θ_merged − θ0)``: the merged weights where the merge serves task t, the
pretrained ones elsewhere. Masks are stored bit-packed (one bit per parameter and task, MSB first
like ``numpy.packbits``) in ``task_masks.safetensors`` (:data:`MASKS_FILE`) in the export folder,
with each expert's own floating buffers (BatchNorm statistics, small) so a task's model also gets
its statistics back. The base checkpoint is not copied: the file records its path, prefix and
sha256, and :func:`load_task_state` reads it from there (or takes it as an argument).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from adamerge.errors import InputError
from adamerge.io.files import atomic_save_safetensors, sha256_file
from adamerge.merges import tall_masks
from adamerge.registry import did_you_mean
from adamerge.core.task_vectors import TaskVectors

MASKS_FILE = "task_masks.safetensors"
FORMAT = "adamerge-task-masks-v1"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as ``ceil(n / 8)`` uint8 bytes, most significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.reshape(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """The first ``n`` booleans of :func:`pack_bits`'s bytes."""
    return ((packed.reshape(-1, 1) & _BITS) != 0).reshape(-1)[:n]


def save_task_masks(folder: str | Path, tv: TaskVectors, merged_state: Mapping[str, Tensor], keys: Sequence[str], *,
                    lam: float = 0.4, base_path: str | None = None, prefix: str | None = None) -> Path:
    """Write :data:`MASKS_FILE` into ``folder``: the TALL masks of every task for the parameters
    ``keys`` (against the merged update ``merged_state − tv.base``) and the experts' floating
    buffers. Returns the file's path."""
    if not (isinstance(lam, (int, float)) and lam >= 0):
        raise InputError(f"task masks: lambda must be a number >= 0, got {lam!r}")
    keys = list(keys)
    delta = {k: merged_state[k].to(torch.float32) - tv.base[k].to(torch.float32) for k in keys}
    tensors: dict[str, Tensor] = {}
    for k in keys:
        masks = tall_masks({k: tv.vectors[k]}, {k: delta[k]}, lam)[k]
        for t in range(tv.num_tasks):
            tensors[f"mask.{t}.{k}"] = pack_bits(masks[t])
    buffers = [k for k, v in tv.vectors.items() if k not in set(keys) and tv.base[k].is_floating_point()]
    for k in buffers:
        for t in range(tv.num_tasks):
            tensors[f"buffer.{t}.{k}"] = (tv.base[k].double() + tv.vectors[k][t].double()).to(tv.base[k].dtype)
    meta = {"format": FORMAT, "tasks": json.dumps(tv.task_names), "lambda": repr(float(lam)),
            "base_path": str(base_path or ""), "prefix": prefix or "",
            "base_sha256": sha256_file(base_path) if base_path else ""}
    path = Path(folder) / MASKS_FILE
    atomic_save_safetensors(tensors, path, meta)
    return path


def _base_state(meta: dict, base: Mapping[str, Tensor] | str | Path | None) -> Mapping[str, Tensor]:
    from adamerge.io.state_dicts import load_state_dict

    if isinstance(base, Mapping):
        return base
    path = Path(base) if base is not None else Path(meta.get("base_path") or "")
    if not path.is_file():
        raise InputError(f"task masks: the base checkpoint {path} is not there; pass base= (the pretrained state dict or its file)")
    if base is None and meta.get("base_sha256") and sha256_file(path) != meta["base_sha256"]:
        raise InputError(f"task masks: {path} changed since the export (sha256 differs); the masks belong to the old base")
    return load_state_dict(path, prefix=meta.get("prefix") or None)


def load_task_state(export_folder: str | Path, task: str, *, base: Mapping[str, Tensor] | str | Path | None = None) -> dict[str, Tensor]:
    """Task ``task``'s model rebuilt from the export's merged checkpoint and its TALL mask:
    ``θ0 + m_t ⊙ (θ_merged − θ0)`` for the parameters, the expert's own floating buffers, the
    merged checkpoint's other entries. Same keys as the base model. ``base`` defaults to the
    base checkpoint recorded at export time (its sha256 is checked)."""
    from safetensors import safe_open

    from adamerge.io.state_dicts import load_state_dict

    folder = Path(export_folder)
    path = folder / MASKS_FILE
    if not path.is_file():
        raise InputError(f"{folder} has no {MASKS_FILE}; export the run with --task-masks")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise InputError(f"{path} is not an adamerge task-mask file (format {meta.get('format')!r})")
        tasks = json.loads(meta["tasks"])
        if task not in tasks:
            raise InputError(f"unknown task '{task}'{did_you_mean(task, tasks)}; the masks cover {tasks}")
        t = tasks.index(task)
        stored = {name[len(f"mask.{t}."):]: f.get_tensor(name) for name in f.keys() if name.startswith(f"mask.{t}.")}
        buffers = {name[len(f"buffer.{t}."):]: f.get_tensor(name) for name in f.keys() if name.startswith(f"buffer.{t}.")}
    merged = load_state_dict(folder / "model.safetensors")
    base_state = _base_state(meta, base) if stored else {}
    out = {}
    for k, v in merged.items():
        if k in stored:
            if k not in base_state or tuple(base_state[k].shape) != tuple(v.shape):
                raise InputError(f"task masks: the base has no tensor '{k}' of shape {tuple(v.shape)}")
            b = base_state[k].to(torch.float32)
            m = unpack_bits(stored[k], v.numel()).reshape(v.shape)
            out[k] = torch.where(m, v.to(torch.float32), b).to(v.dtype)
        elif k in buffers:
            out[k] = buffers[k]
        else:
            out[k] = v.clone()
    return out
