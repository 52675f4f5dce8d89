"""environment.yml (conda, Binder) provides every module the chapters import.

The imports are read from the chapters themselves (every code cell of every notebook in
``_toc.yml``, parsed with :mod:`ast`) and from the roilib modules those cells import
(``roilib.plot`` imports matplotlib inside its functions, ``roilib.torch`` imports torch).
Each top-level module that is not in the standard library must be provided by a conda
or pip entry of ``environment.yml``, through the table ``PROVIDERS`` (import name ->
package names that provide it; a new import fails here until it is added to both).
Modules that need a GPU (``GPU_ONLY``) are exempt, but the chapters may import them only
inside ``try: ... except ImportError`` or under ``if <a GPU flag>:`` (Binder has no GPU).

The version floors of environment.yml may not be lower than pyproject.toml's, and the
checker itself is shown to report what a stripped-down environment lacks.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

yaml = pytest.importorskip("yaml")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import book_layout  # noqa: E402

ROOT = book_layout.ROOT
LOCAL = "<this checkout>"  # a pip entry that installs the repository itself

# import name -> distributions (conda-forge or PyPI names) that provide it
PROVIDERS: Dict[str, Set[str]] = {
    "roilib": {LOCAL},
    "numpy": {"numpy"},
    "matplotlib": {"matplotlib", "matplotlib-base"},
    "torch": {"pytorch", "pytorch-cpu", "torch"},
    "torchvision": {"torchvision"},
    "cuda": {"cuda-bindings", "cuda-python"},  # from cuda.bindings import nvrtc
    "IPython": {"ipykernel", "ipython"},
    "nvidia": {"nvidia-cuda-runtime-cu12", "nvidia-cuda-nvrtc-cu12"},  # roilib.cuda's NVRTC headers
}
GPU_ONLY = {"cupy"}
CAUGHT = {"ImportError", "ModuleNotFoundError", "Exception"}


def _mentions_gpu(test: ast.AST) -> bool:
    """Whether an ``if`` test reads a GPU flag (``if gpu:``, ``if ON_GPU and ...:``)."""
    return any(
        "gpu" in (n.id if isinstance(n, ast.Name) else n.attr).lower()
        for n in ast.walk(test) if isinstance(n, (ast.Name, ast.Attribute))
    )


def _guarded(tree: ast.AST) -> Set[int]:
    """ids of import nodes that run only when they can: inside a ``try`` whose handlers
    catch a failed import, or under an ``if`` on a GPU flag."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _mentions_gpu(node.test):
            for stmt in node.body:
                ids |= {id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
            continue
        if not isinstance(node, ast.Try):
            continue
        names = set()
        for handler in node.handlers:
            kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            names |= {k.id for k in kinds if isinstance(k, ast.Name)} | ({"Exception"} if handler.type is None else set())
        if names & CAUGHT:
            for stmt in node.body:
                ids |= {id(n) for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return ids


def imports_of(source: str) -> List[Tuple[str, bool]]:
    """(dotted module name, guarded) for every absolute import in ``source``."""
    tree = ast.parse(source)
    guarded = _guarded(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in guarded) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module, id(node) in guarded))
            # from roilib import plot: the submodule roilib.plot
            found += [(f"{node.module}.{alias.name}", id(node) in guarded) for alias in node.names]
    return found


def _cell_source(cell) -> str:
    """A code cell as Python: IPython magics and shell escapes dropped."""
    src = "".join(cell["source"])
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in src.splitlines())


def chapter_imports() -> Dict[str, Set[bool]]:
    """Top-level module -> {guarded?} over every chapter and the roilib modules they import."""
    seen: Dict[str, Set[bool]] = {}
    roilib_files = {ROOT / "roilib" / "__init__.py"}
    for docname in book_layout.notebook_docnames():
        nb = json.loads((ROOT / f"{docname}.ipynb").read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] != "code":
                continue
            for name, guarded in imports_of(_cell_source(cell)):
                top = name.split(".")[0]
                if top == "roilib":
                    module = ROOT.joinpath(*name.split("."))
                    for path in (module.with_suffix(".py"), module / "__init__.py"):
                        if path.is_file():
                            roilib_files.add(path)
                    if name == top or not any(p.is_file() for p in (module.with_suffix(".py"), module / "__init__.py")):
                        seen.setdefault(top, set()).add(guarded)
                    continue
                seen.setdefault(top, set()).add(guarded)
    for path in roilib_files:  # the library imports GPU-only modules on its GPU path only
        for name, guarded in imports_of(path.read_text(encoding="utf-8")):
            top = name.split(".")[0]
            if top != "roilib" and top not in GPU_ONLY:
                seen.setdefault(top, set()).add(guarded)
    return {name: kinds for name, kinds in seen.items() if name not in sys.stdlib_module_names}


def _name(spec: str) -> str:
    return re.split(r"[\s<>=!~\[;]", spec.strip(), maxsplit=1)[0].lower()


def provided(env: dict) -> Set[str]:
    """Every distribution name environment.yml installs (conda and pip), LOCAL for the checkout."""
    names = set()
    for dep in env.get("dependencies", []):
        if isinstance(dep, str):
            names.add(_name(dep))
        elif isinstance(dep, dict):
            for spec in dep.get("pip", []):
                spec = spec.strip()
                local = re.fullmatch(r"(-e\s+)?\.(\[[\w,]+\])?", spec)
                names.add(LOCAL if local else _name(spec))
    return names


def missing(env: dict, imports: Dict[str, Set[bool]]) -> List[str]:
    """The imported modules that ``env`` does not provide (GPU-only ones exempt)."""
    have = provided(env)
    lacking = []
    for module in sorted(imports):
        if module in GPU_ONLY:
            continue
        if module not in PROVIDERS:
            lacking.append(f"{module} (not in PROVIDERS: add the package to environment.yml and here)")
        elif not PROVIDERS[module] & have:
            lacking.append(module)
    return lacking


def _environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))


def test_environment_provides_every_chapter_import():
    imports = chapter_imports()
    # the reader is sound: what every chapter imports is found
    assert {"numpy", "roilib", "matplotlib", "torch"} <= set(imports), sorted(imports)
    assert missing(_environment(), imports) == []


def test_gpu_only_modules_are_imported_guarded():
    for module, kinds in chapter_imports().items():
        if module in GPU_ONLY:
            assert kinds == {True}, f"{module} is imported outside try/except ImportError in a chapter"


def test_environment_has_a_kernel_and_installs_this_checkout():
    env = _environment()
    have = provided(env)
    assert {"python", "pip", "ipykernel", LOCAL} <= have, sorted(have)
    assert env.get("channels") == ["conda-forge"], env.get("channels")


def _floors(specs) -> Dict[str, Tuple[int, ...]]:
    floors = {}
    for spec in specs:
        found = re.search(r">=\s*([\d.]+)", spec)
        if isinstance(spec, str) and found:
            floors[_name(spec)] = tuple(int(p) for p in found.group(1).split("."))
    return floors


def test_version_floors_agree_with_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = _floors(project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra])
    wanted["python"] = tuple(int(p) for p in re.search(r">=\s*([\d.]+)", project["requires-python"]).group(1).split("."))
    env_floors = _floors(d for d in _environment()["dependencies"] if isinstance(d, str))
    aliases = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
    for conda_name, floor in env_floors.items():
        pypi_name = aliases.get(conda_name, conda_name)
        if pypi_name in wanted:
            assert floor >= wanted[pypi_name], f"environment.yml: {conda_name}>={floor} is below pyproject's {wanted[pypi_name]}"
    for name in ("python", "numpy"):
        assert name in env_floors, f"environment.yml gives {name} no floor"


def test_checker_reports_what_an_environment_lacks():
    imports = {"numpy": {False}, "torch": {False}, "cupy": {True}, "roilib": {False}, "scipy": {False}}
    stripped = {"dependencies": ["python>=3.9", "numpy", {"pip": ["-e ."]}]}
    assert missing(stripped, imports) == ["scipy (not in PROVIDERS: add the package to environment.yml and here)", "torch"]
    assert missing({"dependencies": ["numpy", "pytorch", {"pip": [".[plot]"]}]}, {"roilib": {False}, "torch": {False}}) == []
    code = "try:\n    import cupy\nexcept ImportError:\n    pass\nimport numpy.linalg\nif on_gpu:\n    import cupyx\n"
    assert sorted(imports_of(code)) == [("cupy", True), ("cupyx", True), ("numpy.linalg", False)]
    assert imports_of("try:\n    import cupy\nexcept KeyError:\n    pass\n") == [("cupy", False)]
