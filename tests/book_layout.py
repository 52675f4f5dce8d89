"""The book's layout as the tests see it: repository settings and chapter list.

Read from ``_config.yml`` and ``_toc.yml`` with a few lines of parsing instead of PyYAML,
because ``make test``'s environment does not install PyYAML. The files use a small
subset of YAML (``key: value`` lines, ``- file: NAME`` entries); when PyYAML is
importable, ``test_book_setup_cells.py`` checks that this reading agrees with it.

Imported by ``tests/test_book_setup_cells.py`` and ``tests/browser_check.py``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "_config.yml"
TOC = ROOT / "_toc.yml"

_COMMENT = re.compile(r"\s+#.*$")


def _scalar(text: str) -> str:
    """A YAML plain or quoted scalar on one line, without its trailing comment."""
    text = text.strip()
    if text[:1] in ("'", '"'):
        return text[1 : text.index(text[0], 1)]
    return _COMMENT.sub("", text).strip()


def repository() -> Dict[str, str]:
    """The ``repository:`` block of ``_config.yml`` (url, branch, path_to_book)."""
    block: Dict[str, str] = {}
    inside = False
    for line in CONFIG.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            inside = _COMMENT.sub("", line).strip() == "repository:"
            continue
        if inside:
            key, _, value = line.strip().partition(":")
            block[key.strip()] = _scalar(value)
    return block


def toc_docnames() -> List[str]:
    """Every page of ``_toc.yml`` in reading order (``root`` first), without suffix."""
    names = []
    for line in TOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*(?:-\s+)?(root|file)\s*:\s*(.+)$", line)
        if m:
            names.append(_scalar(m.group(2)))
    return names


def source_of(docname: str) -> Path:
    """The file a toc entry refers to: ``NAME.ipynb`` or ``NAME.md``, exactly one."""
    found = [ROOT / f"{docname}{ext}" for ext in (".ipynb", ".md") if (ROOT / f"{docname}{ext}").exists()]
    if len(found) != 1:
        raise FileNotFoundError(f"_toc.yml entry {docname!r}: expected one of .ipynb/.md, found {found}")
    return found[0]


def notebook_docnames() -> List[str]:
    """The toc entries that are notebooks (the chapters with a setup cell)."""
    return [d for d in toc_docnames() if (ROOT / f"{d}.ipynb").exists()]


def colab_url(docname: str) -> str:
    """The Colab launch link the book must show for the notebook ``docname``."""
    repo = repository()
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)/?", repo["url"])
    if not m:
        raise ValueError(f"repository.url in _config.yml is not a github.com URL: {repo['url']!r}")
    prefix = repo.get("path_to_book", "").strip("/")
    path = f"{prefix}/{docname}.ipynb" if prefix else f"{docname}.ipynb"
    return f"https://colab.research.google.com/github/{m.group(1)}/{m.group(2)}/blob/{repo['branch']}/{path}"


def page_title(docname: str) -> str:
    """The first level-1 heading of a page's source, as plain text."""
    path = source_of(docname)
    if path.suffix == ".ipynb":
        import json

        nb = json.loads(path.read_text(encoding="utf-8"))
        lines = [
            line
            for cell in nb["cells"]
            if cell["cell_type"] == "markdown"
            for line in "".join(cell["source"]).splitlines()
        ]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        if line.startswith("# "):
            return re.sub(r"[`*]", "", line[2:]).strip()
    raise ValueError(f"{path}: no '# ' title")
