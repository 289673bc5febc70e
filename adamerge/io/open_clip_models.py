"""open_clip models from local files, and zero-shot classification heads.

Nothing here downloads weights unless ``checkpoint`` is an open_clip pretrained *tag* (e.g.
``"openai"``), which is passed through to open_clip on purpose. open_clip is imported lazily.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from adamerge.errors import InputError
from adamerge.io.files import atomic_save_safetensors
from adamerge.io.state_dicts import load_state_dict

__all__ = ["create_open_clip", "zero_shot_head", "register_model_config"]

log = logging.getLogger(__name__)
Template = Union[str, Callable[[str], str]]
_CACHE_KEY_FIELD = "adamerge_zero_shot_key"


def _open_clip() -> Any:
    from adamerge._compat import ensure_torchvision

    ensure_torchvision()  # the CUDA torchvision wheel needs a fix before open_clip imports it
    import open_clip

    return open_clip


def register_model_config(path: str | os.PathLike[str]) -> list[str]:
    """Register an open_clip model config JSON file (or a folder of them); return the new names.

    A file ``tiny-vit.json`` becomes model name ``tiny-vit``. Thin wrapper over
    ``open_clip.add_model_config`` that fails loudly where open_clip silently skips a file
    lacking ``embed_dim``/``vision_cfg``/``text_cfg``.
    """
    oc = _open_clip()
    p = Path(path)
    if not p.exists():
        raise InputError(f"model config not found: {p}")
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    names = []
    for f in files:
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(f"could not parse model config {f} as JSON: {err}") from err
        required = ("embed_dim", "vision_cfg", "text_cfg")
        missing = [k for k in required if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise InputError(
                f"model config {f} lacks {missing[0]!r} (needs embed_dim, vision_cfg, text_cfg)"
            )
        names.append(f.stem)
    if not names:
        raise InputError(f"no *.json model configs in {p}")
    oc.add_model_config(p)
    return names


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _split_tower(sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """("full", sd) for a whole-CLIP state dict, ("visual", image-tower sd) otherwise."""
    visual = [k for k in sd if k.startswith("visual.")]
    if not visual:
        return "visual", sd
    if len(visual) == len(sd):
        return "visual", {k[len("visual."):]: v for k, v in sd.items()}
    return "full", sd


def _mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str | None:
    """First difference between a model's state dict and a checkpoint's, as words, or None."""
    for key in expected:
        if key not in got:
            return f"missing key {key!r}"
    for key in got:
        if key not in expected:
            return f"unexpected key {key!r}"
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape):
            shape, want = tuple(got[key].shape), tuple(ref.shape)
            return f"key {key!r} has shape {shape}, the model expects {want}"
    return None


def create_open_clip(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    tower: str = "visual",
) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """Build open_clip model ``name`` and return (image tower or full CLIP, eval preprocess).

    ``checkpoint`` may be:

    * ``None``: random initialisation (nothing is downloaded);
    * a full CLIP state dict file (keys ``visual.*`` plus text keys; ``.safetensors`` or a
      weights-only ``.pt/.pth/.bin``): loaded by ``open_clip.create_model_and_transforms(name,
      pretrained=path)``, strict;
    * an image-tower-only state dict (keys like ``conv1.weight``, or all prefixed ``visual.``,
      e.g. ``base.safetensors`` from :func:`adamerge.io.classic.convert_classic`): loaded into
      ``model.visual`` with ``strict=True``; only valid with ``tower="visual"``;
    * an open_clip pretrained tag for ``name`` (e.g. ``"openai"``): passed to open_clip, which
      may download it.

    ``tower`` is ``"visual"`` (return ``model.visual``) or ``"full"`` (the whole CLIP, needed by
    :func:`zero_shot_head`). The model is returned in eval mode on the CPU. A checkpoint that
    does not fit raises :class:`InputError` naming the file and the first missing, unexpected or
    wrongly shaped key.
    """
    oc = _open_clip()
    if tower not in ("visual", "full"):
        raise InputError(f"tower must be 'visual' or 'full', got {tower!r}")
    if oc.get_model_config(name) is None and not name.startswith(("hf-hub:", "local-dir:")):
        raise InputError(
            f"unknown open_clip model {name!r}: register its JSON config first "
            f"(register_model_config) or pick one of open_clip.list_models()"
        )

    def build(pretrained: str | None = None, quiet: bool = False) -> tuple[nn.Module, Callable]:
        # quiet: we load weights ourselves right after, so open_clip's "initialized randomly"
        # warning (logged on the root logger) would mislead.
        drop = _DropRandomInitWarning() if quiet else None
        root = logging.getLogger()
        if drop:
            root.addFilter(drop)
        try:
            model, _, preprocess = oc.create_model_and_transforms(
                name, pretrained=pretrained, pretrained_text=False
            )
        finally:
            if drop:
                root.removeFilter(drop)
        return model, preprocess

    if checkpoint is None:
        model, preprocess = build()
    else:
        ckpt = Path(checkpoint)
        if not ckpt.exists():
            if isinstance(checkpoint, str) and checkpoint in oc.list_pretrained_tags_by_model(name):
                model, preprocess = build(checkpoint)
                model.eval()
                return (model.visual if tower == "visual" else model), preprocess
            raise InputError(f"checkpoint file not found: {ckpt}")
        kind, sd = _split_tower(load_state_dict(ckpt))
        if kind == "full":
            model, preprocess = _load_full(build, ckpt, sd)
        else:
            if tower == "full":
                raise InputError(
                    f"{ckpt} holds only the image tower; tower='full' needs a full CLIP "
                    f"checkpoint (text tower weights too)"
                )
            model, preprocess = build(quiet=True)
            problem = _mismatch(model.visual.state_dict(), sd)
            if problem:
                raise InputError(
                    f"checkpoint {ckpt} does not fit the image tower of {name}: {problem}"
                )
            model.visual.load_state_dict(sd, strict=True)
    model.eval()
    return (model.visual if tower == "visual" else model), preprocess


def _load_full(
    build: Callable[..., tuple[nn.Module, Callable]], ckpt: Path, sd: dict[str, torch.Tensor]
) -> tuple[nn.Module, Callable]:
    """Load a full CLIP checkpoint through open_clip; turn its failures into one-line errors."""
    try:
        return build(str(ckpt))
    except RuntimeError as err:
        model, preprocess = build(quiet=True)
        problem = _mismatch(model.state_dict(), sd)
        if problem:
            raise InputError(f"checkpoint {ckpt} does not fit the model: {problem}") from err
        # Same keys and shapes, yet open_clip could not read it (e.g. a {"model": ...} wrapper
        # open_clip does not unwrap): load the state dict we already parsed.
        model.load_state_dict(sd, strict=True)
        return model, preprocess


def _render(templates: Sequence[Template], classnames: Sequence[str]) -> list[str]:
    texts = []
    for c in classnames:
        for t in templates:
            try:
                texts.append(t.format(c) if isinstance(t, str) else str(t(c)))
            except (KeyError, IndexError, ValueError) as err:
                raise InputError(
                    f"template {t!r} cannot be filled with a class name (use '{{}}'): {err}"
                ) from err
    return texts


def _as_callable(template: Template) -> Callable[[str], str]:
    if isinstance(template, str):
        return lambda c, _t=template: _t.format(c)
    return template


def _model_fingerprint(model: nn.Module) -> str:
    """Cheap fingerprint of the text side (names, shapes, dtypes, sums) for the cache key."""
    h = hashlib.sha256()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.startswith("visual.") or not t.is_floating_point():
                continue
            stats = (float(t.sum(dtype=torch.float64)), float(t.abs().sum(dtype=torch.float64)))
            h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|{stats[0]:.9e}|{stats[1]:.9e};".encode())
    return h.hexdigest()


def zero_shot_head(
    model: nn.Module,
    tokenizer_name_or_model_name: str | Callable[..., torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    cache_path: str | os.PathLike[str] | None = None,
    *,
    apply_logit_scale: bool = True,
    num_classes_per_batch: int | None = 10,
) -> dict[str, torch.Tensor]:
    """Zero-shot classification head ``{"weight": [C, D]}`` (no bias) from names and prompts.

    Built with ``open_clip.build_zero_shot_classifier``: each row is the L2-normalised mean of
    the L2-normalised text embeddings of one class's prompts. The caller must L2-normalise the
    image features: ``logits = F.normalize(image_features, dim=-1) @ weight.T``. With
    ``apply_logit_scale`` (default) the rows are multiplied by ``model.logit_scale.exp()``
    (about 100 for OpenAI CLIP), exactly like the classic task_vectors heads, so softmax and
    entropy see the usual CLIP temperature.

    ``model`` is a full CLIP (``create_open_clip(..., tower="full")``); the tokenizer is given
    by name (``open_clip.get_tokenizer``) or as a callable. ``templates`` are format strings
    with ``{}`` or callables. With ``cache_path`` (a ``.safetensors`` file) the head is stored
    with a key hashing the rendered prompts, tokenizer, scale flag and a fingerprint of the text
    tower; a later call with the same inputs loads it instead of recomputing, and a different
    key recomputes and overwrites the file.
    """
    if not hasattr(model, "encode_text"):
        raise InputError(
            f"zero_shot_head needs a full CLIP model with a text tower (create_open_clip(..., "
            f"tower='full')), got {type(model).__name__}"
        )
    for what, seq in (("classnames", classnames), ("templates", templates)):
        if isinstance(seq, str) or not isinstance(seq, Sequence) or len(seq) == 0:
            raise InputError(f"{what} must be a non-empty list, got {seq!r:.80}")
    texts = _render(templates, classnames)
    tok_id = (
        tokenizer_name_or_model_name
        if isinstance(tokenizer_name_or_model_name, str)
        else type(tokenizer_name_or_model_name).__qualname__
    )
    key_src = json.dumps(
        {
            "texts": texts,
            "num_classes": len(classnames),
            "num_templates": len(templates),
            "tokenizer": tok_id,
            "apply_logit_scale": apply_logit_scale,
            "model": _model_fingerprint(model),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()
    cache = Path(cache_path) if cache_path is not None else None
    if cache is not None and cache.is_file():
        cached = _read_cache(cache, key)
        if cached is not None:
            return cached

    oc = _open_clip()
    tokenizer = (
        oc.get_tokenizer(tokenizer_name_or_model_name)
        if isinstance(tokenizer_name_or_model_name, str)
        else tokenizer_name_or_model_name
    )
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            w = oc.build_zero_shot_classifier(
                model,
                tokenizer=tokenizer,
                classnames=list(classnames),
                # open_clip picks str.format or call from templates[0] alone, so a mixed list
                # breaks it: hand it callables only.
                templates=[_as_callable(t) for t in templates],
                num_classes_per_batch=num_classes_per_batch,
                device=device,
            )  # [D, C]
            weight = w.T.float().cpu().contiguous()
            if apply_logit_scale:
                scale = model.logit_scale.detach().float().exp().reshape(-1)[0].item()
                weight = weight * scale
    finally:
        model.train(was_training)
    head = {"weight": weight}
    if cache is not None:
        meta = {
            _CACHE_KEY_FIELD: key,
            "num_classes": str(len(classnames)),
            "num_templates": str(len(templates)),
            "apply_logit_scale": str(apply_logit_scale).lower(),
        }
        atomic_save_safetensors(head, cache, meta)
    return head


def _read_cache(cache: Path, key: str) -> dict[str, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(cache), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if meta.get(_CACHE_KEY_FIELD) != key:
                log.info("zero-shot head cache %s is for other inputs; recomputing", cache)
                return None
            return {"weight": fh.get_tensor("weight")}
    except Exception as err:  # noqa: BLE001 - an unreadable cache is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable zero-shot head cache {cache}: {err}", stacklevel=3)
        return None
