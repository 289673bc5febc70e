"""Make ``import torchvision`` (and so ``open_clip``/``timm``) work on a CPU-only torch.

The torchvision wheel served here is a CUDA build; with CPU torch its import fails with
``RuntimeError: operator torchvision::nms does not exist``. On exactly that error we drop the
half-imported modules, declare the two operator schemas it expects, and import again. A healthy
install is never touched. ``torchvision.ops.nms`` itself stays unusable (nothing here needs it).
"""
from __future__ import annotations

import sys

_PATCHED = False
_LIBRARY = None  # keep the torch.library handle alive


def ensure_torchvision() -> bool:
    """Import torchvision, applying the CPU-torch fix only if the import fails. Returns patched?"""
    global _PATCHED, _LIBRARY
    try:
        import torchvision  # noqa: F401

        return _PATCHED
    except ModuleNotFoundError:
        return False
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define(
        "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor"
    )
    import torchvision  # noqa: F401,F811

    _PATCHED = True
    return True
