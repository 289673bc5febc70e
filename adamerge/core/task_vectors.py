"""Task vectors τ_t = θ_t − θ0, validated once and stored stacked per tensor as ``[T, *shape]``.

Stacking lets the merge of one tensor be a single weighted sum over the leading axis instead of a
Python loop over tasks, and bfloat16 storage halves the memory of the stack (the merge itself is
computed in float32 or higher). Every floating-point entry of the state dict gets a stacked task
vector, parameters and floating buffers (BatchNorm statistics) alike; which of them are merged and
which follow a buffer policy is decided by :class:`adamerge.core.merged.MergedModel`, which knows the
module. Integer buffers (``num_batches_tracked``) are kept from the base.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from adamerge.core.sharding import FlatLayout
from adamerge.errors import InputError
from adamerge.io.state_dicts import TensorSource, require_finite
from adamerge.memory import release_freed_memory

StateDict = Mapping[str, Tensor]
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _check_same_layout(base: StateDict, other: TensorSource, base_src: str, other_src: str) -> None:
    keys = set(other.keys())
    missing = [k for k in base if k not in keys]
    if missing:
        raise InputError(
            f"{other_src}: missing key '{missing[0]}' present in {base_src}"
            f" ({len(missing)} missing in all)"
        )
    extra = [k for k in other.keys() if k not in base]
    if extra:
        raise InputError(
            f"{other_src}: unexpected key '{extra[0]}' not in {base_src} ({len(extra)} extra in all)"
        )
    for key, value in base.items():
        shape, dtype = other.meta(key)
        if shape != tuple(value.shape):
            raise InputError(
                f"{other_src}: tensor '{key}' has shape {shape},"
                f" {base_src} has {tuple(value.shape)}"
            )
        if dtype != value.dtype:
            raise InputError(
                f"{other_src}: tensor '{key}' has dtype {dtype}, {base_src} has {value.dtype}"
            )


@dataclass(frozen=True)
class ShardRequest:
    """Build only rank ``rank``'s shard (of ``world``) of the stacked task vectors of ``keys`` (the
    tensors a sharded merge lays end to end, :class:`adamerge.core.sharding.FlatLayout`)."""

    keys: tuple[str, ...]
    rank: int
    world: int


@dataclass
class StackShard:
    """One rank's shard ``[T, S]`` of the stacked task vectors of ``layout.keys`` (built by
    :meth:`TaskVectors.from_files` with a :class:`ShardRequest`; the whole stack never existed)."""

    layout: FlatLayout
    rank: int
    tau: Tensor
    full_bytes: int  # the whole stack's bytes, for the record


class _ShardedVectors(dict):
    """``TaskVectors.vectors`` of a sharded build: the tensors of the shard are not held whole."""

    def __init__(self, vectors: dict, sharded: tuple[str, ...]) -> None:
        super().__init__(vectors)
        self.sharded = frozenset(sharded)

    def __missing__(self, key: str):
        if key in self.sharded:
            raise InputError(f"task vector '{key}' is held sharded across processes (trainer.strategy shard, built "
                             "one shard per rank): this step needs it whole")
        raise KeyError(key)


class TaskVectors:
    """The pretrained state ``base`` and stacked task vectors ``vectors[key]: [T, *shape]``.

    Build with :meth:`from_state_dicts`, :meth:`from_modules` or :meth:`from_files`. Experts are
    consumed one at a time, so peak memory is base + stack + one expert.
    """

    def __init__(
        self,
        base: dict[str, Tensor],
        vectors: dict[str, Tensor],
        task_names: list[str],
        sources: dict[str, str] | None = None,
        shard: StackShard | None = None,
    ) -> None:
        self.base = base
        self.vectors = vectors if shard is None else _ShardedVectors(vectors, shard.layout.keys)
        self.task_names = list(task_names)
        self.sources = dict(sources or {})
        self.shard = shard

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dicts(
        cls,
        base: StateDict,
        experts: Mapping[str, StateDict],
        *,
        dtype: str | torch.dtype = torch.float32,
        keys: Iterable[str] | None = None,
        base_source: str = "base state dict",
    ) -> "TaskVectors":
        """Validate and stack ``experts[name] - base``; ``keys`` restricts the state to those keys."""
        return cls._build(
            base,
            ((name, (lambda sd=sd: sd), f"expert '{name}'") for name, sd in experts.items()),
            len(experts),
            dtype=dtype,
            keys=keys,
            base_source=base_source,
        )

    @classmethod
    def from_modules(
        cls,
        base: nn.Module,
        experts: Mapping[str, nn.Module],
        *,
        dtype: str | torch.dtype = torch.float32,
    ) -> "TaskVectors":
        """Same as :meth:`from_state_dicts` on the modules' state dicts (base tensors not copied)."""
        return cls.from_state_dicts(
            {k: v.detach() for k, v in base.state_dict().items()},
            {n: {k: v.detach() for k, v in m.state_dict().items()} for n, m in experts.items()},
            dtype=dtype,
            base_source="base module",
        )

    @classmethod
    def from_files(
        cls,
        base: str | Path,
        experts: Mapping[str, str | Path],
        *,
        dtype: str | torch.dtype = torch.float32,
        prefix: str | None = None,
        keys: Iterable[str] | None = None,
        reader: Callable[[str | Path], StateDict] | None = None,
        shard: ShardRequest | None = None,
    ) -> "TaskVectors":
        """Load state-dict files (``.safetensors``, read one tensor at a time; ``.pt/.bin`` with
        ``weights_only=True``), or whatever ``reader(path)`` reads (a model source's own format,
        e.g. Hugging Face folders). ``shard``: keep only that rank's shard of the stacked task
        vectors of its keys (every expert is still read and checked whole, one tensor at a time)."""
        from adamerge.io.state_dicts import load_state_dict, open_state_dict

        read = reader or (lambda path: load_state_dict(path, prefix=prefix))
        expert_reader = reader or (lambda path: open_state_dict(path, prefix=prefix))

        def loader(path: str | Path) -> Callable[[], StateDict | TensorSource]:
            return lambda: expert_reader(path)

        tv = cls._build(
            read(base),
            ((name, loader(p), str(p)) for name, p in experts.items()),
            len(experts),
            dtype=dtype,
            keys=keys,
            base_source=str(base),
            shard=shard,
        )
        tv.sources = {"base": str(base), **{n: str(p) for n, p in experts.items()}}
        return tv

    @classmethod
    def _build(cls, base, experts, count, *, dtype, keys, base_source, shard: ShardRequest | None = None) -> "TaskVectors":
        if dtype == "auto":  # the base's precision: float64 stays float64, anything else float32
            dtype = torch.float64 if any(v.dtype == torch.float64 for v in base.values()) else torch.float32
        dtype = STORAGE_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in STORAGE_DTYPES.values():
            raise InputError(f"storage dtype must be 'auto' or one of {sorted(STORAGE_DTYPES)}, got {dtype}")
        if count < 2:
            raise InputError(f"need at least 2 experts to merge, got {count}")
        if keys is not None:
            keys = list(keys)
            absent = [k for k in keys if k not in base]
            if absent:
                raise InputError(f"{base_source}: requested key '{absent[0]}' not found")
            base = {k: base[k] for k in keys}
        base = dict(base)
        if not base:
            raise InputError(f"{base_source}: the state dict is empty")
        require_finite(base, base_source)
        float_keys = [k for k, v in base.items() if v.is_floating_point()]
        stack_shard, pieces = None, {}
        if shard is not None:
            absent = [k for k in shard.keys if k not in float_keys]
            if absent:
                raise InputError(f"{base_source}: cannot shard '{absent[0]}': not a floating-point tensor of the base")
            layout = FlatLayout(tuple(shard.keys), tuple(tuple(base[k].shape) for k in shard.keys), shard.world)
            for i, a, b, off in layout.segments(shard.rank):
                pieces.setdefault(layout.keys[i], []).append((a, b, off))
            full_bytes = count * layout.total * torch.empty((), dtype=dtype).element_size()
            stack_shard = StackShard(layout, shard.rank, torch.zeros((count, layout.shard_size), dtype=dtype), full_bytes)
            sharded = set(shard.keys)
            float_keys = [k for k in float_keys if k not in sharded]
        vectors = {k: torch.empty((count, *base[k].shape), dtype=dtype) for k in float_keys}
        stacked = set(float_keys)
        names: list[str] = []
        for t, (name, load, source) in enumerate(experts):
            if name in names:
                raise InputError(f"task name '{name}' is given twice")
            sd = load()
            if not isinstance(sd, TensorSource):
                sd = TensorSource(sd)
            if keys is not None:
                sd = TensorSource({k: sd.tensor(k) for k in sd.keys() if k in base})
            _check_same_layout(base, sd, base_source, source)
            # one tensor of the expert at a time (a safetensors file is read lazily): checked,
            # then its difference to the base stored whole or, sharded, only this rank's pieces
            for k in base:
                value = sd.tensor(k)
                require_finite({k: value}, source)
                if k in stacked:
                    vectors[k][t] = (value.to(torch.float64) - base[k].to(torch.float64)).to(dtype)
                for a, b, off in pieces.get(k, ()):
                    diff = value.reshape(-1)[a:b].to(torch.float64) - base[k].reshape(-1)[a:b].to(torch.float64)
                    stack_shard.tau[t, off : off + b - a] = diff.to(dtype)
                del value
            names.append(name)
            del sd
            # this expert's tensors and temporaries go back to the OS now, not after the last
            # expert: glibc keeps freed heap pages resident, and the stack's large blocks cannot
            # reuse them, so the build would otherwise peak at every expert read plus the stack
            release_freed_memory()
        return cls(base, vectors, names, shard=stack_shard)

    # ------------------------------------------------------------------ views
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.vectors.values())).dtype

    def nbytes(self) -> int:
        """Bytes held by the stacked task vectors (a sharded build: this rank's shard)."""
        held = sum(v.numel() * v.element_size() for v in self.vectors.values())
        return held + (0 if self.shard is None else self.shard.tau.numel() * self.shard.tau.element_size())

    @property
    def is_sharded(self) -> bool:
        """Built one shard per rank (``shard``): the sharded tensors are not held whole."""
        return self.shard is not None

    def expert_state_dict(self, task: str) -> dict[str, Tensor]:
        """Reconstruct θ_t = θ0 + τ_t (in the base dtype); for checks and reference baselines."""
        if self.shard is not None:
            raise InputError("the task vectors are held sharded across processes (trainer.strategy shard): an "
                             "expert's weights cannot be rebuilt whole here")
        t = self.task_names.index(task)
        return {
            k: (v + self.vectors[k][t].to(v.dtype)) if k in self.vectors else v.clone()
            for k, v in self.base.items()
        }

    def __repr__(self) -> str:
        n = sum(v[0].numel() for v in self.vectors.values()) + (0 if self.shard is None else self.shard.layout.total)
        return (
            f"TaskVectors(tasks={self.task_names}, tensors={len(self.vectors)},"
            f" elements_per_task={n}, dtype={self.dtype})"
        )
