"""The package manifest: the single description of what a package is.

Export writes it, the runtime reads it; nothing about a package is inferred from file names.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class PackageError(ValueError):
    """A package (or checkpoint) is missing, malformed or unsupported."""


def check_keys(cls: type, data: dict[str, Any], where: str, error: type[Exception] = PackageError) -> None:
    """Reject keys of `data` that name no field of dataclass `cls`, listing the allowed ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")


def strict_from_dict(cls: type, data: Any, where: str, error: type[Exception] = PackageError) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys with the allowed ones."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected an object, got {type(data).__name__} {data!r}")
    check_keys(cls, data, where, error)
    try:
        return cls(**data)
    except TypeError as e:  # missing required keys
        raise error(f"{where}: {e}") from None


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters of a decoder-only transformer."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    tie_embeddings: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return strict_from_dict(cls, data, "model spec")

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """Bytes of K+V cache one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class Stage:
    """One ONNX graph running a contiguous run of decoder layers.

    `first_layer`/`end_layer` index the package's layers (end exclusive). A stage takes
    `input_ids` when it holds the embedding, else the residual stream `hidden`; it returns
    `logits` when it holds the final norm + LM head, else `hidden`.
    """

    file: str
    first_layer: int
    end_layer: int
    embeds: bool
    has_head: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        return strict_from_dict(cls, data, "stage")


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about a package."""

    model: ModelSpec
    stages: tuple[Stage, ...]
    weights: dict[str, str]  # weight group -> dtype, e.g. {"attention": "float32"}
    tokenizer: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool
    chat_template: str | None
    source: dict[str, Any]
    tool_version: str
    kept_layers: tuple[int, ...] = ()  # original block index of each package layer
    gguf: str | None = None  # GGUF file for the llama.cpp backend (relative to the package, or absolute)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # how weights were quantized: recipe, method, ONNX layout and accuracy level, format per tensor
    # (empty for a float package); `weights` above summarizes it per weight group
    quantization: dict[str, Any] = field(default_factory=dict)
    # early-exit points: {"layer", "adapter" (.npy in the package), "top1_agreement", "curve"}
    exits: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PackageError(
                f"manifest schema_version {version!r} is not supported by this edge-run "
                f"(expects {SCHEMA_VERSION}); re-export the package with this version"
            )
        data["model"] = ModelSpec.from_dict(data.get("model"))
        data["stages"] = tuple(Stage.from_dict(s) for s in data.get("stages") or [])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids") or ())
        data["kept_layers"] = tuple(data.get("kept_layers") or ())
        data["exits"] = tuple(data.get("exits") or ())
        manifest = strict_from_dict(cls, data, "manifest")
        manifest.validate()
        return manifest

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check the stages cover every layer once, in order, from embedding to head."""
        if not self.stages:
            if self.gguf is None:
                raise PackageError("manifest lists neither ONNX stages nor a GGUF file")
            return
        expected = 0
        for stage in self.stages:
            if stage.first_layer != expected or stage.end_layer < stage.first_layer:
                raise PackageError(
                    f"stage {stage.file} covers layers [{stage.first_layer}, {stage.end_layer}) "
                    f"but layer {expected} comes next"
                )
            expected = stage.end_layer
        if expected != self.model.num_layers:
            raise PackageError(f"stages cover {expected} layers, model has {self.model.num_layers}")
        if not self.stages[0].embeds or not self.stages[-1].has_head:
            raise PackageError("first stage must embed tokens and the last must hold the LM head")

    def gguf_path(self, package_dir: str | Path) -> Path | None:
        """The package's GGUF file (`gguf` is absolute, or relative to the package); None without one."""
        if self.gguf is None:
            return None
        path = Path(self.gguf)
        return path if path.is_absolute() else Path(package_dir) / path

    @property
    def backends(self) -> tuple[str, ...]:
        """Backends that can run this package, in preference order."""
        return tuple(name for name, present in (("onnx", bool(self.stages)), ("llamacpp", bool(self.gguf))) if present)

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_manifest(directory: str | Path) -> Manifest:
    """Read and validate `directory/manifest.json`.

    Raises:
        PackageError: when the folder is not an edge-run package or the manifest is invalid.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(f"{directory} is not an edge-run package (no {MANIFEST_NAME}); "
                           f"export one with `edge-run export MODEL -o DIR`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PackageError(f"{path} is not valid JSON ({e}); re-export the package") from None
    return Manifest.from_dict(data)
