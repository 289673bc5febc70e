"""Inputs from open_clip checkpoint files, `adamerge inspect` and `adamerge convert` on the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from adamerge import MergedModel, TaskVectors
from adamerge.cli import main
from adamerge.io.files import atomic_save_safetensors


def _tiny_clip(seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    )


def test_task_vectors_from_full_open_clip_checkpoints(tmp_path):
    """Full CLIP checkpoints (.pt and .safetensors): the visual tower is read with prefix 'visual.'."""
    base = _tiny_clip(0)
    base_sd = base.state_dict()
    files = {}
    for i, ext in enumerate([".pt", ".safetensors"]):
        sd = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base_sd.items()}
        path = tmp_path / f"expert{i}{ext}"
        if ext == ".pt":
            torch.save(sd, path)
        else:
            atomic_save_safetensors(sd, path)
        files[f"t{i}"] = path
    torch.save({"state_dict": base_sd}, tmp_path / "base.pt")
    tv = TaskVectors.from_files(tmp_path / "base.pt", files, prefix="visual.")
    assert set(tv.base) == set(base.visual.state_dict())
    mm = MergedModel(base.visual, tv, "block", init=0.5)
    x = torch.randn(2, 3, 16, 16)
    got = mm.merged_state_dict()
    want_key = "conv1.weight"
    e0 = torch.load(files["t0"], weights_only=True)["visual." + want_key]
    from safetensors.torch import load_file

    e1 = load_file(str(files["t1"]))["visual." + want_key]
    b = base_sd["visual." + want_key]
    assert torch.allclose(got[want_key], b + 0.5 * (e0 - b) + 0.5 * (e1 - b), atol=1e-6)
    assert mm(x).shape == (2, 16)


def _tiny_config(tmp_path: Path) -> Path:
    from adamerge.zoo.tiny import tiny_vit

    model = tiny_vit()
    sd = model.state_dict()
    atomic_save_safetensors(sd, tmp_path / "base.safetensors")
    for t in ("a", "b", "c"):
        atomic_save_safetensors({k: v + 0.01 for k, v in sd.items()}, tmp_path / f"{t}.safetensors")
        atomic_save_safetensors({"weight": torch.randn(3, 16)}, tmp_path / f"head_{t}.safetensors")
        atomic_save_safetensors({"x": torch.randn(8, 3, 16, 16)}, tmp_path / f"data_{t}.safetensors")
    cfg = {
        "model": {"source": "tiny_vit"},
        "base": "base.safetensors",
        "experts": {t: f"{t}.safetensors" for t in "abc"},
        "heads": {t: f"head_{t}.safetensors" for t in "abc"},
        "data": {t: {"tensors": f"data_{t}.safetensors"} for t in "abc"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "c.yaml"


def test_inspect_prints_groups(tmp_path, capsys):
    cfg = _tiny_config(tmp_path)
    assert main(["inspect", "--config", str(cfg), "--granularity", "block"]) == 0
    out = capsys.readouterr().out
    assert "transformer.resblocks.0" in out and "8 groups" in out
    assert main(["inspect", "--config", str(cfg), "--granularity", "partition:2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["granularity"] == "partition:2"
    from adamerge.zoo.tiny import tiny_vit

    model = tiny_vit()
    assert sum(g["parameters"] for g in data["groups"]) == sum(p.numel() for p in model.parameters())
    assert len(data["groups"]) == 2 * len(list(model.parameters())) - sum(p.numel() == 1 for p in model.parameters())


def test_eval_streams_without_labels_is_a_clear_error(tmp_path, capsys):
    cfg = _tiny_config(tmp_path)
    assert main(["eval", "--config", str(cfg), "--method", "weight_average"]) == 2
    assert "no labels" in capsys.readouterr().err


def test_convert_needs_trust_pickle(tmp_path, capsys):
    src = tmp_path / "classic"
    src.mkdir()
    torch.save(torch.nn.Linear(2, 2), src / "zeroshot.pt")
    (src / "MNIST").mkdir()
    torch.save(torch.nn.Linear(2, 2), src / "MNIST" / "finetuned.pt")
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "\n" not in err.strip()
    assert not (tmp_path / "dst" / "manifest.json").exists()
    # one pickled module file, trusted: becomes a safetensors state dict
    assert main(["convert", str(src / "zeroshot.pt"), str(tmp_path / "one.safetensors"), "--trust-pickle"]) == 0
    from adamerge.io.state_dicts import load_state_dict

    assert set(load_state_dict(tmp_path / "one.safetensors")) == {"weight", "bias"}


@pytest.mark.parametrize("bad", ["partition:0", "rows"])
def test_inspect_bad_granularity(tmp_path, capsys, bad):
    cfg = _tiny_config(tmp_path)
    assert main(["inspect", "--config", str(cfg), "--granularity", bad]) == 2
    assert "granularity" in capsys.readouterr().err
