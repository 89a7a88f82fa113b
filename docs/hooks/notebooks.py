"""MkDocs hook: the notebooks in notebooks/ become site pages, executed in their smoke mode at build time.

The notebooks are committed without outputs (tests/test_notebooks.py keeps them so). At every build each
``notebooks/NAME.ipynb`` is run from top to bottom with ``PRUNE_ENV_NOTEBOOK_SMOKE=1`` (every size shrunk
to a quick run) in a scratch directory, and the executed copy, figures included, is added to the site's
files at the same path for mkdocs-jupyter to render. A cell that raises fails the build, with the cell and
its traceback: a notebook that no longer runs cannot be published.

Executing needs the package and its dependencies (torch among them) in the environment that runs
``mkdocs``: ``pip install -e ".[docs]"``. ``PRUNE_ENV_DOCS_NOTEBOOKS=unexecuted`` renders the committed
notebooks as they are instead, for quick edits of other pages (``mkdocs serve`` rebuilds on every change).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
MODE_VARIABLE = "PRUNE_ENV_DOCS_NOTEBOOKS"
MODES = ("executed", "unexecuted")
CELL_TIMEOUT = 600  # seconds; smoke cells take a few, a base model trained on first use about a minute
# The kernel inherits this process's environment plus these: smoke sizes; figures drawn as images (under a
# non-interactive backend such as CI's MPLBACKEND=Agg, plt.show() would only warn); no progress bars, whose
# every refresh a static page would show as a line of its own.
KERNEL_ENVIRONMENT = {
    "PRUNE_ENV_NOTEBOOK_SMOKE": "1",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "TQDM_DISABLE": "1",
}

log = logging.getLogger("mkdocs.hooks.notebooks")
_build_dirs: list[tempfile.TemporaryDirectory[str]] = []


def notebook_mode() -> str:
    """How notebooks are rendered: ``executed`` (the default) or ``unexecuted``, from the environment."""
    mode = os.environ.get(MODE_VARIABLE, "executed")
    if mode not in MODES:
        raise PluginError(
            f"{MODE_VARIABLE}={mode!r} is not one of {MODES}: unset it to execute the notebooks"
        )
    return mode


def execute_notebook(source: Path, destination: Path, workdir: Path) -> None:
    """Run ``source`` in smoke mode with ``workdir`` as its working directory; write the result, with its
    outputs, to ``destination``."""
    try:
        import nbclient
        import nbformat
    except ModuleNotFoundError as err:
        raise PluginError(
            f"executing the notebooks needs {err.name}: pip install -e '.[docs]' (or set "
            f"{MODE_VARIABLE}=unexecuted to render them without outputs)"
        ) from err
    notebook = nbformat.read(source, as_version=4)
    saved = {name: os.environ.get(name) for name in KERNEL_ENVIRONMENT}
    os.environ.update(KERNEL_ENVIRONMENT)  # the kernel is a subprocess: it inherits os.environ
    try:
        client = nbclient.NotebookClient(
            notebook,
            timeout=CELL_TIMEOUT,
            kernel_name="python3",
            resources={"metadata": {"path": str(workdir)}},
        )
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        raise PluginError(f"{source.name} failed when executed for the site:\n{err}") from err
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    nbformat.write(notebook, destination)


def executed_copies(notebooks: list[Path], build_dir: Path) -> None:
    """Every notebook executed into ``build_dir/notebooks/``, each in a scratch directory of its own
    (the benchmarking notebook writes its runs where it runs)."""
    (build_dir / "notebooks").mkdir(parents=True)
    for notebook in notebooks:
        workdir = build_dir / "work" / notebook.stem
        workdir.mkdir(parents=True)
        started = time.perf_counter()
        execute_notebook(notebook, build_dir / "notebooks" / notebook.name, workdir)
        log.info("executed %s in %.0f s", notebook.name, time.perf_counter() - started)


@event_priority(50)  # plugins default to 0: mkdocs-jupyter then finds these among the files
def on_files(files: Files, config: MkDocsConfig) -> Files:
    _remove_build_dirs()  # the previous build's copies (`mkdocs serve` builds again on every change)
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    source_dir = ROOT
    if notebook_mode() == "executed":
        build = tempfile.TemporaryDirectory(prefix="prune-env-docs-")
        _build_dirs.append(build)
        executed_copies(notebooks, Path(build.name))
        source_dir = Path(build.name)
    else:
        log.info("%s=unexecuted: the notebooks are rendered without outputs", MODE_VARIABLE)
    for notebook in notebooks:
        uri = notebook.relative_to(ROOT).as_posix()
        files.append(File(uri, str(source_dir), config.site_dir, config.use_directory_urls))
    return files


def _remove_build_dirs() -> None:
    while _build_dirs:
        _build_dirs.pop().cleanup()


def on_shutdown() -> None:
    """The executed copies are read until the pages are written; removed when MkDocs exits."""
    _remove_build_dirs()
