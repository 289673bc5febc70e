"""``adamerge convert``: classic pickled checkpoints to safetensors."""
from __future__ import annotations

from pathlib import Path

from adamerge.io.classic import convert_classic
from adamerge.io.state_dicts import load_state_dict, save_state_dict

__all__ = ["convert"]


def convert(src: str | Path, dst: str | Path, trust_pickle: bool = False) -> str:
    """One pickled checkpoint (a file) → one safetensors state dict, or a classic task-vector
    folder (zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt) → a converted folder. Returns what
    was done, for the user."""
    if Path(src).is_file():
        save_state_dict(load_state_dict(src, trust_pickle=trust_pickle), dst)
        return f"converted {src} to {dst}"
    manifest = convert_classic(src, dst, trust_pickle=trust_pickle)
    return f"converted {len(manifest.get('tasks', []))} tasks to {dst}"
