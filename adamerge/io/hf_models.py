"""Hugging Face ``transformers`` models as adamerge backbones: the ``hf`` model source.

``model: {source: hf, kind: K, checkpoint: FOLDER}`` builds the architecture from the pretrained
model's folder (``config.json``; random weights: the merge brings its own) for one of three kinds:

- ``clip_vision``: a CLIP vision tower with its projection (``CLIPVisionModelWithProjection``),
  features = image embeddings. The folder may be a whole ``CLIPModel`` (FusionBench's
  ``openai/clip-vit-base-patch32``: the text tower then builds zero-shot heads) or a vision model.
  Experts saved as ``CLIPVisionModel`` have no projection: they use the pretrained one, as in
  FusionBench (it is never fine-tuned there).
- ``sequence_classification``: the shared backbone of ``AutoModelForSequenceClassification``
  (``transformer`` of GPT-2, ``bert`` of BERT, ...) is merged; each expert's classification layer
  stays its task's head. Features: the pooled output where the model has a pooler (BERT), else the
  last non-padding token's hidden state (GPT-2, Llama), as transformers' classifiers do.
- ``causal_lm``: the whole ``AutoModelForCausalLM`` (Llama, Qwen, GPT-2) is merged, tied input and
  output embeddings included; its "features" are the next-token logits ``[N, L, V]`` and the head
  is the identity (:class:`NextTokenHead`), so the entropy objective is the next-token entropy.

:class:`HFBackbone` presents the transformers model with exactly the parameter names of its
files (no prefix), so the base, the experts and the export share one key space, and its
:meth:`HFBackbone.read_weights` is the weight reader the config uses for every folder: it checks
the folder against the architecture (model type, sizes, vocabulary) in one line before reading.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from adamerge.errors import InputError
from adamerge.io.hf_folders import read_config, read_weights, resolve_folder

__all__ = ["KINDS", "HFBackbone", "NextTokenHead", "hf_source", "hf_head", "import_transformers"]

KINDS = ("clip_vision", "sequence_classification", "causal_lm")
# config fields that fix the tensors' shapes: two folders of one architecture agree on all they both give
_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "patch_size", "image_size", "num_channels", "n_embd", "n_layer", "n_head", "n_inner",
                 "n_positions", "max_position_embeddings", "type_vocab_size", "tie_word_embeddings")
# CLIP's image preprocessing (OpenAI's mean and std), used when a folder has no preprocessor_config.json
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def import_transformers():
    """``transformers``, imported with the CPU-torch torchvision fix (one line if it is missing)."""
    from adamerge._compat import ensure_torchvision

    ensure_torchvision()
    try:
        import transformers
    except ImportError:
        raise InputError("model.source hf needs the transformers package: pip install -e '.[hf]'") from None
    return transformers


def _structure(cfg: dict, kind: str) -> dict:
    """The part of a config.json that describes the merged architecture (CLIP: the vision tower)."""
    if kind == "clip_vision" and cfg.get("model_type") == "clip":
        return dict(cfg.get("vision_config") or {}, model_type="clip_vision_model")
    return cfg


def _vocab_size(folder: Path, cfg: dict) -> int | None:
    """The vocabulary a folder's tokenizer produces (``tokenizer.json``, added tokens included)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # noqa: BLE001 - a corrupt tokenizer file is the user's input
        raise InputError(f"{path}: not a readable tokenizer ({str(err).splitlines()[0]})") from None


class NextTokenHead(nn.Module):
    """A causal language model's head: its logits are already the next-token predictions, so the
    head passes them on (the objectives reduce over every position). Nothing to store."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    def forward(self, logits: Tensor) -> Tensor:
        return logits

    def state(self) -> dict[str, Tensor]:
        return {}


class HFBackbone(nn.Module):
    """A transformers model as a backbone: ``forward(x)`` returns a tensor (image embeddings,
    pooled or last-token features, next-token logits), and its parameters are named exactly as
    in the model's files. The transformers model itself is held unregistered (``self.hf``): its
    merged sub-modules are registered here under their own names, so ``functional_call`` on this
    module swaps the very tensors the transformers forward reads."""

    def __init__(self, hf_model: nn.Module, kind: str, folder: Path, *, pad_token_id: int | None = None,
                 base_config: dict | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "hf", hf_model)
        self.kind, self.folder, self.pad_token_id = kind, Path(folder), pad_token_id
        self.base_config = dict(base_config or {})
        if kind == "sequence_classification":
            prefix = hf_model.base_model_prefix
            self.add_module(prefix, getattr(hf_model, prefix))
        else:
            if next(hf_model.parameters(recurse=False), None) is not None:
                raise InputError(f"{type(hf_model).__name__} holds parameters outside its sub-modules; not supported")
            for name, child in hf_model.named_children():
                self.add_module(name, child)
        self.with_projection = kind == "clip_vision" and hasattr(hf_model, "visual_projection")

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "clip_vision":
            out = self.hf(pixel_values=x)
            return out.image_embeds if self.with_projection else out.pooler_output
        if self.kind == "causal_lm":
            return self.hf(input_ids=x, use_cache=False).logits
        base = getattr(self.hf, self.hf.base_model_prefix)
        mask = None if self.pad_token_id is None else (x != self.pad_token_id).long()
        out = base(input_ids=x, attention_mask=mask)
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        hidden = out.last_hidden_state
        if mask is None:
            last = torch.full((x.shape[0],), x.shape[1] - 1, device=x.device)
        else:  # the rightmost non-padding token (transformers' sequence classifiers take the same one)
            last = (mask * torch.arange(x.shape[1], device=x.device)).argmax(-1)
        return hidden[torch.arange(x.shape[0], device=x.device), last]

    def train(self, mode: bool = True) -> "HFBackbone":
        super().train(mode)
        self.hf.train(mode)
        return self

    def export_model(self) -> nn.Module:
        """The transformers model that an export saves with ``save_pretrained`` (for a sequence
        classifier: its merged backbone, ``AutoModel``'s class; the heads are saved beside it)."""
        if self.kind == "sequence_classification":
            return getattr(self.hf, self.hf.base_model_prefix)
        return self.hf

    # ------------------------------------------------------------------ weights
    def weight_keys(self) -> dict[str, torch.Size]:
        """The tensors a folder must give: the state's keys, each tied weight once."""
        from adamerge.core.merged import tied_aliases

        tied = tied_aliases(self)
        return {k: v.shape for k, v in self.state_dict().items() if k not in tied}

    def check_folder(self, folder: Path, cfg: dict, what: str) -> None:
        """``folder`` holds the same architecture and vocabulary as the pretrained model's."""
        mine, theirs = _structure(self.base_config, self.kind), _structure(cfg, self.kind)
        if mine.get("model_type") != theirs.get("model_type"):
            raise InputError(f"{what} {folder} is a '{theirs.get('model_type')}' model, the pretrained model"
                             f" ({self.folder}) is '{mine.get('model_type')}': base and experts must share one architecture")
        for key in _SHAPE_FIELDS:
            if key in mine and key in theirs and mine[key] != theirs[key]:
                raise InputError(f"{what} {folder}: config.json has {key} = {theirs[key]}, the pretrained model"
                                 f" ({self.folder}) has {mine[key]}: not the same architecture")
        if self.kind != "clip_vision":
            v_mine, v_theirs = mine.get("vocab_size"), theirs.get("vocab_size")
            if v_mine is not None and v_theirs is not None and v_mine != v_theirs:
                raise InputError(f"{what} {folder}: vocabulary of {v_theirs} tokens (config.json vocab_size), the"
                                 f" pretrained model has {v_mine}: an expert with resized embeddings (added tokens)"
                                 " cannot be merged; merge experts that share the base's tokenizer")
            t_mine, t_theirs = _vocab_size(self.folder, self.base_config), _vocab_size(folder, cfg)
            if t_mine is not None and t_theirs is not None and t_mine != t_theirs:
                raise InputError(f"{what} {folder}: its tokenizer has {t_theirs} tokens, the pretrained model's"
                                 f" ({self.folder}) has {t_mine}: the experts' vocabularies differ; merge experts"
                                 " that share the base's tokenizer")

    def read_weights(self, path: str | Path, what: str = "model folder") -> dict[str, Tensor]:
        """The tensors this architecture needs from a model folder (extra ones, e.g. a CLIP text
        tower or another task's head, are left out), after :meth:`check_folder`."""
        folder = resolve_folder(path, what)
        self.check_folder(folder, read_config(folder), what)
        need = self.weight_keys()
        raw = _align_prefix(read_weights(folder), need)
        out: dict[str, Tensor] = {}
        for key in need:
            if key in raw:
                out[key] = raw[key]
            elif key == "visual_projection.weight" and self.with_projection and folder != self._projection_folder():
                out[key] = self._pretrained_projection()  # a CLIPVisionModel expert: the pretrained projection
            else:
                missing = [k for k in need if k not in raw]
                raise InputError(f"{what} {folder}: no tensor '{key}' ({len(missing)} of the {len(need)} tensors a"
                                 f" {self.kind} {self.base_config.get('model_type')} model needs are missing)")
        return out

    def _projection_folder(self) -> Path:
        return resolve_folder(self.folder)

    def _pretrained_projection(self) -> Tensor:
        if not hasattr(self, "_projection"):
            raw = read_weights(self._projection_folder())
            if "visual_projection.weight" not in raw:
                raise InputError(f"{self.folder}: no 'visual_projection.weight' for experts saved without one")
            object.__setattr__(self, "_projection", raw["visual_projection.weight"])
        return self._projection


def _align_prefix(raw: dict[str, Tensor], need) -> dict[str, Tensor]:
    """A folder saved from the bare inner model (a ``CLIPVisionModel`` of transformers 5, keys
    ``embeddings.…``; a ``GPT2Model``, keys ``h.0.…``) gets the prefix under which the
    architecture holds it (``vision_model.``, ``transformer.``); other folders are unchanged."""
    if any(k in raw for k in need):
        return raw
    for prefix in sorted({k.split(".")[0] for k in need}):
        moved = {f"{prefix}.{k}": v for k, v in raw.items()}
        if any(k in need for k in moved):
            return moved
    return raw


# ---------------------------------------------------------------------------- the source
def _clip_transform(folder: Path, image_size: int):
    """CLIP's preprocessing from ``preprocessor_config.json`` (or OpenAI's at the tower's size)."""
    from adamerge._compat import ensure_torchvision

    ensure_torchvision()
    from torchvision import transforms as T

    size, crop, mean, std = image_size, image_size, _CLIP_MEAN, _CLIP_STD
    path = folder / "preprocessor_config.json"
    if path.is_file():
        pre = json.loads(path.read_text(encoding="utf-8"))
        s = pre.get("size", size)
        size = s.get("shortest_edge", s.get("height", size)) if isinstance(s, dict) else s
        c = pre.get("crop_size", crop)
        crop = c.get("height", crop) if isinstance(c, dict) else c
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop),
                      T.ToTensor(), T.Normalize(mean, std)])


def hf_source(spec: dict):
    """``model: {source: hf, kind: K, checkpoint: FOLDER}`` → (backbone, transform). The transform
    is CLIP's image preprocessing, or for text kinds the encoder of text/JSONL streams."""
    from adamerge.train.text_data import TextEncoder

    kind = spec.get("kind")
    if kind not in KINDS:
        raise InputError(f"model.kind must be one of {list(KINDS)} for source hf, got {kind!r}")
    if not spec.get("checkpoint"):
        raise InputError("model.checkpoint must name the pretrained model's folder (config.json) for source hf")
    folder = resolve_folder(spec["checkpoint"], "model.checkpoint")
    base_cfg = read_config(folder)
    tf = import_transformers()
    config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if kind == "clip_vision":
        if config.model_type == "clip":
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            model = tf.CLIPVisionModelWithProjection(vision)
        elif config.model_type == "clip_vision_model":
            with_proj = "CLIPVisionModelWithProjection" in (config.architectures or [])
            model = (tf.CLIPVisionModelWithProjection if with_proj else tf.CLIPVisionModel)(config)
        else:
            raise InputError(f"model.checkpoint {folder}: kind clip_vision needs a CLIP model, found '{config.model_type}'")
        backbone = HFBackbone(model.eval(), kind, folder, base_config=base_cfg)
        return backbone, _clip_transform(folder, int(model.config.image_size))
    if kind == "sequence_classification":
        model = tf.AutoModelForSequenceClassification.from_config(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    encoder = TextEncoder(lambda: load_tokenizer(folder), "sequences" if kind == "sequence_classification" else "blocks",
                          max_length=int(spec.get("max_length", 128)), block_size=int(spec.get("block_size", 128)),
                          pad_token_id=spec.get("pad_token_id"))
    pad = None
    if kind == "sequence_classification":
        pad = spec.get("pad_token_id", config.pad_token_id)
        if pad is None:
            pad = encoder.pad_token_id(config.eos_token_id)
    backbone = HFBackbone(model.eval(), kind, folder, pad_token_id=pad, base_config=base_cfg)
    encoder.fixed_pad = pad
    return backbone, encoder


def load_tokenizer(folder: Path):
    """The tokenizer saved in a model folder (``AutoTokenizer``, local files only)."""
    tf = import_transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - no or unreadable tokenizer files
        raise InputError(f"{folder}: no tokenizer to read text streams with ({str(err).splitlines()[0]});"
                         " save the tokenizer beside the model") from None


# ---------------------------------------------------------------------------- heads
def hf_head(cfg: dict, task: str, spec: dict, cache_dir: Path | None) -> nn.Module:
    """A task's head for an ``hf`` model: CLIP zero-shot (``classnames`` + ``templates``), the
    expert's own classification layer (``from_expert: true``) or next-token (``next_token: true``)."""
    from adamerge.train.data import LinearHead

    m = cfg["model"]
    kind = m.get("kind")
    if "classnames" in spec:
        if kind != "clip_vision":
            raise InputError(f"heads.{task}: zero-shot heads (classnames) need model.kind clip_vision")
        weight = clip_zero_shot_weights(resolve_folder(m["checkpoint"], "model.checkpoint"), spec["classnames"],
                                        spec.get("templates", ["a photo of a {}."]), cache_dir, task)
        return LinearHead(weight, None, normalize=True)
    if spec.get("from_expert"):
        if kind != "sequence_classification":
            raise InputError(f"heads.{task}: from_expert heads need model.kind sequence_classification")
        return expert_classifier(cfg["experts"][task], f"expert '{task}'")
    if spec.get("next_token"):
        if kind != "causal_lm":
            raise InputError(f"heads.{task}: next_token heads need model.kind causal_lm")
        folder = resolve_folder(m["checkpoint"], "model.checkpoint")
        return NextTokenHead(int(read_config(folder)["vocab_size"]))
    raise InputError(f"heads.{task}: give 'path' (a weight file), 'classnames' (CLIP zero-shot), 'from_expert: true'"
                     " (a sequence classifier's own layer) or 'next_token: true' (a causal LM)")


def expert_classifier(path: str | Path, what: str) -> nn.Module:
    """The classification layer of a sequence-classification expert's folder (``score`` of GPT-2
    and Llama, ``classifier`` of BERT) as a linear head: the one module whose weight is
    ``[num_labels, hidden]`` among the tensors outside the backbone."""
    from adamerge.train.data import LinearHead

    folder = resolve_folder(path, what)
    cfg = read_config(folder)
    raw = read_weights(folder)
    labels = len(cfg["id2label"]) if isinstance(cfg.get("id2label"), dict) else int(cfg.get("num_labels", 2))
    names = ("score", "classifier")
    for name in names:
        w = raw.get(f"{name}.weight")
        if w is not None and w.dim() == 2 and w.shape[0] == labels:
            return LinearHead(w.float(), None if raw.get(f"{name}.bias") is None else raw[f"{name}.bias"].float())
    raise InputError(f"{what} {folder}: no linear classification layer ({' or '.join(n + '.weight' for n in names)}"
                     f" of {labels} rows); give the head as a file (heads.<task>.path)")


def clip_zero_shot_weights(folder: Path, classnames: Sequence[str], templates: Sequence[str],
                           cache_dir: Path | None = None, task: str = "task") -> Tensor:
    """Zero-shot head rows from a ``CLIPModel`` folder's text tower, as FusionBench builds them:
    per class the normalised mean of the normalised projected text embeddings of its prompts,
    times ``logit_scale.exp()``. Cached under ``cache_dir`` by a digest of the prompts and folder."""
    for name, seq in (("classnames", classnames), ("templates", templates)):
        if isinstance(seq, str) or not isinstance(seq, Sequence) or not seq:
            raise InputError(f"heads.{task}: {name} must be a non-empty list")
    texts = [t.format(c) for c in classnames for t in templates]
    key = hashlib.sha256(json.dumps([str(folder), texts, (folder / "config.json").stat().st_mtime_ns]).encode()).hexdigest()[:16]
    cache = None if cache_dir is None else Path(cache_dir) / f"hf_zeroshot_{task}_{key}.safetensors"
    if cache is not None and cache.is_file():
        from safetensors.torch import load_file

        return load_file(str(cache))["weight"]
    cfg = read_config(folder)
    if cfg.get("model_type") != "clip":
        raise InputError(f"{folder}: zero-shot heads need a whole CLIPModel (text tower), found '{cfg.get('model_type')}';"
                         " give the heads as files")
    tf = import_transformers()
    model = tf.CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    tok = load_tokenizer(folder)
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings,
                  return_tensors="pt")
        out = model.get_text_features(**enc)
        emb = out if isinstance(out, Tensor) else out.pooler_output
        emb = torch.nn.functional.normalize(emb.float(), dim=-1).reshape(len(classnames), len(templates), -1)
        weight = torch.nn.functional.normalize(emb.mean(1), dim=-1) * model.logit_scale.exp().float()
    if cache is not None:
        from adamerge.io.files import atomic_save_safetensors

        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({"weight": weight}, cache)
    return weight
