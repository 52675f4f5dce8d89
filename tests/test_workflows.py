"""The GitHub Actions workflows: linted by actionlint, and shaped as the project needs.

* ``actionlint`` (installed by the ``test`` extra, with ``shellcheck`` for the ``run:``
  scripts) reports nothing for ``.github/workflows/*.yml``; a deliberately broken
  workflow shows the lint is live (it must report each planted mistake);
* ``tests.yml`` runs ``make test`` on every push and pull request;
* ``book.yml`` builds the book with ``make book`` and publishes ``_build/html`` (where
  the Makefile's ``jupyter-book build .`` writes it) with the three Pages steps: upload
  the Pages artifact in the build job, then deploy from a job that needs it, with the
  ``pages: write`` and ``id-token: write`` permissions and the ``github-pages``
  environment.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
BIN = Path(sys.executable).parent


def _actionlint(*paths: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """actionlint from this environment, with this environment's shellcheck, no pyflakes."""
    exe, shellcheck = BIN / "actionlint", BIN / "shellcheck"
    assert exe.is_file() and shellcheck.is_file(), "pip install -e '.[test]' provides actionlint and shellcheck"
    return subprocess.run(
        [str(exe), "-no-color", f"-shellcheck={shellcheck}", "-pyflakes=", *map(str, paths)],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def _load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def _steps(job: dict):
    return job.get("steps", [])


def _runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in _steps(job))


def _uses(job: dict):
    return [step["uses"].split("@")[0] for step in _steps(job) if "uses" in step]


def test_actionlint_accepts_the_workflows():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} == {"tests.yml", "book.yml"}, files
    proc = _actionlint(*files)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


BROKEN = """\
name: broken
on:
  push:
jobs:
  build:
    runs-on: ubuntu-24.04
    steps:
      - uses: actions/checkout@v4
      - run: echo ${{ matrix.python }}
      - run: cd $GITHUB_WORKSPACE/$DIR && ls
      - uses: actions/upload-pages-artifact@v3
        with:
          paht: _build/html
  deploy:
    needs: biuld
    runs-on: ubuntu-24.04
    steps:
      - run: echo finished
"""


def test_actionlint_reports_planted_mistakes(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(BROKEN)
    proc = _actionlint(broken, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert 'job "deploy" needs job "biuld" which does not exist' in out, out  # the job graph
    assert "matrix" in out and "[expression]" in out, out  # an expression's context
    assert "shellcheck reported issue" in out and "SC2086" in out, out  # the run: script
    assert 'input "paht" is not defined' in out, out  # an action's inputs


def test_tests_workflow_runs_make_test_on_push_and_pull_request():
    doc = _load("tests.yml")
    assert "push" in doc["on"] and "pull_request" in doc["on"], doc["on"]
    jobs = doc["jobs"].values()
    assert any(line.strip().startswith("make test") for job in jobs for line in _runs(job).splitlines())
    assert all("actions/checkout" in _uses(job) for job in jobs)


def test_book_workflow_builds_uploads_and_deploys_to_pages():
    doc = _load("book.yml")
    assert "push" in doc["on"], doc["on"]
    jobs = doc["jobs"]
    build = [name for name, job in jobs.items() if "actions/upload-pages-artifact" in _uses(job)]
    deploy = [name for name, job in jobs.items() if "actions/deploy-pages" in _uses(job)]
    assert len(build) == 1 and len(deploy) == 1 and build != deploy, (build, deploy)
    build_job, deploy_job = jobs[build[0]], jobs[deploy[0]]

    assert "make book" in _runs(build_job)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "jupyter-book build ." in makefile  # which writes the HTML to _build/html
    upload = next(s for s in _steps(build_job) if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html", upload
    # the artifact is uploaded after the build step
    steps = _steps(build_job)
    assert steps.index(upload) > next(i for i, s in enumerate(steps) if "make book" in s.get("run", ""))

    needs = deploy_job.get("needs")
    assert build[0] in ([needs] if isinstance(needs, str) else needs), needs
    perms = {**doc.get("permissions", {}), **deploy_job.get("permissions", {})}
    assert perms.get("pages") == "write" and perms.get("id-token") == "write", perms
    # the build job, which runs the project's code, cannot publish
    build_perms = build_job.get("permissions", doc.get("permissions", {}))
    assert build_perms.get("pages") != "write" and build_perms.get("id-token") != "write", build_perms
    assert deploy_job["environment"]["name"] == "github-pages", deploy_job
