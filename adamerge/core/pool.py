"""A pool of candidate checkpoints read one tensor at a time from memory-mapped safetensors.

FW-Merging chooses among candidates that may be irrelevant (unrelated fine-tunes, other seeds),
so the pool may be large. Nothing here holds a whole candidate: :meth:`CheckpointPool.tensors`
opens a candidate's file (memory-mapped), hands out its tensors one by one and closes it, so
memory stays constant as the pool grows. The pool counts the bytes of the tensors it has handed
out and not yet taken back (``live_bytes``) and their peak, which the tests and the benchmark read.

Headers are validated when the pool is opened (keys, shapes, dtypes against the base: a wrong
candidate fails before any work); values are checked for NaN/Inf as they are read.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from adamerge.errors import InputError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointPool:
    """Candidates ``{name: path}`` over the base state ``base``; ``keys`` are the tensors merged."""

    def __init__(self, candidates: Mapping[str, str | Path], base: Mapping[str, Tensor], keys: list[str],
                 prefix: str | None = None) -> None:
        if not candidates:
            raise InputError("the pool is empty: give at least one candidate checkpoint")
        self.names = list(candidates)
        self.paths = [Path(p) for p in candidates.values()]
        self.base, self.keys, self.prefix = base, list(keys), prefix or ""
        self.live_bytes = 0
        self.peak_live_bytes = 0
        self.bytes_read = 0
        for name, path in zip(self.names, self.paths):
            self._check_header(name, path)

    def __len__(self) -> int:
        return len(self.names)

    def _check_header(self, name: str, path: Path) -> None:
        from safetensors import safe_open

        if path.suffix != ".safetensors":
            raise InputError(f"pool candidate '{name}': {path} is not a .safetensors file (adamerge convert turns a"
                             " pickled checkpoint into one); the pool reads candidates memory-mapped")
        if not path.is_file():
            raise InputError(f"pool candidate '{name}': {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for k in self.keys:
                    if self.prefix + k not in present:
                        raise InputError(f"pool candidate '{name}' ({path}): missing tensor '{self.prefix + k}'")
                    sl = f.get_slice(self.prefix + k)
                    shape, dtype = tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype())
                    ref = self.base[k]
                    if shape != tuple(ref.shape):
                        raise InputError(f"pool candidate '{name}' ({path}): tensor '{k}' has shape {shape}, the base"
                                         f" has {tuple(ref.shape)} (a different architecture?)")
                    if dtype != ref.dtype:
                        raise InputError(f"pool candidate '{name}' ({path}): tensor '{k}' has dtype {sl.get_dtype()},"
                                         f" the base has {ref.dtype}")
        except InputError:
            raise
        except Exception as err:  # truncated or corrupt header
            raise InputError(f"pool candidate '{name}': cannot read {path}: {err}") from None

    def tensors(self, c: int) -> Iterator[tuple[str, Tensor]]:
        """Candidate ``c``'s merged tensors, one at a time (the consumer drops each before the next)."""
        from safetensors import safe_open

        path = self.paths[c]
        with safe_open(str(path), framework="pt") as f:
            for k in self.keys:
                t = f.get_tensor(self.prefix + k)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise InputError(f"pool candidate '{self.names[c]}' ({path}): tensor '{k}' has non-finite values")
                n = t.numel() * t.element_size()
                self.bytes_read += n
                self.live_bytes += n
                self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
                try:
                    yield k, t
                finally:
                    self.live_bytes -= n
                del t

    def state_dict(self, c: int) -> dict[str, Tensor]:
        """The whole of candidate ``c`` (merged keys; others from the base): for small sets only."""
        out = {k: v for k, v in self.base.items() if k not in set(self.keys)}
        for k, t in self.tensors(c):
            out[k] = t.clone()
        return out

    @torch.no_grad()
    def merge(self, coefficients: Tensor) -> dict[str, Tensor]:
        """``θ0 + Σ_c λ[c, k] · (θ_c,k − θ0,k)`` for every merged key k (``coefficients`` ``[C, K]``),
        streaming the candidates; accumulated in float64, returned in the base dtype."""
        if tuple(coefficients.shape) != (len(self), len(self.keys)):
            raise InputError(f"pool coefficients must be [{len(self)}, {len(self.keys)}], got {tuple(coefficients.shape)}")
        acc = {k: torch.zeros(self.base[k].shape, dtype=torch.float64) for k in self.keys}
        lam = coefficients.to(torch.float64)
        for c in range(len(self)):
            if not bool((lam[c] != 0).any()):
                continue  # never chosen: never read
            for i, (k, t) in enumerate(self.tensors(c)):
                if lam[c, i] != 0:
                    acc[k].add_(t.to(torch.float64) - self.base[k].to(torch.float64), alpha=float(lam[c, i]))
        return {k: (self.base[k].to(torch.float64) + acc[k]).to(self.base[k].dtype) for k in self.keys}
