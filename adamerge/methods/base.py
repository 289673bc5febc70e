"""The method registry and the default behaviour every learned method starts from."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from adamerge.errors import InputError
from adamerge.merged import MergedModel
from adamerge.task_vectors import TaskVectors


@dataclass
class MethodConfig:
    """Options of a learned merge. Each field is also a ``--method.<field>`` CLI override."""

    granularity: Any = "layer"
    init: float = 0.3
    clamp: tuple[float, float] | None = (0.0, 1.0)
    simplex: bool = False
    objective: str = "entropy"
    objective_args: dict = field(default_factory=dict)  # e.g. {"diversity": 0.5} for infomax
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = None
    steps: int = 500
    batch_size: int = 16
    ties_density: float | None = None
    buffer_policy: str = "base"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"unknown method option '{unknown[0]}'; known: {sorted(names)}")
        values = dict(values)
        if isinstance(values.get("clamp"), list):
            values["clamp"] = tuple(values["clamp"])
        return cls(**values)


class Method:
    """Default learned method: coefficients trained by an optimizer on an objective."""

    name = "base"
    defaults: dict = {}

    def config(self, overrides: dict | None = None) -> MethodConfig:
        return MethodConfig.from_dict({**self.defaults, **(overrides or {})})

    def prepare(self, tv: TaskVectors, cfg: MethodConfig, model: nn.Module) -> TaskVectors:
        """Task-vector preprocessing (none by default; TIES on the parameters when
        ``ties_density`` is set, buffers untouched)."""
        if cfg.ties_density:
            from adamerge.merges import ties_vectors

            params = [n for n, _ in model.named_parameters()]
            return TaskVectors(tv.base, ties_vectors(tv.vectors, cfg.ties_density, keys=params), tv.task_names, tv.sources)
        return tv

    def build(self, model: nn.Module, tv: TaskVectors, cfg: MethodConfig, seed: int = 0) -> MergedModel:
        return MergedModel(
            model,
            self.prepare(tv, cfg, model),
            granularity=cfg.granularity,
            init=cfg.init,
            clamp=None if cfg.simplex else cfg.clamp,
            simplex=cfg.simplex,
            buffer_policy=cfg.buffer_policy,
            seed=seed,
        )

    def lightning_module(self, merged: MergedModel, heads: dict[str, nn.Module], cfg: MethodConfig):
        from adamerge.training import MergeModule

        return MergeModule(merged, heads, cfg)


_REGISTRY: dict[str, Callable[[], Method]] = {}


def register_method(name: str) -> Callable:
    """Class decorator: ``@register_method("adamerging")``."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def create_method(name: str) -> Method:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise InputError(f"unknown method '{name}'; registered: {list_methods()}") from None
