"""Tests for adamerge.io: atomic files, state dicts, open_clip helpers, classic conversion.

Everything is built from a tiny open_clip config registered from a JSON file written here; no
weights are downloaded.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
import shutil
import stat
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adamerge  # noqa: F401  (applies the torchvision fix before open_clip is imported)
import open_clip
from adamerge.errors import InputError
from adamerge.io import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    convert_classic,
    create_open_clip,
    load_pickled_object,
    load_state_dict,
    object_state_dict,
    register_model_config,
    save_state_dict,
    sha256_file,
    zero_shot_head,
)
from adamerge.io import classic as classic_mod
from adamerge.io.files import atomic_path

TINY = "adamerge-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    # vocab 49408 is required: the default SimpleTokenizer emits ids up to 49407 and open_clip
    # pools the text tower at the argmax id (the end-of-text token).
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _leftovers(folder: Path) -> list[str]:
    """Hidden temp files/folders (atomic-write or staging leftovers) anywhere under folder."""
    return [str(p) for p in folder.rglob(".*")]


# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny registered open_clip model, and the fake classic ``src.modeling`` classes
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    cfg_file = tmp_path_factory.mktemp("cfg") / f"{TINY}.json"
    cfg_file.write_text(json.dumps(TINY_CFG))
    assert register_model_config(cfg_file) == [TINY]
    assert TINY in open_clip.list_models()
    return TINY


@pytest.fixture(scope="module")
def tiny_clip(tiny_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = create_open_clip(tiny_name, tower="full")
    return model


class ImageEncoder(torch.nn.Module):
    """Mimics task_vectors' src.modeling.ImageEncoder (text transformer deleted)."""

    def __init__(self, clip: torch.nn.Module, preprocess: object, keep_lang: bool = False):
        super().__init__()
        self.model = clip
        self.train_preprocess = preprocess
        self.val_preprocess = preprocess
        self.cache_dir = "/nonexistent/cache"
        if not keep_lang and hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    """Mimics task_vectors' src.modeling.ClassificationHead."""

    def __init__(self, normalize: bool, weights: torch.Tensor, biases: torch.Tensor | None = None):
        out_size, in_size = weights.shape
        super().__init__(in_size, out_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        b = biases.clone() if biases is not None else torch.zeros_like(self.bias)
        self.bias = torch.nn.Parameter(b)


for _cls in (ImageEncoder, ClassificationHead):
    _cls.__module__ = "src.modeling"


@contextlib.contextmanager
def fake_src_modeling():
    """Make ``src.modeling`` importable only while pickling (as in the original repos)."""
    src = types.ModuleType("src")
    modeling = types.ModuleType("src.modeling")
    modeling.ImageEncoder = ImageEncoder
    modeling.ClassificationHead = ClassificationHead
    src.modeling = modeling
    sys.modules["src"], sys.modules["src.modeling"] = src, modeling
    try:
        yield
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]


def _make_encoder(tiny_name: str, seed: int) -> ImageEncoder:
    torch.manual_seed(seed)
    clip, pre = create_open_clip(tiny_name, tower="full")
    return ImageEncoder(clip, pre)


def _make_expert(base: ImageEncoder, seed: int) -> ImageEncoder:
    """A fine-tuned copy: base + a small random perturbation of every parameter."""
    torch.manual_seed(seed)
    expert = copy.deepcopy(base)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return expert


def _save_pickle(obj: object, path: Path, fmt: str = "zip") -> None:
    """Pickle like the classic repos: torch.save (zip or pre-1.6 legacy) or plain pickle.dump."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with fake_src_modeling(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        if fmt == "raw":  # the older task_vectors torch_save
            with open(path, "wb") as fh:
                pickle.dump(obj, fh)
        else:
            torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")


@pytest.fixture(scope="module")
def classic_src(tmp_path_factory: pytest.TempPathFactory, tiny_name: str) -> dict:
    """A classic layout: zeroshot.pt, Cars/ (torch.save), MNISTVal/ (plain pickle), DTD/ (legacy
    torch.save format), and head_<Task>.pt saved the same way as the expert."""
    root = tmp_path_factory.mktemp("classic")
    zs = _make_encoder(tiny_name, seed=1)
    _save_pickle(zs, root / "zeroshot.pt")
    experts, heads = {}, {}
    layout = {"Cars": ("Cars", "zip"), "DTD": ("DTD", "legacy"), "MNIST": ("MNISTVal", "raw")}
    for i, (task, (folder, fmt)) in enumerate(layout.items()):
        enc = _make_expert(zs, seed=10 + i)
        _save_pickle(enc, root / folder / "finetuned.pt", fmt)
        experts[task] = enc
        torch.manual_seed(100 + i)
        head = ClassificationHead(normalize=True, weights=torch.randn(3 + i, 32),
                                  biases=torch.randn(3 + i) if task == "DTD" else None)
        _save_pickle(head, root / f"head_{task}.pt", fmt)
        heads[task] = head
    assert "src.modeling" not in sys.modules
    return {"root": root, "zeroshot": zs, "experts": experts, "heads": heads}


@pytest.fixture(scope="module")
def converted(classic_src: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("converted") / "out"
    manifest = convert_classic(classic_src["root"], dst, trust_pickle=True)
    return dst, manifest


# ----------------------------------------------------------------------------------------------
# files.py
# ----------------------------------------------------------------------------------------------
def test_atomic_writes_roundtrip_and_permissions(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1} and text.index('"a"') < text.index('"b"')
    assert text.endswith("\n") and '\n  "a"' in text  # indent 2
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o666 & ~umask
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_atomic_save_safetensors_unshares_and_contiguous(tmp_path: Path) -> None:
    w = torch.randn(4, 3)
    tensors = {"w": w, "tied": w, "t": w.t(), "row": w[1], "i": torch.arange(5)}
    path = tmp_path / "x.safetensors"
    atomic_save_safetensors(tensors, path, {"k": "v"})
    back = load_file(path)
    for k, v in tensors.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"k": "v"}
    assert torch.equal(w, tensors["w"])  # input untouched
    with pytest.raises(TypeError, match="str to str"):
        atomic_save_safetensors({"w": w}, tmp_path / "y.safetensors", {"k": 1})  # type: ignore[dict-item]
    assert not (tmp_path / "y.safetensors").exists() and _leftovers(tmp_path) == []


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# state_dicts.py
# ----------------------------------------------------------------------------------------------
def _sd() -> dict[str, torch.Tensor]:
    return {"visual.conv1.weight": torch.randn(2, 3), "visual.proj": torch.randn(3),
            "logit_scale": torch.tensor(1.0), "step": torch.tensor([3], dtype=torch.int64)}


def _assert_sd_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k


def test_safetensors_roundtrip_with_metadata(tmp_path: Path) -> None:
    sd = _sd()
    save_state_dict(sd, tmp_path / "m.safetensors", metadata={"role": "base"})
    _assert_sd_equal(load_state_dict(tmp_path / "m.safetensors"), sd)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as fh:
        assert fh.metadata()["role"] == "base"


@pytest.mark.parametrize("wrap", ["none", "state_dict", "model", "module"])
@pytest.mark.parametrize("ext", [".pt", ".pth", ".bin", ".ckpt"])
def test_pickle_extensions_and_wrappers(tmp_path: Path, wrap: str, ext: str) -> None:
    sd = _sd()
    obj: object = {
        "none": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "module": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / f"m{ext}")
    _assert_sd_equal(load_state_dict(tmp_path / f"m{ext}"), sd)


def test_prefix_filters_and_strips(tmp_path: Path) -> None:
    sd = _sd()
    torch.save(sd, tmp_path / "m.pt")
    out = load_state_dict(tmp_path / "m.pt", prefix="visual.")
    assert set(out) == {"conv1.weight", "proj"}
    assert torch.equal(out["proj"], sd["visual.proj"])
    with pytest.raises(InputError, match=r"no key in .*m\.pt starts with prefix 'text\.'"):
        load_state_dict(tmp_path / "m.pt", prefix="text.")


def test_load_state_dict_errors(tmp_path: Path) -> None:
    def err(path: Path, **kw: object) -> str:
        with pytest.raises(InputError) as info:
            load_state_dict(path, **kw)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg
        return msg

    assert "not found" in err(tmp_path / "missing.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    assert "unknown weight file extension '.npz'" in err(tmp_path / "w.npz")
    assert "folder" in err(tmp_path)

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(100, 100)}, str(good))
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    assert "could not parse" in err(tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 7)
    assert "could not parse" in err(tmp_path / "garbage.safetensors")

    torch.save(_sd(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    assert "could not parse" in err(tmp_path / "trunc.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    assert "could not parse" in err(tmp_path / "garbage.pt")
    for bad in ("trunc.pt", "garbage.pt"):
        assert "could not parse" in err(tmp_path / bad, trust_pickle=True)

    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "expected a mapping" in err(tmp_path / "list.pt")
    torch.save({"w": torch.zeros(1), "epoch": 3}, tmp_path / "mixed.pt")
    assert "key 'epoch' holds int" in err(tmp_path / "mixed.pt")
    torch.save({}, tmp_path / "empty.pt")
    assert "no tensors" in err(tmp_path / "empty.pt")

    # A whole pickled module: weights_only refuses it; point to the convert command.
    lin = ClassificationHead(True, torch.randn(2, 4))
    _save_pickle(lin, tmp_path / "module.pt")
    msg = err(tmp_path / "module.pt")
    assert "pickled" in msg and "adamerge convert" in msg and "--trust-pickle" in msg
    assert "src.modeling.ClassificationHead" in msg
    for fmt in ("raw", "legacy"):
        _save_pickle(lin, tmp_path / f"module_{fmt}.pt", fmt)
        msg = err(tmp_path / f"module_{fmt}.pt")
        assert "src.modeling.ClassificationHead" in msg and "--trust-pickle" in msg
    # ... and trust_pickle reads it without src.modeling being importable.
    out = load_state_dict(tmp_path / "module.pt", trust_pickle=True)
    _assert_sd_equal(out, {"weight": lin.weight.detach(), "bias": lin.bias.detach()})


def test_save_state_dict_requires_safetensors_name(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\.safetensors"):
        save_state_dict({"a": torch.zeros(1)}, tmp_path / "a.pt")
    assert not (tmp_path / "a.pt").exists()


# ----------------------------------------------------------------------------------------------
# open_clip_models.py
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_create_open_clip_full_checkpoint(tmp_path: Path, tiny_name: str, tiny_clip, fmt: str) -> None:
    path = tmp_path / f"full.{fmt}"
    sd = tiny_clip.state_dict()
    torch.save(sd, path) if fmt == "pt" else save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(path))
    visual, preprocess = create_open_clip(tiny_name, path)
    _assert_sd_equal(visual.state_dict(), tiny_clip.visual.state_dict())
    assert not visual.training and callable(preprocess)
    full, _ = create_open_clip(tiny_name, path, tower="full")
    _assert_sd_equal(full.state_dict(), sd)


def test_create_open_clip_visual_only_checkpoint(tmp_path: Path, tiny_name: str, tiny_clip) -> None:
    vsd = tiny_clip.visual.state_dict()
    save_state_dict(vsd, tmp_path / "v.safetensors")
    visual, _ = create_open_clip(tiny_name, tmp_path / "v.safetensors")
    _assert_sd_equal(visual.state_dict(), vsd)
    torch.save({f"visual.{k}": v for k, v in vsd.items()}, tmp_path / "vp.pt")
    visual2, _ = create_open_clip(tiny_name, str(tmp_path / "vp.pt"))
    _assert_sd_equal(visual2.state_dict(), vsd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(visual(x), tiny_clip.eval().visual(x))
    with pytest.raises(InputError, match="only the image tower"):
        create_open_clip(tiny_name, tmp_path / "v.safetensors", tower="full")


def test_create_open_clip_mismatch_errors(tmp_path: Path, tiny_name: str, tiny_clip) -> None:
    vsd = dict(tiny_clip.visual.state_dict())
    missing = {k: v for k, v in vsd.items() if k != "ln_post.weight"}
    save_state_dict(missing, tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match=r"missing\.safetensors.*missing key 'ln_post\.weight'"):
        create_open_clip(tiny_name, tmp_path / "missing.safetensors")
    save_state_dict({**vsd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(InputError, match="unexpected key 'extra.weight'"):
        create_open_clip(tiny_name, tmp_path / "extra.safetensors")
    save_state_dict({**vsd, "proj": torch.zeros(64, 7)}, tmp_path / "shape.safetensors")
    with pytest.raises(InputError, match=r"key 'proj' has shape \(64, 7\)"):
        create_open_clip(tiny_name, tmp_path / "shape.safetensors")
    full = {k: v for k, v in tiny_clip.state_dict().items() if k != "text_projection"}
    torch.save(full, tmp_path / "full_missing.pt")
    with pytest.raises(InputError, match=r"full_missing\.pt.*missing key 'text_projection'"):
        create_open_clip(tiny_name, tmp_path / "full_missing.pt")
    with pytest.raises(InputError, match="checkpoint file not found"):
        create_open_clip(tiny_name, tmp_path / "nope.pt")
    with pytest.raises(InputError, match="unknown open_clip model"):
        create_open_clip("no-such-model-xyz")
    with pytest.raises(InputError, match="tower"):
        create_open_clip(tiny_name, tower="text")


def test_register_model_config_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        register_model_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(InputError, match=r"bad\.json lacks 'vision_cfg'"):
        register_model_config(tmp_path / "bad.json")


def test_zero_shot_head_shape_scale_and_cache(tmp_path: Path, tiny_name: str, tiny_clip,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    classes = ["cat", "dog", "car", "tree"]
    templates = ["a photo of a {}.", lambda c: f"a drawing of a {c}."]
    cache = tmp_path / "heads" / "pets.safetensors"
    head = zero_shot_head(tiny_clip, tiny_name, classes, templates, cache_path=cache)
    assert set(head) == {"weight"} and head["weight"].shape == (4, 32)
    scale = tiny_clip.logit_scale.exp().item()
    assert torch.allclose(head["weight"].norm(dim=1), torch.full((4,), scale), rtol=1e-5)
    ref = open_clip.build_zero_shot_classifier(
        tiny_clip, open_clip.get_tokenizer(tiny_name), classes,
        [lambda c: f"a photo of a {c}.", templates[1]])  # open_clip cannot mix str and callables
    assert torch.allclose(head["weight"], ref.T * scale, atol=1e-5)
    unit = zero_shot_head(tiny_clip, tiny_name, classes, templates, apply_logit_scale=False)
    assert torch.allclose(unit["weight"].norm(dim=1), torch.ones(4), atol=1e-5)
    assert cache.is_file() and _leftovers(tmp_path) == []

    calls = []
    real = open_clip.build_zero_shot_classifier

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", counting)
    again = zero_shot_head(tiny_clip, tiny_name, classes, templates, cache_path=cache)
    assert calls == [] and torch.equal(again["weight"], head["weight"])
    other = zero_shot_head(tiny_clip, tiny_name, classes[:3], templates, cache_path=cache)
    assert len(calls) == 1 and other["weight"].shape == (3, 32)
    zero_shot_head(tiny_clip, tiny_name, classes[:3], templates[:1], cache_path=cache)
    assert len(calls) == 2  # templates are part of the key too

    with pytest.raises(InputError, match="full CLIP"):
        zero_shot_head(tiny_clip.visual, tiny_name, classes, templates)
    with pytest.raises(InputError, match="classnames"):
        zero_shot_head(tiny_clip, tiny_name, [], templates)


# ----------------------------------------------------------------------------------------------
# classic.py
# ----------------------------------------------------------------------------------------------
def test_classic_conversion_matches_originals(converted, classic_src: dict) -> None:
    dst, manifest = converted
    assert "src.modeling" not in sys.modules and "src" not in sys.modules
    with pytest.raises(ImportError):
        __import__("src.modeling")
    base_ref = classic_src["zeroshot"].model.visual.state_dict()
    base = load_file(dst / "base.safetensors")
    assert "conv1.weight" in base and "transformer.resblocks.0.attn.in_proj_weight" in base
    _assert_sd_equal(base, base_ref)
    for task, enc in classic_src["experts"].items():
        _assert_sd_equal(load_file(dst / "experts" / f"{task}.safetensors"), enc.model.visual.state_dict())
        assert not torch.equal(enc.model.visual.proj, base_ref["proj"])
    for task, head in classic_src["heads"].items():
        got = load_file(dst / "heads" / f"{task}.safetensors")
        _assert_sd_equal(got, {"weight": head.weight.detach(), "bias": head.bias.detach()})
    assert sorted(p.name for p in dst.iterdir()) == ["base.safetensors", "experts", "heads", "manifest.json"]
    assert _leftovers(dst) == []


def test_classic_manifest(converted, classic_src: dict) -> None:
    dst, manifest = converted
    root = classic_src["root"]
    assert json.loads((dst / "manifest.json").read_text()) == manifest
    assert manifest["tasks"] == ["Cars", "DTD", "MNIST"]
    base_ref = classic_src["zeroshot"].model.visual.state_dict()
    assert manifest["num_keys"] == len(base_ref)
    assert manifest["num_parameters"] == sum(v.numel() for v in base_ref.values())
    assert manifest["feature_dim"] == 32 and manifest["tower_prefix"] == "model.visual."
    assert manifest["base"]["class"] == "src.modeling.ImageEncoder"
    assert manifest["base"]["source_sha256"] == sha256_file(root / "zeroshot.pt")
    assert manifest["experts"]["MNIST"]["source"] == str((root / "MNISTVal" / "finetuned.pt").resolve())
    for task in manifest["tasks"]:
        e, h = manifest["experts"][task], manifest["heads"][task]
        assert e["sha256"] == sha256_file(dst / e["path"])
        assert e["source_sha256"] == sha256_file(e["source"])
        assert h["sha256"] == sha256_file(dst / h["path"])
        assert h["normalize"] is True and h["has_bias"] is True
        assert h["class"] == "src.modeling.ClassificationHead"
    assert manifest["heads"]["DTD"]["num_classes"] == 4
    with safe_open(str(dst / "heads" / "Cars.safetensors"), framework="pt") as fh:
        assert fh.metadata()["normalize"] == "true"


def test_classic_converted_base_loads_into_open_clip(converted, classic_src: dict, tiny_name: str) -> None:
    dst, _ = converted
    visual, _ = create_open_clip(tiny_name, dst / "base.safetensors")
    x = torch.randn(2, 3, 32, 32)
    ref = classic_src["zeroshot"].eval()
    with torch.no_grad():
        assert torch.equal(visual(x), ref(x))


def test_pickled_object_stub_walk_matches_real_state_dict(classic_src: dict) -> None:
    root = classic_src["root"]
    for path, ref in [(root / "zeroshot.pt", classic_src["zeroshot"]),
                      (root / "MNISTVal" / "finetuned.pt", classic_src["experts"]["MNIST"])]:
        obj = load_pickled_object(path)
        assert classic_mod.stub_class_name(obj) == "src.modeling.ImageEncoder"
        assert obj.cache_dir == "/nonexistent/cache"  # plain attributes survive
        _assert_sd_equal(object_state_dict(obj), ref.state_dict())  # non-persistent buffers skipped
    sd = load_state_dict(root / "zeroshot.pt", trust_pickle=True, prefix="model.visual.")
    _assert_sd_equal(sd, classic_src["zeroshot"].model.visual.state_dict())


def test_classic_requires_trust_and_writes_nothing(classic_src: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--trust-pickle") as info:
        convert_classic(classic_src["root"], tmp_path / "out")
    assert "arbitrary code" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_classic_layout_errors(tmp_path: Path, classic_src: dict) -> None:
    with pytest.raises(InputError, match="folder not found"):
        convert_classic(tmp_path / "nope", tmp_path / "out", trust_pickle=True)
    src = tmp_path / "src"
    shutil.copytree(classic_src["root"], src)
    (src / "zeroshot.pt").unlink()
    with pytest.raises(InputError, match=rf"no zeroshot\.pt in {src}"):
        convert_classic(src, tmp_path / "out", trust_pickle=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(classic_src["root"] / "zeroshot.pt", empty / "zeroshot.pt")
    with pytest.raises(InputError, match=rf"no tasks found in {empty}"):
        convert_classic(empty, tmp_path / "out", trust_pickle=True)
    with pytest.raises(InputError, match="task 'SVHN' not found"):
        convert_classic(classic_src["root"], tmp_path / "out", trust_pickle=True, tasks=["SVHN"])
    with pytest.raises(InputError, match="tower prefix 'nope.'"):
        convert_classic(classic_src["root"], tmp_path / "out", trust_pickle=True, tower_prefix="nope.")
    assert not list((tmp_path / "out").glob("*"))


def test_classic_mismatched_expert_keys(tmp_path: Path, classic_src: dict, tiny_name: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(classic_src["root"], src)
    bad = _make_encoder(tiny_name, seed=5)
    bad.model.visual.register_parameter("extra_token", torch.nn.Parameter(torch.zeros(3)))
    _save_pickle(bad, src / "DTD" / "finetuned.pt")
    with pytest.raises(InputError, match=r"DTD/finetuned\.pt has key 'extra_token'"):
        convert_classic(src, tmp_path / "out", trust_pickle=True)
    del bad.model.visual.extra_token
    bad.model.visual.proj = torch.nn.Parameter(torch.zeros(64, 16))
    _save_pickle(bad, src / "DTD" / "finetuned.pt")
    with pytest.raises(InputError, match=r"DTD/finetuned\.pt: key 'proj' is \(64, 16\)"):
        convert_classic(src, tmp_path / "out", trust_pickle=True)
    del bad.model.visual.ln_post
    _save_pickle(bad, src / "DTD" / "finetuned.pt")
    with pytest.raises(InputError, match=r"DTD/finetuned\.pt lacks key 'ln_post\.weight'"):
        convert_classic(src, tmp_path / "out", trust_pickle=True)
    assert not (tmp_path / "out" / "manifest.json").exists() and _leftovers(tmp_path / "out") == []


def test_classic_missing_head_warns_or_errors(tmp_path: Path, classic_src: dict) -> None:
    src = tmp_path / "src"
    shutil.copytree(classic_src["root"], src)
    (src / "head_DTD.pt").unlink()
    with pytest.raises(InputError, match="no head for task DTD"):
        convert_classic(src, tmp_path / "strict", trust_pickle=True, require_heads=True)
    with pytest.warns(UserWarning, match="no head for task DTD"):
        manifest = convert_classic(src, tmp_path / "out", trust_pickle=True, tasks=["DTD", "Cars"])
    assert manifest["tasks"] == ["DTD", "Cars"] and manifest["heads"]["DTD"] is None
    assert not (tmp_path / "out" / "heads" / "DTD.safetensors").exists()
    assert (tmp_path / "out" / "heads" / "Cars.safetensors").exists()


def test_classic_failure_midway_leaves_no_partial_output(
    tmp_path: Path, classic_src: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = classic_mod.atomic_save_safetensors
    calls = []

    def flaky(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real(tensors, path, metadata)

    monkeypatch.setattr(classic_mod, "atomic_save_safetensors", flaky)
    dst = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        convert_classic(classic_src["root"], dst, trust_pickle=True)
    assert not dst.exists()  # staging removed, nothing moved into place, new folder removed

    # A failed overwrite leaves the previous conversion intact.
    monkeypatch.setattr(classic_mod, "atomic_save_safetensors", real)
    convert_classic(classic_src["root"], dst, trust_pickle=True, tasks=["Cars"])
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match="already holds"):
        convert_classic(classic_src["root"], dst, trust_pickle=True)
    calls.clear()
    monkeypatch.setattr(classic_mod, "atomic_save_safetensors", flaky)
    with pytest.raises(OSError, match="disk full"):
        convert_classic(classic_src["root"], dst, trust_pickle=True, overwrite=True)
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before
    assert _leftovers(dst) == []


def test_classic_prefers_task_folder_over_val_folder(tmp_path: Path, classic_src: dict) -> None:
    src = tmp_path / "src"
    shutil.copytree(classic_src["root"], src)
    shutil.copytree(src / "MNISTVal", src / "MNIST")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layout = classic_mod.discover_classic(src)
    assert layout["tasks"]["MNIST"]["finetuned"] == src / "MNIST" / "finetuned.pt"
    assert any("MNISTVal" in str(w.message) for w in caught)
    assert list(classic_mod.discover_classic(classic_src["root"], tasks=["MNISTVal"])["tasks"]) == [
        "MNIST"
    ]
