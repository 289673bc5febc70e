"""Reliability: every bad input gets one clear line, exit status 2, no traceback and nothing
written; interrupted runs (SIGINT, SIGKILL at random points) resume to the uninterrupted result;
generated configs and granularity rules are accepted or refused cleanly (hypothesis)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from adamerge.cli import main
from adamerge.errors import InputError
from helpers import write_config


def _tensor_file(path: Path, tensors: dict) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def _expert_variant(zoo: Path, tmp: Path, name: str, change) -> str:
    sd = dict(load_file(str(zoo / "experts" / "task0.safetensors")))
    change(sd)
    return _tensor_file(tmp / f"{name}.safetensors", sd)


def _first_float(sd: dict) -> str:
    return next(k for k, v in sd.items() if v.is_floating_point() and v.dim() >= 1)


def _set_nan(sd: dict, value: float) -> None:
    k = _first_float(sd)
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = value


def _cases(zoo: Path, tmp: Path) -> dict:
    """name -> (config changes, the words the one error line must contain)."""
    data0 = load_file(str(zoo / "data" / "task0.safetensors"))
    head0 = load_file(str(zoo / "heads" / "task0.safetensors"))
    raw = (zoo / "experts" / "task0.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp / "garbage.safetensors").write_bytes(os.urandom(4096))
    (tmp / "empty_dir").mkdir()
    return {
        "truncated expert": ({"experts.task0": str(tmp / "truncated.safetensors")}, ["truncated"]),
        "corrupt expert": ({"experts.task0": str(tmp / "garbage.safetensors")}, ["corrupt"]),
        "missing expert file": ({"experts.task0": str(tmp / "absent.safetensors")}, ["absent.safetensors"]),
        "missing key": ({"experts.task0": _expert_variant(zoo, tmp, "missing", lambda sd: sd.pop(_first_float(sd)))}, ["missing key"]),
        "extra key": ({"experts.task0": _expert_variant(zoo, tmp, "extra", lambda sd: sd.update({"extra.weight": torch.zeros(2)}))}, ["unexpected key 'extra.weight'"]),
        "shape mismatch": ({"experts.task0": _expert_variant(zoo, tmp, "shape", lambda sd: sd.update({_first_float(sd): torch.zeros(3)}))}, ["shape"]),
        "dtype mismatch": ({"experts.task0": _expert_variant(zoo, tmp, "dtype", lambda sd: sd.update({_first_float(sd): sd[_first_float(sd)].double()}))}, ["dtype"]),
        "nan weights": ({"experts.task0": _expert_variant(zoo, tmp, "nan", lambda sd: _set_nan(sd, float("nan")))}, ["non-finite", "nan.safetensors"]),
        "inf weights": ({"experts.task0": _expert_variant(zoo, tmp, "inf", lambda sd: _set_nan(sd, float("inf")))}, ["non-finite", "inf.safetensors"]),
        "another architecture": ({"model.source": "tiny_cnn"}, ["missing"]),
        "empty tensors file": ({"data.task0": {"tensors": _tensor_file(tmp / "empty.safetensors", {"x": torch.zeros(0, 3, 16, 16)})}}, ["empty"]),
        "tensors file without x": ({"data.task0": {"tensors": _tensor_file(tmp / "nox.safetensors", {"y": data0["y"]})}}, ["'x'"]),
        "empty data folder": ({"data.task0": {"folder": str(tmp / "empty_dir")}}, ["task0"]),
        "fewer samples than a batch": ({"data.task0": {"tensors": _tensor_file(tmp / "small.safetensors", {"x": data0["x"][:5], "y": data0["y"][:5]})}}, ["5 samples", "batch_size"]),
        "task names disagree": ({"heads": {"task0": str(zoo / "heads" / "task0.safetensors"), "task1": str(zoo / "heads" / "task1.safetensors"), "taskX": str(zoo / "heads" / "task2.safetensors")}}, ["taskX"]),
        "head classes disagree with data": ({"heads.task0": _tensor_file(tmp / "head2.safetensors", {"weight": head0["weight"][:2], "bias": head0["bias"][:2]})}, ["2 classes"]),
        "misspelled method": ({"method": "adamergin"}, ["did you mean 'adamerging'"]),
        "misspelled solver": ({"options.solver": "pgdd"}, ["did you mean 'pgd'"]),
        "misspelled granularity": ({"options.granularity": "layr"}, ["did you mean 'layer'"]),
        "misspelled objective": ({"options.objective": "entropyy"}, ["did you mean 'entropy'"]),
        "misspelled option": ({"options.stepz": 3}, ["did you mean 'steps'"]),
        "misspelled config key": ({"optoins": {"steps": 2}}, ["did you mean 'options'"]),
        "negative steps": ({"options.steps": -3}, ["'steps'"]),
        "non-numeric lr": ({"options.lr": "fast"}, ["'lr'"]),
        "bounds lo > hi": ({"options.bounds": [1.0, 0.0]}, ["lo <= hi"]),
        "density outside (0, 1]": ({"options.ties_density": 1.5}, ["ties_density"]),
        "misspelled solver option": ({"options.solver_args": {"schedul": "cosine"}}, ["did you mean 'schedule'"]),
        "non-text config": (None, ["not a text file"]),
        "a task name that is a path": ({"experts": {"../escape": str(zoo / "experts" / "task0.safetensors"),
                                                    "task1": str(zoo / "experts" / "task1.safetensors"),
                                                    "task2": str(zoo / "experts" / "task2.safetensors")}}, ["'../escape'"]),
    }


def test_every_bad_input_gets_one_line_exit_2_and_leaves_nothing(tiny_zoo_dir, tmp_path, capsys):
    cases = _cases(tiny_zoo_dir, tmp_path)
    for name, (changes, words) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        if changes is None:  # a binary file given as the config
            folder.mkdir()
            config = folder / "config.yaml"
            config.write_bytes(b"\x88\x00\xff" * 10)
        else:
            config = write_config(folder, tiny_zoo_dir, **{"options.steps": 2, **changes})
        capsys.readouterr()
        rc = main(["fit", "--config", str(config), "--no-progress", "--run-dir", str(folder / "run")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, name
        assert len(err) == 1 and err[0].startswith("adamerge: error: "), (name, err)
        assert all(w in err[0] for w in words), (name, err[0])
        assert not (folder / "run").exists(), f"{name}: a run folder was written"
    assert len(cases) >= 25


def test_export_refuses_an_occupied_folder_and_an_unfinished_run(tiny_zoo_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0
    assert main(["export", str(tmp_path / "run"), str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (tmp_path / "run" / "results.json").unlink()  # as if fit had been killed before its end
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out2")]) == 2
    assert main(["eval", "--run", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "out2").exists()
    assert "not a finished run" in capsys.readouterr().err


def test_the_api_names_the_tensor_and_the_file(tiny_zoo_dir, tmp_path):
    from adamerge.core.task_vectors import TaskVectors

    bad = _expert_variant(tiny_zoo_dir, tmp_path, "nan", lambda sd: _set_nan(sd, float("nan")))
    key = _first_float(load_file(bad))
    with pytest.raises(InputError, match=f"{bad}: tensor '{key}' has non-finite values"):
        TaskVectors.from_files(tiny_zoo_dir / "base.safetensors", {"a": bad, "b": tiny_zoo_dir / "experts" / "task1.safetensors"})


def test_images_that_fail_to_decode_are_named(tmp_path):
    from PIL import Image

    from adamerge.train.data import stream_from_folder

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    stream = stream_from_folder("t", tmp_path, lambda im: torch.zeros(3, 8, 8))
    with pytest.raises(InputError, match="broken.png"):
        stream.inputs(torch.arange(len(stream)))


# ---------------------------------------------------------------------------------- interruptions
def _fit_process(config: Path, *extra: str) -> subprocess.Popen:
    code = "import sys; from adamerge.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, "fit", "--config", str(config), "--no-progress", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_killing_fit_at_a_random_point_then_resuming_gives_the_uninterrupted_coefficients(tiny_zoo_dir, tmp_path, how):
    changes = {"options.steps": 60, "checkpoint_every": 5}
    ref = write_config(tmp_path / "ref", tiny_zoo_dir, **changes)
    assert main(["fit", "--config", str(ref), "--no-progress"]) == 0
    cut = write_config(tmp_path / "cut", tiny_zoo_dir, **changes)
    proc = _fit_process(cut)
    last = tmp_path / "cut" / "run" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(f"{how}-{os.getpid()}").uniform(0.0, 1.5))  # somewhere after the first checkpoint
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    finished = (tmp_path / "cut" / "run" / "results.json").exists()
    if proc.returncode == 0:
        assert finished  # the signal came after the end
    elif not finished:  # cut before the end: it says so and resumes
        if how == "SIGINT":
            assert proc.returncode == 130 and "fit --resume continues" in err
        assert main(["fit", "--config", str(cut), "--resume", "--no-progress"]) == 0
    # finished (before or after the resume) means complete: the uninterrupted coefficients
    a = load_file(str(tmp_path / "ref" / "run" / "coefficients.safetensors"))["coefficients"]
    b = load_file(str(tmp_path / "cut" / "run" / "coefficients.safetensors"))["coefficients"]
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------------- properties
_names = ["conv1.weight", "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.1.mlp.c_fc.bias", "ln_post.weight", "proj"]
_shapes = {n: torch.Size(s) for n, s in zip(_names, [(4, 3, 2, 2), (6, 2), (8,), (2,), (2, 3)])}


@settings(max_examples=60, deadline=None, derandomize=True)  # the same examples in every CI run
@given(spec=st.one_of(
    st.sampled_from(["task", "block", "layer", "partition:2", "partition:3:random", "partition:2:atlas"]),
    st.text(max_size=12),
    st.builds(lambda r, m: f"partition:{r}{m}", st.integers(-2, 9), st.sampled_from(["", ":random", ":atlas", ":x", ":1:2"])),
    st.lists(st.tuples(st.sampled_from([".*", "conv", "resblocks\\.(\\d+)", "(", "ln_", "[a-z]+"]),
                       st.sampled_from(["g", "rest", "block\\1", ""])), max_size=3),
    st.integers(), st.none(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
))
def test_any_granularity_is_a_valid_grouping_or_one_clear_error(spec):
    from adamerge.core.granularity import make_grouping

    try:
        g = make_grouping(spec, _shapes, seed=0)
    except InputError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert g.num_groups >= 1 and len(g.group_names) == g.num_groups
    sizes = g.group_sizes(_shapes)
    assert sum(sizes) == sum(s.numel() for s in _shapes.values())  # every element in exactly one group


_values = st.one_of(st.integers(-5, 1000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.booleans(), st.none(), st.lists(st.floats(-2, 2), max_size=3), st.lists(st.text(max_size=2), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_option_keys = ["steps", "lr", "init", "batch_size", "bounds", "total", "constraint", "optimizer", "grad_clip", "ties_density",
                "weight_decay", "solver", "objective", "stepz", "buffer_policy", "granularity", "objective_args", "solver_args",
                "method_args", "prepare_args", "preprocess", "micro_batch", "extra"]


# random runs of this property (3,000 examples) found a list objective and a non-mapping
# method_args crashing with a TypeError/AttributeError; the CI run is derandomized
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(options=st.dictionaries(st.sampled_from(_option_keys), _values, max_size=4),
       method=st.sampled_from(["adamerging", "adamerging++", "atlas", "concrete_adamerging", "concrete_ta", "doge",
                               "doge_adamerging", "t3", "fw_merging"]))
def test_any_generated_method_options_are_accepted_or_refused_in_one_line(options, method):
    from adamerge.methods import create_method

    try:
        cfg = create_method(method).config(options)
    except InputError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert cfg.steps >= 0 and cfg.batch_size >= 1 and cfg.lr > 0
    assert cfg.bounds[0] <= cfg.bounds[1] and isinstance(cfg.objective, str)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_coefficients(tiny_zoo_dir, tmp_path, monkeypatch, capsys):
    from adamerge.train.loop import MergeModule

    original = MergeModule.task_losses

    def poisoned(self, batch):
        losses = original(self, batch)
        if self.global_step == 7 and "task1" in losses:  # (per task under options.micro_batch)
            losses["task1"] = losses["task1"] * float("nan")
        return losses

    monkeypatch.setattr(MergeModule, "task_losses", poisoned)
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 20, "checkpoint_every": 3})
    assert main(["fit", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss at step 7" in err[0] and "task1" in err[0] and "last good coefficients" in err[0]
    run = tmp_path / "run"
    assert not (run / "results.json").exists()
    state = torch.load(str(run / "checkpoints" / "last.ckpt"), map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and torch.isfinite(state["state_dict"]["merged.coefficients"]).all()


def test_an_interrupted_export_leaves_no_folder_that_looks_complete(tiny_zoo_dir, tmp_path, monkeypatch):
    import adamerge.io.export_files as export_files
    import adamerge.workflows.export as export

    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2})
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_files, "write_heads", crash)  # after model.safetensors, before the metadata
    with pytest.raises(KeyboardInterrupt):
        export.export_run(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary folder left


def test_the_python_api_checks_what_the_command_line_checks(tiny_zoo_dir, tmp_path):
    from adamerge.config import build_all, load_config
    from adamerge.train.data import LinearHead, stream_from_tensors
    from adamerge.plan import fit

    parts = build_all(load_config(write_config(tmp_path, tiny_zoo_dir)))
    small = [stream_from_tensors(s.name, s.dataset.x[:4], s.dataset.y[:4]) for s in parts["streams"]]
    with pytest.raises(InputError, match="fewer than options.batch_size"):
        fit(tmp_path / "a", parts["model"], parts["tv"], parts["heads"], small, options={"steps": 2}, progress=False)
    heads = dict(parts["heads"])
    heads["task0"] = LinearHead(heads["task0"].weight[:2], heads["task0"].bias[:2])
    with pytest.raises(InputError, match="2 classes"):
        fit(tmp_path / "b", parts["model"], parts["tv"], heads, parts["streams"], options={"steps": 2}, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv", [["nonsense"], ["fit"], ["eval", "--method", "nope"], ["predict", "a", "b"], ["demo", "--quick", "extra"]])
def test_command_line_mistakes_are_one_line_too(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adamerge: error: ")
