"""The tiny test zoo: a tiny open_clip ViT, briefly pretrained, and experts fine-tuned on
synthetic tasks whose heads disagree. Builds in seconds on a CPU; used by the tests and by
``configs/tiny.yaml`` (``python -m adamerge.zoo.tiny OUT`` writes it to disk).

Each task has its own class templates (fixed random patterns); a sample is a template plus
noise. The backbone is pretrained on all tasks' templates at once (a generic model), then each
expert is fine-tuned on its own task with its own linear head.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.train.data import LinearHead, TaskStream, stream_from_tensors

IMAGE = 16


def tiny_vit(seed: int = 0) -> nn.Module:
    """The visual tower of a tiny open_clip CLIP (image 16, patch 4, width 32, 2 layers)."""
    from adamerge._compat import ensure_torchvision

    ensure_torchvision()
    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": IMAGE, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    )
    return clip.visual


def tiny_cnn(seed: int = 0) -> nn.Module:
    """timm's ``test_efficientnet`` (99 k parameters, BatchNorm), features only."""
    from adamerge._compat import ensure_torchvision

    ensure_torchvision()
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", num_classes=0)


@dataclass
class TinyTask:
    name: str
    templates: Tensor  # [C, 3, IMAGE, IMAGE]

    def sample(self, n: int, gen: torch.Generator, noise: float = 0.9) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, self.templates.shape[0], (n,), generator=gen)
        x = self.templates[y] + noise * torch.randn(n, 3, IMAGE, IMAGE, generator=gen)
        return x, y


def make_tasks(num_tasks: int = 3, classes: int = 4, seed: int = 0) -> list[TinyTask]:
    gen = torch.Generator().manual_seed(seed + 1000)
    tasks = []
    for t in range(num_tasks):
        templates = torch.randn(classes, 3, IMAGE, IMAGE, generator=gen)
        templates = F.avg_pool2d(templates, 3, 1, 1) * 2.0  # smooth patterns
        tasks.append(TinyTask(f"task{t}", templates))
    return tasks


def _train(backbone: nn.Module, head: nn.Module, batches, lr: float, steps: int, train_backbone: bool = True) -> None:
    params = list(head.parameters()) + (list(backbone.parameters()) if train_backbone else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    backbone.train()
    for _ in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(head(backbone(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval()


@dataclass
class TinyZoo:
    backbone: nn.Module  # the pretrained model (θ0)
    base: dict[str, Tensor]
    experts: dict[str, dict[str, Tensor]]
    heads: dict[str, LinearHead]
    streams: list[TaskStream]  # labeled test streams (labels used only to score)
    expert_accuracy: dict[str, float]


def build_tiny_zoo(
    num_tasks: int = 3, classes: int = 4, seed: int = 0, test_size: int = 128, backbone: str = "vit",
    pretrain_steps: int = 60, finetune_steps: int = 60,
) -> TinyZoo:
    """Pretrain briefly on every task's templates, then fine-tune one expert per task."""
    tasks = make_tasks(num_tasks, classes, seed)
    make = tiny_vit if backbone == "vit" else tiny_cnn
    model = make(seed)
    dim = model(torch.zeros(1, 3, IMAGE, IMAGE)).shape[-1]
    gen = torch.Generator().manual_seed(seed)

    def mixed():
        while True:
            xs, ys = zip(*[t.sample(16, gen) for t in tasks])
            yield torch.cat(xs), torch.cat([y + i * classes for i, y in enumerate(ys)])

    _train(model, nn.Linear(dim, classes * num_tasks), mixed(), 3e-3, pretrain_steps)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts, heads, acc, streams = {}, {}, {}, []
    for i, task in enumerate(tasks):
        expert = make(seed)
        expert.load_state_dict(base)
        head = nn.Linear(dim, classes)
        torch.manual_seed(seed + 10 + i)
        nn.init.normal_(head.weight, std=0.1)

        def own():
            while True:
                yield task.sample(32, gen)

        _train(expert, head, own(), 1e-3, finetune_steps)
        experts[task.name] = {k: v.detach().clone() for k, v in expert.state_dict().items()}
        heads[task.name] = LinearHead(head.weight, head.bias)
        x, y = task.sample(test_size, torch.Generator().manual_seed(seed + 500 + i))
        streams.append(stream_from_tensors(task.name, x, y, [f"c{c}" for c in range(classes)], "tiny zoo"))
        with torch.no_grad():
            acc[task.name] = float((heads[task.name](expert(x)).argmax(-1) == y).float().mean())
    return TinyZoo(model, base, experts, heads, streams, acc)


def write_tiny_zoo(out: str | Path, zoo: TinyZoo) -> Path:
    """Write the zoo as files: base/experts/heads safetensors, data as .pt tensors, a manifest."""
    from adamerge.io.files import atomic_save_safetensors, atomic_write_json

    out = Path(out)
    atomic_save_safetensors(zoo.base, out / "base.safetensors")
    for name, sd in zoo.experts.items():
        atomic_save_safetensors(sd, out / "experts" / f"{name}.safetensors")
        atomic_save_safetensors(zoo.heads[name].state(), out / "heads" / f"{name}.safetensors")
    for s in zoo.streams:
        atomic_save_safetensors({"x": s.dataset.x, "y": s.dataset.y}, out / "data" / f"{s.name}.safetensors")
    atomic_write_json(out / "manifest.json", {"tasks": [s.name for s in zoo.streams], "expert_accuracy": zoo.expert_accuracy})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="write the tiny test zoo to a folder")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = write_tiny_zoo(args.out, build_tiny_zoo(seed=args.seed))
    print(json.dumps(json.loads((path / "manifest.json").read_text()), indent=2))



def tiny_vit_source(spec: dict):
    """Model source ``tiny_vit`` (see :mod:`adamerge.sources`)."""
    return tiny_vit(spec.get("seed", 0)), None


def tiny_cnn_source(spec: dict):
    """Model source ``tiny_cnn`` (see :mod:`adamerge.sources`)."""
    return tiny_cnn(spec.get("seed", 0)), None


if __name__ == "__main__":
    main()
