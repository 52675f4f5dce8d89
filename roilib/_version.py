"""roilib's version: the single source.

``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``), ``roilib.__version__``
re-exports it, the chapters' setup cells pin the git tag ``v<version>`` (written by
``tools/sync_setup_cells.py``) and ``CHANGELOG.md`` has a section for it; the tests in
``tests/test_release.py`` and ``tests/test_book_setup_cells.py`` check they agree.
"""

__version__ = "0.1.0"
