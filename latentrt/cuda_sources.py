"""The digest of the CUDA extension's sources (csrc/): setup.py compiles it into the extension
(``latentrt._cuda.source_digest``), and cuda_ext refuses, in a source checkout, an extension built from other
sources than the checkout's: an in-place build left stale by an edit to csrc/, or one carried to a GPU machine
from an older tree, would otherwise run other kernels than the sources say.

No imports beyond the standard library: setup.py loads this file on its own, before anything is installed."""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


def source_files(csrc: Path) -> list[Path]:
    """The extension's sources in ``csrc``, sorted by name (every file a translation unit includes lives there)."""
    return sorted(
        (p for p in Path(csrc).iterdir() if p.suffix in SOURCE_SUFFIXES and p.is_file()), key=lambda p: p.name
    )


def source_digest(csrc: Path) -> str:
    """16 hex digits of the SHA-256 of the sources' names and contents (any edit, added or removed file
    changes it)."""
    h = hashlib.sha256()
    for p in source_files(csrc):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
