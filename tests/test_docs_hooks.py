"""The documentation build's own code (docs/hooks/): the notebooks executed for the site, the results page.

These need MkDocs (the ``docs`` extra) and skip without it; ``mkdocs build --strict`` runs them for real.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("mkdocs")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

HOOKS = Path(__file__).resolve().parents[1] / "docs" / "hooks"


def load_hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", HOOKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def write_notebook(path: Path, *sources: str) -> Path:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def test_notebook_mode_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = load_hook("notebooks")
    from mkdocs.exceptions import PluginError

    monkeypatch.delenv(hook.MODE_VARIABLE, raising=False)
    assert hook.notebook_mode() == "executed"
    monkeypatch.setenv(hook.MODE_VARIABLE, "unexecuted")
    assert hook.notebook_mode() == "unexecuted"
    monkeypatch.setenv(hook.MODE_VARIABLE, "skip")
    with pytest.raises(PluginError, match="unset it"):
        hook.notebook_mode()


def test_a_notebook_is_executed_in_smoke_mode_in_its_scratch_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = load_hook("notebooks")
    monkeypatch.delenv("PRUNE_ENV_NOTEBOOK_SMOKE", raising=False)
    source = write_notebook(
        tmp_path / "nb.ipynb",
        "import os; print(os.environ['PRUNE_ENV_NOTEBOOK_SMOKE'], os.environ['TQDM_DISABLE'])",
        "from pathlib import Path; print(Path.cwd().name)",
    )
    workdir = tmp_path / "scratch"
    workdir.mkdir()
    hook.execute_notebook(source, tmp_path / "out.ipynb", workdir)
    cells = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
    assert [c.outputs[0]["text"] for c in cells] == ["1 1\n", "scratch\n"]
    assert nbformat.read(source, as_version=4).cells[0].outputs == []  # the source is left as committed
    assert "PRUNE_ENV_NOTEBOOK_SMOKE" not in os.environ  # this process's environment is restored


def test_a_failing_cell_fails_the_build(tmp_path: Path) -> None:
    hook = load_hook("notebooks")
    from mkdocs.exceptions import PluginError

    source = write_notebook(tmp_path / "broken.ipynb", "raise ValueError('the cell that broke')")
    with pytest.raises(PluginError, match=r"(?s)broken\.ipynb failed when executed.*the cell that broke"):
        hook.execute_notebook(source, tmp_path / "out.ipynb", tmp_path)
    assert not (tmp_path / "out.ipynb").exists()


def test_results_page_groups_a_report_with_its_directory(tmp_path: Path) -> None:
    hook = load_hook("results")
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "runs.csv").write_text("a,b\n")
    (tmp_path / "grid.txt").write_text("the report\n")
    (tmp_path / "alone.json").write_text("{}")  # neither a report nor a plot: no section
    (tmp_path / "README.md").write_text(
        "| file | command |\n|---|---|\n| `grid/` | `python benchmarks/x.py` |\n"
    )
    found = hook.experiments(tmp_path)
    assert [(e.name, e.directory, [p.name for p in e.shown]) for e in found] == [("grid", True, ["grid.txt"])]
    assert hook.commands((tmp_path / "README.md").read_text()) == {"grid": "`python benchmarks/x.py`"}
