"""adamerge: learn how to merge fine-tuned models from unlabeled data."""
from adamerge._compat import ensure_torchvision

ensure_torchvision()

__version__ = "0.1.0"
