"""MkDocs hook: docstrings use Sphinx roles (:class:`SparseLinear`, :func:`sparsify`); the
Markdown rendering keeps the code span and drops the role prefix."""
from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html, page, config, files):
    """Remove role prefixes in front of inline code in the rendered page."""
    return _ROLE.sub("", html)
