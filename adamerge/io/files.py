"""Atomic file writes and file hashing.

Every output adamerge writes goes through here: the data is written to a temporary file in the
destination folder, flushed and fsync'ed, then moved over the target with ``os.replace`` (atomic on
POSIX and Windows when both names are on one filesystem). A crash or an exception mid-way leaves
either the old file or the new one, never a truncated file, and the temporary file is removed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_safetensors",
    "sha256_file",
    "os_message",
    "check_folder_path",
    "make_folders",
    "remove_folders",
    "folder_lock",
]

_TMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # fallback: briefly set, then restore
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and move it over ``path``.

    The caller writes the complete file to the yielded path (any writer that takes a file name
    works, e.g. ``safetensors.torch.save_file``). If the block raises, the temporary file is
    deleted and ``path`` is untouched. Parent folders are created. The final file gets the usual
    permissions (0o666 minus the umask), not the 0o600 that ``mkstemp`` uses.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=_TMP_SUFFIX
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = False
) -> None:
    """Write ``obj`` as indented JSON (indent 2, trailing newline) to ``path`` atomically.

    The object is serialised before anything touches the disk, so an unserialisable object
    raises ``TypeError`` and leaves no file behind.
    """
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors with no two sharing storage (safetensors refuses that)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"safetensors keys must be str, got {type(key).__name__}: {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"value of {key!r} is {type(value).__name__}, expected a tensor")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        shared = ptr != 0 and ptr in seen_storages
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if shared or not whole or not t.is_contiguous():
            # A private, exactly sized copy: un-shares tied weights and drops unused storage.
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr:
            seen_storages.add(ptr)
        out[key] = t
    return out


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save ``tensors`` as a safetensors file atomically.

    Tensors are moved to the CPU and made contiguous; tensors that share storage (tied weights,
    views) are copied so each key owns its data. ``metadata`` must map str to str (a safetensors
    rule); anything else raises ``TypeError`` before the disk is touched.
    """
    from safetensors.torch import save_file

    meta: dict[str, str] | None = None
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(
                    f"safetensors metadata must map str to str; got {k!r}: {type(v).__name__}"
                )
        meta = dict(metadata)
    prepared = _prepare_tensors(tensors)
    with atomic_path(path) as tmp:
        save_file(prepared, str(tmp), metadata=meta)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20, digest=None) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (constant memory); with ``digest`` (a
    ``hashlib`` object) the bytes are added to it, e.g. to hash several files as one."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------ folders
def os_message(err: OSError) -> str:
    """An OS error on one line: what happened and to which file."""
    what = err.strerror or type(err).__name__
    return f"{what} ({err.filename})" if err.filename else what


def check_folder_path(path: Path, what: str) -> None:
    """``path`` is a folder or can be made one: neither it nor a parent is a file (``what`` names
    it in the error, e.g. ``--out`` or ``run_dir``)."""
    from adamerge.errors import InputError

    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{what} {path}: {parent} is a file, not a folder")
            break


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders created, deepest first
    (:func:`remove_folders` takes them away again after a refusal). A file in the way, or an OS
    refusal, is a one-line error and leaves nothing created."""
    from adamerge.errors import InputError

    missing: list[Path] = []
    p = folder
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise InputError(f"cannot create the folder {folder}: {p} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        remove_folders(missing)
        raise InputError(f"cannot create the folder {folder}: {os_message(err)}") from None
    return missing


def remove_folders(created: list[Path]) -> None:
    """Remove the folders :func:`make_folders` created, deepest first, as far as they are empty."""
    for d in created:
        try:
            d.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def folder_lock(folder: Path, busy: str | None) -> Iterator[None]:
    """An exclusive lock on ``folder`` (``flock`` on the folder itself: no lock file is left) while
    the block runs. ``busy``: the error when another process holds it (do not wait); ``None``:
    wait for it. Where the OS or file system has no such locks, the block runs unlocked."""
    from adamerge.errors import InputError

    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise InputError(busy) from None
        except OSError:
            pass  # no flock on this file system (some network ones): unlocked
        yield
    finally:
        os.close(fd)
