"""Load and save flat ``{name: tensor}`` state dicts with clear errors.

Reading never runs pickled code unless the caller opts in: ``.pt/.pth/.bin/.ckpt`` files are read
with ``torch.load(weights_only=True)``. Writing is always safetensors, atomically.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adamerge.errors import InputError
from adamerge.io.files import atomic_save_safetensors

__all__ = [
    "SAFETENSORS_EXTENSIONS",
    "PICKLE_EXTENSIONS",
    "load_state_dict",
    "open_state_dict",
    "TensorSource",
    "save_state_dict",
    "require_finite",
]

SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model")
_GLOBAL_RE = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _one_line(err: BaseException) -> str:
    """An exception's message squeezed onto one short line (for embedding in InputError)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_file(path: Path, what: str = "state dict") -> None:
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} path is a folder, expected a file: {path}")


def _pickled_object_error(path: Path, cls: str | None, reason: str | None = None) -> InputError:
    """The message for a pickle that weights-only loading refuses (a pickled module or object)."""
    if cls:
        what = (
            f"{path} looks like a pickled Python module/object (class {cls}), not a plain "
            f"state dict"
        )
    else:
        what = f"{path} is a pickle that weights-only loading cannot read ({reason})"
    return InputError(
        f"{what}; unpickling it can run arbitrary code. If you trust its source, convert it "
        f"once: adamerge convert {path} OUT.safetensors --trust-pickle (or pass trust_pickle=True)"
    )


_SAFE_GLOBAL_ROOTS = frozenset(
    {"torch", "collections", "builtins", "__builtin__", "_codecs", "numpy"}
)
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                         "SHORT_BINSTRING", "BINSTRING", "STRING"})


def _sniff_pickle(path: Path, limit: int = 1 << 20) -> tuple[bool, str | None]:
    """(is it pickle data?, first class/function it names outside torch/builtins), cheaply.

    Reads the ``data.pkl`` record of a torch zip file, or the first ``limit`` bytes of a legacy
    torch file / plain pickle (several consecutive pickles), and scans opcodes without executing
    anything.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return False, None
                with zf.open(name) as fh:
                    data = fh.read(limit)
        else:
            with open(path, "rb") as fh:
                data = fh.read(limit)
    except (OSError, zipfile.BadZipFile):
        return False, None
    stream = io.BytesIO(data)
    is_pickle = False
    try:
        while stream.tell() < len(data):
            recent: list[str | None] = [None, None]  # the last two values pushed
            memo: dict[int, str | None] = {}
            for i, (op, arg, _pos) in enumerate(pickletools.genops(stream)):
                name = op.name
                if i == 0 and name == "PROTO" or name == "STOP":
                    is_pickle = True
                if name in _STRING_OPS:
                    recent = [recent[-1], str(arg)]
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    recent = [recent[-1], memo.get(int(arg))]
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1]
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = recent[-1]
                elif name in ("GLOBAL", "INST", "STACK_GLOBAL"):
                    if name == "STACK_GLOBAL":
                        module, qual = recent
                    else:
                        module, _, qual = str(arg).partition(" ")
                    if module and qual and module.split(".", 1)[0] not in _SAFE_GLOBAL_ROOTS:
                        return True, f"{module}.{qual}"
                    recent = [recent[-1], None]
                elif name not in ("FRAME", "PROTO"):
                    recent = [recent[-1], None]
    except Exception:  # noqa: BLE001 - the scan window ended mid-pickle, or not a pickle at all
        pass
    return is_pickle, None


def _torch_reason(err: BaseException) -> str:
    """The informative part of torch's multi-paragraph weights-only error, on one line."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return _one_line(Exception(text))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise InputError(
            f"could not parse {path} as safetensors (corrupt or truncated file?): {_one_line(err)}"
        ) from err


def _load_pickle(path: Path, trust_pickle: bool) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocol 4+ (plain pickle.dump files) before failing.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if trust_pickle:  # the safe reader failed; the caller vouches for the file
            from adamerge.io.classic import load_pickled_object, object_state_dict

            return object_state_dict(load_pickled_object(path), path)
        match = _GLOBAL_RE.search(str(err))
        if match:
            raise _pickled_object_error(path, match.group(1)) from err
        is_pickle, cls = _sniff_pickle(path)
        if is_pickle and cls:
            raise _pickled_object_error(path, cls) from err
        if is_pickle and "Unsupported operand" in str(err):
            raise _pickled_object_error(path, None, _torch_reason(err)) from err
        raise InputError(
            f"could not parse {path} as a PyTorch checkpoint (corrupt or truncated file?): "
            f"{_torch_reason(err)}"
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise InputError(
            f"could not parse {path} as a PyTorch checkpoint (corrupt or truncated file?): "
            f"{_one_line(err)}"
        ) from err


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` and check it maps str to tensors."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise InputError(
            f"{path} holds a {type(obj).__name__}, expected a mapping of parameter names to "
            f"tensors (a state dict)"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise InputError(f"{path} is not a state dict: key {key!r} is not a string")
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"{path} is not a state dict: key '{key}' holds {type(value).__name__}, "
                f"expected a tensor"
            )
        out[key] = value.detach() if isinstance(value, torch.nn.Parameter) else value
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` state dict on the CPU, with one-line errors naming the file.

    * ``.safetensors`` is read with safetensors.
    * ``.pt/.pth/.bin/.ckpt`` is read with ``torch.load(map_location="cpu", weights_only=True)``.
      A file holding a whole pickled module/object is refused (it can run code when loaded) with
      a pointer to ``adamerge convert SRC DST --trust-pickle``. With ``trust_pickle=True`` such
      files are unpickled without importing their classes (see
      :func:`adamerge.io.classic.load_pickled_object`) and a module's state dict is rebuilt.
    * A top-level ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is unwrapped, and a
      ``module.`` prefix on every key (DistributedDataParallel) is stripped.
    * ``prefix`` (e.g. ``"visual."``) keeps only keys starting with it and strips it.

    Raises :class:`InputError` for a missing file, an unknown extension, a corrupt or truncated
    file, a pickled module without ``trust_pickle``, a file that is not a mapping of tensors, and
    a state dict that is empty (after prefix filtering).
    """
    p = Path(path)
    _check_file(p)
    ext = p.suffix.lower()
    if ext in SAFETENSORS_EXTENSIONS:
        raw: Any = _load_safetensors(p)
    elif ext in PICKLE_EXTENSIONS:
        raw = _load_pickle(p, trust_pickle)
    else:
        allowed = ", ".join(SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS)
        raise InputError(
            f"unknown weight file extension {ext or '(none)'!r} for {p}: expected one of {allowed}"
        )
    sd = _as_state_dict(raw, p)
    if not sd:
        raise InputError(f"{p} holds no tensors (empty state dict)")
    if prefix:
        first = next(iter(sd))
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise InputError(
                f"no key in {p} starts with prefix {prefix!r} (first key: {first!r})"
            )
    return sd


class TensorSource:
    """A state dict read one tensor at a time: its keys, each tensor's shape and dtype without
    reading it, and a tensor when asked. A safetensors file is read lazily (only the header until a
    tensor is asked for), so building task vectors holds one expert tensor at a time, not a whole
    expert; any other source is a state dict already in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """``(shape, dtype)`` of ``key``, without reading its values."""
        v = self._tensors[key]
        return tuple(v.shape), v.dtype

    def tensor(self, key: str) -> torch.Tensor:
        return self._tensors[key]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class _LazySafetensors(TensorSource):
    def __init__(self, path: Path, prefix: str | None) -> None:
        from safetensors import SafetensorError, safe_open

        super().__init__(None)
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            names = list(self._file.keys())
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise InputError(f"could not parse {path} as safetensors (corrupt or truncated file?): {_one_line(err)}") from err
        if not names:
            raise InputError(f"{path} holds no tensors (empty state dict)")
        keys = {n: n for n in names}
        if all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
            keys = {k[len("module."):]: n for k, n in keys.items()}
        if prefix:
            first = next(iter(keys))
            keys = {k[len(prefix):]: n for k, n in keys.items() if k.startswith(prefix)}
            if not keys:
                raise InputError(f"no key in {path} starts with prefix {prefix!r} (first key: {first!r})")
        self._names = keys
        self._path = path

    def keys(self) -> list[str]:
        return list(self._names)

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        piece = self._file.get_slice(self._names[key])
        code = piece.get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            return tuple(self.tensor(key).shape), self.tensor(key).dtype
        return tuple(piece.get_shape()), _SAFETENSORS_DTYPES[code]

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self._file.get_tensor(self._names[key])
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise InputError(f"could not read tensor '{key}' of {self._path} (corrupt or truncated file?): "
                             f"{_one_line(err)}") from err


def open_state_dict(path: str | os.PathLike[str], *, prefix: str | None = None) -> TensorSource:
    """:func:`load_state_dict`'s state dict as a :class:`TensorSource`: a ``.safetensors`` file is
    read one tensor at a time (same key handling: a ``module.`` prefix on every key stripped,
    ``prefix`` kept and stripped); any other format is loaded whole by :func:`load_state_dict`."""
    p = Path(path)
    _check_file(p)
    if p.suffix.lower() in SAFETENSORS_EXTENSIONS:
        return _LazySafetensors(p, prefix)
    return TensorSource(load_state_dict(p, prefix=prefix))


def require_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`InputError` naming the first floating tensor of ``sd`` that holds NaN or inf
    (``source`` says where the tensors come from, e.g. the file)."""
    for key, value in sd.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise InputError(f"{source}: tensor '{key}' has non-finite values (NaN or inf)")


def save_state_dict(
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a state dict as ``.safetensors`` atomically (the only format adamerge writes).

    Tensors are made contiguous and un-shared; ``metadata`` must map str to str.
    """
    p = Path(path)
    if p.suffix.lower() not in SAFETENSORS_EXTENSIONS:
        raise InputError(
            f"state dicts are saved as safetensors; the name must end in .safetensors: {p}"
        )
    if not sd:
        raise InputError(f"refusing to write an empty state dict to {p}")
    atomic_save_safetensors(sd, p, metadata)
