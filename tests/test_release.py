"""A release that installs: build the sdist and the wheel, check them, install the wheel.

* ``python -m build`` (isolated, as a publisher runs it) makes an sdist and, from the
  unpacked sdist, a wheel; both must carry every kernel source under
  ``roilib/cuda/kernels/`` (the expected list is read from the source tree, not from the
  packaging configuration) and every module of the package;
* ``twine check --strict`` accepts both (metadata, README rendering);
* the version in the archives' metadata is ``roilib/_version.py``'s, and CHANGELOG.md has
  a section for it;
* the wheel installed into a fresh virtual environment (nothing else from this checkout
  importable) runs the NumPy ops on hand-computed cases and builds the CUDA kernels for
  the CPU from the installed ``.cu`` files, matching the reference.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SUFFIXES = (".cu", ".cuh", ".h")


def _version() -> str:
    text = (ROOT / "roilib" / "_version.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def _package_files():
    """Paths (relative to the repository) the wheel must carry: modules and kernel sources."""
    files = set()
    for path in (ROOT / "roilib").rglob("*"):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        if path.suffix == ".py" or (path.parent.name == "kernels" and path.suffix in KERNEL_SUFFIXES):
            files.add(path.relative_to(ROOT).as_posix())
    return files


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """{"sdist": path, "wheel": path} built by ``python -m build`` from this checkout."""
    out = tmp_path_factory.mktemp("dist")
    # from a copy of the tracked and new files: the checkout's own build/ and *.egg-info
    # must neither leak into the archives nor be written by the test
    src = tmp_path_factory.mktemp("src")
    listed = _run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    _run([sys.executable, "-m", "build", "--outdir", out, src])
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(out.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0]}


def test_archives_are_named_for_the_single_source_version(dist):
    version = _version()
    assert dist["sdist"].name == f"roilib-{version}.tar.gz"
    assert dist["wheel"].name == f"roilib-{version}-py3-none-any.whl"
    with zipfile.ZipFile(dist["wheel"]) as whl:
        meta = Parser().parsestr(whl.read(f"roilib-{version}.dist-info/METADATA").decode())
    assert meta["Name"] == "roilib" and meta["Version"] == version
    assert any(r.startswith("numpy") for r in meta.get_all("Requires-Dist")), meta.get_all("Requires-Dist")
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(version)}\]", changelog, re.M), "CHANGELOG.md has no section for the version"


def test_wheel_and_sdist_carry_the_kernel_sources(dist):
    expected = _package_files()
    kernels = {f for f in expected if f.endswith(KERNEL_SUFFIXES)}
    assert {Path(f).suffix for f in kernels} == set(KERNEL_SUFFIXES), kernels  # the tree has all three kinds
    with zipfile.ZipFile(dist["wheel"]) as whl:
        in_wheel = set(whl.namelist())
    assert expected <= in_wheel, sorted(expected - in_wheel)
    prefix = f"roilib-{_version()}/"
    with tarfile.open(dist["sdist"]) as sdist:
        in_sdist = {m.name[len(prefix):] for m in sdist.getmembers() if m.name.startswith(prefix)}
    assert expected <= in_sdist, sorted(expected - in_sdist)
    assert {"pyproject.toml", "README.md", "LICENSE"} <= in_sdist


def test_twine_check_passes(dist):
    proc = _run([sys.executable, "-m", "twine", "check", "--strict", dist["sdist"], dist["wheel"]])
    assert proc.stdout.count("PASSED") == 2, proc.stdout


SMOKE = r'''
import os, sys
import numpy as np
import roilib
from roilib.cuda import cpu

site = os.path.realpath(sys.argv[1])
assert os.path.realpath(roilib.__file__).startswith(site), roilib.__file__
assert roilib.__version__ == sys.argv[2], roilib.__version__

# hand-computed: a 4x4 map holding 4*y + x
x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
box = np.array([[0, 0, 0, 3, 3]], dtype=np.float64)
assert roilib.roi_pool(x, box, 2).tolist() == [[[[5, 7], [13, 15]]]]
assert roilib.spp(x, levels=(2, 1)).tolist() == [[5, 7, 13, 15, 15]]
# aligned RoIAlign over the whole map samples a linear function: the mean, 7.5
whole = np.array([[0, 0, 0, 4, 4]], dtype=np.float64)
assert roilib.roi_align(x, whole, 1, sampling_ratio=2, aligned=True).item() == 7.5

# the CUDA kernels' source, as installed, built for the CPU and called through ctypes
rng = np.random.default_rng(0)
feat = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
rois = np.array([[0, 1.2, 0.7, 30.1, 20.9], [1, -3.0, 2.5, 18.0, 40.0]], dtype=np.float32)
for op, kw in (("roi_pool", {}), ("roi_align", {"sampling_ratio": 2, "aligned": True})):
    got = getattr(cpu, op)(feat, rois, 3, spatial_scale=0.5, **kw)
    want = getattr(roilib, op)(feat, rois, 3, spatial_scale=0.5, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
built = sorted(os.listdir(os.environ["ROILIB_CACHE_DIR"]))
assert len(built) >= 2, built
print("smoke ok", len(built))
'''


def test_wheel_installs_and_runs_in_a_fresh_venv(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", dist["wheel"]])
    site = _run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "ROILIB_"))}
    env["ROILIB_CACHE_DIR"] = str(tmp_path / "kernels")  # a fresh build, not a cached library
    proc = _run([python, "-I", "-c", SMOKE, site, _version()], cwd=tmp_path, env=env)
    assert proc.stdout.startswith("smoke ok"), proc.stdout
