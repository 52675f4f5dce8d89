"""Every chapter notebook opens with the same setup cell, wired to the book's repository.

The setup cell installs roilib from the repository named in ``_config.yml`` when
``import roilib`` fails (Colab, a fresh environment) and prints whether a GPU is active.
Its output depends on the machine, so it is tagged ``nbval-ignore-output``.

Rules checked here, for every notebook listed in ``_toc.yml``:

* the setup cell is the notebook's first cell, or the second one after a markdown cell
  that holds only the chapter's ``# Title``;
* its source is exactly the one in ``chapters/intro.ipynb`` (copy it from there);
* it is plain Python (no ``%pip``), its ``REPO_URL`` and ``BRANCH`` are
  ``repository.url`` and ``repository.branch`` of ``_config.yml``, and no other URL
  appears in it;
* run with roilib hidden, it calls pip exactly once, with ``git+REPO_URL@BRANCH``;
* it was executed and printed one line on stdout (nothing on stderr).
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import book_layout  # noqa: E402

ROOT = book_layout.ROOT
NOTEBOOKS = book_layout.notebook_docnames()
REFERENCE = "chapters/intro"


def _cells(docname: str):
    nb = json.loads((ROOT / f"{docname}.ipynb").read_text(encoding="utf-8"))
    return nb["cells"]


def _source(cell) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def _setup_cell(docname: str):
    """The setup cell of a notebook, enforcing its position."""
    cells = _cells(docname)
    assert cells, f"{docname}.ipynb has no cells"
    first = cells[0]
    if first["cell_type"] == "markdown":
        lines = [line for line in _source(first).splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("# "), (
            f"{docname}.ipynb: before the setup cell only a markdown cell with the '# Title' "
            f"line may come; found {_source(first)[:200]!r}"
        )
        assert len(cells) > 1, f"{docname}.ipynb: no setup cell after the title"
        cell = cells[1]
    else:
        cell = first
    assert cell["cell_type"] == "code", f"{docname}.ipynb: the setup cell must be a code cell"
    return cell


def _string_assignment(tree: ast.AST, name: str) -> str:
    values = [
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    assert len(values) == 1, f"the setup cell must assign {name} = '...' exactly once"
    return values[0]


def test_toc_and_config_are_read_consistently():
    repo = book_layout.repository()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo["url"]), repo
    assert repo["branch"], repo
    names = book_layout.toc_docnames()
    assert names[0] == REFERENCE, "the book's root page is the introduction"
    for name in names:
        book_layout.source_of(name)  # exactly one source file per entry
    assert len(set(names)) == len(names), "a page is listed twice in _toc.yml"
    assert REFERENCE in NOTEBOOKS


def test_layout_reader_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    repo = book_layout.repository()
    for key in ("url", "branch", "path_to_book"):
        assert str(config["repository"][key]) == repo[key], key
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if key in node:
                    yield node[key]
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []):
                    yield from walk(child)

    assert list(walk(toc)) == book_layout.toc_docnames()


def test_book_config_essentials():
    text = (ROOT / "_config.yml").read_text(encoding="utf-8")
    assert re.search(r'^\s*execute_notebooks\s*:\s*"?off"?\s*$', text, re.M), "notebooks must not run at build time"
    assert re.search(r'^\s*colab_url\s*:\s*"?https://colab\.research\.google\.com"?\s*$', text, re.M)
    assert re.search(r"^only_build_toc_files\s*:\s*true\s*$", text, re.M)


@pytest.mark.parametrize("docname", NOTEBOOKS)
def test_chapter_opens_with_the_setup_cell(docname):
    repo = book_layout.repository()
    cell = _setup_cell(docname)
    src = _source(cell)
    assert src == _source(_setup_cell(REFERENCE)), (
        f"{docname}.ipynb: the setup cell differs from chapters/intro.ipynb's; copy it from there"
    )
    assert "nbval-ignore-output" in cell.get("metadata", {}).get("tags", []), (
        f"{docname}.ipynb: tag the setup cell 'nbval-ignore-output' (its output depends on the GPU)"
    )
    tree = ast.parse(src)  # plain Python: no %pip or !pip magics
    assert _string_assignment(tree, "REPO_URL") == repo["url"], "REPO_URL must be repository.url of _config.yml"
    assert _string_assignment(tree, "BRANCH") == repo["branch"], "BRANCH must be repository.branch of _config.yml"
    for url in re.findall(r"https?://[^\s\"'@{}]+", src):
        assert url == repo["url"], f"{docname}.ipynb: unexpected URL in the setup cell: {url}"
    assert "getDeviceCount()" in src and "import cupy" in src, "the setup cell must report the GPU"

    outputs = cell.get("outputs", [])
    assert cell.get("execution_count") is not None and outputs, f"{docname}.ipynb: the setup cell was not run"
    for out in outputs:
        assert out["output_type"] == "stream" and out["name"] == "stdout", (
            f"{docname}.ipynb: the setup cell wrote {out['output_type']} {out.get('name', '')}"
        )
    assert "".join(_source({"source": o["text"]}) for o in outputs).startswith("roilib ")


DRIVER = r"""
import json, subprocess, sys
calls = []

def fake_run(cmd, **kwargs):
    calls.append(list(cmd))
    sys.modules.pop("roilib", None)  # "installed": the next import succeeds
    return subprocess.CompletedProcess(cmd, 0)

subprocess.run = fake_run
sys.modules["roilib"] = None  # import roilib raises ImportError, as on a fresh Colab
exec(compile(sys.stdin.read(), "setup_cell", "exec"), {"__name__": "__main__"})
print("CALLS=" + json.dumps(calls))
"""


def test_setup_cell_installs_from_the_configured_repository():
    repo = book_layout.repository()
    src = _source(_setup_cell(REFERENCE))
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER], input=src, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    calls = json.loads(lines[-1][len("CALLS="):])
    assert len(calls) == 1, calls
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"], cmd
    target = f"git+{repo['url']}@{repo['branch']}"
    assert any(arg.endswith(target) for arg in cmd), (cmd, target)
    assert len(lines) == 2 and lines[0].startswith("roilib ") and "GPU:" in lines[0], lines
