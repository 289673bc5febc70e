"""Hugging Face folders as a user holds them (issue 26): a hub cache snapshot and sharded weights
are read like a plain folder; bad input (no config, mismatched architectures, a vocabulary that
differs between experts, a missing shard, a missing folder) is one line from ``adamerge fit``,
exit status 2, and nothing is written."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import hf_zoo
from adamerge.cli import main
from adamerge.errors import InputError
from adamerge.io.hf_folders import read_weights, resolve_folder

tf = hf_zoo.transformers


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    return root, hf_zoo.llama_zoo(root)


def _fails_with_one_line(tmp_path: Path, zoo: dict, capsys, *needles: str) -> str:
    """``adamerge fit`` on the zoo exits 2 with one line naming the problem and writes nothing."""
    config = hf_zoo.write_config(tmp_path / "cfg", zoo)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["fit", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "cfg" / "run").exists()  # nothing written: no run folder
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
    return err


def _copy_zoo(root: Path, zoo: dict, dest: Path) -> dict:
    shutil.copytree(root, dest, dirs_exist_ok=True)
    swap = lambda p: str(dest / Path(p).relative_to(root))  # noqa: E731
    out = json.loads(json.dumps(zoo))
    out["base"] = swap(zoo["base"])
    out["model"]["checkpoint"] = swap(zoo["model"]["checkpoint"])
    out["experts"] = {t: swap(p) for t, p in zoo["experts"].items()}
    out["data"] = {t: {k: swap(v) for k, v in spec.items()} for t, spec in zoo["data"].items()}
    return out


def test_a_folder_without_config_is_one_line(llama, tmp_path, capsys):
    root, zoo = llama
    zoo = _copy_zoo(root, zoo, tmp_path / "zoo")
    os.remove(Path(zoo["experts"]["t1"]) / "config.json")
    _fails_with_one_line(tmp_path, zoo, capsys, "has no config.json", "experts/t1")


def test_a_missing_expert_folder_is_one_line(llama, tmp_path, capsys):
    root, zoo = llama
    zoo = _copy_zoo(root, zoo, tmp_path / "zoo")
    shutil.rmtree(zoo["experts"]["t2"])
    _fails_with_one_line(tmp_path, zoo, capsys, "does not exist", "experts/t2")


def test_an_expert_of_another_architecture_is_one_line(llama, tmp_path, capsys):
    root, zoo = llama
    zoo = _copy_zoo(root, zoo, tmp_path / "zoo")
    other = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=hf_zoo.VOCAB, n_embd=16, n_layer=2, n_head=2,
                                             bos_token_id=1, eos_token_id=2))
    shutil.rmtree(zoo["experts"]["t0"])
    other.save_pretrained(zoo["experts"]["t0"])
    _fails_with_one_line(tmp_path, zoo, capsys, "is a 'gpt2' model", "'llama'")


def test_an_expert_of_another_size_is_one_line(llama, tmp_path, capsys):
    root, zoo = llama
    zoo = _copy_zoo(root, zoo, tmp_path / "zoo")
    cfg = tf.LlamaConfig.from_pretrained(zoo["base"])
    cfg.num_hidden_layers = 3
    shutil.rmtree(zoo["experts"]["t1"])
    tf.LlamaForCausalLM(cfg).save_pretrained(zoo["experts"]["t1"])
    _fails_with_one_line(tmp_path, zoo, capsys, "num_hidden_layers = 3", "has 2")


def test_an_expert_with_a_resized_vocabulary_is_one_line(llama, tmp_path, capsys):
    """The Llama-3.2 case: an expert fine-tuned with added tokens has more embedding rows."""
    root, zoo = llama
    zoo = _copy_zoo(root, zoo, tmp_path / "zoo")
    folder = Path(zoo["experts"]["t2"])
    model = tf.LlamaForCausalLM.from_pretrained(str(folder))
    size = hf_zoo.save_tokenizer(folder, extra=2)
    model.resize_token_embeddings(size)
    model.save_pretrained(str(folder))
    _fails_with_one_line(tmp_path, zoo, capsys, f"vocabulary of {size} tokens", f"has {hf_zoo.VOCAB}")


def test_an_expert_whose_tokenizer_differs_is_one_line(llama, tmp_path, capsys):
    """Same embedding size in config.json, but a tokenizer with other tokens: refused too."""
    root, zoo = llama
    zoo = _copy_zoo(root, zoo, tmp_path / "zoo")
    size = hf_zoo.save_tokenizer(Path(zoo["experts"]["t0"]), extra=3)
    _fails_with_one_line(tmp_path, zoo, capsys, f"its tokenizer has {size} tokens", f"has {hf_zoo.VOCAB}")


def _shard(folder: Path) -> list[Path]:
    model = tf.LlamaForCausalLM.from_pretrained(str(folder))
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(str(folder), max_shard_size="8KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").is_file()
    return shards


def test_sharded_weights_read_like_one_file_and_a_missing_shard_is_one_line(llama, tmp_path, capsys):
    root, zoo = llama
    zoo = _copy_zoo(root, zoo, tmp_path / "zoo")
    folder = Path(zoo["experts"]["t1"])
    whole = read_weights(folder)
    shards = _shard(folder)
    assert {k: v.tolist() for k, v in read_weights(folder).items()} == {k: v.tolist() for k, v in whole.items()}
    shards[1].unlink()
    _fails_with_one_line(tmp_path, zoo, capsys, f"shard {shards[1].name}", "is missing")


def test_a_hub_cache_entry_and_its_snapshot_are_read_as_folders(llama, tmp_path):
    """``models--org--name/snapshots/<rev>`` (files linked into ``blobs/``) and the entry itself
    (through ``refs/main``) give the folder's tensors; the run fits from them."""
    root, zoo = llama
    entry = tmp_path / "hub" / "models--org--tiny-llama"
    snap = entry / "snapshots" / "abc123"
    (entry / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    for f in Path(zoo["base"]).iterdir():
        blob = entry / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    assert resolve_folder(entry) == snap
    want = read_weights(Path(zoo["base"]))
    got = read_weights(resolve_folder(entry))
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    cfg = {**zoo, "base": str(entry), "model": {**zoo["model"], "checkpoint": str(snap)}}
    config = hf_zoo.write_config(tmp_path / "cfg", cfg, steps=1)
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0
    meta_card = json.loads((tmp_path / "cfg" / "run" / "results.json").read_text())
    assert meta_card["steps"] == 1


def test_a_hub_entry_with_two_snapshots_and_no_ref_is_refused(tmp_path):
    entry = tmp_path / "models--org--x"
    (entry / "snapshots" / "a").mkdir(parents=True)
    (entry / "snapshots" / "b").mkdir(parents=True)
    with pytest.raises(InputError, match="2 snapshots and no refs/main"):
        resolve_folder(entry)


def test_text_data_errors_are_one_line(llama, tmp_path, capsys):
    root, zoo = llama
    zoo = _copy_zoo(root, zoo, tmp_path / "zoo")
    Path(zoo["data"]["t0"]["text"]).write_text("a\n")  # too little text for one block of 8 tokens
    _fails_with_one_line(tmp_path, zoo, capsys, "data.t0", "fewer than one block")


def test_a_kind_that_does_not_exist_is_one_line(llama, tmp_path, capsys):
    root, zoo = llama
    zoo = {**zoo, "model": {**zoo["model"], "kind": "seq2seq"}}
    _fails_with_one_line(tmp_path, zoo, capsys, "model.kind must be one of")


def test_the_fusionbench_clip_config_resolves_to_eight_hf_tasks_with_zero_shot_heads():
    from adamerge.config import check_tasks, load_config

    path = Path(__file__).parent.parent / "configs" / "fusionbench_clip_vit_b32_8tasks.yaml"
    cfg = load_config(path)
    assert cfg["model"]["source"] == "hf" and cfg["model"]["kind"] == "clip_vision"
    tasks = check_tasks(cfg)
    assert tasks == ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    sizes = {t: len(cfg["heads"][t]["classnames"]) for t in tasks}
    assert sizes == {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
                     "mnist": 10, "dtd": 47}
    assert all("{}" in tpl for t in tasks for tpl in cfg["heads"][t]["templates"])
    assert Path(cfg["base"]).is_absolute() and Path(cfg["experts"]["mnist"]).name == "clip-vit-base-patch32_mnist"
