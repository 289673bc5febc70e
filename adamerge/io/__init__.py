"""Reading and writing weights: atomic files, safetensors state dicts, open_clip models, and the
one-time conversion of the classic pickled task-vector checkpoints."""
from __future__ import annotations

from adamerge.io.classic import (
    convert_classic,
    discover_classic,
    load_pickled_object,
    object_state_dict,
)
from adamerge.io.files import (
    atomic_path,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
)
from adamerge.io.open_clip_models import create_open_clip, register_model_config, zero_shot_head
from adamerge.io.state_dicts import load_state_dict, save_state_dict

__all__ = [
    "atomic_path",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "sha256_file",
    "load_state_dict",
    "save_state_dict",
    "create_open_clip",
    "zero_shot_head",
    "register_model_config",
    "convert_classic",
    "discover_classic",
    "load_pickled_object",
    "object_state_dict",
]
