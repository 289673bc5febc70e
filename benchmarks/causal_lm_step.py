"""One layer-wise AdaMerging step on a causal language model against the plain model's step.

A Llama-architecture ``LlamaForCausalLM`` is built from a config (random weights, nothing is
downloaded; the default is about 110 M parameters with tied embeddings), with T experts whose task
vectors are random moves stored in bfloat16 (``storage_dtype: bfloat16``), stacked ``[T, *shape]``
directly so the numbers show the steady state of training, not the loading of T folders. Each task
has ``--batch`` sequences of ``--length`` random tokens.

- ``merged``: adamerge's own step: :class:`adamerge.io.hf_models.HFBackbone` in a layer-wise
  :class:`adamerge.core.merged.MergedModel`, the step's loss through
  :class:`adamerge.train.loop.MergeModule` with ``micro_batch`` (merge once, then one task's
  forward and backward at a time: one task's activations alive), the next-token entropy, one
  backward to the coefficients.
- ``plain``: the plain model with trainable weights, the same next-token entropy on the same
  tokens, forward and backward one task at a time (gradients accumulated), i.e. the same
  activations alive as the merged step: what fine-tuning the model itself would cost.

Each mode runs in a fresh subprocess (its peak RSS, ``VmHWM``, is its own): one untimed step, then
``--steps`` timed ones (the median is reported). Example::

    OMP_NUM_THREADS=1 python benchmarks/causal_lm_step.py --tasks 4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _config(args):
    from adamerge.io.hf_models import import_transformers

    tf = import_transformers()
    return tf, tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                              num_hidden_layers=args.layers, num_attention_heads=args.heads,
                              num_key_value_heads=args.heads, max_position_embeddings=max(64, args.length),
                              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def worker(args) -> dict:
    import torch

    from adamerge.train.objectives import entropy

    torch.manual_seed(0)
    tf, cfg = _config(args)
    tf.logging.set_verbosity_error()
    model = tf.LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    tasks = [f"task{t}" for t in range(args.tasks)]
    tokens = {t: torch.randint(3, args.vocab, (args.batch, args.length), generator=gen) for t in tasks}

    if args.mode == "plain":
        def step() -> None:
            model.zero_grad(set_to_none=True)
            for x in tokens.values():
                entropy(model(input_ids=x, use_cache=False).logits).backward()
    else:
        from pathlib import Path

        from adamerge.core.merged import MergedModel
        from adamerge.core.task_vectors import TaskVectors
        from adamerge.io.hf_models import HFBackbone, NextTokenHead
        from adamerge.methods import create_method
        from adamerge.train.loop import MergeModule

        backbone = HFBackbone(model, "causal_lm", Path("."))
        base = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
        vectors = {}
        for k, v in base.items():
            tau = torch.empty((args.tasks, *v.shape), dtype=torch.bfloat16)
            for t in range(args.tasks):
                tau[t] = (0.01 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
            vectors[k] = tau
        tv = TaskVectors(base, vectors, tasks)
        merged = MergedModel(backbone, tv, granularity="layer", init=0.3)
        options = create_method("adamerging").config({"micro_batch": True, "objective": "entropy"})
        module = MergeModule(merged, {t: NextTokenHead(args.vocab) for t in tasks}, options, solver=None)

        def step() -> None:
            merged.coefficients.grad = None
            loss, _ = module.batch_loss(tokens)
            loss.backward()
            assert merged.coefficients.grad is not None and bool(merged.coefficients.grad.abs().sum() > 0)

    setup_mb = _status_mb("VmRSS")
    step()  # untimed: the steady state is what training sees
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"mode": args.mode, "parameters": params, "tasks": args.tasks, "tokens_per_step": args.tasks * args.batch * args.length,
            "step_s": statistics.median(times), "steps_s": times, "rss_after_setup_mb": setup_mb,
            "peak_rss_mb": _status_mb("VmHWM"), "threads": __import__("torch").get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="sequences per task")
    p.add_argument("--length", type=int, default=64, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=2, help="timed steps per mode")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--mode", choices=("plain", "merged"), help=argparse.SUPPRESS)  # the worker side
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for mode in ("plain", "merged"):
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in (argv if argv is not None else sys.argv[1:])
                                                             if a != "--json" and not a.endswith(".json")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain, merged = rows
    print(f"Llama causal LM, {plain['parameters'] / 1e6:.1f} M parameters, T = {args.tasks}, "
          f"{plain['tokens_per_step']} tokens per step, {plain['threads']} thread(s)")
    print("| step | time (s) | peak RSS (MiB) | RSS after setup (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['step_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_after_setup_mb']:.0f} |")
    print(f"merged / plain: time {merged['step_s'] / plain['step_s']:.2f}x, peak RSS {merged['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
