"""Issue 23: does every seed system earn its demo row? Runs the demo settings with the seed
systems' default rows, their papers' settings and the variants measured while choosing the
defaults, then prints one table per setting and the summary the issue asks for.

    python experiments/seed_systems.py OUT --settings quick,full0,full1,sub2      # development
    python experiments/seed_systems.py OUT --settings s3,s4                       # held out, once
    python experiments/seed_systems.py OUT --settings quick --rows "atlas(test_time)" --variants

Each setting writes ``OUT/<setting>`` (a demo output folder; finished rows are reused, so a rerun
continues). The summary judges each default row against task arithmetic λ = 0.3 on the mean, and
``fw_merging(soft)`` and ``concrete_adamerging(layer)`` against ``adamerging(layer)`` too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from adamerge.workflows import demo

SETTINGS: dict[str, dict] = {
    "quick": {"quick": True},
    "full0": {"seed": 0},
    "full1": {"seed": 1},
    "sub2": {"seed": 2, "tasks": ["digits", "textile", "opencv_digits"], "image_size": 48},
    "s3": {"seed": 3, "tasks": ["mnist", "textile", "fashion_mnist"], "image_size": 32},  # held out
    "s4": {"seed": 4, "image_size": 48},  # held out
}
DEVELOPMENT = ("quick", "full0", "full1", "sub2")

# the rows the issue judges (names kept), with the reference rows they are judged against
DEFAULT_ROWS = ["t3", "t3_b", "fw_merging(hard)", "fw_merging(soft)", "atlas(test_time)", "concrete_ta",
                "concrete_adamerging(layer)", "doge"]
REFERENCES = ["adamerging(layer)"]
MUST_BEAT_ADAMERGING = ("fw_merging(soft)", "concrete_adamerging(layer)")
TA = "task_arithmetic(lam=0.3)"

# DOGE's δ as the port leaves it (the default before session 34): the variants of sessions 32-33 vary that
_ADAM_DELTA = {"span": False, "project": "gradient"}

# variants measured while choosing defaults (development settings only); the demo keeps the
# paper's settings as rows of its own (demo.LEARNED: "...(paper)")
VARIANTS: dict[str, tuple[str, dict]] = {
    "atlas(test_time,teacher=pretrained,init=0.3)": ("atlas", {"lr": 1e-2, "objective": "weak_strong", "init": 0.3,
                                                                "method_args": {"teacher": "pretrained"}}),
    "atlas(test_time,init=0)": ("atlas", {"lr": 1e-2, "objective": "weak_strong", "init": 0.0}),
    "atlas(test_time,trusted=0.5)": ("atlas", {"lr": 1e-2, "objective": "weak_strong", "method_args": {"trusted_fraction": 0.5, "trusted_share": 0.5}}),
    "atlas(test_time,paper_view)": ("atlas", {"lr": 1e-2, "objective": "weak_strong", "method_args": {"flip": True, "crop_min": 0.5}}),
    "fw_merging(hard,schedule,trusted_distill)": ("fw_merging", {"objective": "trusted_distill",
                                                                 "method_args": {"step_rule": "schedule"}}),
    "atlas(test_time,no_flip)": ("atlas", {"lr": 1e-2, "objective": "weak_strong", "method_args": {"flip": False, "crop_min": 0.5}}),
    # session 32: a weaker DOGE merge (δ strengthens it; sub2 and full1 prefer task arithmetic's strength)
    "doge(lam_mean=0.25)": ("doge", {"solver_args": {**_ADAM_DELTA, "lam_mean": 0.25}}),
    "doge(lam_mean=0.2)": ("doge", {"solver_args": {**_ADAM_DELTA, "lam_mean": 0.2}}),
    "doge(trim=0.2)": ("doge", {"solver_args": {**_ADAM_DELTA, "trim": 0.2}}),
    "doge(steps=100)": ("doge", {"steps": 100, "solver_args": _ADAM_DELTA}),
    "doge(keep=subspace)": ("doge", {"solver_args": {**_ADAM_DELTA, "keep": "subspace"}}),
    "doge(project=update)": ("doge", {"solver_args": {**_ADAM_DELTA, "project": "update"}}),
    # session 33: Adam moves every entry of δ by about lr per step whatever the layer's scale; at
    # lr 1e-4 the demo zoo's (Σλ)δ came out a median 4.5x the merged task vector's norm (sub2)
    "doge(lr=1e-5)": ("doge", {"solver_args": {**_ADAM_DELTA, "lr": 1e-5}}),
    "doge(lr=3e-5)": ("doge", {"solver_args": {**_ADAM_DELTA, "lr": 3e-5}}),
    # session 34: the loss sees δ only through its inner products with the task vectors' rows;
    # keep that part (each row projected onto their span: the same loss, none of the rest)
    "doge(span)": ("doge", {"solver_args": {"span": True, "project": "gradient"}}),
    "doge(span,project=update)": ("doge", {"solver_args": {"span": True, "project": "update"}}),  # the default since session 34
    "doge(span,trim=1)": ("doge", {"solver_args": {"span": True, "trim": 1.0, "project": "gradient"}}),
    # the default before session 34 (Adam's δ as the port leaves it)
    "doge(adam_delta)": ("doge", {"solver_args": _ADAM_DELTA}),
    # session 35: on sub2's rebuilt zoo the collapse-safe objective lets the mask pull textile down to
    # its own expert's level (59.0; task arithmetic 73.8); an objective anchored at the start where the
    # experts are unsure (the paper's entropy is the demo's row concrete_adamerging(layer,paper))
    "concrete_adamerging(layer,trusted_distill)": ("concrete_adamerging", {"lr": 1e-2, "objective": "trusted_distill"}),
}


def measured(folder: Path) -> dict[str, dict]:
    """Every row measured in a demo output folder: the last demo call's table (``results.json``,
    which holds only the rows that call named, and the data-free rows) plus every finished run
    under ``runs/`` whose resolved method config is still the current one (a run made under other
    method defaults is stale and left out)."""
    from adamerge.errors import InputError
    from adamerge.methods import create_method
    from adamerge.methods.base import same_run
    from adamerge.train.runs import RunFolder

    methods = dict(json.loads((folder / "results.json").read_text())["methods"])
    for name in demo.LEARNED:
        run_dir = folder / "runs" / demo._slug(name)
        marker = run_dir / "demo_row.json"
        if name in methods or not marker.is_file() or not RunFolder(run_dir).is_finished():
            continue
        spec = json.loads(marker.read_text())
        method = create_method(spec["method"])
        try:
            cfg = method.config(spec["options"])
        except InputError:  # options no longer valid under today's defaults: a stale row
            continue
        current = json.loads(json.dumps(method.settings(cfg), default=str))
        res = RunFolder(run_dir).read_results()
        # a run made before the demo recorded the parsed option classes is compared on its resolved
        # config only (the marker's, or else the one results.json records): a changed default of an
        # option class (method_args, solver_args) goes unseen there, so rerun such rows
        legacy = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
        if not any(same_run(spec.get("resolved", res.get("options")), ok) for ok in (current, legacy)):
            continue
        methods[name] = {"kind": demo.row_kind(spec["method"]), "mean": res["after"]["mean"], "per_task": res["after"]["per_task"]}
    return methods


def summary(folder: Path) -> list[dict]:
    """One row per judged method in a demo output folder: its mean, the margins it is judged on."""
    methods = measured(folder)
    ta, ada = methods[TA]["mean"], methods.get("adamerging(layer)", {}).get("mean")
    rows = []
    for name, m in methods.items():
        if m["kind"] in ("reference", "data_free") and name != "doge":
            continue
        row = {"setting": folder.name, "row": name, "mean": m["mean"], "vs_ta": m["mean"] - ta,
               "vs_adamerging": None if ada is None else m["mean"] - ada, "per_task": m["per_task"]}
        need_ada = name in MUST_BEAT_ADAMERGING
        row["holds"] = row["vs_ta"] >= 0 and (not need_ada or (ada is not None and row["vs_adamerging"] >= 0))
        rows.append(row)
    return rows


def print_summary(folders: list[Path]) -> None:
    print("| setting | row | mean | vs TA λ=0.3 | vs adamerging(layer) | holds |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for folder in folders:
        for r in summary(folder):
            ada = "–" if r["vs_adamerging"] is None else f"{100 * r['vs_adamerging']:+.1f}"
            judged = r["row"] in DEFAULT_ROWS
            print(f"| {r['setting']} | {r['row']} | {100 * r['mean']:.1f} | {100 * r['vs_ta']:+.1f} | {ada} | "
                  f"{('yes' if r['holds'] else '**no**') if judged else ''} |")


def print_matrix(folders: list[Path]) -> None:
    """README's table: a row per judged method, a column per setting, the mean and its margin
    over task arithmetic λ = 0.3 (and over adamerging(layer) where the issue asks for it)."""
    data = {f.name: {r["row"]: r for r in summary(f)} for f in folders}
    ref = {f.name: measured(f) for f in folders}
    print("| row | " + " | ".join(data) + " |")
    print("| --- | " + " | ".join("---:" for _ in data) + " |")
    for name in ("experts", TA, "adamerging(layer)"):
        print(f"| {name} | " + " | ".join(f"{100 * ref[s][name]['mean']:.1f}" if name in ref[s] else "–" for s in data) + " |")
    for name in DEFAULT_ROWS:
        cells = []
        for s in data:
            r = data[s].get(name)
            if r is None:
                cells.append("–")
                continue
            cell = f"{100 * r['mean']:.1f} ({100 * r['vs_ta']:+.1f}"
            if name in MUST_BEAT_ADAMERGING and r["vs_adamerging"] is not None:
                cell += f"; {100 * r['vs_adamerging']:+.1f}"
            cells.append(cell + ")" + ("" if r["holds"] else " **✗**"))
        print(f"| `{name}` | " + " | ".join(cells) + " |")


def run_settings(out: Path, names: list[str], rows: list[str], settings: dict[str, dict], cache_dir=None,
                 summary_only: bool = False) -> list[Path]:
    """Run the demo rows ``rows`` on each named setting (``OUT/<name>``; finished rows are reused)
    unless ``summary_only``; the settings' folders."""
    folders = []
    for name in names:
        folder = out / name
        if not summary_only:
            demo.run_demo(out=folder, cache_dir=cache_dir, methods=rows, progress=True, **settings[name])
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--settings", default=",".join(DEVELOPMENT))
    p.add_argument("--rows", default=None, help="';'-separated rows (default: the judged rows, their references"
                                                " and the papers' settings)")
    p.add_argument("--variants", action="store_true", help="also run the variants measured while choosing defaults")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--all-baselines", action="store_true", help="every data-free row of the demo (default: task"
                                                                " arithmetic's λ grid only)")
    args = p.parse_args(argv)
    demo.LEARNED.update(VARIANTS)
    if not args.all_baselines:  # the judged rows only need task arithmetic's grid (λ = 0.3 judges them)
        demo.DATA_FREE_GRIDS, demo.DATA_FREE_FIXED = ("task_arithmetic",), {}
    rows = args.rows.split(";") if args.rows else REFERENCES + DEFAULT_ROWS + [n for n in demo.LEARNED if n.endswith("(paper)")]
    if args.variants:
        rows += [v for v in VARIANTS if v not in rows]
    folders = run_settings(args.out, args.settings.split(","), rows, SETTINGS, args.cache_dir, args.summary_only)
    print_summary(folders)
    print()
    print_matrix(folders)


if __name__ == "__main__":
    main()
