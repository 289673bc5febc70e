"""First-order optimisers by name (``adam``, ``adamw``, ``sgd``), for the ``gradient`` solver."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from adamerge.errors import InputError
from adamerge.registry import did_you_mean

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, lr, weight_decay: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
    "adamw": lambda params, lr, weight_decay: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
    "sgd": lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay),
}


def list_optimizers() -> list[str]:
    return sorted(OPTIMIZERS)


def create_optimizer(name: str, params: Iterable, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise InputError(f"unknown optimizer '{name}'{did_you_mean(name, list_optimizers())}; choose from {list_optimizers()}")
    return OPTIMIZERS[name](list(params), lr, weight_decay)
