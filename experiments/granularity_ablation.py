"""The granularity ablation on the demo zoo: the recommended method's options (``_REC`` in
:mod:`adamerge.workflows.demo`) at granularity task, block, layer and partition:4, three seeds each,
through ``adamerge ablate``.

    OMP_NUM_THREADS=1 python experiments/granularity_ablation.py --out granularity-ablation [--full]

It builds (or loads from the cache) the demo zoo (``--quick`` settings by default: 3 tasks at
32 px), writes ``OUT/base.yaml`` (an ``adamerge fit`` config over ``OUT/zoo`` and ``OUT/data``)
and then runs the equivalent of::

    adamerge ablate --config OUT/base.yaml --grid granularity=task,block,layer,partition:4 \\
        --seeds 0,1,2 --out OUT

A rerun continues: finished cells are reused. ``--axis`` ablates another option the same way,
e.g. the storage dtype of the task vectors (issue 13: bfloat16 must stay within 0.2 points of
float32 after adaptation)::

    OMP_NUM_THREADS=2 python experiments/granularity_ablation.py --full --axis storage_dtype=float32,bfloat16 --out dtype-ablation
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GRANULARITIES = "task,block,layer,partition:4"


def main(argv: list[str] | None = None) -> int:
    from adamerge.workflows.ablate import parse_grid, parse_seeds, run_ablation
    from adamerge.config import dump_config
    from adamerge.workflows.demo import DEFAULT_TASKS, FULL, QUICK, _REC, _zoo_files, row_config
    from adamerge.io.files import atomic_write_text
    from adamerge.zoo import build_zoo, list_tasks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="granularity-ablation")
    p.add_argument("--cache-dir", default=os.environ.get("ADAMERGE_CACHE", str(Path.home() / ".cache" / "adamerge")))
    p.add_argument("--full", action="store_true", help="the full demo zoo (5 tasks at 64 px, 200 steps) instead of --quick")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--granularities", default=GRANULARITIES)
    p.add_argument("--axis", default=None, help="another grid axis instead of the granularities, NAME=V1,V2")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    setting = FULL if args.full else QUICK
    available = list_tasks(available_only=True)
    tasks = [t for t in DEFAULT_TASKS if t in available][: None if args.full else 3]
    zoo = build_zoo(args.cache_dir, tasks, image_size=setting.image_size, seed=0, steps=setting.zoo_steps,
                    n_train=setting.n_train, n_test=setting.n_test, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _zoo_files(out, zoo, tasks)
    cfg = row_config(out, zoo, tasks, 0, "adamerging", {**_REC, "steps": setting.steps}, out / "base-run")
    atomic_write_text(out / "base.yaml", dump_config(cfg))
    axis = args.axis or f"granularity={args.granularities}"
    grid = parse_grid([axis])
    print(f"adamerge ablate --config {out / 'base.yaml'} --grid {axis} --seeds {args.seeds} --out {out}", file=sys.stderr)
    result = run_ablation(out / "base.yaml", grid, parse_seeds(args.seeds), out, progress=not args.no_progress)
    print((out / "ablation.md").read_text())
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
