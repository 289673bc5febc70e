"""The package's shape (issue 22): no import circles, nothing below the command line imports it,
and every command's checks run once, through the run plan."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adamerge
from adamerge.cli import main
from helpers import write_config

PACKAGE = Path(adamerge.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """module → the adamerge modules it imports (anywhere in the file, lazily or not)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import sub` names the submodule; the package itself only for other names
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in modules] + ([base] if any(t not in modules for t in subs) else [])
            for t in targets:
                # the deepest adamerge module the name refers to
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "adamerge":
                    found.add(t)
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_adamerge_modules():
    graph = _imports()
    assert len(graph) > 50  # the walk saw the whole package
    assert _cycles(graph) == []


def test_only_the_command_line_imports_the_command_line():
    importers = sorted(m for m, deps in _imports().items() if "adamerge.cli" in deps)
    assert importers in ([], ["adamerge.__main__"])


def test_pure_tensor_modules_import_no_io_and_nothing_trains():
    graph = _imports()
    for pure in ("adamerge.solvers.projections", "adamerge.solvers.doge_ops"):
        assert not {d for d in graph[pure] if d.startswith(("adamerge.io", "adamerge.train", "adamerge.workflows"))}, pure
    for low in [m for m in graph if m.startswith(("adamerge.methods", "adamerge.solvers", "adamerge.merges", "adamerge.core"))]:
        assert "adamerge.train.loop" not in graph[low] and "adamerge.plan" not in graph[low], low
        assert not {d for d in graph[low] if d.startswith("adamerge.workflows")}, low


def test_public_imports_still_work():
    from adamerge import MergedModel, RunPlan, TaskVectors, create_method, evaluate, fit, list_methods  # noqa: F401

    assert callable(fit) and callable(evaluate) and "adamerging" in list_methods()


@pytest.fixture
def counted(monkeypatch):
    """Count the calls of every check on the command path."""
    import adamerge.plan as plan_mod
    import adamerge.train.data as data_mod
    from adamerge.methods.base import Method

    calls: dict[str, int] = {}

    def wrap(owner, name, key):
        original = getattr(owner, name)

        def counting(*args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)

    wrap(plan_mod, "check_labels", "check_labels")
    wrap(plan_mod, "check_tasks", "check_tasks")
    wrap(plan_mod, "_check_run_folder", "run_folder")
    wrap(data_mod, "check_batch_size", "check_batch_size")
    wrap(Method, "validate", "validate")
    plans: list = []
    original_init = plan_mod.RunPlan.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plans.append(self)

    monkeypatch.setattr(plan_mod.RunPlan, "__init__", init)
    return calls, plans


def test_fit_runs_every_check_once(tiny_zoo_dir, tmp_path, counted):
    calls, plans = counted
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2})
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0
    assert calls == {"check_labels": 1, "check_tasks": 1, "run_folder": 1, "check_batch_size": 1, "validate": 1}
    from adamerge.plan import CONFIG_CHECKS, PARTS_CHECKS

    assert len(plans) == 1
    assert sorted(plans[0].checks_run) == sorted(CONFIG_CHECKS + PARTS_CHECKS)  # each once, none missing


def test_resume_and_export_run_their_checks_once(tiny_zoo_dir, tmp_path, counted):
    calls, plans = counted
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2})
    assert main(["fit", "--config", str(config), "--no-progress"]) == 0
    calls.clear()
    plans.clear()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert len(plans) == 1 and calls.get("check_labels") == 1 and calls.get("check_tasks") == 1
    assert len(plans[0].checks_run) == len(set(plans[0].checks_run))


def test_the_python_api_goes_through_the_plan(tiny_zoo_dir, tmp_path, counted):
    from adamerge.config import build_all, load_config

    calls, plans = counted
    parts = build_all(load_config(write_config(tmp_path, tiny_zoo_dir)))
    res = adamerge.fit(tmp_path / "api", parts["model"], parts["tv"], parts["heads"], parts["streams"],
                       options={"steps": 2, "batch_size": 16}, progress=False)
    assert res["steps"] == 2 and len(plans) == 1
    assert calls["check_labels"] == 1 and calls["check_batch_size"] == 1 and calls["run_folder"] == 1


def test_an_ablation_runs_one_plan_per_cell(tiny_zoo_dir, tmp_path, counted):
    calls, plans = counted
    config = write_config(tmp_path, tiny_zoo_dir, **{"options.steps": 2})
    assert main(["ablate", "--config", str(config), "--grid", "granularity=task,layer", "--seeds", "0",
                 "--out", str(tmp_path / "ab"), "--no-progress"]) == 0
    fitted = [p for p in plans if p.parts is not None]
    assert len(fitted) == 2
    for p in fitted:
        assert len(p.checks_run) == len(set(p.checks_run))
    assert calls["check_batch_size"] == 2 and calls["run_folder"] == 2


def test_plan_from_a_dict_equals_plan_from_its_file(tiny_zoo_dir, tmp_path):
    import yaml

    from adamerge.plan import RunPlan

    config = write_config(tmp_path, tiny_zoo_dir)
    a = RunPlan.from_config(config)
    b = RunPlan.from_config(yaml.safe_load(config.read_text()), root=config.parent)
    assert a.cfg == b.cfg and a.options == b.options


@pytest.mark.parametrize("change, message", [
    ({"seed": -1}, "seed must be a whole number"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"seed": 2**32}, "seed must be a whole number"),
    ({"method": "adamergin"}, "adamerging"),
    ({"eval_batch_size": -1}, "eval_batch_size"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"storage_dtype": "int8"}, "storage_dtype"),
    ({"trainer.acelerator": "cpu"}, "accelerator"),
    ({"trainer.max_steps": 5}, "set by adamerge"),
    ({"trainer": [1]}, "must be a mapping"),
])
def test_plan_config_checks_write_nothing(tiny_zoo_dir, tmp_path, change, message, capsys):
    config = write_config(tmp_path, tiny_zoo_dir, **change)
    assert main(["fit", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adamerge: error:") and message in err[0]
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_is_a_file_is_refused(tiny_zoo_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    config = write_config(tmp_path, tiny_zoo_dir, run_dir=str(tmp_path / "afile"))
    assert main(["fit", "--config", str(config), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err
    config = write_config(tmp_path, tiny_zoo_dir, run_dir=str(tmp_path / "afile" / "run"))
    assert main(["fit", "--config", str(config), "--no-progress"]) == 2
    assert (tmp_path / "afile").read_text() == "keep me"
