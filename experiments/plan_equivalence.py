"""Fingerprint of every registered method's coefficients on the tiny zoo (issue 22's
"no behaviour change" check): run this on two commits and compare the printed JSON.

    python experiments/plan_equivalence.py --out /tmp/eq > before.json

Each method runs through ``adamerge fit`` (the command line) with a small step budget; the
fingerprint is the sha256 of every tensor in every ``.safetensors`` file at the top of the run folder
(coefficients, method state, masks) and the recorded accuracies, so equal fingerprints mean
bit-identical results.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

CASES = {
    "adamerging-layer": ("adamerging", {"granularity": "layer"}),
    "adamerging-task": ("adamerging", {"granularity": "task"}),
    "adamerging-partition": ("adamerging", {"granularity": "partition:2"}),
    "adamerging++": ("adamerging++", {}),
    "concrete_ta": ("concrete_ta", {}),
    "concrete_adamerging": ("concrete_adamerging", {}),
    "atlas": ("atlas", {}),
    "doge": ("doge", {"steps": 3}),
    "t3": ("t3", {}),
    "fw_merging": ("fw_merging", {}),
}


def digest(path: Path) -> dict:
    if not path.exists():
        return {}
    return {k: hashlib.sha256(v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(load_file(str(path)).items())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    from adamerge.cli import main as cli
    from adamerge.zoo.tiny import build_tiny_zoo, write_tiny_zoo

    out = Path(args.out)
    zoo = out / "zoo"
    if not (zoo / "manifest.json").exists():
        write_tiny_zoo(zoo, build_tiny_zoo(seed=0))
    tasks = ["task0", "task1", "task2"]
    result = {}
    for name in args.cases.split(","):
        method, options = CASES[name]
        folder = out / name
        cfg = {
            "seed": 0, "model": {"source": "tiny_vit"}, "base": str(zoo / "base.safetensors"),
            "experts": {t: str(zoo / "experts" / f"{t}.safetensors") for t in tasks},
            "heads": {t: str(zoo / "heads" / f"{t}.safetensors") for t in tasks},
            "data": {t: {"tensors": str(zoo / "data" / f"{t}.safetensors")} for t in tasks},
            "method": method, "options": {"steps": 6, "lr": 0.01, "batch_size": 16, **options},
            "run_dir": str(folder / "run"), "checkpoint_every": 3,
        }
        if method in ("concrete_adamerging",):
            cfg["options"]["method_args"] = {"adamerging_steps": 3}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
        if not (folder / "run" / "results.json").exists():
            with contextlib.redirect_stdout(sys.stderr):
                code = cli(["fit", "--config", str(folder / "config.yaml"), "--no-progress"])
            if code != 0:
                result[name] = f"exit {code}"
                continue
        run = folder / "run"
        result[name] = {f.name: digest(f) for f in sorted(run.glob("*.safetensors"))}
        result[name]["after"] = json.loads((run / "results.json").read_text()).get("after")
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
