"""edge-run's cache folder and the names of the packages it holds.

The hub writes packages here (exports of checkpoints, light references to GGUF files); the runtime
reads the same names to accept a reference's file outside its folder (see `manifest.Manifest.gguf_path`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..version import __version__


def cache_home() -> Path:
    """edge-run's cache: $EDGE_RUN_HOME, else $XDG_CACHE_HOME/edge-run, else ~/.cache/edge-run."""
    if os.environ.get("EDGE_RUN_HOME"):
        return Path(os.environ["EDGE_RUN_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-run"


def checkpoint_key(checkpoint: Path) -> str:
    """A cache name for what edge-run makes from `checkpoint`: its stem plus a hash of its path,
    size, mtime and the edge-run version (a changed file or tool makes a new entry). A symlink
    names what it points at: the same file has one name however it is reached."""
    checkpoint = Path(checkpoint).resolve()
    st = checkpoint.stat()
    key = hashlib.sha256(f"{checkpoint}|{st.st_size}|{st.st_mtime_ns}|{__version__}".encode())
    return f"{checkpoint.stem[:40]}-{key.hexdigest()[:12]}"


def cached_package_dir(checkpoint: Path, kind: str) -> Path:
    """Cache folder of the package made from `checkpoint` (see `checkpoint_key`).

    `kind` names what the package holds: "fp32" (ONNX export), "gguf" (a reference to the GGUF
    file itself) or "gguf-f32" (a GGUF export of a Hugging Face folder).
    """
    return cache_home() / "packages" / f"{checkpoint_key(checkpoint)}-{kind}"
