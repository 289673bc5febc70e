"""Task vectors sharded by parameter across processes (``trainer.strategy: shard``, gloo on CPU):
the merge and its gradient equal one process's, each rank holds 1/R of the task vectors, and a
sharded ``adamerge fit`` reaches the coefficients one process reaches, resuming included."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from adamerge.core.merged import MergedModel
from adamerge.core.sharding import FlatLayout, take_shard
from adamerge.core.task_vectors import TaskVectors
from adamerge.errors import InputError
from helpers import write_config


def _toy(dtype=torch.float64) -> tuple[nn.Module, TaskVectors]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3)).to(dtype)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = {f"t{i}": {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for i in range(3)}
    return model, TaskVectors.from_state_dicts(base, experts, dtype=dtype)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flat_layout_covers_every_element_once():
    shapes = ((7, 5), (7,), (3, 7), (3,), (3,), (3,))
    for world in (1, 2, 3, 4, 9, 200):
        layout = FlatLayout(tuple("abcdef"), shapes, world)
        seen = torch.zeros(layout.total)
        starts = [0, 35, 42, 63, 66, 69]
        for r in range(world):
            for i, a, b, off in layout.segments(r):
                assert 0 <= off and off + b - a <= layout.shard_size
                seen[starts[i] + a : starts[i] + b] += 1
        assert torch.equal(seen, torch.ones(layout.total))
        tensors = [torch.arange(starts[i], starts[i] + torch.Size(s).numel(), dtype=torch.float32).reshape(s)
                   for i, s in enumerate(shapes)]
        flat = torch.cat([take_shard(tensors, layout, r) for r in range(world)])
        assert torch.equal(flat[: layout.total], torch.arange(float(layout.total)))
        assert not flat[layout.total :].any()  # zero padding


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tv = _toy()
        merged = MergedModel(model, tv, "layer", init=0.3)
        with torch.no_grad():
            merged.coefficients.copy_(torch.rand_like(merged.coefficients))
        full_bytes = merged.nbytes()["task_vectors"]
        merged.shard(rank, world)
        torch.manual_seed(1 + rank)  # each rank its own data, as DDP ranks have
        x = torch.randn(4, 5, dtype=torch.float64)
        loss = merged(x).pow(2).mean()
        loss.backward()
        params = {k: v.detach() for k, v in merged.merged_parameters().items()}
        torch.save({"grad": merged.coefficients.grad, "params": params, "loss": loss.detach(),
                    "bytes": merged.nbytes()["task_vectors"], "full_bytes": full_bytes}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_merge_and_gradient_equal_one_process(tmp_path, world):
    """R ranks, each with its own inputs: every rank's merged weights equal the unsharded merge, and
    every rank's coefficient gradient equals the gradient of the ranks' mean loss computed in one
    process (float64); each rank holds about 1/R of the task vectors."""
    mp.spawn(_sharded_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    model, tv = _toy()
    merged = MergedModel(model, tv, "layer", init=0.3)
    with torch.no_grad():
        merged.coefficients.copy_(torch.rand_like(merged.coefficients))
    losses = []
    for r in range(world):
        torch.manual_seed(1 + r)
        losses.append(merged(torch.randn(4, 5, dtype=torch.float64)).pow(2).mean())
    torch.stack(losses).mean().backward()
    want = merged.merged_parameters()
    for g in got:
        for k, v in want.items():
            torch.testing.assert_close(g["params"][k], v.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(g["grad"], merged.coefficients.grad, rtol=1e-10, atol=1e-12)
        full = g["full_bytes"]
        assert g["bytes"] <= full / world + 8 * 3 * world  # 1/R, plus at most R padding elements per task
    assert sum(g["bytes"] for g in got) >= got[0]["full_bytes"]


def test_shard_refuses_partitions_and_masks():
    model, tv = _toy()
    with pytest.raises(InputError, match="whole-tensor groups"):
        MergedModel(model, tv, "partition:2").shard(0, 2)
    masked = MergedModel(model, tv, "layer")
    masked.masks = {"0.weight": torch.ones(7, 5, dtype=torch.float64)}
    with pytest.raises(InputError, match="masks"):
        masked.shard(0, 2)
    with pytest.raises(InputError, match="rank 2 is not in a group of 2"):
        MergedModel(model, tv, "layer").shard(2, 2)


def test_shard_strategy_refusals_write_nothing(tiny_zoo_dir, tmp_path, capsys):
    from adamerge.cli import main

    for name, changes, words in [
        ("partition", {"options.granularity": "partition:2"}, "splits tensors"),
        ("concrete", {"method": "concrete_adamerging"}, "masks"),
        ("t3", {"method": "t3", "options.granularity": "task"}, "own loop"),
    ]:
        cfg = write_config(tmp_path / name, tiny_zoo_dir, **changes)
        rc = main(["fit", "--config", str(cfg), "--no-progress", "--devices", "2", "--strategy", "shard"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "trainer.strategy shard" in err and words in err, (name, err)
        assert not (tmp_path / name / "run").exists()


_CRASH = """
import sys
from adamerge.train.loop import MergeModule
original = MergeModule.training_step
def crash(self, batch, idx):
    if self.global_step == {cut}:
        raise RuntimeError("simulated crash")
    return original(self, batch, idx)
MergeModule.training_step = crash
from adamerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _fit(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.slow
def test_sharded_fit_matches_one_process_and_resumes(tiny_zoo_dir, tmp_path):
    """``adamerge fit --strategy shard`` on 2 and 4 gloo processes reaches one process's coefficients
    (the paper's entropy: a mean over samples), its results say what each rank held (≈ 1/R of the
    task vectors), and a 2-process run killed after a checkpoint resumes to the same coefficients."""
    exe = [sys.executable, "-m", "adamerge.cli"]
    common = {"options.steps": 6, "options.objective": "entropy", "checkpoint_every": 2}
    coefs, held = {}, {}
    for devices in (1, 2, 4):
        cfg = write_config(tmp_path / f"d{devices}", tiny_zoo_dir, **common)
        cmd = exe + ["fit", "--config", str(cfg), "--no-progress", "--devices", str(devices)]
        if devices > 1:
            cmd += ["--strategy", "shard"]
        proc = _fit(cmd, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = tmp_path / f"d{devices}" / "run"
        coefs[devices] = load_file(str(run / "coefficients.safetensors"))["coefficients"]
        held[devices] = json.loads((run / "results.json").read_text()).get("sharding")
    assert held[1] is None
    for devices in (2, 4):
        torch.testing.assert_close(coefs[devices], coefs[1], rtol=0, atol=1e-5)
        share = held[devices]["task_vector_bytes_per_rank"] / held[devices]["task_vector_bytes"]
        assert held[devices]["world"] == devices and abs(share - 1 / devices) < 0.01, held[devices]

    script = tmp_path / "crash_fit.py"
    script.write_text(_CRASH.replace("{cut}", "4"))
    cfg = write_config(tmp_path / "cut", tiny_zoo_dir, **common)
    args = ["fit", "--config", str(cfg), "--no-progress", "--devices", "2", "--strategy", "shard"]
    proc = _fit([sys.executable, str(script), *args], tmp_path)
    assert proc.returncode != 0 and "simulated crash" in proc.stderr
    run = tmp_path / "cut" / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "results.json").exists()
    proc = _fit(exe + args + ["--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(load_file(str(run / "coefficients.safetensors"))["coefficients"], coefs[1], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_methods_that_save_state_before_the_fit_run_on_two_processes(tiny_zoo_dir, tmp_path):
    """aTLAS saves its trusted labels and DOGE + AdaMerging its data-free stage before Lightning
    starts the second process, which re-runs the command: it joins the run instead of refusing a
    folder that "already holds a run". DOGE + AdaMerging (the paper's entropy) on 2 sharded
    processes reaches one process's coefficients."""
    exe = [sys.executable, "-m", "adamerge.cli"]
    coefs = {}
    for name, method, devices in [("atlas", "atlas", 2), ("doge1", "doge_adamerging", 1), ("doge2", "doge_adamerging", 2)]:
        extra = {"options.objective": "weak_strong"} if method == "atlas" else {}  # its trusted set: method state
        cfg = write_config(tmp_path / name, tiny_zoo_dir, **{"method": method, "options.steps": 3, **extra})
        cmd = exe + ["fit", "--config", str(cfg), "--no-progress", "--devices", str(devices)]
        proc = _fit(cmd + (["--strategy", "shard"] if devices > 1 else []), tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = tmp_path / name / "run"
        results = json.loads((run / "results.json").read_text())
        assert (results.get("sharding") or {}).get("world", 1) == devices
        coefs[name] = load_file(str(run / "coefficients.safetensors"))["coefficients"]
    torch.testing.assert_close(coefs["doge2"], coefs["doge1"], rtol=0, atol=1e-5)
