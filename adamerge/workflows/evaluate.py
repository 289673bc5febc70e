"""``adamerge eval`` and ``adamerge inspect``: scores per task of data-free merges over a config's
inputs, or of a finished run; the coefficient groups a granularity makes over a model."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adamerge.errors import InputError

__all__ = ["evaluate_merges", "evaluate_run", "coefficient_groups"]


def evaluate_merges(config: str | Path, overrides: Sequence[tuple[str, Any]] = (), method: str | None = None,
                    lams: Sequence[float] | None = None, density: float | None = None) -> dict[str, dict | None]:
    """One row per merge setting: ``method`` (a registered data-free merge, or ``pretrained``) at
    each λ of ``lams``. ``overrides`` named ``options.KEY`` are the merge's options (all must be
    known to it); the config's ``options:`` section is shared with ``fit``, so only the keys the
    merge declares are read from it. Every option is checked before any merge runs."""
    from adamerge.config import set_dotted
    from adamerge.merges import get_merge, merged_state
    from adamerge.methods import build_data_free
    from adamerge.plan import RunPlan
    from adamerge.train.evaluation import evaluate

    given = [(k[len("options."):], v) for k, v in overrides if k.startswith("options.")]
    plan = RunPlan.for_inputs(config, [(k, v) for k, v in overrides if not k.startswith("options.")])
    cfg, parts = plan.cfg, plan.parts
    model, tv, heads, streams = parts["model"], parts["tv"], parts["heads"], parts["streams"]
    method = method or "task_arithmetic"
    if method == "pretrained":
        model.load_state_dict(merged_state(tv.base, {}))
        return {"pretrained": evaluate(model, heads, streams)}
    spec = get_merge(method)
    names = spec.option_names()
    options = {k: v for k, v in (cfg.get("options") or {}).items() if k in names}
    for key, value in given:
        set_dotted(options, key, value)
    if density is not None:
        options["density"] = density
    if lams and "lam" not in names:
        raise InputError(f"merge '{method}' has no λ (--lam); its options: {names}")
    spec.options(options)
    rows = {}
    for lam in lams or [None]:
        opts = {**options, **({} if lam is None else {"lam": lam})}
        # the row's name: λ (always, for merges that have one), then the options given
        shown = ({"lam": spec.options(opts).lam} if "lam" in names else {}) | opts
        label = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        mm = build_data_free(method, model, tv, options=opts, heads=heads, streams=streams)
        rows[f"{method}({label})" if label else method] = evaluate(mm, heads, streams)
    return rows


def evaluate_run(run_dir: str | Path) -> dict[str, dict | None]:
    """A finished run's scores: recomputed from its coefficients, or (own-loop methods such as T3,
    whose model depends on each input) the scores the run recorded."""
    from adamerge.methods import create_method
    from adamerge.train.evaluation import evaluate
    from adamerge.train.runs import RunFolder
    from adamerge.workflows.export import load_run

    run = RunFolder(run_dir)
    run.require_finished()
    if create_method(run.read_config()["method"]).own_loop:
        return {f"run:{Path(run_dir).name} (recorded)": run.read_results().get("after")}
    merged, parts, _ = load_run(run_dir)
    return {f"run:{Path(run_dir).name}": evaluate(merged, parts["heads"], parts["streams"])}


def coefficient_groups(config: str | Path, overrides: Sequence[tuple[str, Any]] = (),
                       granularity: str | None = None) -> dict:
    """The groups a granularity (default: the config's) makes over the config's model: ``{"granularity",
    "groups": [{"group", "tensors", "parameters", "names"}]}``. Reads the base weights' shapes only."""
    from adamerge.config import build_model, load_config
    from adamerge.core.granularity import make_grouping
    from adamerge.io.state_dicts import load_state_dict

    cfg = load_config(config, list(overrides))
    model, _ = build_model(cfg["model"])
    base = load_state_dict(cfg["base"], prefix=cfg["prefix"])
    shapes = {n: base[n].shape if n in base else p.shape for n, p in model.named_parameters()}
    grouping = make_grouping(granularity or cfg["options"].get("granularity", "layer"), shapes, seed=cfg["seed"])
    sizes = grouping.group_sizes(shapes)
    members = grouping.members()
    return {"granularity": grouping.spec,
            "groups": [{"group": n, "tensors": len(members[i]), "parameters": sizes[i], "names": members[i]}
                       for i, n in enumerate(grouping.group_names)]}
