"""The Colab path, end to end: a chapter run alone gets roilib only from its setup cell.

What a reader on Colab does, on this machine:

1. this checkout (its working tree, as git would commit it) is committed to a fresh bare
   repository and tagged with the release tag the setup cells pin (``v`` + the version);
2. ``git daemon`` serves that repository on 127.0.0.1;
3. a fresh virtual environment gets only a Jupyter kernel (``ipykernel``), like Colab's
   runtime, and no roilib: ``import roilib`` fails there;
4. the chapter is copied alone into an empty folder and re-executed by nbval in a kernel
   of that environment. Its setup cell runs ``pip install "roilib[plot] @
   git+REPO_URL@RELEASE"`` exactly as published. Git's own URL rewriting
   (``url.<local>.insteadOf = REPO_URL``, given to git through the ``GIT_CONFIG_*``
   environment variables that pip's git child processes inherit) sends the clone to the
   local daemon; the published cell carries no test hook;
5. nbval compares every output with the one stored in the notebook (the expected values),
   with the book's sanitizers;
6. the environment's roilib is checked to be the one built from the served commit
   (pip's ``direct_url.json``) and the daemon's log to show the clone.

pip's own cache (wheels and HTTP) is shared with the rest of ``make test``, so after the
first run nothing is downloaded. The chapter is ``spp``: small, NumPy and matplotlib only.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import book_layout  # noqa: E402

ROOT = book_layout.ROOT
CHAPTER = "chapters/spp"
KERNEL = "roilib-colab-path"


def _version() -> str:
    text = (ROOT / "roilib" / "_version.py").read_text(encoding="utf-8")
    return text.split('__version__ = "', 1)[1].split('"', 1)[0]


def _git(*args, cwd=None, env=None) -> str:
    base = dict(os.environ, GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@localhost",
                GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@localhost")
    proc = subprocess.run(["git", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


def _snapshot(bare: Path, tag: str) -> str:
    """Commit ROOT's working tree (ignored files left out) into ``bare``; tag it; its sha."""
    _git("init", "-q", "--bare", str(bare))
    tree = {"GIT_DIR": str(bare), "GIT_WORK_TREE": str(ROOT), "GIT_INDEX_FILE": str(bare / "snapshot-index")}
    _git("add", "-A", ".", cwd=ROOT, env=tree)
    _git("commit", "-q", "-m", f"snapshot for {tag}", cwd=ROOT, env=tree)
    _git("tag", tag, cwd=ROOT, env=tree)
    return _git("rev-parse", f"{tag}^{{commit}}", cwd=ROOT, env=tree)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def git_server(tmp_path):
    """(git:// URL of a snapshot of this checkout tagged with the release, sha, daemon log)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    tag = f"v{_version()}"
    base = tmp_path / "srv"
    sha = _snapshot(base / "roi-book.git", tag)
    port = _free_port()
    log = tmp_path / "git-daemon.log"
    with open(log, "w") as log_file:
        daemon = subprocess.Popen(
            ["git", "daemon", "--listen=127.0.0.1", f"--port={port}", f"--base-path={base}",
             "--export-all", "--reuseaddr", "--verbose", "--informative-errors", str(base)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    url = f"git://127.0.0.1:{port}/roi-book.git"
    try:
        for _ in range(100):  # ready when it answers
            probe = subprocess.run(["git", "ls-remote", url, tag], capture_output=True, text=True, timeout=30)
            if probe.returncode == 0 and sha in probe.stdout:
                break
            assert daemon.poll() is None, log.read_text()
            time.sleep(0.1)
        else:
            pytest.fail(f"git daemon did not serve {url}: {log.read_text()}")
        yield url, sha, log
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def _fresh_env(path: Path) -> Path:
    """A virtual environment with a Jupyter kernel and nothing of this project; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    python = path / "bin" / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "ipykernel"],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    probe = subprocess.run([str(python), "-I", "-c", "import roilib"], capture_output=True, text=True, cwd=path)
    assert probe.returncode != 0 and "No module named 'roilib'" in probe.stderr, probe.stderr
    return python


def _kernelspec(jupyter_path: Path, python: Path) -> None:
    spec = jupyter_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh Colab-like environment",
        "language": "python",
    }))


def _installed_from(python: Path) -> dict:
    """pip's record (PEP 610 direct_url.json) of where the environment's roilib came from."""
    code = "import importlib.metadata as m; print(m.distribution('roilib').read_text('direct_url.json'))"
    out = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, check=True,
                         timeout=120, cwd=python.parent)
    return json.loads(out.stdout)


def test_chapter_installs_roilib_through_its_setup_cell(tmp_path, git_server):
    served, sha, daemon_log = git_server
    repo_url = book_layout.repository()["url"]
    python = _fresh_env(tmp_path / "venv")
    _kernelspec(tmp_path / "jupyter", python)
    book = tmp_path / "book"
    book.mkdir()
    notebook = book / Path(CHAPTER).with_suffix(".ipynb").name
    shutil.copy(ROOT / f"{CHAPTER}.ipynb", notebook)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "JUPYTER", "GIT_", "VIRTUAL_ENV"))}
    env.update(
        JUPYTER_PATH=str(tmp_path / "jupyter"),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        # the published REPO_URL, rewritten by git itself to the local daemon
        GIT_CONFIG_COUNT="1",
        GIT_CONFIG_KEY_0=f"url.{served}.insteadOf",
        GIT_CONFIG_VALUE_0=repo_url,
        GIT_TERMINAL_PROMPT="0",
        ROILIB_CACHE_DIR=str(tmp_path / "kernel-cache"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(book),
         "--nbval", "--nbval-kernel-name", KERNEL,
         "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), str(notebook)],
        cwd=book, env=env, capture_output=True, text=True, timeout=900,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    cells = sum(c["cell_type"] == "code" for c in json.loads(notebook.read_text())["cells"])
    assert f"{cells} passed" in proc.stdout, report

    origin = _installed_from(python)
    assert origin["url"] == repo_url, origin
    assert origin["vcs_info"]["vcs"] == "git", origin
    assert origin["vcs_info"]["requested_revision"] == f"v{_version()}", origin
    assert origin["vcs_info"]["commit_id"] == sha, origin
    assert "upload-pack" in daemon_log.read_text(), daemon_log.read_text()
