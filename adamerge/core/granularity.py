"""Granularity: which merge coefficient each parameter tensor (or chunk of one) uses.

A :class:`Grouping` maps every merged tensor to a coefficient group; the merged model then owns a
``[T, G]`` coefficient matrix. Names follow the ladder in the docs:

- ``task``: one group (T coefficients in all).
- ``block``: architectural blocks found from the names: the outermost ``blocks.N`` /
  ``resblocks.N`` / ``layers.N`` / ``stages.N`` / ``layerN`` container with all its indices (``blocks.2.1`` in EfficientNet, ``transformer.resblocks.7``
  in an open_clip ViT); any other tensor groups by its top-level module (``conv1``, ``ln_post``,
  ``conv_stem``...), after dropping the prefix shared by every name (``visual.``).
- ``layer``: one group per tensor. AdaMerging's "layer-wise" = aTLAS's "blockwise" = this.
- ``partition:R``: each tensor split into R contiguous chunks of its flattened elements (aTLAS
  ``--partition R``); ``partition:R:random`` assigns elements to chunks by a seeded permutation
  (equal chunk sizes); ``partition:R:atlas`` is aTLAS's own scheme: every element of a weight
  with 2+ dimensions draws an independent, uniform, seeded group index (chunk sizes vary), and
  1-D tensors (biases, norms) are not partitioned. The assignment is a pure function of the seed
  and the shapes, so a resume or an export regenerates exactly the groups the run trained.
  A tensor with fewer than R elements gets one chunk per element.
- rules: a list of ``[regex, group]`` pairs; the first regex that ``re.search``-es the name wins,
  the group may use ``\\1`` back-references; a name matching no rule is an error, so end with a
  fallback such as ``[".*", "rest"]``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adamerge.errors import InputError

Spec = str | dict | Sequence

_BLOCK_RE = re.compile(r"^(.*?\b(?:blocks|resblocks|layers|stages|layer\d*)(?:\.\d+)+)\.")


@dataclass
class Chunks:
    """Element-to-group assignment of one partitioned tensor (groups ``first .. first+count-1``)."""

    first: int
    count: int
    sizes: list[int]  # contiguous chunk sizes, sum = numel
    perm: Tensor | None = None  # random chunks: element -> position in chunk order (int32)

    def expand(self, coef: Tensor) -> Tensor:
        """``coef[:, first:first+count]`` → per-element coefficients ``[T, numel]``."""
        sizes = torch.tensor(self.sizes, device=coef.device)
        lam = coef[:, self.first : self.first + self.count].repeat_interleave(sizes, dim=1)
        if self.perm is not None:
            lam = lam[:, self.perm.to(coef.device).long()]
        return lam


@dataclass
class Grouping:
    """``group_names[g]``; ``tensor_group[key]`` = g; ``chunks[key]`` for partitioned tensors."""

    spec: str
    group_names: list[str]
    tensor_group: dict[str, int]
    chunks: dict[str, Chunks] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def members(self) -> list[list[str]]:
        """For each group, the tensor names in it (a partitioned tensor is in each of its groups)."""
        out: list[list[str]] = [[] for _ in self.group_names]
        for key, g in self.tensor_group.items():
            ch = self.chunks.get(key)
            for gi in range(ch.first, ch.first + ch.count) if ch else [g]:
                out[gi].append(key)
        return out

    def group_sizes(self, shapes: dict[str, torch.Size]) -> list[int]:
        """Number of parameter elements governed by each group."""
        sizes = [0] * self.num_groups
        for key, g in self.tensor_group.items():
            ch = self.chunks.get(key)
            if ch:
                for i, s in enumerate(ch.sizes):
                    sizes[ch.first + i] += s
            else:
                sizes[g] += int(torch.Size(shapes[key]).numel())
        return sizes


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    if len(prefix) >= min(len(p) for p in parts):  # never strip a whole name
        prefix = prefix[:-1]
    return ".".join(prefix) + "." if prefix else ""


def block_name(name: str, prefix: str = "") -> str:
    """The architectural block a parameter name belongs to (see module docstring)."""
    rel = name[len(prefix) :] if prefix and name.startswith(prefix) else name
    m = _BLOCK_RE.match(rel)
    if m:
        return m.group(1)
    return rel.split(".")[0]


def _by_label(spec: str, names: Sequence[str], labels: Sequence[str]) -> Grouping:
    group_names: list[str] = []
    index: dict[str, int] = {}
    tensor_group = {}
    for name, label in zip(names, labels):
        if label not in index:
            index[label] = len(group_names)
            group_names.append(label)
        tensor_group[name] = index[label]
    return Grouping(spec, group_names, tensor_group)


def _rules(spec_rules: Sequence, names: Sequence[str]) -> list[str]:
    if not isinstance(spec_rules, (list, tuple)):
        raise InputError(f"granularity rules must be a list of [regex, group] pairs, got {spec_rules!r}")
    compiled = []
    for i, rule in enumerate(spec_rules):
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2):
            raise InputError(f"granularity rule #{i} must be [regex, group], got {rule!r}")
        if not isinstance(rule[0], str):
            raise InputError(f"granularity rule #{i}: the regex must be a string, got {rule[0]!r}")
        try:
            compiled.append((re.compile(rule[0]), str(rule[1])))
        except re.error as err:
            raise InputError(f"granularity rule #{i}: bad regex {rule[0]!r}: {err}") from None
    labels = []
    for name in names:
        for regex, group in compiled:
            m = regex.search(name)
            if m:
                try:
                    labels.append(m.expand(group))
                except (re.error, IndexError) as err:  # e.g. \\1 in a regex without a group
                    raise InputError(f"granularity rule [{regex.pattern!r}, {group!r}]: bad group name: {err}") from None
                break
        else:
            raise InputError(
                f"parameter '{name}' matches no granularity rule; add a fallback rule like ['.*', 'rest']"
            )
    return labels


def make_grouping(spec: Spec, shapes: dict[str, torch.Size], seed: int = 0) -> Grouping:
    """Build the grouping for tensors ``shapes`` (ordered name → shape) from a spec."""
    names = list(shapes)
    if not names:
        raise InputError("there are no parameters to merge")
    if isinstance(spec, dict):
        if set(spec) != {"rules"}:
            raise InputError(f"granularity dict must be {{'rules': [...]}}, got keys {sorted(spec)}")
        return _by_label("rules", names, _rules(spec["rules"], names))
    if isinstance(spec, (list, tuple)):
        return _by_label("rules", names, _rules(spec, names))
    if not isinstance(spec, str):
        raise InputError(f"unknown granularity {spec!r}")
    if spec == "task":
        return _by_label(spec, names, ["all"] * len(names))
    if spec == "layer":
        return _by_label(spec, names, names)
    if spec == "block":
        prefix = _common_prefix(names)
        return _by_label(spec, names, [block_name(n, prefix) for n in names])
    if spec.startswith("partition:"):
        parts = spec.split(":")
        try:
            r = int(parts[1])
        except (IndexError, ValueError):
            r = 0
        mode = parts[2] if len(parts) > 2 else "contiguous"
        if r < 1 or mode not in ("contiguous", "random", "atlas") or len(parts) > 3:
            raise InputError(f"bad granularity {spec!r}: use partition:R, partition:R:random or partition:R:atlas, R >= 1")
        if mode == "atlas":
            return _atlas_partition(spec, shapes, r, seed)
        return _partition(spec, shapes, r, mode == "random", seed)
    from adamerge.registry import did_you_mean

    raise InputError(
        f"unknown granularity {spec!r}{did_you_mean(spec, ['task', 'block', 'layer', 'partition:4'])}:"
        " use task, block, layer, partition:R or a list of rules"
    )


def _atlas_partition(spec: str, shapes: dict[str, torch.Size], r: int, seed: int) -> Grouping:
    """aTLAS: an independent uniform group index per element of every 2+-D tensor."""
    gen = torch.Generator().manual_seed(seed)
    group_names: list[str] = []
    tensor_group: dict[str, int] = {}
    chunks: dict[str, Chunks] = {}
    for name, shape in shapes.items():
        shape = torch.Size(shape)
        first = len(group_names)
        tensor_group[name] = first
        if len(shape) < 2 or r == 1:
            group_names.append(name)
            continue
        n = int(shape.numel())
        label = torch.randint(0, r, (n,), generator=gen)
        counts = torch.bincount(label, minlength=r)
        used = [i for i in range(r) if counts[i] > 0]
        remap = torch.full((r,), -1, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        label = remap[label]
        order = torch.argsort(label, stable=True)  # chunk order -> element
        inv = torch.empty(n, dtype=torch.int32).scatter_(0, order, torch.arange(n, dtype=torch.int32))
        group_names.extend(f"{name}#{i}" for i in used)
        chunks[name] = Chunks(first, len(used), [int(counts[i]) for i in used], inv)
    return Grouping(spec, group_names, tensor_group, chunks)


def _partition(spec: str, shapes: dict[str, torch.Size], r: int, random: bool, seed: int) -> Grouping:
    gen = torch.Generator().manual_seed(seed)
    group_names: list[str] = []
    tensor_group: dict[str, int] = {}
    chunks: dict[str, Chunks] = {}
    for name, shape in shapes.items():
        n = int(torch.Size(shape).numel())
        count = max(1, min(r, n))
        base, rem = divmod(n, count)
        sizes = [base + (1 if i < rem else 0) for i in range(count)]
        perm = torch.randperm(n, generator=gen).to(torch.int32) if random and count > 1 else None
        # perm maps position-in-chunk-order -> element; invert so expand() indexes by element
        inv = torch.empty_like(perm).scatter_(0, perm.long(), torch.arange(n, dtype=torch.int32)) if perm is not None else None
        first = len(group_names)
        group_names.extend(f"{name}#{i}" for i in range(count))
        tensor_group[name] = first
        chunks[name] = Chunks(first, count, sizes, inv)
    return Grouping(spec, group_names, tensor_group, chunks)
