"""MkDocs hook: the results page, generated at every build from the committed files in benchmarks/results/.

No measured number is typed into the documentation: ``docs/results.md`` holds only prose and a marker,
which this hook replaces with

* one section per experiment that left a text report or a plot: a directory of benchmarks/results/ (its
  ``*.txt`` reports and ``*.png`` plots, at any depth), or a top-level file stem
  (``graph_build_session8.txt``, ``joint_quantization_fashion_vgg.png``); each report is shown verbatim and
  each plot as an image, with the command that made it when benchmarks/results/README.md's tables name
  the file;
* benchmarks/results/README.md itself (every raw file and the command that made it), headings demoted
  under the page's own.

A report or plot committed later appears on the next build without a change here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_README = RESULTS / "README.md"
PAGE = "results.md"
MARKER = "<!-- generated: docs/hooks/results.py -->"
SHOWN = {".txt", ".png"}  # what a section shows; every other file is listed by name
CODE_NAME = re.compile(r"`([^`]+)`")


@dataclass
class Experiment:
    """The committed files of one experiment: a directory of benchmarks/results/, or a top-level stem."""

    name: str
    directory: bool
    files: list[Path] = field(default_factory=list)

    @property
    def shown(self) -> list[Path]:
        """Reports first, then plots, each in path order."""
        return sorted((p for p in self.files if p.suffix in SHOWN), key=lambda p: (p.suffix != ".txt", p))


def experiments(results: Path = RESULTS) -> list[Experiment]:
    """Every experiment under ``results`` with a report or a plot, by name.

    A top-level file whose stem names a directory (``DIR.txt``: a report over ``DIR``'s raw files) joins
    that directory's experiment.
    """
    entries = sorted(e for e in results.iterdir() if e.name != "README.md")
    groups = {
        d.name: Experiment(d.name, True, sorted(p for p in d.rglob("*") if p.is_file()))
        for d in entries
        if d.is_dir()
    }
    for file in (e for e in entries if e.is_file()):
        groups.setdefault(file.stem, Experiment(file.stem, False)).files.append(file)
    return [g for _, g in sorted(groups.items()) if g.shown]


def commands(readme: str) -> dict[str, str]:
    """File name (or directory, without its slash) -> what README's tables say made it."""
    made_by: dict[str, str] = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 2 or set(cells[0]) <= set("-: "):
            continue
        for name in CODE_NAME.findall(cells[0]):
            made_by.setdefault(name.rstrip("/"), cells[-1])
    return made_by


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text.rstrip()}\n{ticks}"


def _demote(markdown: str, levels: int) -> str:
    out, in_code = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and re.match(r"#{1,5} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def _listing(experiment: Experiment) -> str:
    """The experiment's files: a directory's top-level entries (subdirectories with their file count)."""
    if not experiment.directory:
        return "Files: " + ", ".join(f"`{p.relative_to(ROOT).as_posix()}`" for p in experiment.files) + "."
    top = RESULTS / experiment.name
    entries = []
    for entry in sorted(top.iterdir()):
        if entry.is_dir():
            count = sum(1 for p in experiment.files if entry in p.parents)
            entries.append(f"`{entry.name}/` ({count} files)")
        else:
            entries.append(f"`{entry.name}`")
    return f"Files in `{top.relative_to(ROOT).as_posix()}/`: " + ", ".join(entries) + "."


def section(experiment: Experiment, made_by: dict[str, str]) -> str:
    """One experiment's reports verbatim and its plots as images, under a heading of its name."""
    rel = [p.relative_to(RESULTS).as_posix() for p in experiment.files]
    named = [n for n in [experiment.name, *rel] if n in made_by]
    named += sorted(n for n in made_by if n.startswith(experiment.name + "/") and n not in named)
    lines = [f"### `{experiment.name}`", ""]
    if named:
        lines += ["From `benchmarks/results/README.md`:", ""]
        lines += [f"- `{name}`: {made_by[name]}" for name in named]
        lines += [""]
    if len(experiment.files) > 1:
        lines += [_listing(experiment), ""]
    for path in experiment.shown:
        title = path.relative_to(RESULTS).as_posix()
        if path.suffix == ".txt":
            lines += [f"`{title}`:", "", _fence(path.read_text(encoding="utf-8")), ""]
        else:
            lines += [f"![{title}]({path.relative_to(ROOT).as_posix()})", "", f"*{title}*", ""]
    return "\n".join(lines)


def render(results: Path = RESULTS) -> str:
    readme = (results / "README.md").read_text(encoding="utf-8")
    made_by = commands(readme)
    parts = ["## Reports and plots", ""]
    parts += [section(e, made_by) + "\n" for e in experiments(results)]
    parts += ["## Every file and the command that made it", "", _demote(readme, 2)]
    return "\n".join(parts)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Publish every plot under benchmarks/results/ at its repository path, for the page to show."""
    for png in sorted(RESULTS.rglob("*.png")):
        uri = png.relative_to(ROOT).as_posix()
        files.append(File(uri, str(ROOT), config.site_dir, config.use_directory_urls))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its marker {MARKER!r}: the generated results have nowhere to go")
    return markdown.replace(MARKER, render())
