"""MergedModel: one differentiable functional merged model for every granularity.

``θ(λ, m) = θ0 + Σ_t λ[t, g(k)] · (m_t,k ⊙ τ_t,k)`` for each merged tensor k, recomputed inside
every forward from the current coefficients (there is no re-merge call to forget) and run through
``torch.func.functional_call`` on a copy of the architecture that lives on the ``meta`` device, so
the base weights are held once: base + stacked τ + one merged copy + its gradient, (T + 3) model
sizes at most. The coefficients are the only ``nn.Parameter``; everything else is a
non-persistent buffer, so ``state_dict()`` (and a Lightning checkpoint) holds kilobytes.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from adamerge.errors import InputError
from adamerge.core.granularity import Grouping, Spec, make_grouping
from adamerge.core.sharding import Shard, make_shard, shard_with, sharded_merge
from adamerge.core.task_vectors import TaskVectors

BUFFER_POLICIES = ("base", "average", "reestimate")


CPU_CHUNK = 1 << 15
"""Elements per block of the CPU merge (0: one BLAS call per tensor). Blocking keeps each
block of the output in cache while the T rows of τ stream past it, and converts a bfloat16 τ
block by block instead of into a float32 copy of the whole ``[T, *shape]`` stack."""


def _blocks(n: int, device: torch.device) -> list[slice]:
    if device.type != "cpu" or CPU_CHUNK <= 0 or n <= CPU_CHUNK:
        return [slice(0, n)]
    return [slice(s, min(s + CPU_CHUNK, n)) for s in range(0, n, CPU_CHUNK)]


def merge_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of a merge into a base of ``base_dtype``: float64 stays float64,
    float32 and half precision (bfloat16/float16 bases or task vectors) are computed in float32."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


def _is_float_tensor(x) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


class _MergeTensor(torch.autograd.Function):
    """``base + Σ_t w[t] * τ[t]`` in ``w``'s dtype, saving only references.

    ``w`` is ``[T]`` (one coefficient per task), ``[T, C]`` with ``sizes`` (one per task and
    contiguous segment of the flattened tensor: ``partition:R``; with ``perm``, element ``e``
    belongs to the segment holding position ``perm[e]``: ``partition:R:random`` and ``:atlas``),
    or broadcastable to ``τ`` (element coefficients, masks). Whole tensors and contiguous
    segments are ``addmv`` over τ; scattered segments take each block's product with every
    segment's column, then each element's own. Neither forms a temporary delta tensor or a
    ``[T, *shape]`` coefficient tensor (blocked on the CPU, see :data:`CPU_CHUNK`). Autograd's
    own ops would keep a converted copy of a bfloat16 τ alive until the backward; this converts
    on the fly in both passes instead. The base gets no gradient (it is a frozen buffer).
    ``into`` (a one-element list, or ``None``): the first two paths write into ``into[0]`` when
    it fits, else into new memory that they leave there for the next call.
    """

    @staticmethod
    def forward(ctx, weights: Tensor, tau: Tensor, base: Tensor, sizes: tuple[int, ...] | None,  # type: ignore[override]
                into: list | None, perm: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(weights, tau)
        ctx.sizes, ctx.perm = sizes, perm
        dtype = weights.dtype
        if weights.dim() == 1 or sizes is not None:
            rows, flat = tau.reshape(tau.shape[0], -1), base.reshape(-1)
            cols = weights.reshape(weights.shape[0], -1)
            out = into[0] if into is not None else None
            if out is None or out.dtype != dtype or out.device != base.device or out.numel() != flat.numel():
                out = torch.empty(flat.shape, dtype=dtype, device=base.device)
                if into is not None:
                    into[0] = out
            out = out.view(-1)
            if perm is not None:  # scattered segments: every segment's merge of a block, then each element's own
                for b, label in _labelled_blocks(perm, sizes, tau.shape[0], base.device):
                    every = rows[:, b].t().to(dtype) @ cols  # [block, C]
                    torch.add(flat[b].to(dtype), every.gather(1, label[:, None]).squeeze(1), out=out[b])
                return out.view(base.shape).to(base.dtype)
            for c, seg in enumerate(_segments(sizes, flat.numel())):
                w = cols[:, c]
                for b in _blocks(seg.stop - seg.start, base.device):
                    b = slice(seg.start + b.start, seg.start + b.stop)
                    torch.addmv(flat[b].to(dtype), rows[:, b].t().to(dtype), w, out=out[b])
            return out.view(base.shape).to(base.dtype)
        return (base + (weights * tau.to(dtype)).sum(0)).to(base.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weights, tau = ctx.saved_tensors
        none = (None,) * 5
        if not ctx.needs_input_grad[0]:
            return None, *none
        dtype = grad.dtype
        rows, flat = tau.reshape(tau.shape[0], -1), grad.reshape(-1)  # views
        if ctx.perm is not None:
            out = torch.zeros_like(weights, dtype=dtype)  # [T, C]
            for b, label in _labelled_blocks(ctx.perm, ctx.sizes, tau.shape[0], grad.device):
                # the block's gradient, in its elements' segment column: [block, C]
                spread = torch.zeros(label.shape[0], out.shape[1], dtype=dtype, device=grad.device)
                out.addmm_(rows[:, b].to(dtype), spread.scatter_(1, label[:, None], flat[b, None]))
            return out, *none
        if weights.dim() == 1 or ctx.sizes is not None:
            segments = _segments(ctx.sizes, flat.numel())
            out = torch.zeros(len(segments), weights.shape[0], dtype=dtype, device=grad.device)  # [C, T]
            for c, seg in enumerate(segments):
                for b in _blocks(seg.stop - seg.start, grad.device):
                    b = slice(seg.start + b.start, seg.start + b.stop)
                    out[c].addmv_(rows[:, b].to(dtype), flat[b])
            return out.t().reshape(weights.shape), *none
        return (tau.to(dtype) * grad).sum_to_size(weights.shape), *none


def _segments(sizes: tuple[int, ...] | None, n: int) -> list[slice]:
    """The contiguous segments of a flattened tensor of ``n`` elements (one if ``sizes`` is ``None``)."""
    if sizes is None:
        return [slice(0, n)]
    bounds = [0, *itertools.accumulate(sizes)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def _labelled_blocks(perm: Tensor, sizes: tuple[int, ...], tasks: int, device: torch.device):
    """``(block, segment of each of its elements)`` over a flattened tensor whose element ``e``
    sits at position ``perm[e]`` of the segments' order (labels computed per block: nothing
    model-sized is kept for them). A block's ``[block, C]`` product holds at most
    ``8 · CPU_CHUNK`` elements on the CPU, and elsewhere (or with ``CPU_CHUNK = 0``) at most
    ``T · numel``, what per-element coefficients held: one block unless C > T."""
    n, c = perm.numel(), len(sizes)
    ends = torch.tensor(list(itertools.accumulate(sizes)), device=device)
    if device.type == "cpu" and CPU_CHUNK > 0:
        per_block = max(1, CPU_CHUNK * 8 // max(8, c))
    else:
        per_block = n if c <= tasks else max(1, n * tasks // c)
    for lo in range(0, n, per_block):
        b = slice(lo, min(n, lo + per_block))
        yield b, torch.searchsorted(ends, perm[b].to(device, torch.long), right=True)


def merge_tensor(weights: Tensor, tau: Tensor, base: Tensor, sizes: tuple[int, ...] | None = None,
                 into: list | None = None, perm: Tensor | None = None) -> Tensor:
    """``base + Σ_t weights[t] · tau[t]``, differentiable in ``weights`` only, computed in the
    weights' dtype and returned in the base's (callers cast the weights with :func:`merge_dtype`).
    ``weights`` ``[T, C]`` with ``sizes``: one coefficient per task and segment of ``sizes[c]``
    elements of the flattened tensor, contiguous, or scattered by ``perm`` (element → position
    in the segments' order). ``into``: see :class:`_MergeTensor`."""
    return _MergeTensor.apply(weights, tau, base, sizes, into, perm)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Names under which a parameter appears a second time (tied weights: a language model's
    ``lm_head.weight`` that is its input embedding) → the name it is merged under."""
    first = {id(p): n for n, p in model.named_parameters()}
    return {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are storage-free meta tensors."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    arch = copy.deepcopy(model, memo)
    return arch.eval()


class MergedModel(nn.Module):
    """A merged model whose merge coefficients (``[T, G]``) are the only trainable parameter.

    Args:
        model: the architecture (its own weights are not used; the base weights come from ``tv``).
        task_vectors: base state and stacked task vectors whose keys match ``model.state_dict()``.
        granularity: ``task``, ``block``, ``layer``, ``partition:R[:random]`` or a list of rules
            (see :mod:`adamerge.core.granularity`).
        init: initial applied coefficient: a float, or a tensor broadcastable to ``[T, G]``.
        clamp: ``(low, high)`` box applied in the forward (the raw parameter is unbounded; the
            gradient is zero outside the box, as in AdaMerging), or ``None``.
        simplex: parametrise each group's T coefficients as ``total · softmax`` (they sum to
            ``total``); ``init`` then gives relative weights. Excludes ``clamp``.
        buffer_policy: floating buffers such as BatchNorm statistics are not task vectors:
            ``base`` keeps θ0's, ``average`` takes the experts' mean, ``reestimate`` starts from
            θ0's and is refreshed by :meth:`reestimate_buffers` on unlabeled data.
        seed: seed of random partitions.
    """

    def __init__(
        self,
        model: nn.Module,
        task_vectors: TaskVectors,
        granularity: Spec = "layer",
        init: float | Tensor = 0.3,
        clamp: tuple[float, float] | None = (0.0, 1.0),
        simplex: bool = False,
        buffer_policy: str = "base",
        seed: int = 0,
        total: float = 1.0,
    ) -> None:
        super().__init__()
        tv = task_vectors
        if buffer_policy not in BUFFER_POLICIES:
            raise InputError(f"buffer_policy must be one of {BUFFER_POLICIES}, got '{buffer_policy}'")
        if simplex and clamp is not None:
            raise InputError("choose either clamp=(low, high) or simplex=True, not both")
        self.task_names = list(tv.task_names)
        self.buffer_policy = buffer_policy
        self.clamp = tuple(clamp) if clamp is not None else None
        self.simplex = simplex
        self.total = float(total)
        self._check_keys(model, tv)

        persistent = model.state_dict()
        param_names = [n for n, _ in model.named_parameters()]
        # a tied weight is merged once, under its first name; functional_call ties the alias to it
        self.tied: dict[str, str] = tied_aliases(model)
        self.merge_keys: list[str] = param_names
        self.buffer_keys: list[str] = [k for k in persistent if k not in set(param_names) and k not in self.tied]
        self.extra_buffer_keys: list[str] = [
            n for n, _ in model.named_buffers() if n not in persistent
        ]
        # not registered as a submodule: its meta tensors must not be moved, cast or saved
        object.__setattr__(self, "_arch", _meta_copy(model))
        self.grouping: Grouping = make_grouping(
            granularity, {k: tv.base[k].shape for k in self.merge_keys}, seed=seed
        )
        self._shard: Shard | None = None  # see shard()
        self.masks: dict[str, Tensor] | None = None  # fixed masks (e.g. TIES)
        self.mask_set: nn.Module | None = None  # learnable masks (adamerge.core.masks.ConcreteMasks)
        if tv.shard is not None:  # built one shard per rank: the whole stack never existed
            self._adopt_shard(tv)
        else:
            for i, k in enumerate(self.merge_keys):
                self.register_buffer(f"_base{i}", tv.base[k], persistent=False)
                self.register_buffer(f"_tau{i}", tv.vectors[k], persistent=False)
        for i, k in enumerate(self.buffer_keys):
            value = tv.base[k]
            if buffer_policy == "average" and k in tv.vectors:
                value = (value + tv.vectors[k].to(value.dtype).mean(0)).to(value.dtype)
            self.register_buffer(f"_buf{i}", value.clone(), persistent=False)
        named_buffers = dict(model.named_buffers())
        for i, k in enumerate(self.extra_buffer_keys):
            self.register_buffer(f"_extra{i}", named_buffers[k].detach().clone(), persistent=False)

        # float64 coefficients for a float64 model (the merge stays float64 end to end), else float32
        dtype = torch.float64 if any(tv.base[k].dtype == torch.float64 for k in self.merge_keys) else torch.float32
        init_t = self._coefficient_values(init, dtype, "init")
        if simplex:
            if (init_t <= 0).any():
                raise InputError("simplex coefficients need a positive init")
            init_t = init_t.log()
        self.coefficients = nn.Parameter(init_t)
        self._fixed: dict[str, Tensor] | None = None  # see fixed_parameters
        self._final: dict[str, Tensor] | None = None  # see gather_final()
        self._reused: dict[str, list] = {}  # see merged_parameters(reuse=True)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_keys(model: nn.Module, tv: TaskVectors) -> None:
        """The task vectors' base state fits ``model`` key for key and shape for shape."""
        sd = model.state_dict()
        tied = tied_aliases(model)
        for key in sd:
            if key not in tv.base and key not in tied:  # a tied alias may be absent (saved once)
                raise InputError(f"model key '{key}' is missing from the task vectors' base state dict")
        for key in tv.base:
            if key not in sd:
                raise InputError(f"task vectors hold key '{key}' that the model does not have")
        for key, value in sd.items():
            if key in tied and key not in tv.base:
                continue
            if tuple(value.shape) != tuple(tv.base[key].shape):
                raise InputError(
                    f"key '{key}': model shape {tuple(value.shape)} != task-vector base shape"
                    f" {tuple(tv.base[key].shape)}"
                )
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                raise InputError(f"parameter '{name}' is not floating point and cannot be merged")

    # ------------------------------------------------------------------ coefficients
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def group_names(self) -> list[str]:
        return self.grouping.group_names

    def group_index(self, param_name: str) -> int:
        """The coefficient group of a parameter (for a partitioned tensor: its first group)."""
        try:
            return self.grouping.tensor_group[param_name]
        except KeyError:
            raise InputError(f"'{param_name}' is not a merged parameter") from None

    def applied_coefficients(self) -> Tensor:
        """The coefficients as the merge uses them (after clamp or softmax), ``[T, G]``."""
        c = self.coefficients
        if self.simplex:
            return self.total * torch.softmax(c, dim=0)
        if self.clamp is not None:
            return c.clamp(*self.clamp)
        return c

    def _coefficient_values(self, values, dtype: torch.dtype, what: str = "coefficients") -> Tensor:
        """``values`` as a ``[T, G]`` tensor: a number, one value per task (``[T]``: each task's
        value in every group), or ``[T, G]`` / broadcastable to it. Anything else (a list of the
        wrong length, a ``[G]`` row) is a one-line error, never a silent broadcast."""
        T, G = len(self.task_names), self.grouping.num_groups
        try:
            t = torch.as_tensor(values, dtype=dtype)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{what} must be a number, one per task ({T}) or [{T}, {G}] values, got {values!r}") from None
        if t.dim() == 1:
            if t.numel() != T:
                raise InputError(f"{what} has {t.numel()} values; give one number, or one per task ({T} tasks: "
                                 f"{self.task_names})")
            t = t[:, None]
        if t.dim() > 2 or (t.dim() == 2 and (t.shape[0] not in (1, T) or t.shape[1] not in (1, G))):
            raise InputError(f"{what} of shape {tuple(t.shape)} does not fit coefficients [{T}, {G}]")
        if not torch.isfinite(t).all():
            raise InputError(f"{what} must be finite, got {values!r}")
        return t.expand(T, G).clone()

    @torch.no_grad()
    def set_coefficients(self, values: Tensor) -> None:
        """Set the applied coefficients (inverse of the parametrisation), e.g. from a saved run:
        a number, one per task, or ``[T, G]`` (cast to the coefficients' dtype)."""
        values = self._coefficient_values(values, self.coefficients.dtype)
        self.coefficients.copy_((values / self.total).clamp_min(1e-12).log() if self.simplex else values)

    # ------------------------------------------------------------------ the merge
    def _tensor(self, prefix: str, i: int) -> Tensor:
        return getattr(self, f"{prefix}{i}")

    def merged_parameters(self, masks: Mapping[str, Tensor] | None = None, reuse: bool = False) -> dict[str, Tensor]:
        """θ0 + Σ_t λ_t ⊙ (m_t ⊙ τ_t) for every merged parameter (differentiable in λ and m).

        ``masks`` (default ``self.masks``) maps a parameter name to a mask of its shape (shared by
        the tasks) or ``[T, *shape]`` (one per task); unlisted parameters are unmasked.
        ``reuse``: write each merged tensor into the memory the previous ``reuse`` call wrote
        (kept by the model; tensors with whole-tensor or partition coefficients and no mask),
        instead of fresh memory, whose page faults cost about as much as the merge itself
        on a CPU (``benchmarks/merge_alloc.py``). That call's outputs are overwritten: the caller
        must no longer read them (a backward through a graph that saved one fails autograd's
        version check instead of giving a wrong gradient).
        """
        masks = self.masks if masks is None else masks
        if self._final is not None:
            return dict(self._final)
        coef = self.applied_coefficients()
        if self._shard is not None:
            if masks:
                raise InputError("a sharded merged model takes no masks")
            weights = coef[:, self._shard.tensor_group.to(coef.device)]
            return sharded_merge(weights.to(merge_dtype(self._shard.base.dtype)), self._shard)
        learned = self.mask_set() if self.mask_set is not None else {}
        out: dict[str, Tensor] = {}
        chunks = self.grouping.chunks
        for i, key in enumerate(self.merge_keys):
            base, tau = self._tensor("_base", i), self._tensor("_tau", i)
            mask = masks.get(key) if masks else None
            if key in learned:
                mask = learned[key] if mask is None else mask.to(tau.device) * learned[key]
            chunk, sizes, perm = chunks.get(key), None, None
            if chunk is not None and mask is not None:
                weights = chunk.expand(coef).reshape(tau.shape[0], *tau.shape[1:])  # per element
            elif chunk is not None:  # segments, contiguous or scattered: one coefficient column each
                weights, sizes, perm = coef[:, chunk.first : chunk.first + chunk.count], tuple(chunk.sizes), chunk.perm
            else:
                weights = coef[:, self.grouping.tensor_group[key]]
            if mask is not None:
                if weights.dim() == 1:
                    weights = weights.reshape(-1, *([1] * (tau.dim() - 1)))
                weights = weights * mask.to(tau.device)
            into = self._reused.setdefault(key, [None]) if reuse else None
            # the merge's arithmetic follows the model (float64 stays float64; a bfloat16 base or
            # τ is merged in float32 and returned in the base's dtype); autograd casts the gradient back
            out[key] = merge_tensor(weights.to(merge_dtype(base.dtype)), tau, base, sizes, into, perm)
        return out

    # ------------------------------------------------------------------ sharding (trainer.strategy: shard)
    def shard(self, rank: int, world: int, group=None) -> None:
        """Keep only this rank's shard of the base and task vectors of the merged tensors (see
        :mod:`adamerge.core.sharding`); from now on every merge is a collective of the ``world``
        ranks. Whole-tensor groups and no masks. The full tensors are released here (the caller
        drops its own references, e.g. the :class:`TaskVectors`)."""
        refusal = self.shard_refusal()
        if refusal:
            raise InputError(refusal)
        n = len(self.merge_keys)
        self._shard = make_shard(self.merge_keys, [self._tensor("_base", i) for i in range(n)],
                                 [self._tensor("_tau", i) for i in range(n)],
                                 [self.grouping.tensor_group[k] for k in self.merge_keys], rank, world, group)
        for i in range(n):
            delattr(self, f"_base{i}")
            delattr(self, f"_tau{i}")

    def _adopt_shard(self, tv: TaskVectors) -> None:
        """Take a sharded build's shard (:meth:`TaskVectors.from_files` with a ``ShardRequest``)
        as this model's: its tensors must be the merged parameters, in order."""
        built = tv.shard
        if built.layout.keys != tuple(self.merge_keys):
            raise InputError("the task vectors were sharded over other tensors than this model's parameters "
                             f"({len(built.layout.keys)} tensors, first '{built.layout.keys[0]}'; the model has "
                             f"{len(self.merge_keys)}, first '{self.merge_keys[0] if self.merge_keys else None}')")
        refusal = self.shard_refusal()
        if refusal:
            raise InputError(refusal)
        self._shard = shard_with(built.layout, built.rank, [tv.base[k] for k in self.merge_keys], built.tau,
                                 [self.grouping.tensor_group[k] for k in self.merge_keys], built.full_bytes)

    def shard_refusal(self) -> str | None:
        """Why this model cannot be sharded, or ``None``."""
        if self._shard is not None:
            return "the merged model is already sharded"
        if self.grouping.chunks:
            return f"sharded task vectors need whole-tensor groups (task, block, layer), not '{self.grouping.spec}'"
        if self.masks or self.mask_set is not None:
            return "sharded task vectors do not support masks (TIES/TALL masks, Concrete masks)"
        return None

    @property
    def is_sharded(self) -> bool:
        return self._shard is not None

    def shard_summary(self) -> dict | None:
        """This rank's share of the task vectors (``None`` when not sharded)."""
        return self._shard.summary() if self._shard is not None else None

    @torch.no_grad()
    def gather_final(self) -> None:
        """A sharded model's last merge, gathered once on every rank (a collective) and kept: the
        model then merges no more (its coefficients are final) and runs without the other ranks,
        e.g. for rank 0's evaluation and results after training."""
        if self._shard is None:
            raise InputError("gather_final is for a sharded merged model")
        self._final = {k: v.detach().clone() for k, v in self.merged_parameters().items()}

    def release_final(self) -> None:
        """Drop the copy :meth:`gather_final` kept: the model merges from its shard again."""
        self._final = None

    def release_reused(self) -> None:
        """Drop the memory ``merged_parameters(reuse=True)`` keeps between calls (one model size)."""
        self._reused = {}

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._reused = {}  # written for the former device or dtype
        if self._shard is not None:  # the shard is not a registered buffer (DDP would broadcast it)
            self._shard.base, self._shard.tau = fn(self._shard.base), fn(self._shard.tau)
        if self._final is not None:
            self._final = {k: fn(v) for k, v in self._final.items()}
        return self

    def add_masks(self, mask_set: nn.Module) -> None:
        """Attach learnable masks (a module returning ``{name: mask}``); their parameters train
        with (or instead of) the coefficients. A mask multiplies τ after the fixed ``masks``."""
        unknown = [k for k in getattr(mask_set, "keys", []) if k not in self.merge_keys]
        if unknown:
            raise InputError(f"masks for '{unknown[0]}', which is not a merged parameter")
        self.mask_set = mask_set

    def current_buffers(self) -> dict[str, Tensor]:
        """Buffers used in the forward: persistent ones (per policy) and non-persistent ones."""
        out = {k: self._tensor("_buf", i) for i, k in enumerate(self.buffer_keys)}
        out.update({k: self._tensor("_extra", i) for i, k in enumerate(self.extra_buffer_keys)})
        return out

    @property
    def input_dtype(self) -> torch.dtype | None:
        """The merged model's floating dtype (its first merged parameter's), or ``None``."""
        if self._shard is not None:
            return self._shard.base.dtype
        return self._tensor("_base", 0).dtype if self.merge_keys else None

    def cast_inputs(self, args: tuple, kwargs: dict | None = None) -> tuple[tuple, dict]:
        """Floating-point input tensors in the model's dtype (a float32 batch through a float64 or
        bfloat16 model); other arguments unchanged."""
        dtype = self.input_dtype
        cast = (lambda a: a.to(dtype) if _is_float_tensor(a) and a.dtype != dtype else a) if dtype else (lambda a: a)
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in (kwargs or {}).items()}

    def forward(self, *args, **kwargs):
        params = self._fixed if self._fixed is not None else self.merged_parameters()
        args, kwargs = self.cast_inputs(args, kwargs)
        return functional_call(self._arch, {**params, **self.current_buffers()}, args, kwargs)

    @contextlib.contextmanager
    def fixed_parameters(self, params: dict[str, Tensor]):
        """Inside the block the forward uses ``params`` (e.g. leaves detached from one merge, so
        that each task's forward and backward stops at the merged weights) instead of merging."""
        self._fixed = params
        try:
            yield
        finally:
            self._fixed = None

    @torch.no_grad()
    def stacked_parameters(self, coefficients: Tensor) -> dict[str, Tensor]:
        """Merged parameters under M sets of applied coefficients at once: ``coefficients``
        ``[M, T, G]`` → ``{key: [M, *shape]}`` with ``θ0 + Σ_t c[m, t, g(k)] · (mask ⊙ τ_t)``.
        Whole-tensor groups only (task, block, layer, rules); no gradient (test-time use)."""
        if self.grouping.chunks:
            raise InputError(f"several coefficient sets at once need whole-tensor groups, not '{self.grouping.spec}'")
        if self._shard is not None:
            raise InputError("several coefficient sets at once need the whole task vectors, not a shard")
        if self.mask_set is not None:
            raise InputError("several coefficient sets at once do not support learnable masks")
        T, G = self.coefficients.shape
        if coefficients.dim() != 3 or tuple(coefficients.shape[1:]) != (T, G):
            raise InputError(f"coefficient sets must have shape [M, {T}, {G}], got {tuple(coefficients.shape)}")
        out: dict[str, Tensor] = {}
        for i, key in enumerate(self.merge_keys):
            base, tau = self._tensor("_base", i), self._tensor("_tau", i)
            dtype = merge_dtype(base.dtype)
            w = coefficients[:, :, self.grouping.tensor_group[key]].to(dtype)  # [M, T]
            rows = tau.reshape(T, -1).to(dtype)
            mask = self.masks.get(key) if self.masks else None
            if mask is not None:
                rows = rows * mask.to(rows.device, dtype).expand(tau.shape).reshape(T, -1)
            flat = torch.addmm(base.reshape(1, -1).to(dtype), w, rows)
            out[key] = flat.reshape(-1, *base.shape).to(base.dtype)
        return out

    @torch.no_grad()
    def forward_many(self, coefficients: Tensor, x: Tensor, per_input: bool = False, vectorize: bool | None = None) -> Tensor:
        """The backbone under M coefficient sets (``[M, T, G]``), without gradient.

        ``x`` is shared (``[N, ...]`` → ``[M, N, ...]``: e.g. the pretrained model and every expert
        on one batch) or, with ``per_input``, input m goes through set m (``x`` ``[M, ...]`` →
        ``[M, ...]``: per-input merging). ``vectorize`` runs the sets in one ``torch.func.vmap`` pass
        (M merged copies at once) instead of one after another (one merge and one forward each).
        Default (``None``): vmap for per-input sets, a loop for a shared input, the faster of the
        two for each on a CPU (EfficientNet-Lite0 at 32 px, one thread: 16 inputs through their own
        sets 0.40 s vmapped vs 0.96 s in a loop; 4 sets over a shared batch of 64: 1.81 s vmapped
        vs 1.47 s in a loop, against 0.31 s for one plain forward)."""
        if per_input and x.shape[0] != coefficients.shape[0]:
            raise InputError(f"{coefficients.shape[0]} coefficient sets for {x.shape[0]} inputs")
        (x,), _ = self.cast_inputs((x,))
        buffers = self.current_buffers()

        def run(p: dict[str, Tensor], xi: Tensor) -> Tensor:
            return functional_call(self._arch, {**p, **buffers}, (xi,))

        if vectorize is None:
            vectorize = per_input
        if not vectorize:
            outs = []
            for m in range(coefficients.shape[0]):
                params = {k: v[0] for k, v in self.stacked_parameters(coefficients[m : m + 1]).items()}
                outs.append(run(params, x[m : m + 1] if per_input else x))
            return torch.cat(outs) if per_input else torch.stack(outs)
        params = self.stacked_parameters(coefficients)
        with warnings.catch_warnings():
            # nn.MultiheadAttention has no batching rule: vmap loops over the sets there (correct, slower)
            warnings.filterwarnings("ignore", ".*batching rule.*")
            if per_input:
                return vmap(run, in_dims=(0, 0))(params, x.unsqueeze(1)).squeeze(1)
            return vmap(run, in_dims=(0, None))(params, x)

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """Detached merged parameters and buffers, with the same keys as the base model."""
        merged = self.merged_parameters()
        buffers = self.current_buffers()
        keys = [k for k in self._arch.state_dict()]
        merged |= {alias: merged[name] for alias, name in self.tied.items()}  # tied weights: one tensor, every name
        return {k: (merged[k] if k in merged else buffers[k]).detach().clone() for k in keys}

    @torch.no_grad()
    def to_module(self) -> nn.Module:
        """A plain ``nn.Module`` (a copy of the architecture) holding the merged weights."""
        state = {**self.merged_parameters(), **self.current_buffers()}
        memo: dict[int, object] = {}
        for name, p in self._arch.named_parameters():
            memo[id(p)] = nn.Parameter(state[name].detach().clone())
        for name, b in self._arch.named_buffers():
            memo[id(b)] = state[name].detach().clone()
        return copy.deepcopy(self._arch, memo).eval()

    @torch.no_grad()
    def reestimate_buffers(self, batches: Iterable) -> int:
        """Recompute BatchNorm running statistics with the current merged weights.

        Runs the architecture in training mode (cumulative averages, momentum=None) over
        ``batches`` (each a tensor or a tuple of forward arguments) and stores the result as the
        buffers used from now on. Returns the number of batches seen.
        """
        bns = [m for m in self._arch.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        state = {**self.merged_parameters(), **{k: v.clone() for k, v in self.current_buffers().items()}}
        prefix = {id(m): n for n, m in self._arch.named_modules()}
        for m in bns:
            p = prefix[id(m)] + "." if prefix[id(m)] else ""
            if m.track_running_stats:
                state[p + "running_mean"].zero_()
                state[p + "running_var"].fill_(1.0)
                state[p + "num_batches_tracked"].zero_()
        momenta = [m.momentum for m in bns]
        seen = 0
        try:
            for m in bns:
                m.momentum = None
            self._arch.train()
            for batch in batches:
                args, _ = self.cast_inputs(tuple(batch) if isinstance(batch, (tuple, list)) else (batch,))
                functional_call(self._arch, state, args)
                seen += 1
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            self._arch.eval()
        if seen == 0:
            raise InputError("reestimate_buffers: the batch stream is empty")
        for i, k in enumerate(self.buffer_keys):
            self._tensor("_buf", i).copy_(state[k])
        return seen

    def train(self, mode: bool = True) -> "MergedModel":
        """Only the flag changes: the merged backbone always runs in eval mode (BatchNorm uses the
        policy's buffers, dropout is off); use :meth:`reestimate_buffers` to adapt statistics."""
        super().train(mode)
        self._arch.eval()
        return self

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by kind: base, task vectors, buffers, coefficients."""
        size = lambda prefix, n: sum(  # noqa: E731
            self._tensor(prefix, i).numel() * self._tensor(prefix, i).element_size() for i in range(n)
        )
        held = self._shard.nbytes() if self._shard is not None else {
            "base": size("_base", len(self.merge_keys)), "task_vectors": size("_tau", len(self.merge_keys))}
        return {
            **held,
            "buffers": size("_buf", len(self.buffer_keys)) + size("_extra", len(self.extra_buffer_keys)),
            "coefficients": self.coefficients.numel() * self.coefficients.element_size(),
        }

    def extra_repr(self) -> str:
        return (
            f"tasks={self.task_names}, granularity={self.grouping.spec!r},"
            f" coefficients={tuple(self.coefficients.shape)}, clamp={self.clamp},"
            f" simplex={self.simplex}, buffer_policy={self.buffer_policy!r}"
        )
