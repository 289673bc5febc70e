"""``t3``: test-time merging without backpropagation (T3 per input, T3_B per batch).

Nothing is trained. ``fit`` runs the merger over the streams and writes the run folder: its
settings, the coefficients it chose for every input (``lambdas.safetensors``: ``[N, T]`` per
task), their statistics (results.json ``t3``) and, with labels, the accuracy. ``export`` writes
a package that ``adamerge predict`` serves (the base, the stacked task vectors, the heads and the
settings), not a single merged checkpoint: the weights depend on each input.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from adamerge.errors import InputError
from adamerge.methods.base import FitContext, Method, MethodConfig, register_method
from adamerge.progress import Progress
from adamerge.solvers.base import parse_options
from adamerge.core.test_time import T3Options, TestTimeMerger, t3_merged_model

PACKAGE_KIND = "t3"


def t3_options(cfg: MethodConfig) -> T3Options:
    return parse_options(T3Options, cfg.method_args, "method 't3'")


def _stats(values: torch.Tensor, names: list[str]) -> dict:
    """mean / std / min / max per column (expert)."""
    return {n: {"mean": float(c.mean()), "std": float(c.std()) if c.numel() > 1 else 0.0,
                "min": float(c.min()), "max": float(c.max())} for n, c in zip(names, values.t())}


@register_method("t3")
class T3(Method):
    description = "test-time merging from the pretrained/expert divergence, per input (T3) or per batch (T3_B)"
    own_loop = True
    defaults = {"granularity": "task", "steps": 0}
    method_args_class = T3Options

    def check(self, cfg: MethodConfig) -> None:
        t3_options(cfg)
        if cfg.granularity != "task":
            raise InputError("t3 sets one coefficient per task and input: granularity must be 'task'")

    def solvers(self, cfg: MethodConfig) -> list:
        return []

    def run(self, ctx: FitContext) -> dict:
        opts = t3_options(ctx.cfg)
        merger = TestTimeMerger(t3_merged_model(ctx.model, ctx.tv, ctx.cfg.buffer_policy), ctx.heads, opts)
        tasks = ctx.tv.task_names
        total = sum(len(s) for s in ctx.streams)
        lambdas, divergences, correct, labelled = {}, {}, {}, True
        start = time.perf_counter()
        with Progress(total, f"t3 per {opts.per}", enabled=ctx.progress, unit="inputs") as bar:
            for s in ctx.streams:
                labels = s.labels()
                labelled = labelled and labels is not None
                coefs, divs, hits = [], [], 0
                for lo in range(0, len(s), opts.batch_size):
                    idx = torch.arange(lo, min(lo + opts.batch_size, len(s)))
                    x = s.inputs(idx)
                    logits, coef, div = merger.predict(x, s.name)
                    coefs.append(coef)
                    divs.append(div)
                    if labels is not None:
                        hits += int((logits.argmax(-1) == labels[idx]).sum())
                    bar.update(len(idx))
                lambdas[s.name], divergences[s.name], correct[s.name] = torch.cat(coefs), torch.cat(divs), hits
        seconds = time.perf_counter() - start
        from adamerge.io.files import atomic_save_safetensors

        atomic_save_safetensors({f"{t}": v.contiguous() for t, v in lambdas.items()}, ctx.run.path / "lambdas.safetensors",
                                {"experts": json.dumps(tasks), "layout": "per task: [inputs, experts]"})
        out = {
            "t3": {
                "settings": dataclasses.asdict(opts),
                "inputs": total,
                "inputs_per_second": total / max(seconds, 1e-9),
                "coefficients": {t: _stats(v, tasks) for t, v in lambdas.items()},
                "divergence": {t: _stats(v, tasks) for t, v in divergences.items()},
            },
            "steps": 0,
        }
        if labelled:
            from adamerge.train.evaluation import accuracy_table

            out["after"] = accuracy_table(correct, {s.name: len(s) for s in ctx.streams})
        return out

    def export(self, folder: Path, run_dir, cfg: dict, results: dict) -> str:
        from adamerge.config import build_heads
        from adamerge.io.export_files import export_metadata, model_card, write_heads
        from adamerge.io.files import atomic_save_safetensors, atomic_write_json, atomic_write_text
        from adamerge.core.task_vectors import TaskVectors

        # what the package holds, and nothing more (no model, no data streams)
        tv = TaskVectors.from_files(cfg["base"], cfg["experts"], dtype=cfg["storage_dtype"], prefix=cfg["prefix"])
        atomic_save_safetensors(dict(tv.base), folder / "base.safetensors", {"format": "pt"})
        atomic_save_safetensors({k: v.contiguous() for k, v in tv.vectors.items()}, folder / "task_vectors.safetensors",
                                {"tasks": json.dumps(tv.task_names), "layout": "[tasks, *shape] per key"})
        write_heads(folder, build_heads(cfg, Path(cfg["run_dir"]) / "cache"))
        meta = export_metadata(cfg, results, kind=PACKAGE_KIND)
        meta["t3"] = {"settings": results["t3"]["settings"], "tasks": tv.task_names}
        atomic_write_json(folder / "adamerge.json", meta)
        atomic_write_text(folder / "README.md", model_card(meta, package=(
            "This is a **test-time merging package**, not one merged checkpoint: the weights depend on each"
            " input (T3) or batch (T3_B). `base.safetensors` holds θ0, `task_vectors.safetensors` the stacked"
            " τ ([tasks, *shape] per key), `heads.safetensors` the heads; serve it with"
            " `adamerge predict EXPORT INPUT --task NAME`.")))
        return "a T3 package (base, task vectors, heads, settings) for adamerge predict"

