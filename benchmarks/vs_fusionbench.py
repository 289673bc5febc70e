"""adamerge beside FusionBench (the peer): the same merge, step time, peak memory, time to accuracy.

Both sides learn layer-wise AdaMerging coefficients (entropy, Adam) on the same base, experts,
heads, batches and initial coefficients, each in its own process and its own virtual
environment (FusionBench 0.2.33 beside ours, the same constraints file)::

    python -m venv .venv-fusionbench
    .venv-fusionbench/bin/pip install -c constraints.txt fusion-bench==0.2.33 open_clip_torch timm

The driver (run with adamerge's environment) starts one worker process per side and round,
alternating ours / peer, and reads back a JSON file from each:

- **ours** trains through :func:`adamerge.plan.fit` (the product's Lightning loop, a callback
  stamping each step);
- **peer** runs FusionBench's own ``LayerWiseMergedModel`` and the test-time loop of its
  ``LayerWiseAdaMergingAlgorithm``, subclassed only to supply the batches and ``compute_logits``
  (FusionBench's documented way to use it on a custom model).

Each case first checks that both sides build the same merged weights from the same
coefficients (max abs diff ≤ 1e-6 required; with ``--storage-dtype bfloat16``, ≤ the bound
bfloat16 rounding of the task vectors implies) and the same step-0 loss; then it reports the
median step time over the timed steps (warm-up steps excluded) and the peak resident memory
while training (the kernel's high-water mark, reset when training starts: what the process
holds, weights included, plus what training adds), medians over rounds.

Cases: ``small_vit`` (an open_clip ViT visual tower from a config: 64 px, patch 8, width 256, 6
layers; T = 8 random experts base + 0.01·N(0, 1); the setup of PERFORMANCE.md), ``demo_zoo``
(the demo's EfficientNet-Lite0 experts and test images), ``vitb32`` (a random-weight open_clip
ViT-B-32 visual tower, T = 8, a few steps). ``--scale`` measures memory against T for ViT-B-32;
``--time-to-accuracy`` measures, on the demo zoo, the wall time each side needs to reach the
accuracy FusionBench's defaults reach (Adam 1e-3, 1000 steps, one batch of 16 per task).

Examples::

    python benchmarks/vs_fusionbench.py --quick --peer-python .venv-fusionbench/bin/python
    python benchmarks/vs_fusionbench.py --cases small_vit,demo_zoo,vitb32 --json vs.json
    python benchmarks/vs_fusionbench.py --time-to-accuracy --json tta.json
    python benchmarks/vs_fusionbench.py --scale 2,4,8,16,20 --json scale.json --plot scale.png
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_VERSION = "0.2.33"

CASES: dict[str, dict] = {
    "small_vit": {"model": {"kind": "open_clip_config", "image_size": 64, "patch_size": 8, "width": 256,
                            "layers": 6, "embed_dim": 64},
                  "tasks": 8, "classes": 10, "batch": 16, "warmup": 3, "timed": 12},
    "demo_zoo": {"model": {"kind": "zoo"}, "batch": 16, "warmup": 3, "timed": 12},
    "vitb32": {"model": {"kind": "open_clip", "name": "ViT-B-32"}, "tasks": 8, "classes": 10, "batch": 16,
               "warmup": 1, "timed": 3},
    # the tests' case: seconds per process
    "tiny": {"model": {"kind": "open_clip_config", "image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                       "embed_dim": 8},
             "tasks": 2, "classes": 3, "batch": 4, "warmup": 1, "timed": 2},
}


# ------------------------------------------------------------------------------ both sides
@functools.lru_cache(maxsize=None)
def _adamerge_file(name: str):
    """A standard-library-only module of adamerge (``_compat``, ``memory``), loaded from its file:
    the peer's environment does not have adamerge installed, and both sides must measure alike."""
    spec = importlib.util.spec_from_file_location(f"_adamerge_{name}", REPO / "adamerge" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its high-water mark (``VmHWM``), in MiB."""
    return _adamerge_file("memory").process_memory_mb(field)


def reset_peak() -> bool:
    """Reset the high-water mark of this process's RSS, after handing the heap pages the harness
    freed (its generated experts) back to the OS, on both sides alike."""
    memory = _adamerge_file("memory")
    memory.release_freed_memory()
    return memory.reset_peak_memory()


def _fix_torchvision() -> None:
    """adamerge's CPU-torch torchvision fix (before lightning/torchmetrics import torchvision)."""
    _adamerge_file("_compat").ensure_torchvision()


def build_case(spec: dict) -> dict:
    """The architecture, base state, experts, head weights and the fixed timing batches of a case,
    built the same way (seeded) in either environment."""
    import torch

    _fix_torchvision()
    seed, m = spec["seed"], spec["model"]
    torch.manual_seed(seed)
    if m["kind"] == "zoo":
        import timm
        from safetensors.torch import load_file

        zoo = Path(m["dir"])
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
        base = load_file(str(zoo / "base.safetensors"))
        names = list(spec["task_names"])
        experts = [load_file(str(zoo / "experts" / f"{n}.safetensors")) for n in names]
        heads = [load_file(str(zoo / "heads" / f"{n}.safetensors")) for n in names]
        data = load_file(m["streams"])
        streams = {n: (data[f"x/{n}"], data[f"y/{n}"]) for n in names}
    else:
        import open_clip

        if m["kind"] == "open_clip_config":
            from open_clip.model import CLIPVisionCfg, _build_vision_tower

            vision = CLIPVisionCfg(layers=m["layers"], width=m["width"], patch_size=m["patch_size"], image_size=m["image_size"],
                                   head_width=min(64, m["width"]))
            model = _build_vision_tower(m["embed_dim"], vision).eval()
            image = m["image_size"]
        else:
            import logging

            logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights": intended
            model = open_clip.create_model(m["name"], pretrained=None).visual.eval()
            image = model.image_size[0] if isinstance(model.image_size, (tuple, list)) else model.image_size
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        names = [f"task{t}" for t in range(spec["tasks"])]
        experts = []
        for t in range(spec["tasks"]):
            gen = torch.Generator().manual_seed(seed * 1000 + t + 1)
            experts.append({k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
                            for k, v in base.items()})
        gen = torch.Generator().manual_seed(seed + 17)
        dim = model.output_dim
        heads = [{"weight": torch.randn(spec["classes"], dim, generator=gen) / dim ** 0.5,
                  "bias": torch.zeros(spec["classes"])} for _ in names]
        streams = {n: (torch.randn(spec["batch"], 3, image, image, generator=torch.Generator().manual_seed(seed * 7919 + t)), None)
                   for t, n in enumerate(names)}
    if spec.get("timing", True):  # one fixed batch per task: every step of both sides sees it
        streams = {n: (x[: spec["batch"]], None if y is None else y[: spec["batch"]]) for n, (x, y) in streams.items()}
    return {"model": model, "base": base, "names": names, "experts": experts, "heads": heads, "streams": streams}


def _weights_path(out: str) -> str:
    return out + ".weights.safetensors"


def _dump_weights(out: str, merged: dict, loss: float, names: list[str]) -> dict:
    """Save the step-0 merged parameters (for the driver's comparison) and return the record."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous() for k, v in merged.items()}, _weights_path(out))
    return {"step0_loss": loss, "tasks": names}


# ------------------------------------------------------------------------------ ours
def ours_worker(spec: dict, out: str) -> dict:
    import lightning as L
    import torch

    from adamerge.train.data import LinearHead, stream_from_tensors
    from adamerge.methods import create_method
    from adamerge.solvers import create_solver
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.plan import fit
    from adamerge.train.loop import MergeModule, extra_trainer_callbacks

    case = build_case(spec)
    names = case["names"]
    options = {"granularity": "layer", "init": 0.3, "lr": spec.get("lr", 1e-3), "objective": "entropy",
               "batch_size": spec["batch"], "steps": spec["warmup"] + spec["timed"],
               "constraint": "box" if spec.get("clamp", True) else "none", **spec.get("options", {})}
    options = {k: v for k, v in options.items() if v is not None}
    tv = TaskVectors.from_state_dicts(case["base"], _handed_over(names, case), dtype=spec.get("storage_dtype", "float32"))
    # bfloat16 task vectors round each τ by at most 2^-8 relative: the merge may then differ from
    # the peer's float32 one by up to Σ_t λ·max|τ_t|·2^-8 (λ = 0.3)
    tolerance = 1e-6 + (0.0 if tv.dtype == torch.float32 else
                        sum(0.3 * max(float(v[t].float().abs().max()) for v in tv.vectors.values()) * 2**-8 for t in range(len(names))))
    model = case["model"].to("meta")  # the architecture only: the weights live in the task vectors
    del case["base"]
    heads = {n: LinearHead(h["weight"], h.get("bias")) for n, h in zip(names, case["heads"])}
    streams = [stream_from_tensors(n, *case["streams"][n]) for n in names]
    record: dict = {}
    if spec.get("check"):  # the merge at the initial coefficients and the step-0 loss
        m = create_method("adamerging")
        cfg = m.config(options)
        merged = m.build(model, tv, cfg)
        module = MergeModule(merged, heads, cfg, create_solver(cfg.solver, cfg))
        with torch.no_grad():
            loss, _ = module.batch_loss({n: case["streams"][n][0] for n in names})
        record |= _dump_weights(out, merged.merged_parameters(), float(loss), names) | {"weight_tolerance": tolerance}
        del merged, module

    class Clock(L.Callback):
        stamps: list = []

        def on_train_start(self, trainer, pl_module):
            self.build_peak = rss_mb("VmHWM")  # imports, the harness's experts, the build
            self.reset = reset_peak()
            self.start_rss = rss_mb()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.stamps.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.stamps.append(time.perf_counter())
            self.peak = rss_mb("VmHWM")

    clock = Clock()
    with tempfile.TemporaryDirectory() as run_dir, extra_trainer_callbacks(clock):
        results = fit(Path(run_dir) / "run", model, tv, heads, streams, "adamerging", options, seed=spec["seed"],
                      progress=False, checkpoint_every=10**6, eval_batch_size=64)
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return record | {"side": "ours", "steps_s": steps, "step_s": statistics.median(steps[spec["warmup"]:]),
                     "start_rss_mb": clock.start_rss, "peak_mb": clock.peak, "peak_reset": clock.reset,
                     "build_peak_mb": clock.build_peak, "micro_batch": results.get("micro_batch"),
                     "options": results["options"]}


class _handed_over:
    """The harness's experts, each dropped by the harness as the build takes it (as the peer's
    side pops each one into its model): one generated expert alive at a time, as when reading files."""

    def __init__(self, names: list[str], case: dict) -> None:
        self.names, self.case = names, case

    def __len__(self) -> int:
        return len(self.names)

    def items(self):
        experts = self.case.pop("experts")
        for name in self.names:
            yield name, experts.pop(0)


# ------------------------------------------------------------------------------ the peer
def peer_worker(spec: dict, out: str) -> dict:
    import lightning as L
    import torch
    from omegaconf import DictConfig

    from fusion_bench.method.adamerging.entropy_loss import entropy_loss
    from fusion_bench.method.adamerging.layer_wise_adamerging import LayerWiseAdaMergingAlgorithm

    case = build_case(spec)
    names = case["names"]
    heads = {n: (h["weight"], h.get("bias")) for n, h in zip(names, case["heads"])}
    template, experts = case["model"], dict(zip(names, case.pop("experts")))
    timing = spec.get("timing", True)
    gen = torch.Generator().manual_seed(spec["seed"])

    class Pool:
        """The modelpool interface the algorithm reads: names and ``load_model``."""

        model_names = names

        def load_model(self, name: str):
            if name == "_pretrained_":
                template.load_state_dict(case.pop("base"))
                return template
            model = copy.deepcopy(template)
            model.load_state_dict(experts.pop(name))  # the state dict is freed: one copy per expert
            return model

    class Peer(LayerWiseAdaMergingAlgorithm):
        stamps: list = []

        def on_test_time_adaptation_start(self):
            self.build_peak = rss_mb("VmHWM")  # imports, the harness's experts, the build
            self.reset = reset_peak()
            self.start_rss = rss_mb()

        def get_shuffled_test_loader_iter(self, task):
            if task == names[0]:
                self.stamps.append(time.perf_counter())
            x = case["streams"][task][0]
            if not timing:  # a random batch of the test stream per step
                x = x[torch.randint(len(x), (spec["batch"],), generator=gen)]
            return iter([(x,)])

        def compute_logits(self, module, images, task):
            # eval mode: the loop calls module.train(), which would switch BatchNorm to batch
            # statistics and turn dropout on (the demo zoo's EfficientNet has both); adamerge
            # keeps the base's BatchNorm statistics, and so must the comparison
            module.eval()
            weight, bias = heads[task]
            return module(images) @ weight.T + (0 if bias is None else bias)

    config = DictConfig({"name": "clip_layer_wise_adamerging", "weights": None, "optimizer": "adam",
                         "lr": spec.get("lr", 1e-3), "init_values": 0.3, "clamp_weights": spec.get("clamp", True),
                         "tie_weights": True, "strict": False, "max_steps": spec["warmup"] + spec["timed"],
                         "fast_dev_run": False, "save_merging_weights": False})
    algo = Peer(config)
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)
    algo.fabric.launch()
    algo.modelpool = Pool()
    module = algo.construct_layer_wise_merged_model(algo.modelpool)
    record: dict = {}
    if spec.get("check"):
        with torch.no_grad():
            state = module.merge_weights()
            loss = sum(float(entropy_loss(algo.compute_logits(module, case["streams"][n][0], n))) for n in names)
        params = {k for k, _ in template.named_parameters()}
        record |= _dump_weights(out, {k: v for k, v in state.items() if k in params}, loss, names)
        module._merged_state_dict = None
    start = time.perf_counter()
    module = algo.test_time_adaptation(module)
    end = time.perf_counter()
    peak = rss_mb("VmHWM")
    steps = [b - a for a, b in zip(algo.stamps, algo.stamps[1:] + [end])]
    record |= {"side": "peer", "steps_s": steps, "step_s": statistics.median(steps[spec["warmup"]:]),
               "train_s": end - start, "start_rss_mb": algo.start_rss, "peak_mb": peak, "peak_reset": algo.reset,
               "build_peak_mb": algo.build_peak}
    if not timing:  # the final merged weights, for the driver to score
        from safetensors.torch import save_file

        state = module.merge_weights()
        save_file({k: v.detach().contiguous() for k, v in state.items()}, out + ".final.safetensors")
    return record


# ------------------------------------------------------------------------------ driver
def _run_worker(side: str, spec: dict, python: str, work: Path, threads: int, timeout: float) -> dict:
    spec_path = work / f"spec-{side}-{time.monotonic_ns()}.json"
    out = str(spec_path.with_suffix(".out.json"))
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO) if side == "ours" else "", "TQDM_DISABLE": "1"}
    proc = subprocess.run([python, __file__, "--worker", side, "--spec", str(spec_path), "--out", out],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{side} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(Path(out).read_text()) | {"out": out}


def _max_weight_diff(ours: dict, peer: dict) -> float:
    from safetensors.torch import load_file

    a, b = load_file(_weights_path(ours["out"])), load_file(_weights_path(peer["out"]))
    if sorted(a) != sorted(b):
        raise SystemExit(f"the sides merged different tensors: {sorted(set(a) ^ set(b))[:5]}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _zoo_streams(work: Path) -> tuple[str, str, list[str]]:
    """The demo zoo (built or loaded from the cache) and its test streams as one file."""
    from safetensors.torch import save_file

    from adamerge.workflows.demo import DEFAULT_TASKS, FULL
    from adamerge.zoo import build_zoo, list_tasks

    tasks = [t for t in DEFAULT_TASKS if t in list_tasks(available_only=True)]
    cache = Path(os.environ.get("ADAMERGE_CACHE", Path.home() / ".cache" / "adamerge"))
    zoo = build_zoo(cache, tasks, image_size=FULL.image_size, seed=0, steps=FULL.zoo_steps,
                    n_train=FULL.n_train, n_test=FULL.n_test, progress=False)
    path = work / "zoo_streams.safetensors"
    save_file({**{f"x/{t}": zoo.tasks[t].x_test.float().contiguous() for t in tasks},
               **{f"y/{t}": zoo.tasks[t].y_test.long().contiguous() for t in tasks}}, str(path))
    return str(zoo.path), str(path), tasks


def _case_spec(name: str, args, work: Path) -> dict:
    spec = copy.deepcopy(CASES[name]) | {"seed": 0, "name": name}
    if spec["model"]["kind"] == "zoo":
        zoo_dir, streams, tasks = _zoo_streams(work)
        spec["model"] |= {"dir": zoo_dir, "streams": streams}
        spec["task_names"], spec["tasks"] = tasks, len(tasks)
    spec["storage_dtype"] = args.storage_dtype
    spec["options"] = {"micro_batch": args.micro_batch}
    for key in ("warmup", "timed"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    return spec


def compare(spec: dict, args, work: Path, say) -> dict:
    """The equal-weights check, then ``args.rounds`` alternating (ours, peer) timing rounds."""
    rounds: dict[str, list] = {"ours": [], "peer": []}
    for r in range(args.rounds):
        for side in ("ours", "peer"):
            python = sys.executable if side == "ours" else args.peer_python
            rec = _run_worker(side, spec | {"check": r == 0}, python, work, args.threads, args.timeout)
            rounds[side].append(rec)
            say(f"[{spec['name']}] round {r + 1}/{args.rounds} {side}: {rec['step_s']:.3f} s/step, "
                f"peak {rec['peak_mb']:.0f} MiB (held at start {rec['start_rss_mb']:.0f})")
        if r == 0:
            diff = _max_weight_diff(rounds["ours"][0], rounds["peer"][0])
            loss = (rounds["ours"][0]["step0_loss"], rounds["peer"][0]["step0_loss"])
            say(f"[{spec['name']}] merged weights max abs diff {diff:.3g}; step-0 loss ours {loss[0]:.7f} peer {loss[1]:.7f}")
            tol = rounds["ours"][0]["weight_tolerance"]
            if diff > tol:
                raise SystemExit(f"[{spec['name']}] the sides merge differently: max abs diff {diff:.3g} > {tol:.3g}")
    med = {s: {k: statistics.median(r[k] for r in rounds[s]) for k in ("step_s", "peak_mb", "start_rss_mb", "build_peak_mb")}
           for s in rounds}
    ratios = [p["step_s"] / o["step_s"] for o, p in zip(rounds["ours"], rounds["peer"])]
    mem = [o["peak_mb"] / p["peak_mb"] for o, p in zip(rounds["ours"], rounds["peer"])]
    return {"ours_step_s": med["ours"]["step_s"], "peer_step_s": med["peer"]["step_s"],
            "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
            "ours_peak_mb": med["ours"]["peak_mb"], "peer_peak_mb": med["peer"]["peak_mb"],
            "memory_ratio": statistics.median(mem), "memory_ratio_range": [min(mem), max(mem)],
            "ours_start_mb": med["ours"]["start_rss_mb"], "peer_start_mb": med["peer"]["start_rss_mb"],
            # the high-water mark before training (imports, the harness's generated experts, each
            # side's build), apart from the training peak above (reset when training starts)
            "ours_build_peak_mb": med["ours"]["build_peak_mb"], "peer_build_peak_mb": med["peer"]["build_peak_mb"],
            "ours_micro_batch": rounds["ours"][0].get("micro_batch"),
            "max_abs_weight_diff": diff, "weight_tolerance": tol, "step0_loss": {"ours": loss[0], "peer": loss[1]},
            "tasks": spec["tasks"], "batch_per_task": spec["batch"], "timed_steps": spec["timed"],
            "rounds": args.rounds, "ours_options": rounds["ours"][0]["options"]}


def ours_only(spec: dict, args, work: Path, say) -> dict:
    """``--ours-only``: adamerge's worker alone for ``args.rounds`` rounds (what an option costs or
    saves on our side, e.g. ``--micro-batch true`` against ``auto``); medians and ranges."""
    recs = []
    for r in range(args.rounds):
        recs.append(_run_worker("ours", spec, sys.executable, work, args.threads, args.timeout))
        say(f"[{spec['name']}] round {r + 1}/{args.rounds} ours: {recs[-1]['step_s']:.3f} s/step, "
            f"peak {recs[-1]['peak_mb']:.0f} MiB (held at start {recs[-1]['start_rss_mb']:.0f})")
    out = {f"ours_{k}": statistics.median(r[k] for r in recs) for k in ("step_s", "peak_mb", "start_rss_mb", "build_peak_mb")}
    return out | {f"ours_{k}_range": [min(r[k] for r in recs), max(r[k] for r in recs)] for k in ("step_s", "peak_mb")} | {
        "ours_micro_batch": recs[0].get("micro_batch"), "ours_options": recs[0]["options"], "rounds": args.rounds,
        "tasks": spec["tasks"], "batch_per_task": spec["batch"], "timed_steps": spec["timed"]}


def _zoo_parts(spec: dict) -> tuple:
    """The demo zoo's labeled test streams, heads and task vectors, for adamerge's side."""
    from safetensors.torch import load_file

    from adamerge.train.data import LinearHead, stream_from_tensors
    from adamerge.core.task_vectors import TaskVectors

    zoo, names = Path(spec["model"]["dir"]), spec["task_names"]
    data = load_file(spec["model"]["streams"])
    streams = [stream_from_tensors(n, data[f"x/{n}"], data[f"y/{n}"]) for n in names]
    heads = {n: LinearHead.from_state_dict(load_file(str(zoo / "heads" / f"{n}.safetensors"))) for n in names}
    tv = TaskVectors.from_state_dicts(load_file(str(zoo / "base.safetensors")),
                                      {n: load_file(str(zoo / "experts" / f"{n}.safetensors")) for n in names})
    return streams, heads, tv


# the unlabeled stopping rule the race also runs, fixed before any run was scored (see docs/scaling.md)
EARLY_STOP = {"window": 20, "min_delta": 0.01}


def time_to_accuracy(args, work: Path, say) -> dict:
    """FusionBench's defaults on the demo zoo (its own loop); then adamerge's recommended recipe
    (a) until it reaches the peer's final accuracy (labels checked every ``--eval-every`` steps,
    the clock paused) and (b) with ``early_stop`` (no labels) until the objective settles.
    Training time only on both sides (loading and evaluation not counted)."""
    from safetensors.torch import load_file

    from adamerge.train.evaluation import evaluate
    # the recipe these timings were measured with (README, benchmarks/README.md): the recommendation
    # until session 36, an entropy-style objective like the peer's (the later recommendation also
    # reads the experts' predictions and trains the heads: another comparison)
    from adamerge.workflows.demo import FORMER_RECOMMENDED as RECOMMENDED
    from adamerge.workflows.demo import LEARNED
    from adamerge.zoo import create_backbone

    spec = _case_spec("demo_zoo", args, work)
    spec |= {"timing": False, "warmup": 0, "timed": args.peer_steps, "clamp": False}
    say(f"[tta] FusionBench defaults: Adam 1e-3, {args.peer_steps} steps, init 0.3, no clamp, batch 16 per task")
    peer = _run_worker("peer", spec, args.peer_python, work, args.threads, args.timeout)
    parts = _zoo_parts(spec)  # streams, heads, task vectors: loaded once for all three runs
    streams, heads, _ = parts
    backbone = create_backbone(pretrained=False)
    backbone.load_state_dict(load_file(peer["out"] + ".final.safetensors"))
    target = evaluate(backbone, heads, streams, 256)
    say(f"[tta] FusionBench: {target['mean']:.4f} mean accuracy after {peer['train_s']:.1f} s of training")
    method, options = LEARNED[RECOMMENDED]
    ours = _ours_run(parts, method, dict(options), target["mean"], args)
    settled = _ours_run(parts, method, {**options, "early_stop": EARLY_STOP}, None, args)
    for name, r in (("to the target", ours), ("early_stop", settled)):
        say(f"[tta] adamerge {RECOMMENDED} {name}: {r['accuracy']:.4f} after {r['train_s']:.1f} s ({r['steps']} steps)")
    return {"peer": {"accuracy": target, "train_s": peer["train_s"], "steps": args.peer_steps,
                     "settings": "Adam lr 1e-3, init 0.3, no clamp, entropy, batch 16 per task"},
            "ours": ours | {"recipe": RECOMMENDED, "options": options, "reached": ours["accuracy"] >= target["mean"]},
            "ours_early_stop": settled | {"options": {**options, "early_stop": EARLY_STOP}},
            "time_ratio": ours["train_s"] / peer["train_s"] if ours["accuracy"] >= target["mean"] else None,
            "early_stop_time_ratio": settled["train_s"] / peer["train_s"]}


def _ours_run(parts: tuple, method: str, options: dict, target: float | None, args) -> dict:
    """adamerge's fit on the demo zoo. With a ``target``: accuracy every ``args.eval_every``
    steps (the clock paused), stopping once the mean reaches it; without: scored once at the end."""
    import lightning as L
    import torch

    from adamerge.train.evaluation import evaluate
    from adamerge.plan import fit
    from adamerge.train.loop import extra_trainer_callbacks
    from adamerge.zoo import create_backbone

    streams, heads, tv = parts
    torch.set_num_threads(args.threads)

    class Watch(L.Callback):
        def __init__(self):
            self.paused, self.curve, self.done = 0.0, [], False

        def on_train_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def score(self, trainer, pl_module):
            t = time.perf_counter()
            train_s = t - self.t0 - self.paused  # the evaluations so far do not count
            acc = evaluate(pl_module.merged, heads, streams, 256)["mean"]
            self.paused += time.perf_counter() - t
            self.curve.append({"step": trainer.global_step, "train_s": train_s, "accuracy": acc})
            return acc

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if target is None or self.done or trainer.global_step % args.eval_every:
                return
            if self.score(trainer, pl_module) >= target:
                self.done = True
                pl_module.request_stop("reached the target accuracy")

        def on_train_end(self, trainer, pl_module):
            if not self.curve or self.curve[-1]["step"] != trainer.global_step:
                self.score(trainer, pl_module)

    watch = Watch()
    with tempfile.TemporaryDirectory() as run_dir, extra_trainer_callbacks(watch):
        results = fit(Path(run_dir) / "run", create_backbone(pretrained=False), tv, heads, streams, method, options,
                      seed=0, progress=False, checkpoint_every=10**6)
    last = watch.curve[-1]
    return {"curve": watch.curve, "train_s": last["train_s"], "steps": last["step"], "accuracy": last["accuracy"],
            "stopped_early": results.get("stopped_early")}


def scale(args, work: Path, say) -> dict:
    """Peak memory while training against T (random ViT-B-32 experts), each side in its own process."""
    rows = []
    for t in [int(v) for v in args.scale.split(",")]:
        spec = copy.deepcopy(CASES["vitb32"]) | {"seed": 0, "name": f"vitb32_T{t}", "tasks": t, "warmup": 1, "timed": 1,
                                                  "storage_dtype": args.storage_dtype, "options": {"micro_batch": args.micro_batch}}
        row = {"tasks": t}
        for side in ("ours", "peer") if args.peer_python and not args.ours_only else ("ours",):
            python = sys.executable if side == "ours" else args.peer_python
            rec = _run_worker(side, spec, python, work, args.threads, args.timeout)
            row[side] = {k: rec[k] for k in ("step_s", "peak_mb", "start_rss_mb")}
            say(f"[scale] T={t} {side}: peak {rec['peak_mb']:.0f} MiB, {rec['step_s']:.1f} s/step")
        rows.append(row)
    return {"model": "ViT-B-32 (random weights), layer-wise, 16 images per task", "storage_dtype": args.storage_dtype,
            "micro_batch": args.micro_batch, "rows": rows}


def plot_scale(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rows"]
    for side, label in (("ours", "adamerge"), ("peer", f"FusionBench {PEER_VERSION}")):
        pts = [(r["tasks"], r[side]["peak_mb"] / 1024) for r in rows if side in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(24, color="grey", ls="--", lw=1, label="24 GiB machine")
    ax.set_xlabel("experts T")
    ax.set_ylabel("peak RSS while training (GiB)")
    ax.set_title("ViT-B-32, layer-wise AdaMerging, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="small_vit,demo_zoo,vitb32", help=f"comma-separated, from {list(CASES)}")
    p.add_argument("--quick", action="store_true", help="case small_vit alone, 2 rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None, help="override the cases' warm-up steps")
    p.add_argument("--timed", type=int, default=None, help="override the cases' timed steps")
    p.add_argument("--peer-python", default=os.environ.get("FUSIONBENCH_PYTHON", str(REPO / ".venv-fusionbench" / "bin" / "python")))
    p.add_argument("--storage-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--micro-batch", default=None, help="adamerge's options.micro_batch: true, false, auto or N (default: the library's default)")
    p.add_argument("--time-to-accuracy", action="store_true", help="the demo-zoo race to FusionBench's default accuracy")
    p.add_argument("--peer-steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--scale", default=None, help="memory against T, e.g. 2,4,8,16,20 (ViT-B-32)")
    p.add_argument("--ours-only", action="store_true", help="adamerge's side alone (--scale, or the cases: what an option costs on our side)")
    p.add_argument("--plot", default=None, help="--scale: the plot's PNG path")
    p.add_argument("--json", default=None)
    p.add_argument("--work", default=None, help="folder for the workers' files (default: a temporary one)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.micro_batch is not None:
        mb = args.micro_batch.lower()
        args.micro_batch = True if mb == "true" else False if mb == "false" else "auto" if mb == "auto" else int(mb)
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        _fix_torchvision()  # before lightning/torchmetrics import torchvision
        spec = json.loads(Path(args.spec).read_text())
        rec = (ours_worker if args.worker == "ours" else peer_worker)(spec, args.out)
        Path(args.out).write_text(json.dumps(rec))
        return 0
    if not Path(args.peer_python).exists() and not args.ours_only:
        raise SystemExit(f"no FusionBench environment at {args.peer_python}: create it with\n"
                         f"  python -m venv .venv-fusionbench && .venv-fusionbench/bin/pip install -c constraints.txt "
                         f"fusion-bench=={PEER_VERSION} open_clip_torch timm\nor pass --peer-python")
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result: dict = {"peer": f"fusion-bench {PEER_VERSION}", "threads": args.threads, "machine": _machine()}
        if args.time_to_accuracy:
            result["time_to_accuracy"] = time_to_accuracy(args, work, say)
        elif args.scale:
            result["scale"] = scale(args, work, say)
            if args.plot:
                plot_scale(result["scale"], args.plot)
        else:
            names = ["small_vit"] if args.quick else args.cases.split(",")
            if args.quick:
                args.rounds = min(args.rounds, 2)
            run = ours_only if args.ours_only else compare
            result["cases"] = {n: run(_case_spec(n, args, work), args, work, say) for n in names}
            _print_table(result["cases"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


def _print_table(cases: dict) -> None:
    if all("peer_step_s" not in c for c in cases.values()):  # --ours-only
        print("case | T | ours s/step | ours peak MiB | held at start MiB | micro_batch chunk")
        for name, c in cases.items():
            chunk = (c["ours_micro_batch"] or {}).get("chunk", c["ours_options"]["micro_batch"])
            print(f"{name} | {c['tasks']} | {c['ours_step_s']:.3f} | {c['ours_peak_mb']:.0f} | {c['ours_start_rss_mb']:.0f} | {chunk}")
        return
    cols = ["case", "T", "ours s/step", "peer s/step", "speedup (peer/ours)", "ours peak MiB", "peer peak MiB",
            "memory (ours/peer)", "build peak MiB (ours/peer)", "max |Δw|"]
    print(" | ".join(cols))
    for name, c in cases.items():
        print(" | ".join([name, str(c["tasks"]), f"{c['ours_step_s']:.3f}", f"{c['peer_step_s']:.3f}",
                          f"{c['speedup']:.3f}", f"{c['ours_peak_mb']:.0f}", f"{c['peer_peak_mb']:.0f}",
                          f"{c['memory_ratio']:.3f}", f"{c['ours_build_peak_mb']:.0f}/{c['peer_build_peak_mb']:.0f}",
                          f"{c['max_abs_weight_diff']:.2g}"]))


if __name__ == "__main__":
    sys.exit(main())
