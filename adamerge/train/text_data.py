"""Unlabeled text streams: a task's prompts from a text or JSONL file, tokenized into a tensor stream.

``data: {task: {text: prompts.txt}}`` reads one prompt per non-empty line; ``{jsonl: f.jsonl,
field: text, label_field: label}`` one JSON object per line (its ``label``, when present, only
scores, as for images). Two layouts, chosen by the model kind:

- ``sequences`` (sequence classifiers): one sample per prompt, truncated to ``max_length`` tokens
  and right-padded with the padding token to the longest prompt;
- ``blocks`` (causal language models): the prompts' tokens joined by the end-of-sequence token
  and cut into windows of ``block_size`` tokens (the incomplete last window is dropped), so no
  position is padding and every position's next-token prediction counts in the objective.

The tokenizer is the pretrained model's (the model source hands over how to load it from its
folder; it is loaded on first use).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from adamerge.errors import InputError
from adamerge.train.data import TaskStream, stream_from_tensors

__all__ = ["TextEncoder", "read_texts", "stream_from_text"]


def read_texts(task: str, spec: dict) -> tuple[list[str], list[int] | None, str]:
    """The prompts (and labels, if every record has one) of a ``text`` or ``jsonl`` data spec."""
    path = Path(spec.get("text") or spec.get("jsonl"))
    if not path.is_file():
        raise InputError(f"data.{task}: {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"data.{task}: {path} is not UTF-8 text") from None
    if "text" in spec:
        return [ln for ln in lines if ln.strip()], None, str(path)
    field, label_field = spec.get("field", "text"), spec.get("label_field", "label")
    texts, labels = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise InputError(f"data.{task}: {path} line {i} is not JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise InputError(f"data.{task}: {path} line {i} has no text field '{field}'")
        texts.append(rec[field])
        labels.append(rec.get(label_field))
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        raise InputError(f"data.{task}: {path}: '{label_field}' is on some records only (line {has.index(False) + 1}"
                         " lacks it); give it on every record or on none")
    if any(has) and not all(isinstance(lab, int) and not isinstance(lab, bool) for lab in labels):
        raise InputError(f"data.{task}: {path}: '{label_field}' must be a class index (an integer)")
    return texts, (labels if any(has) else None), str(path)


class TextEncoder:
    """Tokenizes a task's prompts into ``[N, L]`` token ids (see the module docstring for the two
    layouts); ``load_tokenizer()`` gives the tokenizer (called on first use, errors as one line)."""

    def __init__(self, load_tokenizer: Callable[[], Any], layout: str, *, max_length: int = 128, block_size: int = 128,
                 pad_token_id: int | None = None) -> None:
        if layout not in ("sequences", "blocks"):
            raise InputError(f"text layout must be 'sequences' or 'blocks', got {layout!r}")
        for name, value in (("max_length", max_length), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"model.{name} must be a whole number >= 1, got {value!r}")
        self.load_tokenizer, self.layout = load_tokenizer, layout
        self.max_length, self.block_size = max_length, block_size
        self.fixed_pad = pad_token_id
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.load_tokenizer()
        return self._tokenizer

    def pad_token_id(self, fallback: int | None = None) -> int | None:
        """The padding token: given, the tokenizer's, else ``fallback`` (GPT-2: end of sequence)."""
        if self.fixed_pad is not None:
            return self.fixed_pad
        tok = self._tokenizer if self._tokenizer is not None else self._try_tokenizer()
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        return pad if pad is not None else fallback

    def _try_tokenizer(self):
        try:
            return self.tokenizer
        except InputError:
            return None

    def encode(self, texts: list[str], where: str) -> Tensor:
        """``[N, L]`` token ids of the prompts in this encoder's layout."""
        tok = self.tokenizer
        ids = [tok(t, add_special_tokens=self.layout == "sequences")["input_ids"] for t in texts]
        if self.layout == "sequences":
            ids = [row[: self.max_length] for row in ids]
            if any(len(row) == 0 for row in ids):
                raise InputError(f"{where}: a prompt has no tokens")
            pad = self.pad_token_id()
            if pad is None:
                raise InputError(f"{where}: prompts of different lengths need a padding token (model.pad_token_id)")
            width = max(len(row) for row in ids)
            return torch.tensor([row + [pad] * (width - len(row)) for row in ids], dtype=torch.long)
        eos = tok.eos_token_id
        flat: list[int] = []
        for row in ids:
            flat += row + ([eos] if eos is not None else [])
        n = len(flat) // self.block_size
        if n == 0:
            raise InputError(f"{where}: {len(flat)} tokens in all, fewer than one block of model.block_size"
                             f" {self.block_size}; give more text or a smaller block_size")
        return torch.tensor(flat[: n * self.block_size], dtype=torch.long).reshape(n, self.block_size)


def stream_from_text(task: str, spec: dict, encoder) -> TaskStream:
    """A task's stream of token ids from a ``text`` or ``jsonl`` data spec."""
    if not isinstance(encoder, TextEncoder):
        raise InputError(f"data.{task}: text data need a text model (model.source hf with kind"
                         " sequence_classification or causal_lm)")
    texts, labels, source = read_texts(task, spec)
    if not texts:
        raise InputError(f"data.{task}: {source} holds no text")
    x = encoder.encode(texts, f"data.{task} ({source})")
    if labels is not None and encoder.layout == "blocks":
        labels = None  # a language model's windows have no per-window label
    return stream_from_tensors(task, x, labels, source=source)
