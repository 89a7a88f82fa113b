"""The structure holds: layers import one way, settings have one default, the CLI exposes every setting.

Import checks run in a fresh interpreter, so what this test process already imported cannot hide an import.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from prune_env.app import cli
from prune_env.app.settings import SearchSettings, from_options
from prune_env.settings import ProblemSettings

ROOT = Path(__file__).resolve().parents[1]


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return set(out.stdout.split())


def test_the_library_imports_neither_agents_nor_the_application() -> None:
    loaded = _modules_loaded_by("import prune_env, prune_env.env, prune_env.problem, prune_env.checkpoint")
    assert not {m for m in loaded if m == "agents" or m.startswith(("agents.", "prune_env.app"))}


def test_agents_do_not_import_the_application_or_stable_baselines_until_asked() -> None:
    loaded = _modules_loaded_by("import agents")
    assert not {m for m in loaded if m.startswith("prune_env.app")}
    assert "stable_baselines3" not in loaded  # SB3 loads when an SB3 agent is first named


def test_every_public_name_resolves() -> None:
    import prune_env

    missing = [name for name in prune_env.__all__ if getattr(prune_env, name, None) is None]
    assert missing == []


def test_help_answers_without_torch() -> None:
    loaded = _modules_loaded_by("from prune_env.app import cli\ncli.build_parser()")
    assert "torch" not in loaded
    assert "agents" not in loaded


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "prune_env").rglob("*.py") if "app" not in p.relative_to(ROOT).parts),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_library_module_names_agents_or_the_application(path: Path) -> None:
    """Not even a local import inside a function: the dependency points one way, written or not."""
    if path.name == "__main__.py":
        return  # `python -m prune_env` is the command line's door, not part of the library
    bad = {n for n in _imports(path) if n == "agents" or n.startswith(("agents.", "prune_env.app"))}
    assert not bad


def test_agents_never_name_the_application() -> None:
    for path in (ROOT / "agents").glob("*.py"):
        assert not {n for n in _imports(path) if n.startswith("prune_env.app")}, path


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages: tuple[str, ...] = ("prune_env", "agents")) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function (``from package import
    submodule`` names the submodule, not the package)."""
    paths = {_module_name(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in paths]
                targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return cycles


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_even_through_local_imports() -> None:
    """A function-local import that closes a cycle still makes the modules one unit: refused."""
    graph = import_graph()
    assert "prune_env.latency.cost" in graph["prune_env.latency"]  # the graph sees imports at all
    assert import_cycles(graph) == []


def test_no_module_is_over_about_500_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in [*(ROOT / "prune_env").rglob("*.py"), *(ROOT / "agents").glob("*.py")]
        if (n := len(p.read_text().splitlines())) > 550
    }
    assert long == {}


# ------------------------------------------------------------------------------------------------ settings


def _search_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices["search"]


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    return [
        f
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", True) and f.name != "problem"  # the problem's fields are listed below
    ]


@pytest.mark.parametrize("cls", [SearchSettings, ProblemSettings])
def test_every_settings_field_is_an_option_with_the_same_default(cls: type) -> None:
    parser = _search_parser()
    defaults = cls()
    by_dest = {a.dest: a for a in parser._actions}
    for f in _cli_fields(cls):
        assert f.name in by_dest, f"{cls.__name__}.{f.name} is not a `prune-env search` option"
        option_default = by_dest[f.name].default
        expected = getattr(defaults, f.name)
        if f.name == "agent_settings":
            assert option_default is None and expected == {}
        elif f.name == "out":
            assert Path(option_default) == expected
        else:
            assert option_default == expected, f.name


def test_every_latency_setting_is_a_latency_option_and_reaches_the_settings() -> None:
    from prune_env.app.settings import settings_from_options
    from prune_env.latency.settings import LatencySettings

    parser = cli.build_parser()
    defaults = LatencySettings()
    args = parser.parse_args(["latency", "tiny"])
    assert settings_from_options(args, LatencySettings) == defaults  # every field, its own default
    args = parser.parse_args(["latency", "tiny", "--repeats", "4", "--noise-bound", "0.1", "--no-progress"])
    chosen = settings_from_options(args, LatencySettings)
    assert (chosen.repeats, chosen.noise_bound, chosen.progress) == (4, 0.1, False)


def test_parsed_defaults_are_the_settings_defaults() -> None:
    args = _search_parser().parse_args([])
    assert from_options(args) == SearchSettings()


def test_options_reach_the_settings() -> None:
    args = _search_parser().parse_args(
        ["--target-params", "0.4", "--round-to", "4", "--importance", "l2", "--no-progress",
         "--agent", "evolution", "--agent-setting", "population=8", "--agent-setting", "mutation_prob=0.2",
         "--out", "runs/x"]
    )  # fmt: skip
    s = from_options(args)
    assert s.problem == ProblemSettings(target_params=0.4, round_to=4, importance="l2", progress=False)
    assert s.problem.metric == "params"
    assert s.agent_settings == {"population": 8, "mutation_prob": 0.2}
    assert s.out == Path("runs/x")


def test_settings_are_frozen_and_refuse_unknown_keys() -> None:
    from prune_env.errors import InvalidSettingError

    s = ProblemSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 3  # type: ignore[misc]
    with pytest.raises(InvalidSettingError, match="no setting eval_sample"):
        ProblemSettings.from_kwargs({"eval_sample": 3})
    assert dataclasses.replace(s, seed=3).seed == 3


def test_an_agent_module_that_cannot_import_is_named_and_does_not_break_the_others() -> None:
    """Without Stable-Baselines3 (an import that fails), the other agents still run and asking for an SB3
    agent names the module and the reason."""
    code = (
        "import sys\n"
        "sys.modules['stable_baselines3'] = None  # as if it were not installed\n"
        "import agents\n"
        "from prune_env.errors import UnknownNameError\n"
        "names = agents.available()\n"
        "assert 'evolution' in names and 'random' in names and 'ppo' not in names, names\n"
        "try:\n"
        "    agents.resolve_agent('ppo')\n"
        "except UnknownNameError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "unknown agent 'ppo'" in out.stdout
    assert "agents.sb3: ModuleNotFoundError" in out.stdout
