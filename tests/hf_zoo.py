"""Tiny Hugging Face model folders for the ``hf`` source tests, built with transformers itself (no hub).

Each family gets a pretrained folder and T expert folders saved with ``save_pretrained`` exactly as
a user's would be (tokenizer files beside the weights), experts = base + small random moves, and
unlabeled data files. Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

import adamerge  # noqa: F401  (the torchvision fix runs before transformers is imported)
from adamerge._compat import ensure_torchvision

ensure_torchvision()
import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402

WORDS = ("a photo of the cat dog car ship plane bird good bad movie film great awful and is it was very"
         " not this that one two red blue green small big").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TASKS = ["t0", "t1", "t2"]
transformers.logging.set_verbosity_error()


def save_tokenizer(folder: Path, extra: int = 0) -> int:
    """A word-level tokenizer over :data:`WORDS` (``extra`` more tokens: a resized vocabulary)
    saved as a user's ``tokenizer.json``; returns its size."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + [f"new{i}" for i in range(extra)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return len(vocab)


VOCAB = len(SPECIALS) + len(WORDS)


def _moved(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def clip_zoo(root: Path, dtype=torch.float32) -> dict:
    """A ``CLIPModel`` pretrained folder (text tower, projections, tokenizer) and one
    ``CLIPVisionModel`` folder per task (FusionBench's layout: no projection), tensors data."""
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8)
    base = transformers.CLIPModel(cfg).to(dtype).eval()
    base.save_pretrained(str(root / "base"))
    save_tokenizer(root / "base")
    experts = {}
    for i, t in enumerate(TASKS):
        vcfg = cfg.vision_config
        expert = transformers.CLIPVisionModel(vcfg).to(dtype)
        expert.load_state_dict(base.vision_model.state_dict())
        _moved(expert, 10 + i)
        expert.save_pretrained(str(root / "experts" / t))
        experts[t] = str(root / "experts" / t)
    gen = torch.Generator().manual_seed(1)
    data = {}
    for i, t in enumerate(TASKS):
        from safetensors.torch import save_file

        path = root / "data" / f"{t}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": torch.randn(24, 3, 16, 16, generator=gen), "y": torch.randint(0, 3, (24,), generator=gen)}, str(path))
        data[t] = {"tensors": str(path)}
    classes = [["cat", "dog", "car"], ["ship", "plane", "bird"], ["red", "blue", "green"]]
    return {"model": {"source": "hf", "kind": "clip_vision", "checkpoint": str(root / "base")},
            "base": str(root / "base"), "experts": experts,
            "heads": {t: {"classnames": c, "templates": ["a photo of a {}.", "a {}."]} for t, c in zip(TASKS, classes)},
            "data": data}


def gpt2_cls_zoo(root: Path, dtype=torch.float32) -> dict:
    """A GPT-2 pretrained folder (``GPT2LMHeadModel``, as ``gpt2`` on the hub) and one
    ``GPT2ForSequenceClassification`` folder per task, each with its own classifier; JSONL data."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).to(dtype).eval()
    base.save_pretrained(str(root / "base"))
    save_tokenizer(root / "base")
    experts = {}
    for i, t in enumerate(TASKS):
        ecfg = transformers.GPT2Config(**{**cfg.to_dict(), "num_labels": 2 + i})
        expert = transformers.GPT2ForSequenceClassification(ecfg).to(dtype)
        expert.transformer.load_state_dict(base.transformer.state_dict())
        _moved(expert, 20 + i)
        expert.save_pretrained(str(root / "experts" / t))
        save_tokenizer(root / "experts" / t)
        experts[t] = str(root / "experts" / t)
    data = _text_data(root, labels=[2, 3, 4])
    return {"model": {"source": "hf", "kind": "sequence_classification", "checkpoint": str(root / "base"), "max_length": 12},
            "base": str(root / "base"), "experts": experts,
            "heads": {t: {"from_expert": True} for t in TASKS}, "data": data}


def llama_zoo(root: Path, dtype=torch.float32, tied: bool = True) -> dict:
    """A Llama-architecture causal LM (tied embeddings) and its experts; prompt files."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    base.save_pretrained(str(root / "base"))
    save_tokenizer(root / "base")
    experts = {}
    for i, t in enumerate(TASKS):
        expert = transformers.LlamaForCausalLM(cfg).to(dtype)
        expert.load_state_dict(base.state_dict())
        _moved(expert, 30 + i)
        expert.save_pretrained(str(root / "experts" / t))
        save_tokenizer(root / "experts" / t)
        experts[t] = str(root / "experts" / t)
    data = _text_data(root, labels=None)
    return {"model": {"source": "hf", "kind": "causal_lm", "checkpoint": str(root / "base"), "block_size": 8},
            "base": str(root / "base"), "experts": experts,
            "heads": {t: {"next_token": True} for t in TASKS}, "data": data}


def _text_data(root: Path, labels: list[int] | None) -> dict:
    """Per task prompts: a text file, or JSONL records with a label when ``labels`` gives classes."""
    gen = torch.Generator().manual_seed(2)
    data = {}
    for i, t in enumerate(TASKS):
        rows = []
        for _ in range(24):
            n = int(torch.randint(3, 9, (1,), generator=gen))
            rows.append(" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=gen)))
        folder = root / "data"
        folder.mkdir(parents=True, exist_ok=True)
        if labels is None:
            path = folder / f"{t}.txt"
            path.write_text("\n".join(rows) + "\n")
            data[t] = {"text": str(path)}
        else:
            path = folder / f"{t}.jsonl"
            path.write_text("".join(json.dumps({"text": r, "label": k % labels[i]}) + "\n" for k, r in enumerate(rows)))
            data[t] = {"jsonl": str(path)}
    return data


def write_config(folder: Path, zoo: dict, **options) -> Path:
    """A run config over a zoo: layer-wise AdaMerging, a few steps."""
    cfg = {**zoo, "method": "adamerging", "seed": 0, "run_dir": str(folder / "run"), "checkpoint_every": 2,
           "options": {"granularity": "layer", "steps": 3, "lr": 0.05, "batch_size": 4, **options}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
