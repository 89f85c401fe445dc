"""Griffe extension for the docs build: the docstrings' reStructuredText roles as MkDocs cross-references.

The library's docstrings cite code the Sphinx way (``:class:`~adaclip.methods.base.ClipRule```,
``:meth:`release```, a ``text::`` line before an indented block).  This rewrites them, once the
package is loaded, into Markdown that mkdocs-autorefs links: a role whose target resolves (by
Python's scoping rules from the object that holds the docstring) to a documented ``adaclip`` object
becomes a plain cross-reference, which ``mkdocs build --strict`` fails on if nothing renders that
object; anything else (the research wing, private helpers, Opacus, torch) becomes an optional one,
a link where the target is rendered and plain code where it is not.  An ``Args:`` entry that
documents several parameters at once (``rank, world_size: ...``) becomes one entry per name, so
that Griffe can still check every documented name against the signature.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Module, NameResolutionError, Object

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+)`")
LITERAL_BLOCK = re.compile(r"::\n(?=\s*\n)")
JOINED_ARGS = re.compile(r"^(?P<indent>\s+)(?P<names>\w+(?:, \w+)+): (?P<text>.*)$")
LINKED = re.compile(r"adaclip(\.(methods|engine|privacy)(\.[A-Za-z]\w*)*)?")


def _resolve(obj: Object, target: str) -> str:
    if target.startswith("adaclip"):
        return target
    head, _, rest = target.partition(".")
    try:
        path = obj.resolve(head)
    except NameResolutionError:
        return target
    return f"{path}.{rest}" if rest else path


def _reference(obj: Object, match: re.Match[str]) -> str:
    target = match["target"]
    path = _resolve(obj, target)
    title = target.rsplit(".", 1)[-1] if match["tilde"] else target
    if LINKED.fullmatch(path):
        return f"[`{title}`][{path}]"
    return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'


def _split_joined_args(text: str) -> str:
    lines, in_args = [], False
    for line in text.splitlines():
        if line.strip():
            in_args = line == "Args:" or (in_args and line.startswith(" "))
        joined = JOINED_ARGS.match(line) if in_args else None
        if joined:
            lines += [f"{joined['indent']}{name}: {joined['text']}" for name in joined["names"].split(", ")]
        else:
            lines.append(line)
    return "\n".join(lines)


def _rewrite(obj: Object) -> None:
    if obj.docstring is not None:
        text = _split_joined_args(LITERAL_BLOCK.sub(":\n", obj.docstring.value))
        obj.docstring.value = ROLE.sub(lambda match: _reference(obj, match), text)
    for member in obj.members.values():
        if isinstance(member, Object):  # an Alias is documented where its target lives
            _rewrite(member)


class SphinxRoles(Extension):
    """Rewrite every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        _rewrite(pkg)
