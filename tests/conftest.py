"""Shared fixtures: tiny backbones and synthetic experts (base + small random perturbations)."""
from __future__ import annotations

import pytest
import torch


def _perturbed(base: dict, seed: int, scale: float = 0.02) -> dict:
    """An expert: every parameter moved by ``scale``·N(0,1); BN running stats changed too."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value.clone()
        elif key.endswith("running_var"):
            out[key] = value * (1.0 + 0.5 * torch.rand(value.shape, generator=gen))
        elif key.endswith("running_mean"):
            out[key] = value + 0.3 * torch.randn(value.shape, generator=gen)
        else:
            out[key] = value + scale * torch.randn(value.shape, generator=gen, dtype=value.dtype)
    return out


@pytest.fixture(scope="session")
def make_zoo():
    """``make_zoo(backbone, num_tasks)`` → ``(model, base_sd, {name: expert_sd})``.

    ``backbone`` is ``"vit"`` (tiny open_clip ViT) or ``"cnn"`` (timm test_efficientnet). The
    result is cached: treat the tensors as read-only (clone before corrupting them).
    """
    from adamerge.zoo.tiny import tiny_cnn, tiny_vit

    cache: dict = {}

    def make(backbone: str = "vit", num_tasks: int = 2):
        key = (backbone, num_tasks)
        if key not in cache:
            model = (tiny_vit if backbone == "vit" else tiny_cnn)(seed=0).eval()
            base = {k: v.detach() for k, v in model.state_dict().items()}
            if backbone == "cnn":  # non-trivial base BN statistics
                base = _perturbed(base, seed=999, scale=0.0)
                model.load_state_dict(base)
                base = {k: v.detach() for k, v in model.state_dict().items()}
            experts = {f"t{i}": _perturbed(base, seed=i + 1) for i in range(num_tasks)}
            cache[key] = (model, base, experts)
        model, base, experts = cache[key]
        return model, dict(base), {n: dict(sd) for n, sd in experts.items()}

    return make


@pytest.fixture(scope="session")
def inputs():
    """``inputs(backbone, n, seed)`` → a batch of images the backbone accepts."""

    def make(backbone: str = "vit", n: int = 2, seed: int = 0, dtype=torch.float32):
        size = 16 if backbone == "vit" else 32
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, size, size, generator=gen).to(dtype)

    return make


@pytest.fixture(scope="session")
def tiny_zoo_dir(tmp_path_factory):
    """The tiny open_clip ViT zoo written to disk once per session (base, experts, heads, data)."""
    from adamerge.zoo.tiny import build_tiny_zoo, write_tiny_zoo

    return write_tiny_zoo(tmp_path_factory.mktemp("tiny") / "zoo", build_tiny_zoo(seed=0))
