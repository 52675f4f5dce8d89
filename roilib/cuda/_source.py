"""Where the kernel sources are, and how to hand them to a compiler.

Both backends and the NVRTC test read the same files: ``kernels/<family>.cu``, one per
op family, plus the headers they include (``common.cuh``, ``sampling.cuh``,
``cpu_shim.h``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import List

KERNEL_DIR = Path(__file__).resolve().with_name("kernels")
FAMILIES = (
    "roi_align", "roi_pool", "roi_warp", "spp", "tiles",
    "ps_roi", "multiscale", "roi_align_rotated", "prroi_pool",
)  # fmt: skip

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


def kernel_path(family: str) -> Path:
    """The ``.cu`` file of an op family (``"roi_align"``, ``"roi_pool"``, ...)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {FAMILIES}")
    return KERNEL_DIR / f"{family}.cu"


def kernel_source(family: str) -> str:
    """The family's ``.cu`` text with its local ``#include "..."`` headers pasted in.

    One self-contained string is what CuPy's ``RawModule(code=...)`` caches on: its
    on-disk cache keys on the source text, so a changed header must change the text.
    ``#line`` directives keep compiler messages pointing at the real files. System
    headers (``<cuda_fp16.h>``) stay as includes. Each header is pasted once.
    """
    seen = set()

    def expand(path: Path) -> str:
        seen.add(path.name)
        text = path.read_text()
        out, pos, line = [], 0, 1
        for m in _LOCAL_INCLUDE.finditer(text):
            out.append(text[pos : m.start()])
            line += text.count("\n", pos, m.end())
            name = m.group(1)
            if name not in seen:
                out.append(f'#line 1 "{name}"\n{expand(KERNEL_DIR / name)}\n#line {line + 1} "{path.name}"')
            pos = m.end()
        out.append(text[pos:])
        return "".join(out)

    return expand(kernel_path(family))


def sources_digest() -> str:
    """SHA-256 over every kernel file: changes whenever any kernel or header does."""
    h = hashlib.sha256()
    for path in sorted(KERNEL_DIR.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def cuda_include_dirs() -> List[str]:
    """Directories holding ``cuda_fp16.h`` from the ``nvidia-cuda-runtime`` wheels, if installed.

    CUDA 13 wheels put headers in ``nvidia/cu13/include``, CUDA 12 wheels
    (``nvidia-cuda-runtime-cu12``) in ``nvidia/cuda_runtime/include``. NVRTC needs them
    for ``#include <cuda_fp16.h>`` when no CUDA toolkit is installed.
    """
    if importlib.util.find_spec("nvidia") is None:
        return []
    import nvidia

    dirs = []
    for root in map(Path, nvidia.__path__):
        for sub in ("cu13/include", "cuda_runtime/include"):
            if (root / sub / "cuda_fp16.h").is_file():
                dirs.append(str(root / sub))
    return dirs

