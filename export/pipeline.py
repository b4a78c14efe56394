"""The export pipeline in one call: checkpoint -> prune/heal -> exit heads -> quantize -> package.

    options = ExportOptions(formats=("onnx",), quant="int4", exit_layers=(10,))
    manifest = export("model.gguf", "out/", options, progress=True)

`ExportOptions` holds every export setting and checks them all (the quant recipe included) when
it is made, so a bad setting fails before a checkpoint is read. `export` takes a checkpoint path
or a loaded `Checkpoint`; known model names are resolved by the caller (`edgerun.hub.pull`).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import cached_property
from operator import index
from pathlib import Path
from typing import Any

from ..devices.profiles import export_devices, load_profiles
from ..quant.recipe import Recipe
from ..runtime.manifest import MANIFEST_NAME, Manifest, PackageError, strict_from_dict
from ..runtime.memory import parse_size
from .checkpoint import Checkpoint, load_checkpoint
from .generic import export_generic, generic_architecture
from .gguf_writer import GGUF_DTYPES
from .package import FORMATS, write_package
from .quantize import quantize_for_gguf, quantize_for_onnx, resolve_quant

log = logging.getLogger(__name__)
_KV_NAMES = {"float32": "f32", "float16": "f16"}  # --kv-cache names of the KV float types export builds

QuantSpec = str | Path | dict | Recipe  # preset name, recipe file, recipe dict or Recipe


def _ints(values: Any, what: str) -> tuple[int, ...]:
    """`values` as a tuple of ints (a list from JSON, a tuple from the CLI)."""
    try:
        return tuple(index(v) for v in values)
    except TypeError:
        raise ValueError(f"{what} must be a list of integers, got {values!r}") from None


def _int(value: Any, what: str) -> int:
    try:
        return index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class ExportOptions:
    """Every setting of one export; checked as a whole when made.

    Attributes:
        formats: "onnx" (fp32 or MatMulNBits graphs for onnxruntime) and/or "gguf" (model.gguf for
            llama.cpp); a comma-separated string such as "onnx,gguf" is accepted too.
        gguf_dtype: "f32" or "f16": the GGUF's float matrices (GGUF only).
        stage_boundaries: first layer of every ONNX stage graph after the first (ONNX only).
        exit_layers: layers after which the model can stop and score: each becomes a stage boundary,
            the head gets a stage of its own, and an exit adapter is fitted and calibrated per layer.
        separate_head: put the final norm + LM head in a stage of its own without fitting exits
            (what self-speculation needs); implied by `exit_layers`.
        prune_layers: remove this many contiguous blocks (the run whose input and output differ least).
        keep_layers: keep exactly these blocks (instead of `prune_layers`).
        heal: after pruning, fit a linear correction at each cut (ONNX only).
        quant: None (float weights), a preset name, a recipe file (.json / .toml), a recipe dict
            or a `Recipe`; for a GGUF also a llama.cpp type name such as "q4_k_m".
        device: the device profile (devices/profiles.json) whose ONNX variant to build: it sets the
            MatMulNBits accuracy level of a quantized package, the KV cache type (cuda: f16, so
            attention and the cache run on the GPU), adds ORT-format models for mobile targets
            (android, ios), and is recorded in the manifest.
        accuracy_level: MatMulNBits compute precision, overriding the profile's (0 unset, 1 fp32,
            2 fp16, 3 bf16, 4 int8).
        kv_cache: "f32" or "f16": the element type of an ONNX package's KV cache, which its attention
            (GroupQueryAttention) runs in; f16 halves the KV memory (ONNX only; llama.cpp picks its
            KV type at run time: `--kv-cache`). None: the device profile's (`variant.kv_dtype`).
        max_memory: a memory budget (bytes, or a size such as "400MB") the package must run in:
            an export that cannot fit at the shortest context is refused, else the longest context
            that fits is recorded in the manifest (see `write_package`).
        force: replace an existing package folder.
    Raises:
        ValueError: on construction, a setting that is invalid or conflicts with another one, or a
            quant preset / recipe that cannot be loaded.
    """

    formats: tuple[str, ...] = ("onnx",)
    gguf_dtype: str = "f32"
    stage_boundaries: tuple[int, ...] = ()
    exit_layers: tuple[int, ...] = ()
    separate_head: bool = False
    prune_layers: int = 0
    keep_layers: tuple[int, ...] = ()
    heal: bool = False
    quant: QuantSpec | None = None
    device: str = "cpu"
    accuracy_level: int | None = None
    max_memory: int | str | None = None
    kv_cache: str | None = None
    force: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportOptions:
        """Options from plain data (JSON, TOML); unknown keys are an error that lists the allowed ones."""
        return strict_from_dict(cls, data, "export options", ValueError)

    def __post_init__(self) -> None:
        given = self.formats
        parts = given.split(",") if isinstance(given, str) else list(given)
        formats = tuple(dict.fromkeys(p.strip() for p in parts if isinstance(p, str) and p.strip()))
        if not formats or set(formats) - set(FORMATS) or not all(isinstance(p, str) for p in parts):
            shown = given if isinstance(given, str) else ",".join(map(str, parts))
            raise ValueError(f"--format must be onnx, gguf or onnx,gguf, got {shown!r}")
        set_ = object.__setattr__  # normalizing a frozen dataclass's fields
        set_(self, "formats", formats)
        set_(self, "stage_boundaries", _ints(self.stage_boundaries, "stage_boundaries"))
        set_(self, "exit_layers", _ints(self.exit_layers, "exit_layers"))
        set_(self, "keep_layers", _ints(self.keep_layers, "keep_layers"))
        set_(self, "prune_layers", _int(self.prune_layers, "prune_layers"))
        if self.accuracy_level is not None:
            set_(self, "accuracy_level", _int(self.accuracy_level, "accuracy_level"))
        if self.max_memory is not None:
            set_(self, "max_memory", parse_size(self.max_memory))
        self._check()
        _ = self.recipe  # a bad recipe fails here, before any checkpoint is read

    def _check(self) -> None:
        """The rules between settings; messages name the CLI flags that set them."""
        if self.prune_layers < 0:
            raise ValueError(f"--prune-layers must be >= 0, got {self.prune_layers}")
        if self.kv_cache not in (None, "f32", "f16"):
            raise ValueError(f"--kv-cache must be f32 or f16, got {self.kv_cache!r}")
        if self.kv_cache == "f16" and "onnx" not in self.formats:
            raise ValueError("--kv-cache f16 builds ONNX graphs whose attention runs in fp16; llama.cpp picks its "
                             "KV type at run time (edge-run run --kv-cache f16)")
        if self.gguf_dtype not in GGUF_DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(GGUF_DTYPES)}, got {self.gguf_dtype!r}")
        if "onnx" in self.formats and self.gguf_dtype != "f32":
            raise ValueError(f"--dtype {self.gguf_dtype} applies to GGUF only (ONNX graphs are f32); "
                             f"use --format gguf --dtype {self.gguf_dtype}")
        if (self.exit_layers or self.stage_boundaries or self.separate_head) and "onnx" not in self.formats:
            raise ValueError("--stage-boundaries / --exit-layers split ONNX graphs; add onnx to --format")
        if self.heal and "gguf" in self.formats:
            raise ValueError("--heal adds a linear correction at each cut that llama.cpp's llama architecture has "
                             "no place for; export healed models with --format onnx, or prune without --heal for GGUF")
        if self.prune_layers and self.keep_layers:
            raise ValueError("give either --prune-layers N or --keep-layers LIST, not both")
        if self.heal and not (self.prune_layers or self.keep_layers):
            raise ValueError("--heal needs --prune-layers or --keep-layers")
        if self.quant is not None and len(self.formats) > 1:
            raise ValueError("--quant writes one format per package (ONNX MatMulNBits or GGUF blocks); "
                             "export --format onnx and --format gguf to separate folders")
        profile = load_profiles().get(self.device)
        if profile is None or not profile.onnx:
            what = (f"{self.device} is a llama.cpp GPU backend: export --format gguf and choose it at run time "
                    f"(edge-run run PKG --device {self.device})") if profile else f"unknown --device {self.device!r}"
            raise ValueError(f"{what}; export builds ONNX variants for --device {', '.join(export_devices())}")
        if self.device != "cpu" and "onnx" not in self.formats:
            raise ValueError(f"--device {self.device} builds that device's ONNX variant; a GGUF is the same for every "
                             f"llama.cpp device (choose it at run time with --device), so add onnx to --format")
        own = profile.variant.kv_dtype
        if (self.kv_cache is not None and profile.runs_op("GroupQueryAttention", own)
                and not profile.runs_op("GroupQueryAttention", self.kv_dtype)):
            raise ValueError(f"--device {self.device} builds a {_KV_NAMES[own]} KV cache ({profile.provider} has no "
                             f"{self.kv_dtype} GroupQueryAttention kernel), not {self.kv_cache}; drop --kv-cache, "
                             f"or export with --device cpu --kv-cache {self.kv_cache}")
        if self.accuracy_level is not None and not (self.quant is not None and self.formats == ("onnx",)):
            raise ValueError("--accuracy-level sets the MatMulNBits compute of a quantized ONNX package; "
                             "use it with --quant and --format onnx")
        if self.accuracy_level is not None and self.accuracy_level not in range(5):
            raise ValueError(f"--accuracy-level must be 0-4 (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8), "
                             f"got {self.accuracy_level}")

    @property
    def kv_dtype(self) -> str:
        """The KV cache's float type to build: `kv_cache` when given, else the device profile's."""
        if self.kv_cache is not None:
            return {v: k for k, v in _KV_NAMES.items()}[self.kv_cache]
        return load_profiles()[self.device].variant.kv_dtype

    @cached_property
    def recipe(self) -> Recipe | str | None:
        """The loaded quant recipe, a llama.cpp type name (GGUF only), or None (float weights)."""
        return None if self.quant is None else resolve_quant(self.quant, self.formats[0])

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The stage boundaries to write: `stage_boundaries` merged with `exit_layers`."""
        if not self.exit_layers:
            return self.stage_boundaries
        return tuple(sorted(set(self.stage_boundaries) | set(self.exit_layers)))

    @property
    def prunes(self) -> bool:
        """Whether the export changes the model's depth (prune, keep or heal)."""
        return bool(self.prune_layers or self.keep_layers or self.heal)


def check_output(out: str | Path, force: bool = False) -> None:
    """Refuse an output folder that exists (unless `force`) or that `force` must not replace.

    `force` replaces an edge-run package or an empty folder, never any other folder.

    Raises:
        PackageError: naming the folder and the fix.
    """
    out = Path(out)
    if not out.exists():
        return
    if not force:
        raise PackageError(f"{out} already exists; choose another -o folder or pass --force")
    if not (out / MANIFEST_NAME).is_file() and not (out.is_dir() and not any(out.iterdir())):
        raise PackageError(f"{out} is not an edge-run package (no {MANIFEST_NAME}); --force only "
                           f"replaces a package folder, so choose another -o folder")


def export(source: str | Path | Checkpoint, out: str | Path, options: ExportOptions | None = None,
           progress: bool = False) -> Manifest:
    """Export a checkpoint to a package folder as `options` say; the folder is written atomically.

    Args:
        source: a checkpoint path (.gguf file or Hugging Face folder) or a loaded `Checkpoint`.
        out: package folder to create (replaced only with `options.force`, see `check_output`).
        options: the export settings (default: an fp32 ONNX package with one stage graph).
        progress: show progress bars on stderr.
    Returns:
        The manifest written. Its `kept_layers` and `exits` (with each exit's `top1_agreement`
        on held-out tokens) describe what pruning and exit fitting did.
    A Hugging Face folder of an architecture without a family module exports through optimum's
    ONNX exporter instead (`export.generic`: the `export` extra; fewer options apply).

    Raises:
        PackageError: the output folder is taken, or the checkpoint cannot be read or written.
        ValueError: a setting that does not fit this checkpoint (stage boundaries, layers out of
            range, a recipe format a tensor's shape cannot take).
    """
    options = options or ExportOptions()
    check_output(out, options.force)  # before a possibly large checkpoint is read
    if not isinstance(source, Checkpoint) and generic_architecture(source) is not None:
        return export_generic(source, out, options, progress)  # no family module: through optimum
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    if "onnx" in options.formats and options.kv_dtype != ckpt.spec.kv_dtype:
        ckpt = dataclasses.replace(ckpt, spec=dataclasses.replace(ckpt.spec, kv_dtype=options.kv_dtype))
    if options.prunes:
        from .prune import prune_for_export

        ckpt = prune_for_export(ckpt, options.prune_layers, options.keep_layers, options.heal, progress=progress)
        log.info("kept blocks %s", list(ckpt.kept_layers))
    fitted = None
    if options.exit_layers:
        from .exits import fit_exits

        fitted = fit_exits(ckpt, options.exit_layers, progress=progress)
    quantization = None
    if options.recipe is not None and options.formats == ("gguf",):
        quantization = quantize_for_gguf(ckpt, options.recipe, progress=progress)
    elif options.recipe is not None:
        quantization = quantize_for_onnx(ckpt, options.recipe, options.device, options.accuracy_level, progress)
    return write_package(ckpt, out, options.boundaries, force=options.force, progress=progress,
                         separate_head=bool(options.exit_layers) or options.separate_head,
                         quantization=quantization, formats=options.formats, gguf_dtype=options.gguf_dtype,
                         exits=fitted, device=options.device if "onnx" in options.formats else None,
                         max_memory=options.max_memory)


__all__ = ["ExportOptions", "QuantSpec", "check_output", "export"]
