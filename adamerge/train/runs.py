"""Run folders: everything ``fit`` writes and ``eval`` / ``export`` read, in one place.

A run folder holds::

    config.yaml                  the resolved config (written before training starts)
    coefficients.safetensors     applied coefficients [T, G] (tasks and granularity in metadata)
    groups.json                  the coefficient groups and their member tensors
    method_state.safetensors     tensors a method needs besides the coefficients (e.g. DOGE's
                                 corrections), absent when there are none
    heads.safetensors            the trained heads (options.train_heads), absent otherwise
    metrics.csv                  every logged step of every attempt (first run and resumes)
    results.json                 method, options, solver summary, accuracies; written LAST, so
                                 its presence (with ``"status": "finished"``) marks a finished run
    checkpoints/                 Lightning checkpoints (coefficients, optimizer and loop state)
    logs/version_N/              the CSV (and TensorBoard) logs of attempt N

Every file is written atomically (temporary file, then rename).
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor, nn

from adamerge.errors import InputError
from adamerge.io.files import atomic_save_safetensors, atomic_write_json, atomic_write_text


def is_launched_rank() -> bool:
    """Whether this process is a rank other than 0 of a multi-process launch (Lightning's
    launcher sets RANK / LOCAL_RANK in the processes it starts): rank 0 writes the run folder."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0"

FINISHED = "finished"


class RunFolder:
    """Paths and readers/writers of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def stage_checkpoints(self, stage: int) -> Path:
        """Checkpoints of data stage ``stage`` (the first stage writes to ``checkpoints/``)."""
        return self.checkpoints if stage == 0 else self.checkpoints / f"stage{stage}"

    def next_log_version(self) -> int:
        return len(list(self.logs.glob("version_*")))

    # ------------------------------------------------------------------ config
    def write_config(self, cfg: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(cfg, sort_keys=False))

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise InputError(f"{self.path} is not a run folder: config.yaml is missing")
        cfg = yaml.safe_load(self.config_path.read_text())
        if not isinstance(cfg, dict):
            raise InputError(f"{self.config_path}: not a mapping")
        return cfg

    # ------------------------------------------------------------------ coefficients and state
    def save_coefficients(self, merged) -> None:
        """``coefficients.safetensors`` (applied values, [T, G]) and ``groups.json``."""
        coef = merged.applied_coefficients().detach().cpu().float().contiguous()
        atomic_save_safetensors(
            {"coefficients": coef},
            self.path / "coefficients.safetensors",
            {"tasks": json.dumps(merged.task_names), "granularity": json.dumps(merged.grouping.spec)},
        )
        members = merged.grouping.members()
        atomic_write_json(
            self.path / "groups.json",
            {
                "tasks": merged.task_names,
                "granularity": merged.grouping.spec,
                "groups": [{"name": n, "parameters": members[i]} for i, n in enumerate(merged.group_names)],
            },
        )

    def load_coefficients(self) -> Tensor:
        from safetensors import safe_open

        path = self.path / "coefficients.safetensors"
        if not path.is_file():
            raise InputError(f"{self.path} is not a finished run: coefficients.safetensors is missing")
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("coefficients")

    @property
    def state_path(self) -> Path:
        return self.path / "method_state.safetensors"

    def save_state(self, tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> None:
        """Method state beyond the coefficients (saved once, when the stage that makes it ends)."""
        atomic_save_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            self.state_path,
            {"meta": json.dumps(meta or {})},
        )

    @property
    def heads_path(self) -> Path:
        return self.path / "heads.safetensors"

    def save_heads(self, heads: Mapping[str, nn.Module]) -> None:
        """``options.train_heads``: the trained heads (``<task>.weight`` / ``<task>.bias``),
        written when a data stage ends; refused when one is not finite."""
        from adamerge.io.state_dicts import require_finite

        state = {f"{t}.{k}": v.detach().cpu().contiguous() for t, h in heads.items() for k, v in h.state().items()}
        require_finite(state, "the trained heads")
        atomic_save_safetensors(state, self.heads_path)

    def load_heads(self, heads: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """``heads`` with the run's trained weights in their place (frozen), or ``heads`` as they
        are when the run trained none. Each trained tensor must match the given head's shape."""
        from adamerge.io.state_dicts import load_state_dict, require_finite
        from adamerge.train.data import LinearHead

        if not self.heads_path.is_file():
            return dict(heads)
        state = load_state_dict(self.heads_path)
        require_finite(state, str(self.heads_path))
        out = {}
        for t, head in heads.items():
            given = head.state()
            trained = {k: state.get(f"{t}.{k}") for k in given}
            for k, v in trained.items():
                if v is None or tuple(v.shape) != tuple(given[k].shape):
                    got = "missing" if v is None else f"of shape {tuple(v.shape)}"
                    raise InputError(f"{self.heads_path}: the trained '{t}.{k}' is {got}; the head of '{t}' has "
                                     f"{tuple(given[k].shape)} (were the heads changed after training?)")
            out[t] = LinearHead(trained["weight"], trained.get("bias"), getattr(head, "normalize", False))
        return out

    def state_meta(self) -> dict[str, Any]:
        """The metadata saved with the method state (``{}`` when there is none)."""
        if not self.state_path.is_file():
            return {}
        from safetensors import safe_open

        try:
            with safe_open(str(self.state_path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        except Exception as err:
            raise InputError(f"{self.state_path}: cannot read the method state ({err})") from None
        if not isinstance(meta, dict):
            raise InputError(f"{self.state_path}: the method state's metadata is not a mapping")
        return meta

    def stages_done(self) -> int:
        """How many solver stages have finished (recorded with the method state)."""
        if not self.state_path.is_file():
            return 0
        return int(self.state_meta().get("stages_done", 1))

    def load_state(self) -> dict[str, Tensor] | None:
        """The saved method state, or ``None`` when the run has none."""
        if not self.state_path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(self.state_path))
        except Exception as err:  # a truncated or corrupt file
            raise InputError(f"{self.state_path}: cannot read the method state ({err})") from None

    # ------------------------------------------------------------------ metrics
    def collect_metrics(self) -> None:
        """Join the CSV logs of the first run and of every resume into ``metrics.csv``."""
        parts = sorted(self.logs.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
        rows: list[dict] = []
        fields: list[str] = []
        for part in parts:
            with open(part, newline="") as f:
                reader = csv.DictReader(f)
                fields += [c for c in reader.fieldnames or [] if c not in fields]
                rows += list(reader)
        if not rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())

    def read_metrics(self) -> list[dict]:
        """Rows of ``metrics.csv`` (empty cells dropped)."""
        with open(self.path / "metrics.csv", newline="") as f:
            return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]

    # ------------------------------------------------------------------ results
    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    def write_results(self, results: dict) -> None:
        """Written last: marks the run finished."""
        atomic_write_json(self.results_path, {"status": FINISHED, **results})

    def read_results(self) -> dict:
        if not self.results_path.is_file():
            return {}
        return json.loads(self.results_path.read_text())

    def is_finished(self) -> bool:
        return self.results_path.is_file() and self.read_results().get("status", FINISHED) == FINISHED

    def require_finished(self, files: tuple[str, ...] = ("config.yaml", "results.json")) -> None:
        """A clear error unless the run finished (results.json says so) and ``files`` exist."""
        for name in files:
            if not (self.path / name).is_file():
                raise InputError(f"{self.path} is not a finished run: {name} is missing (did fit stop early? fit --resume continues it)")
        if not self.is_finished():
            raise InputError(f"{self.path} is not a finished run (results.json has status {self.read_results().get('status')!r})")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of a run's ``metrics.csv`` (empty cells dropped)."""
    return RunFolder(run_dir).read_metrics()


__all__ = ["RunFolder", "read_metrics", "FINISHED"]
