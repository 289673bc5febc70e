"""One line per `adamerge demo` output folder: does the recommended merge hold its claim there?

For each folder's ``results.json`` this prints the recommended method's mean accuracy, the best
data-free row (task arithmetic / TIES / averaging at its best λ, which itself peeks at the test
labels), the paper's objective (``adamerging(layer)``) and plain ``infomax`` for comparison, and
the recommended method's worst per-task change against task arithmetic λ = 0.3.

    python experiments/demo_summary.py /tmp/demo-seed0 /tmp/demo-seed1 ...

``--candidate NAME`` (repeatable) judges other rows by the same rule instead of the recommended
one (how a new recommendation is checked: experiments/expert_guided.sh).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REFERENCE = "task_arithmetic(lam=0.3)"
COMPARE = ("adamerging(layer)", "adamerging(layer,infomax)")


def summarize(folder: Path, candidate: str | None = None) -> dict:
    results = json.loads((folder / "results.json").read_text())
    methods, tasks = results["methods"], results["tasks"]
    rec_name = candidate or results["recommended"]
    if rec_name not in methods:
        raise SystemExit(f"{folder}: no row '{rec_name}' (rows: {list(methods)})")
    rec = methods[rec_name]
    best_name, best = max(
        ((n, m) for n, m in methods.items() if m["kind"] == "data_free"), key=lambda item: item[1]["mean"]
    )
    drops = {t: rec["per_task"][t] - methods[REFERENCE]["per_task"][t] for t in tasks}
    worst = min(drops, key=drops.get)
    return {
        "folder": str(folder),
        "tasks": tasks,
        "recommended": rec_name,
        "recommended_mean": rec["mean"],
        "best_data_free": best_name,
        "best_data_free_mean": best["mean"],
        "compare": {n: methods[n]["mean"] for n in COMPARE if n in methods},
        "worst_task": worst,
        "worst_change": drops[worst],
        "wins": rec["mean"] > best["mean"] and drops[worst] >= -0.05,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    p.add_argument("--candidate", action="append", default=None, help="judge this row instead of the recommended one")
    args = p.parse_args(argv)
    rows = [summarize(f, c) for c in (args.candidate or [None]) for f in args.folders]
    print("| run | tasks | judged row | mean | best data-free | " + " | ".join(COMPARE) + " | worst task vs TA λ=0.3 | holds |")
    print("| --- | --- | --- | ---: | --- | " + " | ".join("---:" for _ in COMPARE) + " | --- | --- |")
    for r in rows:
        compare = " | ".join(f"{100 * r['compare'][n]:.1f}" if n in r["compare"] else "–" for n in COMPARE)
        print(
            f"| {Path(r['folder']).name} | {len(r['tasks'])} | {r['recommended']} | {100 * r['recommended_mean']:.1f} |"
            f" {r['best_data_free']} {100 * r['best_data_free_mean']:.1f} | {compare} |"
            f" {r['worst_task']} {100 * r['worst_change']:+.1f} | {'yes' if r['wins'] else 'NO'} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
