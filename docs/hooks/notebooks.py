"""MkDocs hook: the notebooks in notebooks/ become site pages, rendered by mkdocs-jupyter.

The notebooks live beside the code, not under docs/, so each ``notebooks/NAME.ipynb`` is added to the
site's files at the same path before mkdocs-jupyter looks for notebooks (a higher event priority runs
first). They are committed without outputs and rendered as they are: executing them would need torch in
the documentation's environment (see docs/README.md).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


@event_priority(50)  # plugins default to 0: mkdocs-jupyter then finds these among the files
def on_files(files: Files, config: MkDocsConfig) -> Files:
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        uri = notebook.relative_to(ROOT).as_posix()
        files.append(File(uri, str(ROOT), config.site_dir, config.use_directory_urls))
    return files
