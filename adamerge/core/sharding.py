"""Task vectors sharded by parameter across ranks (``trainer.strategy: shard``).

The merged tensors are laid end to end in one flat vector of N elements (``FlatLayout``), padded
to R·S and cut into R contiguous shards of S elements. Rank r holds shard r of the base and of
every task vector (``[T, S]``), so each rank stores 1/R of the stacked task vectors. One step:

1. forward: each rank merges its own shard, θ_r(λ) = θ0,r + Σ_t λ_t,k τ_t,r (per tensor k it
   touches, the coefficient of k's group), and ONE ``all_gather`` assembles the full merged
   vector, split back into tensors for the forward;
2. backward: the gradient G of the full merged vector (each rank's own data) is summed across
   ranks by ONE ``reduce_scatter`` and divided by R (the ranks' losses are averaged, as DDP
   averages gradients), so rank r gets its shard of the gradient of the averaged loss; each rank
   contracts it with its shard of the task vectors, and ONE ``all_reduce`` sums the coefficient
   gradients, which are then equal on every rank.

So the coefficients follow the same trajectory as one process with the whole batch (up to the
order of the reductions). Whole-tensor groups only (``task``, ``block``, ``layer``, rules) and no
masks: a partition's or a mask's per-element weights would need sharding too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from adamerge.errors import InputError

SHARD_STRATEGY = "shard"
"""``trainer.strategy: shard``: DDP processes, each holding 1/R of the task vectors (by parameter)."""


@dataclass(frozen=True)
class FlatLayout:
    """Where each merged tensor lies in the flat vector, and which piece of it each rank holds."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    world: int

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def shard_size(self) -> int:
        """S: elements per rank (the flat vector padded to R·S)."""
        return -(-self.total // self.world)

    def segments(self, rank: int) -> list[tuple[int, int, int, int]]:
        """``(tensor index, start, stop, offset in the shard)`` for every tensor piece rank
        ``rank`` holds: elements ``start:stop`` of the flattened tensor."""
        lo, hi = rank * self.shard_size, (rank + 1) * self.shard_size
        out, pos = [], 0
        for i, n in enumerate(self.sizes):
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                out.append((i, a - pos, b - pos, a - lo))
            pos += n
        return out


def take_shard(tensors: list[Tensor], layout: FlatLayout, rank: int, lead: tuple[int, ...] = ()) -> Tensor:
    """Rank ``rank``'s shard ``[*lead, S]`` of the flat vector of ``tensors`` (each ``[*lead,
    *shape]``); the padding at the end of the last shard is zero."""
    first = tensors[0]
    out = torch.zeros((*lead, layout.shard_size), dtype=first.dtype, device=first.device)
    for i, a, b, off in layout.segments(rank):
        out[..., off : off + b - a] = tensors[i].reshape(*lead, -1)[..., a:b]
    return out


def _all_gather(out: Tensor, local: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


def _reduce_scatter(out: Tensor, full: Tensor, group) -> None:
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, full, group=group)


@dataclass
class Shard:
    """One rank's shard of the base and the task vectors, and how to talk to the other ranks."""

    layout: FlatLayout
    rank: int
    base: Tensor  # [S], the merged tensors' dtype
    tau: Tensor  # [T, S], the storage dtype
    tensor_group: Tensor  # [K]: each merged tensor's coefficient group
    full_tau_bytes: int  # the whole stack's bytes, for the record
    group: object = None  # the process group (None: the default one)

    @property
    def world(self) -> int:
        return self.layout.world

    def nbytes(self) -> dict[str, int]:
        return {"base": self.base.numel() * self.base.element_size(),
                "task_vectors": self.tau.numel() * self.tau.element_size()}

    def summary(self) -> dict:
        """What this rank holds against the whole (results.json's ``sharding``)."""
        return {"world": self.world, "rank": self.rank, "task_vector_bytes": self.full_tau_bytes,
                "task_vector_bytes_per_rank": self.nbytes()["task_vectors"]}


class _ShardedMerge(torch.autograd.Function):
    """Full merged flat vector ``[N]`` from per-tensor weights ``[T, K]`` and this rank's shard;
    gradient in the weights only (see the module docstring for the collectives)."""

    @staticmethod
    def forward(ctx, weights: Tensor, shard: Shard) -> Tensor:  # type: ignore[override]
        ctx.shard = shard
        layout, dtype = shard.layout, weights.dtype
        local = torch.zeros(layout.shard_size, dtype=dtype, device=shard.base.device)
        for i, a, b, off in layout.segments(shard.rank):
            piece = slice(off, off + b - a)
            torch.addmv(shard.base[piece].to(dtype), shard.tau[:, piece].t().to(dtype), weights[:, i], out=local[piece])
        full = torch.empty(layout.shard_size * layout.world, dtype=dtype, device=local.device)
        _all_gather(full, local, shard.group)
        return full[: layout.total].to(shard.base.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        shard: Shard = ctx.shard
        layout, dtype = shard.layout, grad.dtype
        full = torch.zeros(layout.shard_size * layout.world, dtype=dtype, device=grad.device)
        full[: layout.total] = grad
        local = torch.empty(layout.shard_size, dtype=dtype, device=grad.device)
        _reduce_scatter(local, full, shard.group)
        local /= layout.world
        del full
        out = torch.zeros(shard.tau.shape[0], len(layout.keys), dtype=dtype, device=grad.device)
        for i, a, b, off in layout.segments(shard.rank):
            piece = slice(off, off + b - a)
            out[:, i] = shard.tau[:, piece].to(dtype) @ local[piece]
        dist.all_reduce(out, group=shard.group)
        return out, None


def sharded_merge(weights: Tensor, shard: Shard) -> dict[str, Tensor]:
    """The merged tensors ``{key: θ0 + Σ_t weights[t, k] τ_t}`` of every rank's shard, gathered
    (a collective: every rank of the group must call it in the same order)."""
    layout = shard.layout
    flat = _ShardedMerge.apply(weights, shard)
    return {k: piece.view(s) for k, s, piece in zip(layout.keys, layout.shapes, flat.split(layout.sizes))}


def make_shard(keys: list[str], bases: list[Tensor], taus: list[Tensor], tensor_group: list[int], rank: int,
               world: int, group=None) -> Shard:
    """This rank's :class:`Shard` of the merged tensors, cut from the whole stack (checked: one
    dtype, a valid rank)."""
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"rank {rank} is not in a group of {world} processes")
    layout = FlatLayout(tuple(keys), tuple(tuple(b.shape) for b in bases), world)
    full = sum(t.numel() * t.element_size() for t in taus)
    return shard_with(layout, rank, bases, take_shard(taus, layout, rank, (taus[0].shape[0],)), tensor_group, full, group)


def shard_with(layout: FlatLayout, rank: int, bases: list[Tensor], tau: Tensor, tensor_group: list[int],
               full_tau_bytes: int, group=None) -> Shard:
    """A :class:`Shard` from this rank's task-vector shard ``tau`` ``[T, S]`` (cut from the whole
    stack, or built per rank from the files) and the whole base tensors, of which it keeps its
    shard (checked: one dtype)."""
    dtypes = {b.dtype for b in bases}
    if len(dtypes) > 1:
        raise InputError(f"sharded task vectors need merged tensors of one dtype, found {sorted(map(str, dtypes))}")
    return Shard(layout, rank, take_shard(bases, layout, rank), tau, torch.tensor(tensor_group, dtype=torch.long),
                 full_tau_bytes, group)
