"""Issue 24: does a trust-weighted expert objective reach 98% of the experts on every setting with
no task sacrificed? The recommendation protocol, unchanged: candidates' defaults fixed on the
development settings (quick, full0, full1, sub2), then run once on the held-out ones: s3, s4 and
s5, a setting defined (below) before any run of this script; s6, defined in session 32 before any
run (s3 and s5 were looked at in diagnostics); s7, defined in session 37 before any run.

    python experiments/trusted_recommendation.py OUT --settings quick,full0,full1,sub2     # development
    python experiments/trusted_recommendation.py OUT --settings s3,s4,s5,s6,s7             # held out, once
    python experiments/trusted_recommendation.py OUT --settings quick,full0,full1,sub2,s3,s4,s5,s6,s7 --summary-only

Session 37's candidate, the recommendation since (``RECOMMENDED`` in adamerge/workflows/demo.py):
``adamerging(partition:4,trusted_distill,unsure=mean,start_views=9,heads)``; session 36's was the
same without ``start_views``. ``--variants`` adds the variants measured on the development
settings while choosing session 36's (name them in ``--rows``).

Each setting is a demo output folder ``OUT/<setting>`` (finished rows are reused, so a rerun
continues), with every data-free row (the best of them is a bar). The rule a candidate must hold
on a setting: mean ≥ 98% of the experts' mean where the setting has 4 or more tasks, ≥ 97% on
the 3-task ones; above the best data-free row; no task more than 5 points under task arithmetic
λ = 0.3. Labels only score.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_systems import SETTINGS as _SEED_SETTINGS  # noqa: E402
from seed_systems import TA, measured, run_settings  # noqa: E402

from adamerge.workflows import demo  # noqa: E402


# s5 was defined before any run of this script (issue 24 asks for one new held-out setting):
# another seed, another image size, a 4-task subset with the weak textile task in it
SETTINGS = {**_SEED_SETTINGS, "s5": {"seed": 5, "tasks": ["mnist", "digits", "textile", "fashion_mnist"], "image_size": 40}}
# s6, defined in session 32 before any run (s3 and s5 were looked at in that session's
# diagnostics, so the next candidate is judged on a setting nobody has seen): seed 6, 56 px, the
# four tasks other than mnist (textile with the three digit-like and clothing tasks)
SETTINGS["s6"] = {"seed": 6, "tasks": ["digits", "textile", "fashion_mnist", "opencv_digits"], "image_size": 56}
# s7, defined in session 37 before any run or diagnostic on it (s3-s6 were all seen by session
# 36's choice): seed 7, 56 px, all five tasks, so the strict 98 % bar of a 5-task setting applies
SETTINGS["s7"] = {"seed": 7, "image_size": 56}
DEVELOPMENT = ("quick", "full0", "full1", "sub2")
HELD_OUT = ("s3", "s4", "s5", "s6", "s7")
# the recommendation before issue 24, the expert-guided objective, the trust-weighted one
CANDIDATES = ["adamerging(layer,infomax,floor=0.9)", "adamerging(layer,expert_distill)", "adamerging(layer,trusted_distill)",
              "adamerging(partition:4,trusted_distill)", "adamerging(partition:4,trusted_distill,heads)",
              "adamerging(partition:4,trusted_distill,unsure=mean)", "adamerging(partition:4,trusted_distill,unsure=mean,heads)",
              "adamerging(partition:4,trusted_distill,unsure=mean,start_views=9,heads)"]

# session 36: the variants measured on the development settings while choosing the candidate's
# target where the expert is unsure (quick and sub2 first: quick's experts are right where unsure,
# sub2's textile expert is wrong); each is a demo row here, run with --variants
_P4H = demo.LEARNED["adamerging(partition:4,trusted_distill,heads)"][1]
VARIANTS: dict[str, tuple[str, dict]] = {
    "adamerging(partition:4,trusted_distill,heads,steps=200)": ("adamerging", {**_P4H, "steps": 200}),
    "adamerging(partition:16,trusted_distill,heads)": ("adamerging", {**_P4H, "granularity": "partition:16"}),
    "adamerging(partition:4,trusted_distill,heads,confidence=0.7)": ("adamerging", {**_P4H, "objective_args": {"confidence": 0.7}}),
    "adamerging(partition:4,trusted_distill,heads,head_lr=1e-2)": ("adamerging", {**_P4H, "head_lr": 1e-2}),
    "adamerging(partition:4,expert_distill,heads)": ("adamerging", {**_P4H, "objective": "expert_distill"}),
    "adamerging(partition:4,trusted_distill,unsure=agree,heads)": ("adamerging", {**_P4H, "objective_args": {"unsure": "agree"}}),
}


def judge(folder: Path, row: str) -> dict | None:
    """One candidate on one setting: its mean, the share of the experts' mean, the margin over the
    best data-free row, the worst task against task arithmetic λ = 0.3, and whether it holds."""
    methods = measured(folder)
    if row not in methods:
        return None
    m, experts, ta = methods[row], methods["experts"], methods[TA]
    best_name, best = max(((n, r) for n, r in methods.items() if r["kind"] == "data_free"), key=lambda it: it[1]["mean"])
    drops = {t: m["per_task"][t] - ta["per_task"][t] for t in m["per_task"]}
    worst = min(drops, key=drops.get)
    share = m["mean"] / experts["mean"]
    bar = 0.98 if len(drops) >= 4 else 0.97
    return {"setting": folder.name, "row": row, "mean": m["mean"], "share": share, "bar": bar,
            "best_data_free": best_name, "vs_best_data_free": m["mean"] - best["mean"],
            "worst_task": worst, "worst_vs_ta": drops[worst], "per_task": m["per_task"],
            "holds": share >= bar and m["mean"] > best["mean"] and drops[worst] >= -0.05}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--settings", default=",".join(DEVELOPMENT))
    p.add_argument("--rows", default=";".join(CANDIDATES), help="';'-separated candidate rows")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--variants", action="store_true", help="make the session-36 variants demo rows (name them in --rows)")
    args = p.parse_args(argv)
    if args.variants:
        demo.LEARNED.update(VARIANTS)
    rows = args.rows.split(";")
    folders = run_settings(args.out, args.settings.split(","), rows, SETTINGS, args.cache_dir, args.summary_only)
    judged = [j for row in rows for f in folders if (j := judge(f, row)) is not None]
    print("| candidate | setting | mean | % of experts (bar) | vs best data-free | worst task vs TA λ=0.3 | holds |")
    print("| --- | --- | ---: | ---: | ---: | --- | --- |")
    for j in judged:
        print(f"| {j['row']} | {j['setting']} | {100 * j['mean']:.1f} | {100 * j['share']:.1f} ({100 * j['bar']:.0f}) | "
              f"{100 * j['vs_best_data_free']:+.1f} ({j['best_data_free']}) | {j['worst_task']} {100 * j['worst_vs_ta']:+.1f} | "
              f"{'yes' if j['holds'] else '**no**'} |")
    print()
    print_matrix(judged, rows, [f.name for f in folders])
    if args.json:
        args.json.write_text(json.dumps(judged, indent=2))


def print_matrix(judged: list[dict], rows: list[str], settings: list[str]) -> None:
    """The README's form: a row per candidate, a column per setting, the mean with its share of the
    experts and its worst task against task arithmetic λ = 0.3; ✗ where the rule fails."""
    cell = {(j["row"], j["setting"]): j for j in judged}
    print("| candidate | " + " | ".join(settings) + " |")
    print("| --- | " + " | ".join("---:" for _ in settings) + " |")
    for row in rows:
        out = []
        for s in settings:
            j = cell.get((row, s))
            out.append("–" if j is None else f"{100 * j['mean']:.1f} ({100 * j['share']:.1f} %; {100 * j['worst_vs_ta']:+.1f})"
                       + ("" if j["holds"] else " ✗"))
        print(f"| `{row}` | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()
