"""The notebooks: committed clean, generated from their source, and every one runs at smoke size.

``PRUNE_ENV_NOTEBOOK_SMOKE=1`` shrinks every notebook to a smoke test; the kernel inherits the test's
environment, including ``PRUNE_ENV_CACHE`` pointing at the session's trained resnet20, so no notebook
trains a base model here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds; smoke cells take a few


def test_every_notebook_has_its_source() -> None:
    assert NOTEBOOKS
    assert [p.stem for p in NOTEBOOKS] == sorted(p.stem for p in NOTEBOOK_DIR.glob("0*.py"))


def _cells(nb: Any) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_source(path: Path) -> None:
    """The .py (percent format) is the reviewed source; the .ipynb must hold exactly its cells."""
    jupytext = pytest.importorskip("jupytext")
    source = jupytext.read(path.with_suffix(".py"))
    assert _cells(nbformat.read(path, as_version=4)) == _cells(source), (
        f"{path.name} is out of sync with {path.with_suffix('.py').name}: run jupytext --sync notebooks/*.py"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} of {path.name} has stale outputs"
            assert cell.execution_count is None, f"cell {i} of {path.name} has an execution count"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert 'os.environ.get("PRUNE_ENV_NOTEBOOK_SMOKE") == "1"' in first_code.source
    assert "%matplotlib inline" in first_code.source  # figures show as images in Jupyter, not as reprs


def test_kernel_is_this_python() -> None:
    """The "python3" kernel must run this interpreter (the venv with prune_env), not some other Python."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    executable = km.format_kernel_cmd()[0]
    assert Path(shutil.which(executable) or executable).resolve() == Path(sys.executable).resolve()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(
    path: Path,
    digits_base: Any,
    shared_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel is a subprocess that inherits os.environ (monkeypatch restores it afterwards).
    monkeypatch.setenv("PRUNE_ENV_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("PRUNE_ENV_CACHE", str(shared_cache))
    # One thread, as in the test workers: two workers on two cores would otherwise oversubscribe.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # As in Jupyter (CI exports MPLBACKEND=Agg, under which plt.show() warns that it cannot show).
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        # Run in a scratch directory: the benchmark notebook writes runs/ relative to it.
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    if path.name.startswith("04"):
        assert (tmp_path / "runs" / "benchmark-smoke" / "runs.csv").exists()
        assert (tmp_path / "runs" / "benchmark-smoke" / "pareto.png").exists()
