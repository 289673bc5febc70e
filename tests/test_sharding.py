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
    coefs, held, before = {}, {}, {}
    for devices in (1, 2, 4):
        cfg = write_config(tmp_path / f"d{devices}", tiny_zoo_dir, **common)
        cmd = exe + ["fit", "--config", str(cfg), "--no-progress", "--devices", str(devices)]
        if devices > 1:
            cmd += ["--strategy", "shard"]
        proc = _fit(cmd, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = tmp_path / f"d{devices}" / "run"
        coefs[devices] = load_file(str(run / "coefficients.safetensors"))["coefficients"]
        results = json.loads((run / "results.json").read_text())
        held[devices], before[devices] = results.get("sharding"), results["before"]
    assert held[1] is None
    for devices in (2, 4):
        torch.testing.assert_close(coefs[devices], coefs[1], rtol=0, atol=1e-5)
        # each rank read only its shard; the start's scores come from the gathered merge
        assert held[devices]["build"] == "per_rank_shard", held[devices]
        assert before[devices] == before[1]
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
    assert json.loads((run / "results.json").read_text())["before"] == before[1]  # the start's, not the checkpoint's


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
        if devices > 1:  # a data-free stage / the trusted set reads the task vectors whole: built whole, then cut
            assert results["sharding"]["build"] == "whole_then_cut"
        coefs[name] = load_file(str(run / "coefficients.safetensors"))["coefficients"]
    torch.testing.assert_close(coefs["doge2"], coefs["doge1"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the sharded build: each rank reads its shard
def _toy_files(folder: Path, fmt: str = "safetensors", wrap: bool = False) -> tuple[nn.Module, Path, dict]:
    """The toy model's base and three experts as files (``wrap``: every key under ``module.``)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)

    def save(sd, name):
        sd = {f"module.{k}" if wrap else k: v.contiguous() for k, v in sd.items()}
        path = folder / f"{name}.{fmt}"
        save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
        return path

    experts = {}
    for i in range(3):
        sd = {k: (v + 0.1 * torch.randn_like(v)) if v.is_floating_point() else v for k, v in base.items()}
        experts[f"t{i}"] = save(sd, f"t{i}")
    return model, save(base, "base"), experts


@pytest.mark.parametrize("fmt,wrap", [("safetensors", False), ("safetensors", True), ("pt", False)])
def test_sharded_build_holds_each_ranks_shard_of_the_whole_stack(tmp_path, fmt, wrap):
    """Rank r of R builds exactly shard r of the whole stack's flat layout of the parameters (the
    buffers, e.g. BatchNorm statistics, stay whole), holds about 1/R of it, and says clearly that a
    sharded tensor is not held whole."""
    from adamerge.core.task_vectors import ShardRequest

    model, base, experts = _toy_files(tmp_path, fmt, wrap)
    keys = tuple(n for n, _ in model.named_parameters())
    whole = TaskVectors.from_files(base, experts)
    for world in (1, 2, 3, 4):
        layout = FlatLayout(keys, tuple(tuple(whole.base[k].shape) for k in keys), world)
        held = 0
        for rank in range(world):
            tv = TaskVectors.from_files(base, experts, shard=ShardRequest(keys, rank, world))
            assert tv.is_sharded and tv.shard.layout == layout
            assert torch.equal(tv.shard.tau, take_shard([whole.vectors[k] for k in keys], layout, rank, (3,)))
            for k in ("1.running_mean", "1.running_var"):
                assert torch.equal(tv.vectors[k], whole.vectors[k])
            assert not any(k in tv.vectors for k in keys)
            with pytest.raises(InputError, match="'0.weight' is held sharded across processes"):
                tv.vectors["0.weight"]
            with pytest.raises(InputError, match="sharded across processes"):
                tv.expert_state_dict("t0")
            held += tv.shard.tau.numel()
            assert tv.shard.tau.numel() == 3 * layout.shard_size
        assert held == 3 * layout.shard_size * world < 3 * (layout.total + world)


def test_sharded_build_reads_expert_files_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Experts in safetensors files are never loaded whole (safetensors' load_file is not called for
    them), and a non-finite value in another rank's shard still stops every rank, naming the file."""
    import safetensors.torch as st
    from safetensors.torch import save_file

    from adamerge.core.task_vectors import ShardRequest

    model, base, experts = _toy_files(tmp_path)
    keys = tuple(n for n, _ in model.named_parameters())
    real, loaded = st.load_file, []
    monkeypatch.setattr(st, "load_file", lambda path, *a, **k: (loaded.append(Path(path).name), real(path, *a, **k))[1])
    whole = TaskVectors.from_files(base, experts)
    assert loaded == ["base.safetensors"]
    sharded = TaskVectors.from_files(base, experts, shard=ShardRequest(keys, 1, 2))
    assert loaded == ["base.safetensors"] * 2
    assert torch.equal(sharded.shard.tau, take_shard([whole.vectors[k] for k in keys], sharded.shard.layout, 1, (3,)))
    bad = st.load_file(str(experts["t1"]))
    bad["2.weight"][-1, -1] = float("nan")  # the last element: in rank 1's shard, not rank 0's
    save_file(bad, str(experts["t1"]))
    assert 1 in [r for r in (0, 1) for i, a, b, off in sharded.shard.layout.segments(r) if keys[i] == "2.weight"
                 and b == 21]
    for rank in (0, 1):
        with pytest.raises(InputError, match=r"t1\.safetensors: tensor '2.weight' has non-finite values"):
            TaskVectors.from_files(base, experts, shard=ShardRequest(keys, rank, 2))


def test_merged_model_from_a_sharded_build_equals_one_sharded_after(tmp_path):
    """A MergedModel over a rank's sharded build holds the very shard that cutting the whole one
    gives (base and task vectors), and refuses a build sharded over other tensors."""
    from adamerge.core.task_vectors import ShardRequest

    model, base, experts = _toy_files(tmp_path)
    keys = tuple(n for n, _ in model.named_parameters())
    for rank in (0, 1):
        cut = MergedModel(model, TaskVectors.from_files(base, experts), "layer")
        cut.shard(rank, 2)
        built = MergedModel(model, TaskVectors.from_files(base, experts, shard=ShardRequest(keys, rank, 2)), "layer")
        assert built.is_sharded and built.shard_summary() == cut.shard_summary()
        assert torch.equal(built._shard.tau, cut._shard.tau) and torch.equal(built._shard.base, cut._shard.base)
        assert torch.equal(built._shard.tensor_group, cut._shard.tensor_group)
        assert built.nbytes() == cut.nbytes()
    other = TaskVectors.from_files(base, experts, shard=ShardRequest(keys[:2], 0, 2))
    with pytest.raises(InputError, match="sharded over other tensors"):
        MergedModel(model, other, "layer")
    with pytest.raises(InputError, match="whole-tensor groups"):
        MergedModel(model, TaskVectors.from_files(base, experts, shard=ShardRequest(keys, 0, 2)), "partition:2")


def test_which_sharded_runs_read_only_their_shard(tiny_zoo_dir, tmp_path, monkeypatch):
    """The rank reads its shard only when nothing reads the task vectors whole before training,
    on one machine, with Lightning's ranks; otherwise the whole stack is built and cut."""
    import yaml

    from adamerge.plan import RunPlan

    for k in ("LOCAL_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)

    def plan(devices=2, **changes):
        cfg = yaml.safe_load(write_config(tmp_path, tiny_zoo_dir, **changes).read_text())
        cfg["trainer"] = {"strategy": "shard", "devices": devices}
        return RunPlan.from_config(cfg, root=tmp_path)

    assert plan().shard_build() == (0, 2)
    assert plan(devices=4, **{"options.objective": "entropy"}).shard_build() == (0, 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert plan().shard_build() == (1, 2)
    monkeypatch.delenv("LOCAL_RANK")
    assert plan(**{"options.objective": "expert_distill"}).shard_build() is None
    assert plan(**{"method": "doge_adamerging"}).shard_build() is None
    assert plan(**{"options.preprocess": "ties"}).shard_build() is None
    assert plan(**{"method": "atlas"}).shard_build() is None  # test time: the experts label its trusted set
    assert plan(devices="auto").shard_build() is None
    assert plan(**{"options.steps": 0}).shard_build() is None
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert plan().shard_build() is None


def test_a_shard_built_for_another_rank_is_refused_once_connected(tmp_path):
    """Lightning's rank and world must be the ones the build was sharded for (a clear error)."""
    from types import SimpleNamespace

    from adamerge.core.task_vectors import ShardRequest
    from adamerge.methods import create_method
    from adamerge.solvers import create_solver
    from adamerge.train.loop import MergeModule

    model, base, experts = _toy_files(tmp_path)
    keys = tuple(n for n, _ in model.named_parameters())
    merged = MergedModel(model, TaskVectors.from_files(base, experts, shard=ShardRequest(keys, 1, 2)), "layer")
    cfg = create_method("adamerging").config({"objective": "entropy"})
    heads = {t: nn.Identity() for t in merged.task_names}
    module = MergeModule(merged, heads, cfg, create_solver(cfg.solver, cfg), None)
    module._trainer = SimpleNamespace(world_size=2, global_rank=0, is_global_zero=True)
    with pytest.raises(InputError, match="built shard 1 of 2 .* rank 0 of 2"):
        module.setup("fit")
