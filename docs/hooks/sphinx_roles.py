"""A griffe extension: the docstrings' Sphinx roles (``:class:`~prune_env.graph.DependencyGraph```) as links.

The library's docstrings are Google style with Sphinx cross-reference roles, which Markdown would print
literally. Each role becomes an *optional* cross-reference: a link where the target is documented on the
site, plain code where it is not (no warning either way, so ``mkdocs build --strict`` stays meaningful
for the pages' own links). A bare name (``:class:`Outcome```) is looked up beside the object whose
docstring names it: in the same class, then the same module.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`]+)`")


def _resolve(name: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
    """The canonical path of ``name`` as seen from ``obj`` (``name`` itself when nothing matches).

    Canonical: where the object is defined, so that a name a module imports (``agents.registry``'s
    ``BudgetedEvaluator``) links to the one documented object (``agents.evaluator.BudgetedEvaluator``).
    """
    candidates = [f"{scope.path}.{name}" for scope in (obj, *_parents(obj))]
    for candidate in (name, *candidates) if "." in name else candidates:
        try:
            found = loader.modules_collection[candidate]
            return str(found.final_target.path if found.is_alias else found.path)
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
    return name


def _parents(obj: griffe.Object) -> list[griffe.Object]:
    parents = []
    parent = obj.parent
    while parent is not None:
        parents.append(parent)
        parent = parent.parent
    return parents


def _rewrite(obj: griffe.Object, loader: griffe.GriffeLoader) -> None:
    docstring = obj.docstring
    if docstring is None or ":`" not in docstring.value:
        return

    def link(match: re.Match[str]) -> str:
        target = match["target"].strip().removesuffix("()")
        title = target.rsplit(".", 1)[-1] if match["tilde"] else target
        identifier = html.escape(_resolve(target, obj, loader), quote=True)
        return f'<autoref identifier="{identifier}" optional><code>{html.escape(title)}</code></autoref>'

    docstring.value = ROLE.sub(link, docstring.value)


def _walk(obj: griffe.Object, loader: griffe.GriffeLoader, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    _rewrite(obj, loader)
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member, loader, seen)


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring of a loaded package, once the whole package is known."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        _walk(pkg, loader, set())
