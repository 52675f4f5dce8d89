# The README's commands. Every dependency is installed here, into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU PyTorch for roilib.torch's tests and the chapters that train a small head. On
# this project's machines a CPU build of torch 2.13.0 lies in /opt/wheels; elsewhere
# pip fetches the release from PyPI.
TORCH  ?= torch==2.13.0
LOCAL_WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: test book browser-check bench gpu-check clean setup-cells dist

$(VENV)/.test-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(LOCAL_WHEELS) -e '.[test]' '$(TORCH)'
	# matplotlib builds its font cache on first import and says so on stderr, which
	# nbval would count as a changed output: build it now
	$(PY) -c "import matplotlib.pyplot"
	touch $@

# Every test in one run: unit, property, kernels on the CPU (and NVRTC), the torch
# bridge, and every chapter re-executed from a fresh kernel by nbval.
test: $(VENV)/.test-installed
	$(PY) -m pytest -q tests chapters $(NBVAL)

# The book: Jupyter Book 1.x into _build/html. Warnings (-W) and unresolved references
# (-n) fail the build; --keep-going reports all of them first.
$(VENV)/.book-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(LOCAL_WHEELS) -e '.[book]' '$(TORCH)'
	touch $@

book: $(VENV)/.book-installed
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

# Opens every page of _build/html (run `make book` first) in headless Debian Chromium
# (/usr/bin/chromium; `apt-get install chromium`) through Playwright: titles, images,
# MathJax, Colab links, page errors, no requests leaving 127.0.0.1.
$(VENV)/.bookcheck-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[bookcheck]'
	touch $@

browser-check: $(VENV)/.bookcheck-installed
	ROILIB_REQUIRE_BROWSER=1 $(PY) -m pytest -q -p no:cacheprovider --noconftest tests/browser_check.py

# Rewrites every chapter's setup cell from tools/sync_setup_cells.py's template, with
# repository.url from _config.yml and the release tag v<version> (roilib/_version.py).
setup-cells: $(VENV)/.test-installed
	$(PY) tools/sync_setup_cells.py

# The release archives (sdist and wheel, with the kernel sources) in dist/, checked.
dist: $(VENV)/.test-installed
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*

bench: $(VENV)/.test-installed
	$(PY) -m roilib.bench

# On a machine with an NVIDIA GPU whose Python already has torch, torchvision, CuPy,
# pytest and hypothesis (nothing is installed; no network needed): the GPU tests, the
# GPU benchmark and the CUDA chapter's cells, results in gpu-check-results.txt.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) tools/gpu_check.py --out gpu-check-results.txt

clean:
	rm -rf $(VENV) _build .pytest_cache .hypothesis dist
