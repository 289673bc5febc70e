"""Model sources: how a config's ``model:`` section becomes an architecture, by name.

``model: {source: open_clip, name: ViT-B-32}`` looks up ``open_clip`` here. A source is a function
``spec -> (module, transform or None)``. Sources are registered lazily (``"package.module:function"``)
so that resolving a config never imports what it does not use (the demo zoo and timm stay
unimported for an open_clip run). ``register_source(name, target)`` adds one; ``list_sources()``
names them all.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from adamerge.errors import InputError
from adamerge.registry import Registry

Built = tuple[nn.Module, "Callable | None"]
SourceFn = Callable[[dict], Built]

SOURCES: Registry[SourceFn | str] = Registry("model.source")


def register_source(name: str, target: SourceFn | str, *, replace: bool = False) -> None:
    """Register a model source: a function ``spec -> (model, transform)`` or its dotted path."""
    SOURCES.add(name, target, replace=replace)


def list_sources() -> list[str]:
    return SOURCES.names()


def _resolve(target: SourceFn | str) -> SourceFn:
    if callable(target):
        return target
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def build_model(spec: dict) -> Built:
    """The architecture named by ``spec['source']`` and its preprocessing transform (or ``None``)."""
    return _resolve(SOURCES.get(spec.get("source")))(spec)


# ---------------------------------------------------------------------------- built-in sources
def _open_clip(spec: dict) -> Built:
    from adamerge.io.open_clip_models import create_open_clip

    return create_open_clip(spec["name"], spec.get("checkpoint"))


def _timm(spec: dict) -> Built:
    from adamerge._compat import ensure_torchvision

    ensure_torchvision()
    import timm

    model = timm.create_model(spec["name"], num_classes=0, pretrained=False)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    return model, timm.data.create_transform(**data_cfg)


def _python(spec: dict) -> Built:
    target = spec.get("target", "")
    if ":" not in target:
        raise InputError("model.source python needs model.target 'package.module:function'")
    mod, fn = target.split(":")
    try:
        return getattr(importlib.import_module(mod), fn)(**spec.get("kwargs", {})), None
    except (ImportError, AttributeError) as err:
        raise InputError(f"model.target {target}: {err}") from None


register_source("open_clip", _open_clip)
register_source("timm", _timm)
register_source("python", _python)
# the offline zoos (tests and demo), imported only when a config names them
register_source("tiny_vit", "adamerge.zoo.tiny:tiny_vit_source")
register_source("tiny_cnn", "adamerge.zoo.tiny:tiny_cnn_source")
register_source("efficientnet_lite0", "adamerge.zoo.backbone:backbone_source")
# Hugging Face transformers folders (pip install -e ".[hf]"), imported only when a config names it
register_source("hf", "adamerge.io.hf_models:hf_source")
