"""The package manifest: the single description of what a package is.

Export writes it, the runtime reads it; nothing about a package is inferred from file names.
A manifest may come from anyone, so reading one checks every field's type and range, and every
file it names (`package_file`), before anything is opened or allocated.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..devices.profiles import export_devices, load_profiles
from .home import cache_home, cached_package_dir

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # real manifests are a few kB (a long chat template and exit curves: ~100 kB)
MAX_TEMPLATE_CHARS = 1 << 20
# manifest `weights` groups (see export.package.gguf_weight_dtypes and export.quantize.manifest_entries)
WEIGHT_GROUPS = ("embedding", "attention", "mlp", "norms", "lm_head", "other")


class PackageError(ValueError):
    """A package (or checkpoint) is missing, malformed or unsupported."""


def check_keys(cls: type, data: dict[str, Any], where: str, error: type[Exception] = PackageError) -> None:
    """Reject keys of `data` that name no field of dataclass `cls`, listing the allowed ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")


def strict_from_dict(cls: type, data: Any, where: str, error: type[Exception] = PackageError,
                     typed: bool = False) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys with the allowed ones.

    `typed` also checks each value against its field's type hint and range (`check_fields`).
    """
    if not isinstance(data, dict):
        raise error(f"{where}: expected an object, got {type(data).__name__} {show(data)}")
    check_keys(cls, data, where, error)
    if typed:
        check_fields(cls, data, where, error=error)
    try:
        return cls(**data)
    except TypeError as e:  # missing required keys
        raise error(f"{where}: {e}") from None


# -- field checks -------------------------------------------------------------------------------------
def show(value: Any, limit: int = 60) -> str:
    """`repr(value)`, shortened: a hostile file's value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))  # its own from_dict checks its fields
    if origin in (tuple, list):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(v, args[1]) for k, v in value.items())
    raise TypeError(f"no check for type hint {hint!r}")  # a field of a type this module does not know


_WORDS = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"),
          bool: ("true or false", "booleans"), str: ("a string", "strings"), type(None): ("null", "nulls"),
          Any: ("any value", "values")}


def describe(hint: Any, plural: bool = False) -> str:
    """What a type hint asks for, in words ("an integer", "a list of strings or null", ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a, plural) for a in args)
    if origin in (tuple, list):
        return "lists" if plural else f"a list of {describe(args[0], plural=True)}"
    if origin is dict or dataclasses.is_dataclass(hint):
        values = "" if origin is not dict or args[1] is Any else f" of {describe(args[1], plural=True)}"
        return f"objects{values}" if plural else f"an object{values}"
    return _WORDS[hint][plural]


def check_fields(cls: type, data: dict[str, Any], source: str, prefix: str = "",
                 error: type[Exception] = PackageError) -> None:
    """Check each value of `data` against its field's type hint in dataclass `cls` and the range in
    `cls.LIMITS` (field -> (lowest, highest)).

    Raises:
        error: naming `source` (the file), the field (after `prefix`), what was expected and what it got.
    """
    hints = typing.get_type_hints(cls)
    limits = getattr(cls, "LIMITS", {})
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name in fields:  # check_keys reports the others
            check_value(value, hints[name], source, f"{prefix}{name}", limits.get(name), error)


def check_value(value: Any, hint: Any, source: str, name: str, limits: tuple | None = None,
                error: type[Exception] = PackageError) -> None:
    """Check one value against a type hint and an optional (lowest, highest) range."""
    expected = describe(hint)
    if limits is not None:
        low, high = limits
        expected += f" in {low:g}..{high:g}" if isinstance(low, float) else f" in {low}..{high}"
    if not _matches(value, hint) or (limits is not None and value is not None and not low <= value <= high):
        raise error(f"{source}: {name} must be {expected}, got {show(value)}")


def _require(ok: bool, source: str, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise PackageError(f"{source}: {name} must be {expected}, got {show(value)}")


# -- files a manifest names ---------------------------------------------------------------------------
def package_file(package_dir: str | Path, name: str, what: str) -> Path:
    """The file `name` (the manifest field `what`) of the package in `package_dir`, resolved.

    A manifest names files relative to its folder; whatever leads outside it is refused before
    anything is opened: an absolute path, `..` steps past the folder, or a symlink (on the way or
    at the end) that points out of it.

    Raises:
        PackageError: naming the field, the offending path and where it leads.
    """
    return contained_file(package_dir, name, what, "package", "re-export it")


def contained_file(folder: str | Path, name: str, what: str, owner: str = "package", fix: str = "re-export it"
                   ) -> Path:
    """`name` (field `what` of a file of kind `owner`: a package's manifest, a recipe) resolved
    inside `folder`, or a PackageError naming the field, the path and where it leads (an absolute
    path, `..` past the folder, a symlink out of it), before anything is opened; `fix` says what to do."""
    root = Path(folder).resolve()
    where = f"{owner} {folder}: {what} {show(name, 400)}"
    if not isinstance(name, str) or not name or "\0" in name:
        raise PackageError(f"{where} is not a file name; {fix}")
    if Path(name).is_absolute() or Path(name).drive:
        raise PackageError(f"{where} is an absolute path; a {owner} names only files inside its own folder "
                           f"({fix}, or move the file in and name it relative to the folder)")
    path = (root / name).resolve()
    if path != root and root in path.parents:
        return path
    inside = Path(os.path.normpath(root / name))
    how = f"leads through a symlink to {path}" if inside == root or root in inside.parents else f"resolves to {path}"
    raise PackageError(f"{where} {how}, outside the {owner} folder {root}; a {owner} names only files "
                       f"inside its own folder ({fix})")


def gguf_reference(package_dir: str | Path, gguf: str) -> Path:
    """The GGUF file a light reference package names by its absolute path, once checked.

    Only the hub makes such packages (`hub.resolve_package`): in the cache, in the folder named after
    that very file (its path, size and mtime: `home.cached_package_dir`). Any other package naming an
    absolute path, or a reference whose file changed since, is refused without opening the file.

    Raises:
        PackageError: naming the package, the path and what to do.
    """
    folder, path = Path(package_dir).resolve(), Path(gguf)
    packages = (cache_home() / "packages").resolve()
    if folder.parent != packages or not folder.name.endswith("-gguf"):
        raise PackageError(f"package {package_dir}: gguf {show(gguf, 400)} is an absolute path outside the package "
                           f"folder; only the light references edge-run makes in its cache ({packages}) may name "
                           f"one. Put the GGUF file in the package and name it relative to the folder")
    if not path.is_file():
        raise PackageError(f"package {package_dir} refers to GGUF file {path}, which does not exist; "
                           f"load the .gguf file again (or put it back)")
    if cached_package_dir(path, "gguf").resolve() != folder:
        raise PackageError(f"package {package_dir} is not edge-run's reference to {path} as the file is now "
                           f"(the file changed since, or the package was edited); load the .gguf file itself")
    return path.resolve()


# -- the manifest ---------------------------------------------------------------------------------------
KV_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters of a decoder-only transformer.

    Every size has a range (`LIMITS`): a value outside it is no model edge-run can run on a device,
    and is refused before anything is allocated for it.
    """

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
    # what a block has beyond plain Llama, set by the family module and read by the graph builders as data
    attention_bias: bool = False  # q/k/v projections add a bias (weights `layers.{i}.{q,k,v}_bias`)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (weights `layers.{i}.{q,k}_norm`)
    # Hugging Face style rope scaling, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None: plain RoPE
    rope_scaling: dict[str, float | str] | None = None
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    attention_scale: float | None = None  # softmax scale of q.k; None: 1/sqrt(head_dim)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs too (`post_attn_norm`, `post_ffn_norm`)
    activation: str = "silu"  # of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    sliding_window: int = 0  # keys a sliding-window layer attends to (0: none)
    sliding_layers: tuple[int, ...] = ()  # layers with sliding-window attention
    rope_local_theta: float | None = None  # rope base of the sliding-window layers (None: rope_theta)
    # element type of an ONNX package's KV cache (its attention runs in it): "float32" or "float16"
    kv_dtype: str = "float32"

    LIMITS: ClassVar[dict[str, tuple]] = {
        "vocab_size": (1, 1 << 22),  # the largest real vocabularies hold ~262k tokens
        "hidden_size": (1, 1 << 16),
        "intermediate_size": (1, 1 << 18),
        "num_layers": (1, 1024),
        "num_heads": (1, 1024),
        "num_kv_heads": (1, 1024),
        "head_dim": (1, 1024),
        "rms_norm_eps": (0.0, 1.0),
        "rope_theta": (1e-3, 1e12),
        "context_length": (2, 1 << 24),  # the KV cache is sized separately: see kv_bytes
    }

    def __post_init__(self):  # specs made from GGUF metadata or a config.json are checked too
        self.check_values({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "model spec")

    @classmethod
    def check_values(cls, values: dict[str, Any], source: str, prefix: str = "") -> None:
        """Raise a PackageError naming `source` and the field when a value has a wrong type or size."""
        check_fields(cls, values, source, prefix)
        heads, kv_heads = values.get("num_heads"), values.get("num_kv_heads")
        if heads is not None and kv_heads is not None:
            _require(kv_heads <= heads, source, f"{prefix}num_kv_heads", f"at most num_heads ({heads})", kv_heads)
        if values.get("architecture") is not None:
            _require(values["architecture"].strip() != "", source, f"{prefix}architecture", "a name", "")
        if values.get("kv_dtype") is not None:
            _require(values["kv_dtype"] in KV_DTYPES, source, f"{prefix}kv_dtype", f"one of {KV_DTYPES}",
                     values["kv_dtype"])

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model spec", prefix: str = "") -> ModelSpec:
        if isinstance(data, dict):
            cls.check_values(data, source, prefix)
        return strict_from_dict(cls, data, f"{source}: {prefix.rstrip('.')}" if prefix else source)

    @property
    def kv_itemsize(self) -> int:
        """Bytes of one KV cache element of an ONNX package."""
        return 2 if self.kv_dtype == "float16" else 4

    def kv_bytes_per_token(self, itemsize: float = 4) -> int:
        """Bytes of K+V cache one token occupies across all layers (`itemsize` may be fractional:
        a block-quantized cache type's bytes per value)."""
        return math.ceil(2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize)

    def kv_bytes(self, batch: int, positions: int, itemsize: int = 4) -> int:
        """Bytes of a KV cache of `batch` rows of `positions` each."""
        return batch * positions * self.kv_bytes_per_token(itemsize)


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse to allocate `nbytes` for `what` when the machine has less memory available.

    Raises:
        ValueError: naming the size, the memory available and `fix`.
    """
    import psutil

    available = psutil.virtual_memory().available
    if nbytes > available:
        raise ValueError(f"{what} needs {nbytes / 1e9:.1f} GB but this machine has {available / 1e9:.1f} GB "
                         f"of memory available; {fix}")


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

    LIMITS: ClassVar[dict[str, tuple]] = {"first_layer": (0, 1024), "end_layer": (0, 1024)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stage", prefix: str = "") -> Stage:
        if isinstance(data, dict):
            check_fields(cls, data, source, prefix)
        return strict_from_dict(cls, data, f"{source}: {prefix.rstrip('.')}" if prefix else source)


# what an exit entry holds (export.exits.fit_exits), and the curve lists early_exit reads
_EXIT_KEYS = {"layer": int, "file": str, "top1_agreement": float, "calibration_tokens": int,
              "curve": dict[str, Any]}
_CURVE_KEYS = ("threshold", "agreement", "exit_rate", "probe_floor")


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
    # GGUF file for the llama.cpp backend, relative to the package (or the absolute path of a light
    # reference the hub makes in its cache: see gguf_reference)
    gguf: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # how weights were quantized: recipe, method, ONNX layout and accuracy level, format per tensor
    # (empty for a float package); `weights` above summarizes it per weight group
    quantization: dict[str, Any] = field(default_factory=dict)
    # early-exit points: {"layer", "file" (.npz in the package), "top1_agreement", "curve"}
    exits: tuple[dict[str, Any], ...] = ()
    # the device profile (devices/profiles.json) whose variant the ONNX graphs are; None: made before
    # profiles existed, which is the "cpu" variant
    device: str | None = None
    # ORT-format copies of the stage graphs, in stage order (mobile profiles), and the operator list a
    # reduced onnxruntime build needs for them
    ort_models: tuple[str, ...] = ()
    required_operators: str | None = None
    # set when the one stage graph was made by a generic exporter rather than edge-run's builder
    # (an architecture without a family module): {"exporter": "optimum-onnx", "version", "task",
    # ...}; the onnx backend then runs it as such a graph (runtime/generic_backend.py)
    generic: dict[str, Any] | None = None

    LIMITS: ClassVar[dict[str, tuple]] = {"bos_token_id": (0, (1 << 22) - 1)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        """Build and validate a manifest from JSON data; `source` (the file) is named in every error.

        Raises:
            PackageError: an unknown key, a value of the wrong type or size, an unknown weight
                group, or stages / exits / token ids that do not fit the model.
        """
        if not isinstance(data, dict):
            raise PackageError(f"{source}: expected a JSON object, got {type(data).__name__} {show(data)}")
        data = dict(data)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PackageError(
                f"{source}: manifest schema_version {show(version)} is not supported by this edge-run "
                f"(expects {SCHEMA_VERSION}); re-export the package with this version"
            )
        check_keys(cls, data, source)
        check_fields(cls, data, source)
        data["model"] = ModelSpec.from_dict(data.get("model"), source, "model.")
        data["stages"] = tuple(Stage.from_dict(s, source, f"stages[{k}].")
                               for k, s in enumerate(data.get("stages") or []))
        for key in ("eos_token_ids", "kept_layers", "exits", "ort_models"):
            data[key] = tuple(data.get(key) or ())
        manifest = strict_from_dict(cls, data, source)
        manifest.check(source)
        manifest.validate(source)
        return manifest

    def check(self, source: str = "manifest") -> None:
        """Field checks that need the model: token ids, weight groups, kept layers, exits, template size."""
        vocab = self.model.vocab_size
        _require(self.bos_token_id is None or self.bos_token_id < vocab, source, "bos_token_id",
                     f"a token id below vocab_size ({vocab})", self.bos_token_id)
        for k, token in enumerate(self.eos_token_ids):
            _require(0 <= token < vocab, source, f"eos_token_ids[{k}]", f"a token id in 0..{vocab - 1}", token)
        for group in self.weights:
            _require(group in WEIGHT_GROUPS, source, "weights", f"keyed by weight groups ({', '.join(WEIGHT_GROUPS)})",
                         group)
        if self.kept_layers:
            _require(len(self.kept_layers) == self.model.num_layers, source, "kept_layers",
                         f"one block index per layer ({self.model.num_layers})", list(self.kept_layers))
            _require(all(0 <= i < 1 << 16 for i in self.kept_layers), source, "kept_layers",
                         "block indices >= 0", list(self.kept_layers))
        _require(len(self.chat_template or "") <= MAX_TEMPLATE_CHARS, source, "chat_template",
                     f"at most {MAX_TEMPLATE_CHARS} characters", (self.chat_template or "")[:20])
        for k, entry in enumerate(self.exits):
            self._check_exit(entry, f"exits[{k}]", source)
        profiles = load_profiles()
        _require(self.device is None or self.device in profiles and profiles[self.device].onnx, source, "device",
                 f"null or a device profile with onnxruntime graphs ({', '.join(export_devices())})", self.device)
        _require(not self.ort_models or len(self.ort_models) == len(self.stages), source, "ort_models",
                 f"one ORT-format file per stage ({len(self.stages)})", list(self.ort_models))
        if self.generic is not None:
            _require(len(self.stages) == 1 and isinstance(self.generic.get("exporter"), str), source, "generic",
                     "an object naming its exporter, in a package of one stage graph", self.generic)
            _require(not self.exits and not self.ort_models, source, "generic",
                     "absent in a package with exits or ORT-format models", self.generic)

    def _check_exit(self, entry: Any, name: str, source: str) -> None:
        _require(isinstance(entry, dict) and set(_EXIT_KEYS) <= set(entry), source, name,
                     f"an object with {', '.join(_EXIT_KEYS)}", entry)
        for key, hint in _EXIT_KEYS.items():
            check_value(entry[key], hint, source, f"{name}.{key}")
        curve = entry["curve"]
        for key in _CURVE_KEYS:
            check_value(curve.get(key), tuple[float, ...], source, f"{name}.curve.{key}")
        lengths = {len(curve[key]) for key in _CURVE_KEYS}
        _require(len(lengths) == 1, source, f"{name}.curve", "lists of one length", sorted(lengths))
        boundaries = {s.first_layer for s in self.stages[1:]}
        _require(entry["layer"] in boundaries, source, f"{name}.layer",
                 f"a stage boundary ({sorted(boundaries) or 'none'})", entry["layer"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "manifest") -> None:
        """Check the stages cover every layer once, in order, from embedding to head."""
        if not self.stages:
            if self.gguf is None:
                raise PackageError(f"{source}: lists neither ONNX stages nor a GGUF file")
            return
        expected = 0
        for k, stage in enumerate(self.stages):
            if stage.first_layer != expected or stage.end_layer < stage.first_layer:
                raise PackageError(
                    f"{source}: stage {stage.file} covers layers [{stage.first_layer}, {stage.end_layer}) "
                    f"but layer {expected} comes next"
                )
            if stage.embeds != (k == 0) or stage.has_head != (k == len(self.stages) - 1):
                raise PackageError(f"{source}: first stage must embed tokens and the last must hold the LM head "
                                   f"(and no others); stage {k} ({stage.file}) has embeds={stage.embeds}, "
                                   f"has_head={stage.has_head}")
            expected = stage.end_layer
        if expected != self.model.num_layers:
            raise PackageError(f"{source}: stages cover {expected} layers, model has {self.model.num_layers}")

    def check_files(self, package_dir: str | Path) -> None:
        """Refuse the package when a file it names leads outside its folder (see `package_file`)."""
        package_file(package_dir, self.tokenizer, "tokenizer")
        for k, stage in enumerate(self.stages):
            package_file(package_dir, stage.file, f"stages[{k}].file")
        for k, entry in enumerate(self.exits):
            package_file(package_dir, entry["file"], f"exits[{k}].file")
        for k, name in enumerate(self.ort_models):
            package_file(package_dir, name, f"ort_models[{k}]")
        if self.required_operators is not None:
            package_file(package_dir, self.required_operators, "required_operators")
        self.gguf_path(package_dir)

    def gguf_path(self, package_dir: str | Path) -> Path | None:
        """The package's GGUF file, checked to lie inside the package (or to be a cache reference's
        own file: `gguf_reference`); None without one.

        Raises:
            PackageError: the path leads outside the package.
        """
        if self.gguf is None:
            return None
        if Path(self.gguf).is_absolute():
            return gguf_reference(package_dir, self.gguf)
        return package_file(package_dir, self.gguf, "gguf")

    @property
    def backends(self) -> tuple[str, ...]:
        """Backends that can run this package, in preference order."""
        return tuple(name for name, present in (("onnx", bool(self.stages)), ("llamacpp", bool(self.gguf))) if present)

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_manifest(directory: str | Path) -> Manifest:
    """Read and validate `directory/manifest.json`, and check every file it names lies inside the folder.

    Raises:
        PackageError: when the folder is not an edge-run package, the manifest is invalid (the
            error names the file and the field), or it names a file outside the package.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(f"{directory} is not an edge-run package (no {MANIFEST_NAME}); "
                           f"export one with `edge-run export MODEL -o DIR`")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{path} holds {size} bytes, more than any manifest ({MAX_MANIFEST_BYTES}); "
                           f"re-export the package")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep a nesting
        raise PackageError(f"{path} is not valid JSON ({e}); re-export the package") from None
    try:
        manifest = Manifest.from_dict(data, str(path))
    except PackageError as e:
        raise PackageError(f"{e}; re-export the package" if "re-export" not in str(e) else str(e)) from None
    manifest.check_files(directory)
    return manifest
