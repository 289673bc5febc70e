"""A finished run over Hugging Face models, exported as a Hugging Face folder.

``adamerge export RUN OUT`` on a run whose ``model.source`` is ``hf`` writes what
``save_pretrained`` writes (``config.json``, ``model.safetensors`` or its shards) for the merged
model, so ``AutoModel…from_pretrained(OUT)`` loads it with no adamerge installed: a CLIP vision
tower (``CLIPVisionModelWithProjection``), a sequence classifier's merged backbone (``AutoModel``;
each task's classification layer in ``heads.safetensors`` beside it) or the whole causal language
model (``AutoModelForCausalLM``, tied embeddings kept tied). The pretrained folder's tokenizer and
image-preprocessor files are copied beside it, and the export's ``adamerge.json`` and model card
(with the Hugging Face front matter) are the ones every export writes (:mod:`adamerge.io.export_files`),
with ``"format": "hf"``. The open_clip and timm exports are unchanged.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from adamerge.core.merged import MergedModel
from adamerge.errors import InputError
from adamerge.io.export_files import export_metadata, model_card, write_heads
from adamerge.io.files import atomic_write_json, atomic_write_text
from adamerge.io.hf_folders import resolve_folder
from adamerge.io.hf_models import HFBackbone

__all__ = ["write_hf_export", "LOADERS"]

# what loads each kind's export
LOADERS = {"clip_vision": "CLIPVisionModelWithProjection", "sequence_classification": "AutoModel",
           "causal_lm": "AutoModelForCausalLM"}
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
           "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja", "preprocessor_config.json")


def _hub_name(path: str) -> str | None:
    """``org/name`` for a hub cache path (``.../models--org--name/...``), else ``None``."""
    for part in Path(path).parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return None


def write_hf_export(folder: Path, merged: MergedModel, heads: dict, cfg: dict, results: dict) -> str:
    """Write the merged model of a run over ``hf`` models into ``folder`` (an empty temporary
    folder that :func:`adamerge.workflows.export.export_run` renames into place). Returns what it holds."""
    from adamerge.io.state_dicts import require_finite

    require_finite(merged.merged_state_dict(), "the merged model (nothing exported; are the run's coefficients finite?)")
    module = merged.to_module()
    if not isinstance(module, HFBackbone):
        raise InputError(f"a Hugging Face export needs a model of source hf, got {type(module).__name__}")
    model = module.export_model()
    kind = module.kind
    loader = LOADERS[kind] if kind != "clip_vision" else type(model).__name__
    model.save_pretrained(str(folder))
    source = resolve_folder(cfg["model"]["checkpoint"], "model.checkpoint")
    for name in _COPIED:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    with_heads = any(h.state() for h in heads.values())
    if with_heads:
        write_heads(folder, heads)
    meta = {**export_metadata(cfg, results), "format": "hf", "architecture": type(model).__name__, "loader": loader,
            "tasks": merged.task_names, "granularity": merged.grouping.spec, "groups": merged.group_names,
            "coefficients": merged.applied_coefficients().detach().tolist(), "buffer_policy": merged.buffer_policy}
    atomic_write_json(folder / "adamerge.json", meta)
    features = {"clip_vision": "the L2-normalised image embeddings",
                "sequence_classification": "the pooled output (BERT) or the last non-padding token's hidden state"}
    how = (f"Load it with `transformers.{loader}.from_pretrained(\"<this folder>\")`"
           + (f": the merged backbone; `heads.safetensors` holds each task's classification layer"
              f" (`<task>.weight`/`<task>.bias`, applied to {features.get(kind, 'its features')})." if with_heads else "."))
    front = ["---", "library_name: transformers", "tags:", "- merge", "- adamerge"]
    hub = _hub_name(cfg["base"])
    if hub:
        front += [f"base_model: {hub}"]
    front += ["---", ""]
    atomic_write_text(folder / "README.md", "\n".join(front) + model_card(meta, package=how))
    return f"a Hugging Face folder ({loader}.from_pretrained" + (", heads.safetensors beside it)" if with_heads else ")")
