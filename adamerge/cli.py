"""``adamerge fit | eval | export | predict | inspect | convert | demo | ablate | tune``.

A user mistake ends with one line ``adamerge: error: ...`` on stderr and exit status 2.
Configs are YAML; any ``--a.b value`` after the known options overrides ``a.b`` in the config.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adamerge.errors import AdamergeError


def _overrides(extra: list[str]) -> list[tuple[str, object]]:
    from adamerge.config import parse_value
    from adamerge.errors import InputError

    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise InputError(f"unexpected argument '{arg}'; overrides look like --options.steps 100")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(extra):
            value, i = extra[i + 1], i + 2
        else:
            raise InputError(f"override {arg} needs a value")
        out.append((key, parse_value(value)))
    return out


def cmd_fit(args, extra) -> int:
    from adamerge.plan import RunPlan

    overrides = _overrides(extra)
    if args.run_dir:
        overrides.append(("run_dir", str(Path(args.run_dir).resolve())))
    for key, value in (("trainer.accelerator", args.accelerator), ("trainer.devices", args.devices), ("trainer.strategy", args.strategy)):
        if value is not None:
            overrides.append((key, value))
    plan = RunPlan.from_config(args.config, overrides, resume=args.resume, progress=not args.no_progress).build()
    results = plan.fit()
    rows = {k: results[k] for k in ("before", "after") if results and results.get(k)}
    if rows:
        _print_table(rows, plan.parts["tasks"])
    if results:
        print(f"run written to {plan.run_dir}")
    return 0


def _print_table(rows: dict[str, dict], tasks: list[str]) -> str:
    width = max(len(n) for n in rows) + 2
    head = "method".ljust(width) + "".join(t[:12].rjust(13) for t in tasks) + "mean".rjust(9)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(name.ljust(width) + "".join(f"{100 * r['per_task'][t]:13.1f}" for t in tasks) + f"{100 * r['mean']:9.1f}")
    text = "\n".join(lines)
    print(text)
    return text


def cmd_eval(args, extra) -> int:
    from adamerge.errors import InputError
    from adamerge.io.files import atomic_write_json
    from adamerge.workflows.evaluate import evaluate_merges, evaluate_run

    if args.run:
        rows = evaluate_run(args.run)
    elif args.config:
        rows = evaluate_merges(args.config, _overrides(extra), args.method, args.lam, args.density)
    else:
        raise InputError("eval needs --config (with --method) or --run")
    if any(r is None for r in rows.values()):
        raise InputError("the data streams have no labels, so there is nothing to score")
    tasks = list(next(iter(rows.values()))["per_task"])
    table = _print_table(rows, tasks)
    if args.out:
        atomic_write_json(Path(args.out), {"tasks": tasks, "methods": rows, "table": table})
    return 0


def cmd_export(args, extra) -> int:
    from adamerge.workflows.export import export_run

    out, what = export_run(args.run, args.out, force=args.force,
                           task_masks=args.mask_lambda if args.task_masks else None)
    print(f"exported {what} to {out}")
    return 0


def cmd_inspect(args, extra) -> int:
    from adamerge.workflows.evaluate import coefficient_groups

    result = coefficient_groups(args.config, _overrides(extra), args.granularity)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = result["groups"]
    width = max(len(r["group"]) for r in rows) + 2
    print(f"granularity {result['granularity']}: {len(rows)} groups, {sum(r['parameters'] for r in rows)} parameters")
    print("group".ljust(width) + "tensors".rjust(8) + "parameters".rjust(12))
    for r in rows:
        print(r["group"].ljust(width) + f"{r['tensors']:8d}{r['parameters']:12d}")
    return 0


def cmd_convert(args, extra) -> int:
    from adamerge.workflows.convert import convert

    print(convert(args.src, args.dst, trust_pickle=args.trust_pickle))
    return 0


def cmd_predict(args, extra) -> int:
    from adamerge.workflows.predict import predict

    summary = predict(args.export, args.input, args.task, args.out, batch_size=args.batch_size,
                      progress=not args.no_progress, trust_code=args.trust_code, force=args.force,
                      task_masks=not args.no_task_masks)
    acc = f", accuracy {100 * summary['accuracy']:.1f}%" if "accuracy" in summary else ""
    print(f"wrote {summary['rows']} predictions ({summary['kind']} export{acc}, {summary['inputs_per_second']:.1f} inputs/s) to {args.out}")
    return 0


def cmd_demo(args, extra) -> int:
    from adamerge.workflows.demo import run_demo

    run_demo(
        out=args.out, cache_dir=args.cache_dir, seed=args.seed, tasks=args.tasks, image_size=args.image_size,
        steps=args.steps, quick=args.quick, progress=not args.no_progress, methods=args.rows,
    )
    return 0


def cmd_ablate(args, extra) -> int:
    from adamerge.workflows.ablate import parse_grid, parse_seeds, run_ablation

    result = run_ablation(args.config, parse_grid(args.grid), parse_seeds(args.seeds), args.out,
                          overrides=_overrides(extra), progress=not args.no_progress)
    print((Path(args.out) / "ablation.md").read_text())
    print(f"{len(result.rows)} of {result.total} runs finished ({result.fitted} fitted now, {result.skipped} reused);"
          f" tables and plots in {args.out}")
    return 1 if result.failed else 0


def cmd_tune(args, extra) -> int:
    from adamerge.workflows.tune import run_study

    run_study(args.config, args.study, args.storage, args.trials, out=args.out, overrides=_overrides(extra),
              progress=not args.no_progress)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line ``adamerge: error: ...``, exit 2
    (``--help`` shows the usage)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"adamerge: error: {self.prog.removeprefix('adamerge ')}: {message} (see --help)"
              if self.prog != "adamerge" else f"adamerge: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="adamerge", description="Learn how to merge fine-tuned models from unlabeled data.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fit", help="train merge coefficients on unlabeled streams (writes a run folder)")
    f.add_argument("--config", required=True)
    f.add_argument("--run-dir")
    f.add_argument("--resume", action="store_true", help="continue the run in run_dir from its last checkpoint")
    f.add_argument("--accelerator")
    f.add_argument("--devices", type=int)
    f.add_argument("--strategy")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(fn=cmd_fit)

    e = sub.add_parser("eval", help="score a run or a data-free merge per task")
    e.add_argument("--config")
    e.add_argument("--run")
    from adamerge.merges import list_merges

    e.add_argument("--method", choices=["pretrained", *list_merges()],
                   help="a registered data-free merge (its options: --options.KEY VALUE or the config's options:)")
    e.add_argument("--lam", type=float, nargs="+", help="one or more λ (a grid), for merges that have one")
    e.add_argument("--density", type=float, default=None, help="shorthand for --options.density (TIES)")
    e.add_argument("--out", help="write the table as JSON here")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write a run's merged checkpoint (weights, heads, metadata, model card)")
    x.add_argument("run")
    x.add_argument("out")
    x.add_argument("--force", action="store_true",
                   help="replace OUT when it is a previous export (its adamerge.json and export files only); never a run"
                        " folder, an input of the run or a folder containing one, nor a folder holding other files")
    x.add_argument("--task-masks", action="store_true",
                   help="also store bit-packed per-task TALL masks (task_masks.safetensors) to rebuild each task's model")
    x.add_argument("--mask-lambda", type=float, default=0.4, help="λ of the TALL masks |τ_t| > λ·|τ_merged − τ_t|")
    x.set_defaults(fn=cmd_export)

    i = sub.add_parser("inspect", help="print the coefficient groups of a granularity")
    i.add_argument("--config", required=True)
    i.add_argument("--granularity")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    c = sub.add_parser("convert", help="convert classic pickled task-vector checkpoints (a folder, or one file) to safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--trust-pickle", action="store_true", help="allow unpickling (runs code from the files)")
    c.set_defaults(fn=cmd_convert)

    r = sub.add_parser("predict", help="predict with an export (a merged checkpoint or a T3 package): a CSV row per input")
    r.add_argument("export", help="an export folder (adamerge export)")
    r.add_argument("input", help="a tensors file (x, optional y) or an image folder (class sub-folders give labels)")
    r.add_argument("--task", required=True, help="the task whose head scores the inputs")
    r.add_argument("--out", default="predictions.csv")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--force", action="store_true",
                   help="replace an existing --out file that is a previous predictions CSV (never a folder or an input)")
    r.add_argument("--trust-code", action="store_true",
                   help="allow an export whose metadata reads code or weights from outside the export folder: a 'python'"
                        " model source (imports code), or a model checkpoint/pretrained/name that is an absolute or '..'"
                        " path, a pretrained tag, a hub or local-dir name or a URL (reads other files or downloads)")
    r.add_argument("--no-task-masks", action="store_true",
                   help="serve the one merged checkpoint even when the export holds per-task TALL masks")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=cmd_predict)

    d = sub.add_parser("demo", help="the offline benchmark on real data: every method, a table, plots, an export")
    d.add_argument("--quick", action="store_true", help="smaller splits and fewer steps (minutes)")
    d.add_argument("--out", default="adamerge-demo")
    d.add_argument("--cache-dir", default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=None)
    d.add_argument("--image-size", type=int, default=None)
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--rows", type=lambda s: [r for r in s.split(";") if r], default=None,
                   help="only these learned rows, ';'-separated (default: all; --quick: a fixed subset)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    a = sub.add_parser("ablate", help="a grid of config options x seeds: one run folder per cell, a table and plots")
    a.add_argument("--config", required=True)
    a.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                   help="axes: granularity=task,layer solver=gradient,pgd lr=0.01,0.1 (bare names are options.NAME)")
    a.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    a.add_argument("--out", required=True, help="the ablation folder (a rerun continues it)")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(fn=cmd_ablate)

    t = sub.add_parser("tune", help="an optuna study over the config's tune: search space (resumable)")
    t.add_argument("--config", required=True)
    t.add_argument("--study", required=True, help="the study's name in the storage")
    t.add_argument("--storage", default="sqlite:///adamerge.db", help="an optuna storage URL (sqlite:///FILE or an RDB URL)")
    t.add_argument("--trials", type=int, default=10, help="trials to add to the study")
    t.add_argument("--out", default=None, help="trial run folders and the summary (default: tune-<study>)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("fit", "eval", "inspect", "ablate", "tune"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args, extra)
    except AdamergeError as err:
        print(f"adamerge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adamerge: interrupted; completed checkpoints are kept (fit --resume continues)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
