"""Hugging Face model folders on disk: where the files are, what ``config.json`` says, the weights.

A folder is what ``save_pretrained`` writes (``config.json`` and ``model.safetensors``, or
``model.safetensors.index.json`` and its shards; ``pytorch_model.bin`` is read with
``weights_only=True``), or a hub cache entry: a snapshot folder
(``models--org--name/snapshots/<revision>``, whose files are links into ``blobs/``) or the entry
itself (``models--org--name``, resolved through ``refs/main``). Nothing is downloaded and
``transformers`` is not imported here: the weights are read with safetensors. Every problem
(no config, a missing shard, an index naming a key twice) is one :class:`InputError` line.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from adamerge.errors import InputError
from adamerge.io.files import sha256_file

__all__ = ["resolve_folder", "read_config", "read_weights", "weight_files", "folder_digest", "is_model_folder"]

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_model_folder(path: str | Path) -> bool:
    """A folder (not a weight file): the Hugging Face reader applies."""
    return Path(path).is_dir()


def resolve_folder(path: str | Path, what: str = "model folder") -> Path:
    """The folder holding ``config.json``: ``path`` itself, or for a hub cache entry
    (``models--org--name``) the snapshot that ``refs/main`` names (the only snapshot, without refs)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist")
    if not p.is_dir():
        raise InputError(f"{what} {p} is a file; give the folder that holds config.json")
    snapshots = p / "snapshots"
    if not (p / "config.json").exists() and snapshots.is_dir():
        ref = p / "refs" / "main"
        if ref.is_file():
            p = snapshots / ref.read_text(encoding="utf-8").strip()
        else:
            found = sorted(d for d in snapshots.iterdir() if d.is_dir())
            if len(found) != 1:
                raise InputError(f"{what} {path}: a hub cache entry with {len(found)} snapshots and no refs/main;"
                                 " give the snapshot folder (snapshots/<revision>)")
            p = found[0]
    if not (p / "config.json").is_file():
        raise InputError(f"{what} {p} has no config.json (not a Hugging Face model folder; save it with"
                         " save_pretrained, or give the hub snapshot folder)")
    return p


def read_config(folder: Path) -> dict:
    """``config.json`` as a dict (one line if it is not JSON)."""
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable JSON config ({str(err).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise InputError(f"{path}: a Hugging Face config.json needs a 'model_type'")
    return cfg


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a folder and, for a sharded one, the index's key → file map. A shard
    the index names but the folder lacks is an error here, before any tensor is read."""
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise InputError(f"{index}: not a shard index (a JSON object with a 'weight_map')") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index}: 'weight_map' must map tensor names to shard files")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not isinstance(shard, str) or Path(shard).name != shard:
                    raise InputError(f"{index}: shard {shard!r} is not a file name in the folder")
                if not (folder / shard).is_file():
                    raise InputError(f"{folder}: shard {shard} listed in {name} is missing"
                                     f" ({len(shards)} shards in all); download it again")
            return [folder / s for s in shards], weight_map
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name], None
    raise InputError(f"{folder} has no weights (model.safetensors, its shard index, or pytorch_model.bin)")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, keys as in its files (``save_pretrained``'s names)."""
    from adamerge.io.state_dicts import load_state_dict

    files, weight_map = weight_files(folder)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_state_dict(f)
        for key, value in part.items():
            if key in out:
                raise InputError(f"{folder}: tensor '{key}' appears in two shards")
            if weight_map is not None and weight_map.get(key) != f.name:
                raise InputError(f"{f}: holds '{key}', which the shard index places in {weight_map.get(key)}")
            out[key] = value
    if weight_map is not None:
        absent = [k for k in weight_map if k not in out]
        if absent:
            raise InputError(f"{folder}: '{absent[0]}' is listed in the shard index but in no shard"
                             f" ({len(absent)} missing)")
    return out


def folder_digest(path: str | Path) -> str:
    """sha256 over a model folder's ``config.json`` and weight files (names and contents), so
    that an export records exactly which experts it merged."""
    folder = resolve_folder(path)
    files, _ = weight_files(folder)
    h = hashlib.sha256()
    for f in [folder / "config.json", *files]:
        h.update(f.name.encode() + b"\0")
        sha256_file(f, digest=h)
    return h.hexdigest()
