"""AdaMerging (Yang et al., ICLR 2024) and AdaMerging++ (TIES-processed task vectors).

Coefficients init 0.3, clamped to [0, 1] in the forward, Adam lr 1e-3, entropy of each task's
head on its unlabeled test batch, summed over tasks. Granularity ``task`` = task-wise, ``layer``
(one coefficient per parameter tensor) = layer-wise; every other granularity works too.
"""
from adamerge.methods.base import Method, register_method


@register_method("adamerging")
class AdaMerging(Method):
    defaults = {"granularity": "layer", "init": 0.3, "clamp": (0.0, 1.0), "objective": "entropy", "lr": 1e-3}


@register_method("adamerging++")
class AdaMergingPlusPlus(Method):
    defaults = {**AdaMerging.defaults, "ties_density": 0.2}
