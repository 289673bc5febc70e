"""Unlabeled streams per task, balanced per-step sampling, and per-task heads.

A :class:`TaskStream` wraps anything indexable (tensors, an image folder, any ``Dataset`` whose
items are ``x`` or ``(x, y)``). Labels, when present, are used only to score. :class:`StepBatches`
makes the batch of step ``s`` a pure function of ``(seed, s)``: every task contributes ``B``
samples drawn from its own permutation, reshuffled on each pass. That is what makes a resumed run
and a multi-process (DDP) run see exactly the samples an uninterrupted single process would: rank
``r`` of ``W`` takes positions ``r, r+W, ...`` of each task's slice of the global batch.
"""
from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from adamerge.errors import InputError


@dataclass
class TaskStream:
    """One task's test stream: ``dataset[i]`` is ``x`` or ``(x, y)``."""

    name: str
    dataset: Any
    classes: list[str] | None = None
    source: str = "in-memory"
    _labels: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.dataset) == 0:
            raise InputError(f"task '{self.name}': the stream from {self.source} is empty")

    def __len__(self) -> int:
        return len(self.dataset)

    def inputs(self, index: Tensor) -> Tensor:
        """Stack the inputs at ``index`` into one batch."""
        ds = self.dataset
        if isinstance(ds, _TensorPair):
            return ds.x[index]
        items = [ds[int(i)] for i in index]
        return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])

    def labels(self) -> Tensor | None:
        """All labels (``None`` when the stream has none)."""
        if self._labels is None:
            ds = self.dataset
            if isinstance(ds, _TensorPair):
                self._labels = ds.y
            elif hasattr(ds, "targets"):
                self._labels = torch.as_tensor(ds.targets)
            else:
                first = ds[0]
                if not isinstance(first, (tuple, list)) or len(first) < 2:
                    return None
                self._labels = torch.as_tensor([int(ds[i][1]) for i in range(len(ds))])
        return self._labels


class _TensorPair(Dataset):
    def __init__(self, x: Tensor, y: Tensor | None) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i] if self.y is None else (self.x[i], self.y[i])


def stream_from_tensors(name: str, x, y=None, classes: list[str] | None = None, source: str = "tensors") -> TaskStream:
    """A stream over an array/tensor of inputs ``[N, ...]`` (labels ``[N]`` optional)."""
    x = torch.as_tensor(x)
    if x.dtype == torch.float64:
        x = x.float()
    y = None if y is None else torch.as_tensor(y).long()
    if y is not None and y.shape[0] != x.shape[0]:
        raise InputError(f"task '{name}': {x.shape[0]} inputs but {y.shape[0]} labels")
    if x.is_floating_point() and x.numel() and not torch.isfinite(x).all():
        raise InputError(f"task '{name}': inputs from {source} contain NaN or inf")
    return TaskStream(name, _TensorPair(x, y), classes, source)


def stream_from_dataset(name: str, dataset: Dataset, classes: list[str] | None = None) -> TaskStream:
    """A stream over any map-style ``Dataset`` (items ``x`` or ``(x, y)``)."""
    return TaskStream(name, dataset, classes or getattr(dataset, "classes", None), type(dataset).__name__)


def stream_from_folder(name: str, root: str | Path, transform: Callable) -> TaskStream:
    """An image folder: ``root/<class>/*.png`` (labels from sub-folders) or images directly."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise InputError(f"task '{name}': image folder {root} does not exist")
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if subdirs:
        files = [(f, c) for c, d in enumerate(subdirs) for f in sorted(d.rglob("*")) if f.suffix.lower() in exts]
        classes = [d.name for d in subdirs]
    else:
        files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in exts]
        classes = None

    class _Folder(Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            path, label = files[i]
            try:
                x = transform(Image.open(path).convert("RGB"))
            except Exception as err:  # a corrupt image names its file
                raise InputError(f"task '{name}': cannot read image {path}: {err}") from None
            return x if label < 0 else (x, label)

    return TaskStream(name, _Folder(), classes, str(root))


def check_batch_size(streams: Sequence[TaskStream], batch_size: int) -> None:
    """A training batch draws ``batch_size`` samples per task: a smaller stream is an error
    (it would repeat samples within one batch)."""
    for s in streams:
        if len(s) < batch_size:
            raise InputError(f"task '{s.name}' has {len(s)} samples in {s.source}, fewer than options.batch_size"
                             f" {batch_size}; lower the batch size or give more data")


def _seed_for(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StepBatch(NamedTuple):
    """One step's samples: ``inputs[task]`` and their positions ``index[task]`` in the task's stream
    (the positions select per-sample targets such as the experts' predictions)."""

    inputs: dict[str, Tensor]
    index: dict[str, Tensor]


class StepBatches(Dataset):
    """Item ``i`` is step ``start + i``'s :class:`StepBatch` (this rank's share of it), or with
    ``per_step = k > 1`` a list of k batches (draws ``k·s … k·s + k − 1``: a bi-level step's
    inner and outer batches)."""

    def __init__(
        self,
        streams: Sequence[TaskStream],
        batch_size: int,
        steps: int,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        per_step: int = 1,
        pools: Mapping[str, Sequence[Tensor]] | None = None,
        mix: Sequence[float] | None = None,
    ) -> None:
        if batch_size % world_size:
            raise InputError(f"batch size per task {batch_size} must be divisible by {world_size} processes")
        self.streams, self.batch_size, self.steps = list(streams), batch_size, steps
        self.seed, self.start, self.rank, self.world_size = seed, start, rank, world_size
        self.per_step = per_step
        self._perms: dict[tuple[int, int], Tensor] = {}
        # optional per-task pools of stream positions, each contributing a fixed share of the batch
        self.pools = {k: [torch.as_tensor(p, dtype=torch.long) for p in v] for k, v in (pools or {}).items()}
        if self.pools:
            mix = list(mix or [])
            counts = [int(round(batch_size * m)) for m in mix]
            counts[-1] = batch_size - sum(counts[:-1])
            if any(c < 0 for c in counts):
                raise InputError(f"bad pool mix {mix} for batch size {batch_size}")
            self.pool_counts = counts
            for name, pools_t in self.pools.items():
                if len(pools_t) != len(counts):
                    raise InputError(f"task '{name}': {len(pools_t)} pools but a mix of {len(counts)}")
                for j, p in enumerate(pools_t):
                    if counts[j] and len(p) == 0:
                        raise InputError(f"task '{name}': pool {j} is empty")
        self._pool_perms: dict[tuple[int, int, int], Tensor] = {}

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def _perm(self, t: int, epoch: int) -> Tensor:
        key = (t, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.streams):
                self._perms.clear()
            gen = torch.Generator().manual_seed(_seed_for(self.seed, self.streams[t].name, epoch))
            self._perms[key] = torch.randperm(len(self.streams[t]), generator=gen)
        return self._perms[key]

    def _pool_indices(self, step: int, t: int) -> Tensor:
        name = self.streams[t].name
        out = []
        for j, (pool, count) in enumerate(zip(self.pools[name], self.pool_counts)):
            n = len(pool)
            for p in range(step * count, (step + 1) * count):
                key = (t, j, p // n)
                if key not in self._pool_perms:
                    if len(self._pool_perms) > 8 * len(self.streams):
                        self._pool_perms.clear()
                    gen = torch.Generator().manual_seed(_seed_for(self.seed, name, "pool", j, p // n))
                    self._pool_perms[key] = pool[torch.randperm(n, generator=gen)]
                out.append(self._pool_perms[key][p % n])
        return torch.stack(out)

    def indices(self, step: int, t: int) -> Tensor:
        """Sample indices of task ``t`` in the global batch of ``step`` (all ranks)."""
        if self.streams[t].name in self.pools:
            return self._pool_indices(step, t)
        n = len(self.streams[t])
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self._perm(t, int(p) // n)[int(p) % n] for p in pos])

    def __getitem__(self, i: int) -> StepBatch | list[StepBatch]:
        if self.per_step > 1:
            step = self.start + i
            return [self.draw(self.per_step * step + j) for j in range(self.per_step)]
        return self.draw(self.start + i)

    def draw(self, step: int) -> StepBatch:
        """The batch of draw number ``step``."""
        inputs, index = {}, {}
        for t, s in enumerate(self.streams):
            idx = self.indices(step, t)[self.rank :: self.world_size]
            inputs[s.name], index[s.name] = s.inputs(idx), idx
        return StepBatch(inputs, index)


def strong_view(x: Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.5, 1.0), flip: bool = True) -> Tensor:
    """aTLAS's strong view of an image batch ``[N, C, H, W]``: per sample a random resized crop
    (area fraction in ``scale``, aspect ratio 3/4..4/3, resized back to H×W) and, with ``flip``, a
    horizontal flip with probability 1/2 (the random numbers drawn are the same either way).
    Deterministic given the generator."""
    if x.dim() != 4:
        raise InputError(f"strong views need image batches [N, C, H, W], got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    r = torch.rand(n, 4, generator=generator)
    for i in range(n):
        area = scale[0] + (scale[1] - scale[0]) * float(r[i, 0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(r[i, 1]))
        ch = max(1, min(h, int(round(math.sqrt(area * h * w / ratio)))))
        cw = max(1, min(w, int(round(math.sqrt(area * h * w * ratio)))))
        top = int(float(r[i, 2]) * (h - ch + 1))
        left = int(float(r[i, 3]) * (w - cw + 1))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        crop = F.interpolate(crop.float(), size=(h, w), mode="bilinear", align_corners=False).to(x.dtype)
        flipped = torch.rand(1, generator=generator).item() < 0.5
        out[i] = crop[0].flip(-1) if flip and flipped else crop[0]
    return out


def images_layout(x: Tensor, model: nn.Module | None = None) -> Tensor:
    """Image batches for a convolutional network go channels-last: its convolutions on CPU run
    about 1.7x faster that way (EfficientNet-Lite0, 80 images at 64 px: 0.31 s vs 0.53 s per
    merged training step). A model with at most one 2-D convolution (a ViT's patch embedding)
    keeps the contiguous layout: there the conversion is one more copy of the batch for nothing
    (ViT-B-32's per-task step: 14.09 s with it, 13.88 s without, medians of 3 pairs, a difference
    within this 2-core machine's noise)."""
    if x.dim() != 4 or (model is not None and not prefers_channels_last(model)):
        return x
    return x.contiguous(memory_format=torch.channels_last)


_CHANNELS_LAST: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def prefers_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` (or a merged model's architecture) is a convolutional network: two or
    more ``Conv2d`` layers. Walked once per architecture (this runs on every batch)."""
    arch = getattr(model, "_arch", model)
    known = _CHANNELS_LAST.get(arch)
    if known is None:
        known = _CHANNELS_LAST[arch] = sum(isinstance(m, nn.Conv2d) for m in arch.modules()) > 1
    return known


class LinearHead(nn.Module):
    """A frozen classification head: ``normalize(f) @ W.T + b`` (normalise for CLIP zero-shot)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, normalize: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.normalize = normalize

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], normalize: bool = False, source: str = "head") -> "LinearHead":
        if "weight" not in sd:
            raise InputError(f"{source}: a head needs a 'weight' tensor, found keys {sorted(sd)}")
        return cls(sd["weight"], sd.get("bias"), normalize)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(features, self.weight.to(features.dtype), None if self.bias is None else self.bias.to(features.dtype))

    def state(self) -> dict[str, Tensor]:
        return {"weight": self.weight} | ({} if self.bias is None else {"bias": self.bias})

    def trainable(self) -> "LinearHead":
        """A copy whose weight and bias are parameters (``options.train_heads``: the head is the
        task-specific layer trained with the coefficients); this head is left as it is."""
        head = LinearHead(self.weight, self.bias, self.normalize)
        for name in ("weight", "bias"):
            value = getattr(head, name)
            if value is not None:
                delattr(head, name)
                setattr(head, name, nn.Parameter(value))
        return head

    def frozen(self) -> "LinearHead":
        """A detached copy on the CPU with buffers again (a trained head, saved and scored)."""
        return LinearHead(self.weight.detach().cpu(), None if self.bias is None else self.bias.detach().cpu(), self.normalize)
