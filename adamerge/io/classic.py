"""Convert the classic task-vector checkpoints (whole pickled modules) to safetensors once.

The mlfoundations ``task_vectors`` and AdaMerging repositories ship a folder like::

    SRC/zeroshot.pt          pickled src.modeling.ImageEncoder (attribute ``model``: an open_clip
                             CLIP, usually with the text ``transformer`` deleted)
    SRC/<Task>/finetuned.pt  the same class, fine-tuned on <Task>
    SRC/head_<Task>.pt       pickled src.modeling.ClassificationHead (an nn.Linear subclass with a
                             ``normalize`` flag; its weight is the zero-shot text embedding times
                             CLIP's logit scale)

Accepted variations (documented behaviour):

* An expert folder may be named ``<Task>`` or ``<Task>Val`` (task_vectors trains "MNISTVal" on
  the train split minus a held-out validation part); the task is called ``<Task>`` either way.
  When both folders exist, ``<Task>/`` wins and a warning names the ignored one.
* A head is looked up as ``head_<Task>.pt``, then ``head_<Folder>.pt``, then ``head_<Task>Val.pt``.
  A task without a head is converted with a warning and ``null`` in the manifest (heads can be
  rebuilt with :func:`adamerge.io.open_clip_models.zero_shot_head`), unless
  ``require_heads=True``, which makes it an error.
* ``zeroshot.pt`` must be at the top of SRC; copies that only have ``<Task>/zeroshot.pt`` get an
  error telling which file to copy there.
* Files written with ``torch.save`` (zip or legacy format) and with plain ``pickle.dump`` (the
  older ``torch_save`` in task_vectors) are both read.

Unpickling runs code from the file, so it needs ``trust_pickle=True``. Even then no class is
imported from outside torch/numpy/the standard containers: every other class, and every
``nn.Module`` subclass (including torch's own, to avoid version skew), becomes a small stub that
just records the pickled attributes. The original ``src.modeling`` code does not need to exist.
State dicts are rebuilt from the stubs' ``_parameters``, ``_buffers`` (minus
``_non_persistent_buffers_set``) and ``_modules``, exactly like ``nn.Module.state_dict``.
"""
from __future__ import annotations

import _compat_pickle
import contextlib
import io
import os
import pickle
import shutil
import tempfile
import types
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from adamerge.errors import InputError
from adamerge.io.files import atomic_save_safetensors, atomic_write_json, sha256_file

__all__ = [
    "PickleStub",
    "load_pickled_object",
    "object_state_dict",
    "stub_class_name",
    "discover_classic",
    "convert_classic",
]

MANIFEST_FORMAT = "adamerge-classic-v1"
_ALLOWED_ROOTS = frozenset({"torch", "numpy", "collections", "builtins", "copyreg", "_codecs"})
_TRUST_HINT = (
    "re-run with --trust-pickle (trust_pickle=True) only if the files come from a trusted source"
)


# ----------------------------------------------------------------------------------------------
# Unpickling without the original classes
# ----------------------------------------------------------------------------------------------
class PickleStub:
    """Stand-in for a pickled class that is not imported; keeps the pickled state as attributes.

    Subclasses are made per original class (``__stub_module__``/``__stub_name__`` say which).
    It accepts any constructor arguments and any ``__setstate__`` payload, and list/dict style
    filling, so it can stand in for modules, transforms, enums, namespaces and the like.
    """

    __stub_module__ = ""
    __stub_name__ = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickleStub:
        obj = object.__new__(cls)
        if args or kwargs:
            obj.__dict__["_stub_args"] = (args, kwargs)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (
            state[0] is None or isinstance(state[0], dict)
        ) and (state[1] is None or isinstance(state[1], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stub_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_stub_items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("_stub_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_stub_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<stub of {stub_class_name(self)}>"


def stub_class_name(obj: Any) -> str:
    """``module.Class`` of the original class behind a stub (or of a real object)."""
    cls = type(obj)
    if issubclass(cls, PickleStub):
        return f"{cls.__stub_module__}.{cls.__stub_name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_storage_from_bytes_cpu(b: bytes) -> Any:
    """``torch.storage._load_from_bytes`` with ``map_location="cpu"`` (CUDA-saved pickles)."""
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=False)


class _StubUnpickler(pickle.Unpickler):
    """Unpickler importing only torch/numpy/builtins; all else, and nn.Modules, become stubs."""

    _stubs: dict[tuple[str, str], type] = {}

    @classmethod
    def _stub(cls, module: str, name: str) -> type:
        key = (module, name)
        if key not in cls._stubs:
            short = name.rsplit(".", 1)[-1]
            cls._stubs[key] = type(
                short,
                (PickleStub,),
                {"__stub_module__": module, "__stub_name__": name, "__module__": __name__},
            )
        return cls._stubs[key]

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_from_bytes_cpu
        # Protocol-2 pickles (torch.save's default) name Python 2 modules, e.g. __builtin__.set;
        # the C unpickler would map them inside super().find_class, too late for our check.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if module.split(".", 1)[0] not in _ALLOWED_ROOTS:
            return self._stub(module, name)
        try:
            found = super().find_class(module, name)
        except (ImportError, AttributeError):
            return self._stub(module, name)
        if isinstance(found, type) and issubclass(found, torch.nn.Module):
            return self._stub(module, name)
        return found


def _stub_pickle_load(file: Any, **kwargs: Any) -> Any:
    return _StubUnpickler(file, **kwargs).load()


# What torch.load needs from a ``pickle_module``: Unpickler, load and a __name__.
_STUB_PICKLE = types.SimpleNamespace(
    __name__="adamerge_stub_pickle", Unpickler=_StubUnpickler, load=_stub_pickle_load
)


def load_pickled_object(path: str | os.PathLike[str]) -> Any:
    """Unpickle a trusted ``.pt`` file (``torch.save`` zip/legacy, or plain ``pickle.dump``).

    Tensors land on the CPU. Classes outside torch/numpy/builtins and all ``nn.Module``
    subclasses come back as :class:`PickleStub` instances (use :func:`object_state_dict`).
    Only call this on files you trust: unpickling can still execute code.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"pickle file not found: {p}")
    try:
        with warnings.catch_warnings():
            # Legacy torch files embed module source code and torch compares it to the loaded
            # classes; stubs have none, so it would warn once per module class.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            if zipfile.is_zipfile(p):
                return torch.load(
                    str(p), map_location="cpu", weights_only=False, pickle_module=_STUB_PICKLE
                )
            with open(p, "rb") as fh:
                first = _StubUnpickler(fh).load()
            if type(first) is int and first == torch.serialization.MAGIC_NUMBER:
                # Legacy (pre-1.6) torch.save format: magic number, then object and storages.
                return torch.load(
                    str(p), map_location="cpu", weights_only=False, pickle_module=_STUB_PICKLE
                )
            return first  # a plain pickle.dump of the object
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot parse this file"
        msg = " ".join(str(err).split()) or type(err).__name__
        raise InputError(
            f"could not parse {p} as a pickled checkpoint (corrupt or truncated file?): {msg[:200]}"
        ) from err


def _is_module_like(obj: Any) -> bool:
    d = getattr(obj, "__dict__", None)
    return isinstance(d, dict) and "_parameters" in d and "_modules" in d


def _walk_module(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    if depth > 200:
        raise InputError("module nesting deeper than 200 levels (a reference cycle?)")
    if isinstance(obj, torch.nn.Module):  # a real module (not normally reached)
        for k, v in obj.state_dict(prefix=prefix).items():
            out[k] = v.detach()
        return
    d = obj.__dict__
    for name, param in (d.get("_parameters") or {}).items():
        if param is not None:
            out[prefix + name] = param.detach()
    skip = d.get("_non_persistent_buffers_set") or set()
    for name, buf in (d.get("_buffers") or {}).items():
        if buf is not None and name not in skip:
            out[prefix + name] = buf.detach()
    for name, child in (d.get("_modules") or {}).items():
        if child is not None and (_is_module_like(child) or isinstance(child, torch.nn.Module)):
            _walk_module(child, f"{prefix}{name}.", out, depth + 1)


def object_state_dict(
    obj: Any, path: str | os.PathLike[str] = "<object>"
) -> dict[str, torch.Tensor]:
    """State dict of an unpickled object: a (stubbed) module, or a mapping of tensors.

    A mapping with a ``state_dict`` or ``model`` entry is unwrapped first. ``path`` only names
    the source in error messages.
    """
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) or _is_module_like(inner):
                obj = inner
                break
    if _is_module_like(obj) or isinstance(obj, torch.nn.Module):
        out: dict[str, torch.Tensor] = {}
        _walk_module(obj, "", out)
        return out
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise InputError(
                    f"{path} is not a state dict: key {key!r} holds {type(value).__name__}, "
                    f"expected a tensor"
                )
            out[key] = value.detach()
        return out
    raise InputError(
        f"{path} holds a {stub_class_name(obj)}, which is neither an nn.Module nor a mapping of "
        f"tensors"
    )


# ----------------------------------------------------------------------------------------------
# The classic folder layout
# ----------------------------------------------------------------------------------------------
def _task_name(folder: str) -> str:
    return folder[:-3] if folder.endswith("Val") and len(folder) > 3 else folder


def discover_classic(
    src: str | os.PathLike[str], *, tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """Find ``zeroshot.pt``, experts and heads in a classic folder without unpickling anything.

    Returns ``{"zeroshot": Path, "tasks": {task: {"finetuned": Path, "head": Path | None}}}``
    with tasks sorted by name. ``tasks`` restricts (and orders) the selection.
    Raises :class:`InputError` for a missing folder, a missing ``zeroshot.pt``, no tasks, or a
    requested task that is not there.
    """
    root = Path(src)
    if not root.is_dir():
        raise InputError(f"classic checkpoint folder not found: {root}")
    found: dict[str, Path] = {}  # task -> its finetuned.pt
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        ft = child / "finetuned.pt"
        if not ft.is_file():
            continue
        task = _task_name(child.name)
        if task in found:
            other = found[task].parent
            keep, drop = (child, other) if child.name == task else (other, child)
            warnings.warn(
                f"both {keep} and {drop} hold finetuned.pt for task {task}; using {keep}",
                stacklevel=2,
            )
            found[task] = keep / "finetuned.pt"
        else:
            found[task] = ft
    zeroshot = root / "zeroshot.pt"
    if not zeroshot.is_file():
        nested = [
            p.parent / "zeroshot.pt" for p in found.values() if (p.parent / "zeroshot.pt").is_file()
        ]
        hint = f"; found {nested[0]}: copy it to {zeroshot}" if nested else ""
        raise InputError(
            f"no zeroshot.pt in {root}: expected the pretrained ImageEncoder at {zeroshot}{hint}"
        )
    if not found:
        raise InputError(
            f"no tasks found in {root}: expected folders <Task>/finetuned.pt next to zeroshot.pt"
        )
    if tasks is not None:
        tasks = [t if t in found else _task_name(t) for t in tasks]  # "MNISTVal" -> "MNIST"
        missing = [t for t in tasks if t not in found]
        if missing:
            raise InputError(
                f"task {missing[0]!r} not found in {root} (available: {', '.join(sorted(found))})"
            )
        names = list(dict.fromkeys(tasks))
    else:
        names = sorted(found)
    out: dict[str, Any] = {"zeroshot": zeroshot, "tasks": {}}
    for task in names:
        ft = found[task]
        candidates = [f"head_{task}.pt", f"head_{ft.parent.name}.pt", f"head_{task}Val.pt"]
        head = next((root / c for c in candidates if (root / c).is_file()), None)
        out["tasks"][task] = {"finetuned": ft, "head": head}
    return out


def _tower(sd: dict[str, torch.Tensor], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    if not prefix:
        return sd
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        first = next(iter(sd), None)
        raise InputError(
            f"no key in {path} starts with tower prefix {prefix!r} (first key: {first!r}); "
            f"pass the right tower_prefix"
        )
    return out


def _check_same_keys(
    base: dict[str, torch.Tensor], other: dict[str, torch.Tensor], path: Path, base_path: Path
) -> None:
    for key in base:
        if key not in other:
            raise InputError(f"{path} lacks key {key!r} that {base_path.name} has")
    for key in other:
        if key not in base:
            raise InputError(f"{path} has key {key!r} that {base_path.name} lacks")
    for key, ref in base.items():
        t = other[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise InputError(
                f"{path}: key {key!r} is {tuple(t.shape)} {t.dtype} but {tuple(ref.shape)} "
                f"{ref.dtype} in {base_path.name}"
            )


def _head_tensors(obj: Any, path: Path, dim: int | None) -> tuple[dict[str, torch.Tensor], Any]:
    """(``{"weight", "bias"?}``, normalize flag or None) of an unpickled classification head."""
    sd = object_state_dict(obj, path)
    weight = sd.get("weight")
    if weight is None or weight.ndim != 2:
        raise InputError(
            f"{path} is not a classification head: expected a 2-D 'weight' "
            f"(keys: {', '.join(list(sd)[:5]) or 'none'})"
        )
    if dim is not None and weight.shape[1] != dim:
        raise InputError(
            f"{path}: head weight is {tuple(weight.shape)} but the image tower outputs {dim} "
            f"features"
        )
    out = {"weight": weight}
    bias = sd.get("bias")
    if bias is not None:
        out["bias"] = bias
    attrs = {} if isinstance(obj, Mapping) else getattr(obj, "__dict__", {})
    normalize = attrs.get("normalize")
    return out, (bool(normalize) if normalize is not None else None)


def convert_classic(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    tower_prefix: str = "model.visual.",
    tasks: Sequence[str] | None = None,
    require_heads: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert a classic task-vector folder to safetensors state dicts plus a manifest.

    Writes ``dst/base.safetensors`` (the image tower of ``zeroshot.pt``, ``tower_prefix``
    stripped: keys like ``conv1.weight``), ``dst/experts/<Task>.safetensors``,
    ``dst/heads/<Task>.safetensors`` (``weight`` [C, D], ``bias`` if any) and
    ``dst/manifest.json`` (tasks, source paths, sha256 of sources and outputs, head normalize
    flags, key and parameter counts), and returns the manifest.

    Everything is first written into a hidden staging folder inside ``dst`` and moved into place
    only after every file converted, with the manifest last; a failure leaves ``dst`` without any
    new or partial file. An existing ``dst/manifest.json`` is an error unless ``overwrite``.
    See the module docstring for the accepted layouts; ``tasks`` picks a subset, and
    ``require_heads`` turns a missing head from a warning into an error.
    """
    layout = discover_classic(src, tasks=tasks)
    root = Path(src)
    zeroshot: Path = layout["zeroshot"]
    if require_heads:
        for task, info in layout["tasks"].items():
            if info["head"] is None:
                raise InputError(
                    f"no head for task {task} in {root}: expected {root / f'head_{task}.pt'}"
                )
    if not trust_pickle:
        raise InputError(
            f"{zeroshot} and the other files in {root} are whole pickled Python objects, which "
            f"can run arbitrary code when loaded; {_TRUST_HINT}"
        )
    out_dir = Path(dst)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output path exists and is not a folder: {out_dir}")
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise InputError(
            f"{out_dir} already holds a converted model (manifest.json); pass overwrite=True "
            f"(--overwrite) or choose another folder"
        )
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".convert-"))
    try:
        manifest = _convert_into(layout, root, staging, tower_prefix)
        for rel in manifest["outputs"]:
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, out_dir / rel)
        atomic_write_json(out_dir / "manifest.json", manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if still empty
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _convert_into(
    layout: dict[str, Any], root: Path, staging: Path, tower_prefix: str
) -> dict[str, Any]:
    zeroshot: Path = layout["zeroshot"]
    outputs: list[str] = []

    def save(rel: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
        atomic_save_safetensors(tensors, staging / rel, {"format": "pt", **meta})
        outputs.append(rel)
        return sha256_file(staging / rel)

    obj = load_pickled_object(zeroshot)
    base_class = stub_class_name(obj)
    base = _tower(object_state_dict(obj, zeroshot), tower_prefix, zeroshot)
    del obj
    proj = base.get("proj")
    feature_dim = int(proj.shape[1]) if proj is not None and proj.ndim == 2 else None
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "source": str(root.resolve()),
        "tower_prefix": tower_prefix,
        "tasks": list(layout["tasks"]),
        "num_keys": len(base),
        "num_parameters": int(sum(t.numel() for t in base.values())),
        "feature_dim": feature_dim,
        "base": {
            "source": str(zeroshot.resolve()),
            "source_sha256": sha256_file(zeroshot),
            "class": base_class,
            "path": "base.safetensors",
        },
        "experts": {},
        "heads": {},
    }
    manifest["base"]["sha256"] = save(
        "base.safetensors", base, {"role": "base", "source": zeroshot.name}
    )

    for task, info in layout["tasks"].items():
        ft: Path = info["finetuned"]
        obj = load_pickled_object(ft)
        expert_class = stub_class_name(obj)
        expert = _tower(object_state_dict(obj, ft), tower_prefix, ft)
        del obj
        _check_same_keys(base, expert, ft, zeroshot)
        rel = f"experts/{task}.safetensors"
        entry = {
            "source": str(ft.resolve()),
            "source_sha256": sha256_file(ft),
            "class": expert_class,
            "path": rel,
        }
        meta = {"role": "expert", "task": task, "source": f"{ft.parent.name}/{ft.name}"}
        entry["sha256"] = save(rel, expert, meta)
        manifest["experts"][task] = entry
        del expert

        head_path: Path | None = info["head"]
        if head_path is None:
            warnings.warn(
                f"no head for task {task} in {root} (looked for head_{task}.pt); converted the "
                f"expert without one",
                stacklevel=3,
            )
            manifest["heads"][task] = None
            continue
        obj = load_pickled_object(head_path)
        head_class = stub_class_name(obj)
        tensors, normalize = _head_tensors(obj, head_path, feature_dim)
        del obj
        rel = f"heads/{task}.safetensors"
        meta = {"role": "head", "task": task, "source": head_path.name}
        meta["normalize"] = "unknown" if normalize is None else str(normalize).lower()
        head_entry = {
            "source": str(head_path.resolve()),
            "source_sha256": sha256_file(head_path),
            "class": head_class,
            "path": rel,
            "normalize": normalize,
            "num_classes": int(tensors["weight"].shape[0]),
            "has_bias": "bias" in tensors,
        }
        head_entry["sha256"] = save(rel, tensors, meta)
        manifest["heads"][task] = head_entry
    manifest["outputs"] = outputs
    return manifest
