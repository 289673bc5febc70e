"""The data-free merge registry and the one result every merge returns.

A merge is a pure tensor function over stacked task vectors ``{key: Tensor[T, *shape]}`` (no
I/O, no modules) registered with :func:`register_merge` together with its options dataclass.
It returns a :class:`MergeResult` in one factored form,

    θ = θ0 + Σ_t c[key][t] · w[key][t] ⊙ τ'_t

- ``vectors`` τ': the task vectors the merge rewrites (trimmed, masked, dropped...); a merge that
  does not rewrite returns its input. This part is what ``preprocess`` hands a learned method.
- ``coefficients`` c: one scalar per task and tensor (λ, LiNeS's depth profile). This part is
  what ``init: {merge: ...}`` hands a learned method as its starting coefficients.
- ``weights`` w: optional element weights broadcastable to ``[T, *shape]`` (TIES's disjoint mean,
  PCB's balanced scores, Fisher's normalised diagonal); only the data-free merge itself uses them.

A merge that needs data (Fisher) also registers an ``estimate`` function that computes its extra
inputs from the model, heads and unlabeled streams; the tensor function stays pure.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from adamerge.checks import check_number, option, parse_options  # noqa: F401  (the shared checks, for the merges)
from adamerge.errors import InputError
from adamerge.registry import Registry

Stacks = Mapping[str, Tensor]


def f32(t: Tensor) -> Tensor:
    """Half-precision stacks are computed in float32; other dtypes are kept."""
    return t.to(torch.float32) if t.dtype in (torch.bfloat16, torch.float16) else t


@dataclass
class MergeResult:
    """``θ0 + Σ_t coefficients[k][t] · weights[k][t] ⊙ vectors[k][t]`` for every key ``k``."""

    vectors: dict[str, Tensor]
    coefficients: dict[str, Tensor]  # key -> [T] (float64: exact for a float64 merge, cast at merge time)
    weights: dict[str, Tensor] = field(default_factory=dict)  # key -> broadcastable to [T, *shape]

    def delta(self) -> dict[str, Tensor]:
        """The merged update per key (float32 for half-precision stacks)."""
        out = {}
        for k, v in self.vectors.items():
            v = f32(v)
            c = self.coefficients[k].to(v.dtype).reshape(-1, *([1] * (v.dim() - 1)))
            w = self.weights.get(k)
            out[k] = (c * v if w is None else c * w.to(v.dtype) * v).sum(0)
        return out


def constant_coefficients(stacks: Stacks, value: float | Tensor) -> dict[str, Tensor]:
    """The same coefficient (a float, or one per task) for every key."""
    T = next(iter(stacks.values())).shape[0]
    c = torch.as_tensor(value, dtype=torch.float64).expand(T).clone()
    return {k: c for k in stacks}


@dataclass(frozen=True)
class MergeSpec:
    """A registered merge: its function, options dataclass and capabilities."""

    name: str
    fn: Callable[..., MergeResult]
    Options: type
    rewrites: bool  # rewrites the task vectors, so it can serve as ``preprocess``
    estimate: Callable[..., dict] | None  # (model, tv, heads, streams, options, keys) -> extra inputs
    description: str

    @property
    def needs_data(self) -> bool:
        return self.estimate is not None

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.Options)]

    def options(self, values: Mapping[str, Any] | None = None) -> Any:
        """The validated options (unknown keys and bad values are one-line :class:`InputError` s),
        parsed by type with :func:`adamerge.checks.parse_options`."""
        if values is not None and not isinstance(values, Mapping):
            raise InputError(f"merge '{self.name}': options must be a mapping, got {values!r}")
        return parse_options(self.Options, dict(values or {}), f"merge '{self.name}'")

    def run(self, stacks: Stacks, options: Any, **data: Any) -> MergeResult:
        """Apply the merge to parameter stacks with validated options (and estimated data).
        The pure function: a result that keeps nothing is returned as it is (see :meth:`apply`)."""
        if not stacks:
            raise InputError(f"merge '{self.name}': there are no task vectors to merge")
        return self.fn(stacks, options, **data)

    def check_fit(self, options: Any, tasks: int, entries: int) -> None:
        """The options fit ``tasks`` task vectors of ``entries`` parameter entries each (e.g.
        consensus ``k <= T``, a TIES density that keeps an entry): ``Options.check_fit``, if any."""
        fit = getattr(options, "check_fit", None)
        if fit is not None:
            try:
                fit(tasks, entries)
            except InputError as err:
                raise InputError(f"merge '{self.name}': {err}") from None

    def apply(self, stacks: Stacks, options: Any, **data: Any) -> MergeResult:
        """:meth:`run` as the commands use it (``eval --method``, ``preprocess``): the options must
        fit the stacks (``Options.check_fit(tasks, entries)``, e.g. consensus ``k <= T``), and a
        rewriting merge must keep some entry of the task vectors: one that keeps none would score
        the pretrained model under the merge's name, so it is refused in one line."""
        if not stacks:
            raise InputError(f"merge '{self.name}': there are no task vectors to merge")
        tasks = next(iter(stacks.values())).shape[0]
        entries = sum(v[0].numel() for v in stacks.values())
        self.check_fit(options, tasks, entries)
        result = self.fn(stacks, options, **data)
        if self.rewrites and any(bool(v.any()) for v in stacks.values()):
            if not any(bool(result.vectors[k].any()) for k in stacks if k in result.vectors):
                hint = getattr(options, "KEEPS_NOTHING", "")
                shown = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(options).items())
                raise InputError(f"merge '{self.name}' with {shown} keeps no entry of any task vector ({tasks} tasks, "
                                 f"{entries} entries each): the merge would be the pretrained model"
                                 + (f"; {hint}" if hint else ""))
        return result


MERGES: Registry[MergeSpec] = Registry("data-free merge")


def register_merge(name: str, options: type, *, rewrites: bool = False, estimate: Callable | None = None,
                   description: str = "") -> Callable:
    """Function decorator: ``@register_merge("ties", TiesOptions, rewrites=True)``. A duplicate
    name is an error."""

    def wrap(fn: Callable[..., MergeResult]) -> Callable[..., MergeResult]:
        doc = (fn.__doc__ or "").strip().splitlines()
        MERGES.add(name, MergeSpec(name, fn, options, rewrites, estimate, description or (doc[0] if doc else "")))
        return fn

    return wrap


def list_merges() -> list[str]:
    """The registered data-free merges, sorted."""
    return MERGES.names()


def get_merge(name: str) -> MergeSpec:
    """The registered merge ``name`` (an unknown name is an error with a did-you-mean)."""
    return MERGES.get(name)


def merge_request(value: Any, role: str) -> tuple[MergeSpec, Any]:
    """Parse a method option that names a merge, ``"NAME"`` or ``{"merge": NAME, **options}``,
    into (spec, validated options). ``role`` is ``preprocess`` (the merge must rewrite the task
    vectors) or ``init``; neither may need data (a learned method's hooks see no streams)."""
    if isinstance(value, str):
        value = {"merge": value}
    if not isinstance(value, Mapping) or "merge" not in value:
        raise InputError(f"option '{role}' must be a merge name or {{merge: NAME, ...options}}, got {value!r}")
    options = {k: v for k, v in value.items() if k != "merge"}
    spec = get_merge(value["merge"])
    if spec.needs_data:
        raise InputError(f"option '{role}': merge '{spec.name}' needs data (model, heads and streams); use it with eval --method")
    if role == "preprocess" and not spec.rewrites:
        rewriting = [n for n in list_merges() if MERGES.get(n).rewrites]
        raise InputError(f"option 'preprocess': merge '{spec.name}' does not rewrite the task vectors; choose from {rewriting} (or use it as init)")
    return spec, spec.options(options)


