"""MkDocs hooks (mkdocs.yml ``hooks:``): the API reference shows the docstrings' Sphinx-style cross references
(``:class:`Run```, ``:func:`~difflab.x.y```) as the code they name, without the role; a ``~`` keeps the last
dotted part, as Sphinx does."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _code(m: re.Match) -> str:
    name = m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)
    return f"<code>{name}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(_code, html)
