"""The documentation holds together without building the site (`mkdocs build --strict` builds it).

Cheap, static checks: the README stays short, keeps the set-up commands the site gives and links to files
that exist, every public name has its place in the API reference, and every page the navigation lists
exists. Nothing here imports the package: public names are read from the source with ast.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_LIMIT = 8000  # characters
# `::: dotted.name` on a line of its own: a mkdocstrings directive.
DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", re.MULTILINE)


def public_names(package: str) -> list[str]:
    """``__all__`` of ``package``'s ``__init__.py``, read from the source (a literal list)."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            names = ast.literal_eval(node.value)
            assert isinstance(names, list)
            return names
    raise AssertionError(f"{package}/__init__.py defines no literal __all__")


def documented(docs: Path = DOCS) -> set[str]:
    """Every object an API page renders with a ``::: name`` directive."""
    return {name for page in (docs / "api").glob("*.md") for name in DIRECTIVE.findall(page.read_text())}


def nav_pages(config: Path = ROOT / "mkdocs.yml") -> list[str]:
    """The files the ``nav:`` of mkdocs.yml lists (``- Title: path.md``), in order."""
    text = config.read_text(encoding="utf-8")
    nav = text[text.index("\nnav:") :]
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?(\S+\.(?:md|ipynb))\s*$", nav, re.MULTILINE)


def page_exists(page: str) -> bool:
    """A page is a file under docs/, or a notebook the build adds from notebooks/ (docs/hooks/notebooks.py)."""
    if page.startswith("notebooks/") and page.endswith(".ipynb"):
        return (ROOT / page).is_file()
    return (DOCS / page).is_file()


def test_readme_is_short() -> None:
    length = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert length <= README_LIMIT, (
        f"README.md has {length} characters (at most {README_LIMIT}): move the detail to a page under docs/"
    )


@pytest.mark.parametrize("package", ["prune_env", "agents"])
def test_every_public_name_is_in_the_api_reference(package: str) -> None:
    names = public_names(package)
    assert names
    missing = [name for name in names if f"{package}.{name}" not in documented()]
    assert missing == [], f"add `::: {package}.NAME` for these to a page in docs/api/: {missing}"


def test_every_nav_page_exists() -> None:
    pages = nav_pages()
    assert "index.md" in pages and "results.md" in pages
    assert [p for p in pages if not page_exists(p)] == []


def test_every_page_and_notebook_is_in_the_nav() -> None:
    """mkdocs warns (and --strict fails) on a page left out of the nav; a notebook would silently vanish."""
    pages = set(nav_pages())
    notebooks = {p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*.ipynb")}
    written = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if p.name != "README.md"}
    assert notebooks and notebooks <= pages, f"notebooks missing from mkdocs.yml's nav: {notebooks - pages}"
    assert written <= pages, f"pages missing from mkdocs.yml's nav: {written - pages}"


def test_readme_links_point_at_files() -> None:
    """The README links into docs/ with relative paths, which the site's strict build does not check."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert any(t.startswith("docs/") for t in targets)
    assert [t for t in targets if not (ROOT / t).exists()] == []


def test_readme_and_getting_started_give_the_same_set_up_commands() -> None:
    def commands(path: Path) -> list[str]:
        text = path.read_text(encoding="utf-8")
        return re.findall(r"```bash\n(.*?)\n```", text, re.DOTALL)[:2]

    readme = commands(ROOT / "README.md")
    assert len(readme) == 2 and "pip install -e ." in readme[0] and "python -m pytest" in readme[1]
    assert commands(DOCS / "getting-started.md") == readme


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The parsers above find what they look for: a nav entry, a directive, a missing page."""
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "x.md").write_text("# X\n\n::: prune_env.prune\n\n:::not_a_directive\n")
    assert documented(tmp_path) == {"prune_env.prune"}
    config = tmp_path / "mkdocs.yml"
    config.write_text("site_name: x\nnav:\n  - Home: index.md\n  - Part:\n      - Nb: notebooks/zz.ipynb\n")
    assert nav_pages(config) == ["index.md", "notebooks/zz.ipynb"]
    assert not page_exists("notebooks/zz.ipynb") and not page_exists("no-such-page.md")
