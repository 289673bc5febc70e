"""``options.micro_batch``: each task's forward and backward alone against the merged weights,
then one backward through the merge, gives the batched path's loss and gradient, and keeps one
task's activations alive at a time."""
from __future__ import annotations

import copy

import pytest
import torch

from adamerge.train.data import LinearHead, StepBatch
from adamerge.core.merged import MergedModel
from adamerge.methods import create_method
from adamerge.solvers import create_solver, list_solvers
from adamerge.core.task_vectors import TaskVectors
from adamerge.train.loop import MergeModule


def _module(make_zoo, micro: bool, granularity: str, objective: str, dtype=torch.float64):
    model, base, experts = make_zoo("vit", 3)
    model = copy.deepcopy(model).to(dtype)
    tv = TaskVectors.from_state_dicts({k: v.to(dtype) for k, v in base.items()},
                                      {n: {k: v.to(dtype) for k, v in sd.items()} for n, sd in experts.items()},
                                      dtype={torch.float64: "float64", torch.float32: "float32"}[dtype])
    cfg = create_method("adamerging").config({"granularity": granularity, "objective": objective, "micro_batch": micro})
    merged = MergedModel(model, tv, granularity, init=0.3, clamp=None)
    merged.coefficients.data += 0.05 * torch.randn(merged.coefficients.shape, generator=torch.Generator().manual_seed(0), dtype=merged.coefficients.dtype)
    gen = torch.Generator().manual_seed(1)
    heads = {n: LinearHead(torch.randn(4, 16, generator=gen, dtype=dtype)) for n in tv.task_names}
    return MergeModule(merged, heads, cfg, create_solver("gradient", cfg)), tv.task_names


@pytest.mark.parametrize("granularity", ["task", "layer", "partition:2"])
@pytest.mark.parametrize("objective,micro_batch", [("entropy", True), ("infomax", True), ("entropy", 2),
                                                   ("reliable_entropy", 3), ("entropy_norm", 1)])
def test_micro_batch_gives_the_batched_loss_and_gradient(make_zoo, inputs, granularity, objective, micro_batch):
    """Per task (true) and in chunks of N samples (5 samples: uneven chunks) alike."""
    out = {}
    for micro in (False, micro_batch):
        module, tasks = _module(make_zoo, micro, granularity, objective)
        batch = StepBatch({n: torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                           for i, n in enumerate(tasks)}, {n: torch.arange(5) for n in tasks})
        loss, losses = module.batch_loss(batch)
        loss.backward()
        out[micro] = (loss.detach(), {n: v.detach() for n, v in losses.items()}, module.merged.coefficients.grad.clone())
    # the objectives compute in float32: equal to its rounding
    assert torch.allclose(out[micro_batch][0], out[False][0], atol=1e-6)
    for n in out[False][1]:
        assert torch.allclose(out[micro_batch][1][n], out[False][1][n], atol=1e-6)
    assert torch.allclose(out[micro_batch][2], out[False][2], rtol=1e-4, atol=1e-7)
    assert out[False][2].abs().max() > 1e-4  # a gradient that can disagree


@pytest.mark.parametrize("granularity", ["layer", "partition:2"])
def test_the_step_reuses_its_memory_and_two_losses_before_one_backward_stay_exact(make_zoo, granularity):
    """The per-task step writes its merged weights into the previous step's memory and zeroes the
    previous step's gradients instead of allocating; a second loss formed before the first's
    backward gets gradients of its own (the first's are still to be read), so the backward of
    their sum is the batched path's gradient of the sum."""
    def batch(seed):
        return {n: torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64)
                for i, n in enumerate(tasks)}

    out = {}
    for micro in (False, True):
        module, tasks = _module(make_zoo, micro, granularity, "entropy")
        coef = module.merged.coefficients
        grads = []
        for step in range(2):  # two steps, the coefficients moved in between
            loss, _ = module.batch_loss(batch(10 * step))
            loss.backward()
            grads.append(coef.grad.clone())
            coef.grad = None
            with torch.no_grad():
                coef.add_(0.05)
        kept = set(module._kept_grads)
        first, _ = module.batch_loss(batch(100))
        waiting = dict(module._kept_grads)  # taken by the first loss until its backward: none for the second
        second, _ = module.batch_loss(batch(200))
        (first + 2 * second).backward()
        out[micro] = (grads, coef.grad.clone(), kept, waiting, set(module._kept_grads))
    for a, b in zip(out[True][0], out[False][0]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7) and b.abs().max() > 1e-4
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-4, atol=1e-7)
    kept, waiting, after = out[True][2:]
    assert kept and waiting == {} and after == kept
    reused = module.merged.merged_parameters(reuse=True)
    assert all(module.merged._reused[k][0].data_ptr() == v.data_ptr() for k, v in reused.items())


def test_micro_batch_keeps_one_tasks_activations_alive(make_zoo):
    """Autograd saves tensors for the backward: the bytes of saved activations alive at once
    (tensors that are not the model's own weights and buffers) under each path: per task, one
    task's; in chunks of 16 of a task's 64 samples, a quarter of that."""
    saved = {}
    for micro in (False, True, 16):
        module, tasks = _module(make_zoo, micro, "layer", "entropy", torch.float32)
        own = {t.untyped_storage().data_ptr() for t in list(module.buffers()) + list(module.parameters())}
        batch = {n: torch.randn(64, 3, 16, 16) for n in tasks}
        live, peak = [0], [0]

        class Held:
            def __init__(self, t):
                self.t, self.n = t, 0 if t.untyped_storage().data_ptr() in own else t.numel() * t.element_size()
                live[0] += self.n
                peak[0] = max(peak[0], live[0])

            def __del__(self):
                live[0] -= self.n

        with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
            loss, _ = module.batch_loss(batch)
            loss.backward()
        saved[micro] = peak[0]
    # batched: all three tasks' activations are saved together; per task: one task's at a time
    print("saved activation bytes, per task / batched:", saved[True] / saved[False], "chunks of 16 / per task:", saved[16] / saved[True])
    assert saved[True] < 0.6 * saved[False]
    assert saved[16] < 0.4 * saved[True]


class _WithUnused(torch.nn.Module):
    """A small network with a parameter its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 6)
        self.unused = torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_merged_gradients_are_allocated_before_the_first_forward_and_unreached_tensors_stay_out(monkeypatch):
    """The per-task backwards add into zero gradients allocated before any activation (the
    memory layout that keeps the training peak low); a merged tensor no forward reaches gets no
    gradient term (as when its gradient stayed ``None``); loss and gradient equal the batched path's."""
    import adamerge.train.loop as loop

    torch.manual_seed(0)
    model = _WithUnused().double()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = {f"t{i}": {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for i in range(2)}
    tv = TaskVectors.from_state_dicts(base, experts, dtype="float64")
    batch = {n: torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
             for i, n in enumerate(tv.task_names)}
    out = {}
    for micro in (False, True):
        cfg = create_method("adamerging").config({"granularity": "layer", "objective": "entropy", "micro_batch": micro})
        merged = MergedModel(model, tv, "layer", init=0.3, clamp=None)
        heads = {n: LinearHead(torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9)))
                 for n in tv.task_names}
        module = MergeModule(merged, heads, cfg, create_solver("gradient", cfg))
        first, injected = [], []
        forward = module.task_losses

        def task_losses(one, module=module, first=first, forward=forward):
            if not first and module.merged._fixed is not None:
                first.append(all(p.grad is not None and not p.grad.any() for p in module.merged._fixed.values()))
            return forward(one)

        monkeypatch.setattr(module, "task_losses", task_losses)
        apply = loop._InjectGradients.apply
        monkeypatch.setattr(loop._InjectGradients, "apply",
                            lambda grads, done, *t, apply=apply, injected=injected: injected.append(len(t))
                            or apply(grads, done, *t))
        loss, _ = module.batch_loss(batch)
        loss.backward()
        monkeypatch.undo()
        out[micro] = (loss.detach(), merged.coefficients.grad.clone(), first, injected)
    assert out[True][2] == [True]  # zero gradients, before the first forward
    reached = [k for k in merged.merge_keys if not k.startswith("unused.")]
    assert out[True][3] == [len(reached)] and len(reached) < len(merged.merge_keys)
    assert torch.allclose(out[True][0], out[False][0], atol=1e-6)
    assert torch.allclose(out[True][1], out[False][1], rtol=1e-6, atol=1e-9)
    unused = [merged.group_index(k) for k in merged.merge_keys if k.startswith("unused.")]
    assert out[True][1][:, unused].abs().max() == 0


@pytest.mark.parametrize("objective,args", [("infomax", {}), ("expert_distill", {"confidence": 0.5})])
def test_chunks_are_refused_for_objectives_of_the_whole_batch(objective, args):
    from adamerge.errors import InputError

    with pytest.raises(InputError, match="depends on the whole batch"):
        create_method("adamerging").config({"objective": objective, "objective_args": args, "micro_batch": 4})
    create_method("adamerging").config({"objective": objective, "objective_args": args, "micro_batch": True})
    for bad in (0, -1, 2.5, "many"):
        with pytest.raises(InputError, match="micro_batch"):
            create_method("adamerging").config({"micro_batch": bad})


def test_a_fit_with_micro_batch_reaches_the_batched_coefficients(tiny_zoo_dir, tmp_path):
    from safetensors.torch import load_file

    from adamerge.cli import main
    from helpers import write_config

    coef = {}
    for micro in (False, True, 3):
        cfg = write_config(tmp_path / str(micro), tiny_zoo_dir, **{"options.steps": 10, "options.micro_batch": micro})
        assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
        coef[micro] = load_file(str(tmp_path / str(micro) / "run" / "coefficients.safetensors"))["coefficients"]
    assert torch.allclose(coef[True], coef[False], atol=1e-4)
    assert torch.allclose(coef[3], coef[False], atol=1e-4)
    assert not torch.allclose(coef[False], torch.full_like(coef[False], 0.3))  # it trained


@pytest.mark.parametrize("solver", list_solvers(needs_data=True))
def test_every_data_solver_trains_the_same_with_micro_batch(tiny_zoo_dir, tmp_path, solver):
    """Generated from the solver registry: a new data solver is checked for free (line searches
    evaluate the loss without gradients, the bi-level solver trains masks too)."""
    from safetensors.torch import load_file

    from adamerge.cli import main
    from adamerge.solvers import solver_class
    from helpers import write_config

    masks = solver_class(solver).needs_masks
    coef = {}
    for micro in (False, True):
        cfg = write_config(tmp_path / str(micro), tiny_zoo_dir, **{
            "method": "concrete_adamerging" if masks else "adamerging", "options.solver": solver,
            "options.method_args": {"adamerging_steps": 0} if masks else {},
            "options.constraint": "simplex" if solver == "frank_wolfe" else "box",
            "options.steps": 6, "options.lr": 0.02, "options.micro_batch": micro})
        assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
        coef[micro] = load_file(str(tmp_path / str(micro) / "run" / "coefficients.safetensors"))["coefficients"]
    assert torch.allclose(coef[True], coef[False], atol=1e-4), solver


def test_saved_bytes_counts_one_samples_activations_without_the_weights():
    """A Linear(100, 50) + tanh saves, per sample, its input row (100 floats) and its output row
    (50 floats): 600 bytes; its weight, saved too, is left out (it does not grow with the batch),
    and a slice of a larger batch counts its own elements only. A batch of 16 under a 1200-byte
    budget is cut into 8 equal chunks of 2; 5 samples under 1300 bytes, into 3 chunks of at most 2."""
    from adamerge.train.loop import SavedBytes, chunk_size

    layer = torch.nn.Linear(100, 50)
    x = torch.randn(16, 100, requires_grad=True)
    with SavedBytes([layer.weight, layer.bias]) as meter:
        out = torch.tanh(layer(x[:1]))
    assert meter.bytes == 600
    out.sum().backward()  # the measured forward is an ordinary one
    assert x.grad is not None and x.grad[1:].abs().sum() == 0
    with SavedBytes() as meter:  # the weight counted: 50 · 100 floats more
        torch.tanh(layer(x[:3]))
    assert meter.bytes == 3 * 600 + 50 * 100 * 4
    chunking = {"bytes_per_sample": 600, "budget_bytes": 1200}
    assert chunk_size(chunking, 16) == 2 and chunk_size(chunking, 2) == 2
    assert chunk_size({"bytes_per_sample": 600, "budget_bytes": 1300}, 5) == 2
    assert chunk_size({"bytes_per_sample": 600, "budget_bytes": 10**9}, 16) == 16


def test_micro_batch_auto_chunks_sample_means_and_keeps_the_coefficients(tiny_zoo_dir, tmp_path, monkeypatch):
    """``micro_batch: auto``: with the floor lowered so that the tiny model's activations exceed the
    budget, each task's batch is cut into chunks, results.json says how, and the coefficients are
    those of the whole-batch path; infomax (a batch statistic) is never cut."""
    import json

    from safetensors.torch import load_file

    import adamerge.train.loop as loop
    from adamerge.cli import main
    from helpers import write_config

    monkeypatch.setattr(loop, "AUTO_CHUNK_FLOOR", 0)  # the budget is the merged weights' size
    coef, res = {}, {}
    for name, opts in {"auto": {"options.objective": "entropy", "options.micro_batch": "auto"},
                       "whole": {"options.objective": "entropy", "options.micro_batch": True},
                       "infomax": {"options.objective": "infomax", "options.micro_batch": "auto"}}.items():
        cfg = write_config(tmp_path / name, tiny_zoo_dir, **{"options.steps": 6, **opts})
        assert main(["fit", "--config", str(cfg), "--no-progress"]) == 0
        coef[name] = load_file(str(tmp_path / name / "run" / "coefficients.safetensors"))["coefficients"]
        res[name] = json.loads((tmp_path / name / "run" / "results.json").read_text())
    chosen = res["auto"]["micro_batch"]
    assert res["auto"]["options"]["micro_batch"] == "auto" and 1 <= chosen["chunk"] < chosen["batch_size"] == 16
    assert chosen["chunk"] == loop.chunk_size(chosen, 16) and chosen["bytes_per_sample"] * chosen["chunk"] <= chosen["budget_bytes"]
    assert torch.allclose(coef["auto"], coef["whole"], atol=1e-5)
    assert "micro_batch" not in res["whole"] and "micro_batch" not in res["infomax"]
