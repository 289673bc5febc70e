"""Run configuration: YAML files with dotted overrides, resolved into models, task vectors,
heads and streams. The resolved config is what a run folder saves as ``config.yaml``.

Schema (paths are relative to the config file)::

    seed: 0
    model: {source: open_clip, name: ViT-B-32, checkpoint: null}   # a registered source (adamerge.sources):
                                                                   # open_clip, timm, python (target: "pkg.mod:fn"),
                                                                   # tiny_vit, tiny_cnn, efficientnet_lite0, hf
                                                                   # (kind: clip_vision | sequence_classification |
                                                                   # causal_lm, checkpoint: the base's folder;
                                                                   # base and experts are then folders too)
    base: zeroshot.safetensors          # the pretrained state dict (keys as model.state_dict())
    prefix: null                        # strip this key prefix when reading weight files
    experts: {mnist: experts/mnist.safetensors, ...}
    heads: {mnist: heads/mnist.safetensors, ...}   # or {path: ..., normalize: true}
                                                   # or {classnames: [...], templates: [...]} (CLIP zero-shot)
    data: {mnist: {folder: data/mnist/test}, ...}   # or {tensors: file.safetensors} with x (and y),
                                                    # or {text: f.txt} / {jsonl: f.jsonl} (hf text models)
    labeled: {mnist: {tensors: train.safetensors}}  # optional: a labeled split (few-shot methods);
                                                    # never the scored stream
    storage_dtype: auto                 # the task vectors' storage: auto (float64 for a float64
                                        # base, else float32), float32, bfloat16 or float64
    method: adamerging
    options: {granularity: layer, steps: 500, lr: 0.001, batch_size: 16, ...}
    trainer: {accelerator: cpu, devices: 1, strategy: auto}
    run_dir: runs/example
    cache_dir: null                     # experts' cached predictions (expert_distill); share it
                                        # between runs over the same experts and streams
    pool: {mnist: experts/mnist.safetensors, other: ft/other.safetensors}  # fw_merging's candidates
                                        # (safetensors; a list of paths names them by file stem,
                                        # a_x, b_x for a/x, b/x where stems repeat;
                                        # default: the experts)
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

import yaml
from torch import nn

from adamerge.errors import InputError

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "prefix": None,
    "storage_dtype": "auto",
    "method": "adamerging",
    "options": {},
    "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto"},
    "run_dir": "runs/adamerge",
    "eval_batch_size": 256,
    "checkpoint_every": 50,
    "cache_dir": None,  # cached expert predictions (expert_distill); default <run_dir>/cache
}
REQUIRED = ("model", "base", "experts", "heads", "data")
OPTIONAL = ("labeled", "pool", "tune")  # sections without a default
KNOWN_KEYS = tuple(DEFAULTS) + REQUIRED + OPTIONAL
TASK_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


def parse_value(text: str) -> Any:
    """A command-line value, typed as YAML would type it (``0.1`` → float, ``[0,1]`` → list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """``set_dotted(cfg, "options.steps", 10)`` sets ``cfg["options"]["steps"] = 10``."""
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: list[tuple[str, Any]] | None = None) -> dict:
    """Read YAML, apply dotted overrides, fill defaults and make paths absolute (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file (a YAML config is UTF-8 text)") from None
    return resolve_config(raw, overrides, path.parent, where=str(path))


def resolve_config(raw: Any, overrides: list[tuple[str, Any]] | None, root: Path, where: str = "config") -> dict:
    """A config mapping (as read from YAML) with overrides applied, defaults filled and paths
    made absolute relative to ``root``."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: the top level must be a mapping")
    from adamerge.registry import did_you_mean

    for key in list(raw) + [k.split(".")[0] for k, _ in overrides or []]:
        if key not in KNOWN_KEYS:
            raise InputError(f"{where}: unknown config key '{key}'{did_you_mean(key, list(KNOWN_KEYS))}; known: {sorted(KNOWN_KEYS)}")
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in copy.deepcopy(raw).items():
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) and isinstance(value, dict) else value
    for key, value in overrides or []:
        set_dotted(cfg, key, value)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise InputError(f"{where}: missing required section '{missing[0]}'")
    return resolve_paths(cfg, root)


def resolve_paths(cfg: dict, root: Path) -> dict:
    """Turn every relative path of the config into an absolute one (relative to ``root``)."""

    def fix(p):
        return None if p is None else str((root / p).resolve()) if not Path(str(p)).is_absolute() else str(p)

    cfg["base"] = fix(cfg["base"])
    cfg["experts"] = {t: fix(p) for t, p in cfg["experts"].items()}
    heads = {}
    for t, spec in cfg["heads"].items():
        spec = {"path": spec} if isinstance(spec, str) else dict(spec)
        if "path" in spec:
            spec["path"] = fix(spec["path"])
        heads[t] = spec
    cfg["heads"] = heads
    for section in ("data", "labeled"):
        if not cfg.get(section):
            continue
        data = {}
        for t, spec in cfg[section].items():
            spec = {"folder": spec} if isinstance(spec, str) else dict(spec)
            for key in ("folder", "tensors", "text", "jsonl"):
                if key in spec:
                    spec[key] = fix(spec[key])
            data[t] = spec
        cfg[section] = data
    if cfg["model"].get("checkpoint"):
        cfg["model"]["checkpoint"] = fix(cfg["model"]["checkpoint"])
    if cfg.get("pool"):
        pool = cfg["pool"]
        if isinstance(pool, list):
            # named by file stem (a/x.safetensors -> x); stems that repeat take as many parent
            # folders as make them unique, joined by "_" (a/x, b/x -> a_x, b_x; r1/a/x, r2/a/x ->
            # r1_a_x, r2_a_x); a file listed twice is refused below
            if not all(isinstance(p, str) for p in pool):
                raise InputError("'pool' must map candidate names to safetensors paths (or list the paths)")
            parts = [Path(fix(p)).with_suffix("").parts for p in pool]
            depth = [1] * len(pool)
            while True:
                names = ["_".join(pp[-d:]).lstrip("/_") or pp[-1] for pp, d in zip(parts, depth)]
                clash = {n for n in names if names.count(n) > 1}
                grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
                if not clash or not grow:
                    break
                for i in grow:
                    depth[i] += 1
            if clash:
                same = [i for i, n in enumerate(names) if n in clash]
                if len({str(Path(fix(pool[i])).resolve()) for i in same}) < len(same):
                    raise InputError(f"'pool' lists {pool[same[0]]} twice; list each candidate once")
                raise InputError(f"'pool': cannot name {[pool[i] for i in same]} apart by their folders; "
                                 "give 'pool' as a mapping {name: path}")
            pool = dict(zip(names, pool))
        if not isinstance(pool, dict) or not all(isinstance(p, str) for p in pool.values()):
            raise InputError("'pool' must map candidate names to safetensors paths (or list the paths)")
        resolved = {str(n): fix(p) for n, p in pool.items()}
        seen: dict[str, str] = {}
        for name, path in resolved.items():
            real = str(Path(path).resolve())
            if real in seen:
                raise InputError(f"'pool' lists {path} twice (as '{seen[real]}' and '{name}'); list each candidate once")
            seen[real] = name
        cfg["pool"] = resolved
    cfg["run_dir"] = fix(cfg["run_dir"])
    if cfg.get("cache_dir"):
        cfg["cache_dir"] = fix(cfg["cache_dir"])
    return cfg


def build_model(spec: dict) -> tuple[nn.Module, Callable | None]:
    """The architecture and its preprocessing transform (``None`` if inputs come as tensors),
    through the model-source registry (:mod:`adamerge.sources`)."""
    from adamerge.sources import build_model as build

    return build(spec)


def build_heads(cfg: dict, cache_dir: Path | None = None) -> dict[str, nn.Module]:
    from adamerge.train.data import LinearHead
    from adamerge.io.state_dicts import load_state_dict

    heads = {}
    for task, spec in cfg["heads"].items():
        if "path" not in spec and cfg["model"].get("source") == "hf":
            from adamerge.io.hf_models import hf_head

            heads[task] = hf_head(cfg, task, spec, cache_dir)
        elif "path" in spec:
            heads[task] = LinearHead.from_state_dict(load_state_dict(spec["path"]), bool(spec.get("normalize", False)), spec["path"])
        elif "classnames" in spec:
            from adamerge.io.open_clip_models import zero_shot_head

            m = cfg["model"]
            full, _ = _full_clip(m)
            cache = None if cache_dir is None else cache_dir / f"zeroshot_{task}.safetensors"
            sd = zero_shot_head(full, m["name"], spec["classnames"], spec.get("templates", ["a photo of a {}."]), cache)
            heads[task] = LinearHead.from_state_dict(sd, normalize=True, source=f"zero-shot head '{task}'")
        else:
            raise InputError(f"heads.{task}: give 'path' (a weight file) or 'classnames' (+ 'templates')")
    return heads


def _full_clip(m: dict):
    from adamerge.io.open_clip_models import create_open_clip

    return create_open_clip(m["name"], m.get("checkpoint"), tower="full")


def build_streams(cfg: dict, transform: Callable | None, section: str = "data") -> list:
    """The streams of a config section: ``data`` (the scored, unlabeled-at-training streams) or
    ``labeled`` (a labeled split for few-shot methods, never scored)."""
    from adamerge.train.data import stream_from_folder, stream_from_tensors
    from adamerge.io.state_dicts import load_state_dict

    streams = []
    for task, spec in cfg[section].items():
        if "tensors" in spec:
            sd = load_state_dict(spec["tensors"])
            if "x" not in sd:
                raise InputError(f"data.{task}: {spec['tensors']} needs a tensor named 'x' (and optionally 'y')")
            streams.append(stream_from_tensors(task, sd["x"], sd.get("y"), source=spec["tensors"]))
        elif "text" in spec or "jsonl" in spec:
            from adamerge.train.text_data import stream_from_text

            streams.append(stream_from_text(task, spec, transform))
        elif "folder" in spec:
            if transform is None:
                raise InputError(f"data.{task}: an image folder needs a model with a preprocessing transform")
            streams.append(stream_from_folder(task, spec["folder"], transform))
        else:
            raise InputError(f"data.{task}: give 'folder', 'tensors', 'text' or 'jsonl'")
    return streams


def check_tasks(cfg: dict) -> list[str]:
    """The task names, identical across experts, heads and data (else a clear error)."""
    tasks = list(cfg["experts"])
    for t in tasks:  # task names become file names (caches, exports): no path can hide in one
        if not isinstance(t, str) or not TASK_NAME.fullmatch(t) or t.startswith("."):
            raise InputError(f"task name {t!r} must be letters, digits and _ . + - (it names files), not start with '.'")
    for section in ("heads", "data"):
        names = list(cfg[section])
        if sorted(names) != sorted(tasks):
            extra = sorted(set(names) - set(tasks)) or sorted(set(tasks) - set(names))
            raise InputError(f"{section} tasks {sorted(names)} do not match experts {sorted(tasks)} (check '{extra[0]}')")
    seen: dict[str, str] = {}
    for t, p in cfg["experts"].items():
        if p in seen:
            raise InputError(f"experts '{seen[p]}' and '{t}' point to the same file {p}")
        seen[p] = t
    return tasks


def build_all(cfg: dict, *, cache_heads: bool = True, shard: tuple[int, int] | None = None) -> dict:
    """Everything a run needs: model, task vectors, heads and streams (built, not checked against
    each other: :class:`adamerge.plan.RunPlan` runs those checks, once). ``shard=(rank, world)``:
    this process keeps only its shard of the task vectors of the model's parameters."""
    from adamerge.core.task_vectors import ShardRequest, TaskVectors

    tasks = list(cfg["experts"])
    model, transform = build_model(cfg["model"])
    reader = getattr(model, "read_weights", None)  # a source's own folders (Hugging Face), else weight files
    request = None if shard is None else ShardRequest(tuple(n for n, _ in model.named_parameters()), *shard)
    tv = TaskVectors.from_files(cfg["base"], cfg["experts"], dtype=cfg["storage_dtype"], prefix=cfg["prefix"], reader=reader,
                                shard=request)
    heads = build_heads(cfg, Path(cfg["run_dir"]) / "cache" if cache_heads else None)
    streams = build_streams(cfg, transform)
    labeled = build_streams(cfg, transform, "labeled") if cfg.get("labeled") else None
    return {"model": model, "tv": tv, "heads": heads, "streams": streams, "tasks": tasks, "labeled": labeled}


def check_labels(heads: dict, streams: list) -> None:
    """Every label a stream carries is a class of its task's head (else accuracy would be wrong)."""
    for s in streams:
        labels = s.labels()
        if labels is None or len(labels) == 0:
            continue
        classes = heads[s.name].num_classes
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise InputError(f"task '{s.name}': labels in {s.source} range over [{low}, {high}], but its head has"
                             f" {classes} classes (a head or data file of another task?)")


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
