"""Device profiles: per target, the provider, the package variant edge-run builds for it, and its ops.

The facts live in `profiles.json` next to this module (data, not code); this module loads and
checks them once. `providers.DEVICES` is derived from the same table.

    profile = get_profile("android")
    profile.variant.ort_format      # True: export writes ORT-format models for a mobile build
    profile.runs_op("GroupQueryAttention", "float32")
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROFILES_FILE = Path(__file__).with_name("profiles.json")
BACKENDS = ("onnx", "llamacpp")
FLOAT_TYPES = ("float32", "float16", "bfloat16")
KV_PLACES = ("host", "device")


def _strict(cls: type, data: Any, where: str) -> Any:
    """`cls(**data)`, refusing unknown keys (listing the allowed ones) and missing ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class GraphVariant:
    """The ONNX package a profile needs.

    Attributes:
        dtype: float type of activations (and of float weights).
        kv_dtype: float type of the KV cache.
        block_size: int4/int8 block size of MatMulNBits weights.
        accuracy_level: MatMulNBits compute precision (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8).
        static_shapes: the provider compiles fixed shapes only (NPUs); edge-run builds dynamic ones.
        ort_format: also write ORT-format models and required_operators.config (mobile builds).
    """

    dtype: str = "float32"
    kv_dtype: str = "float32"
    block_size: int = 32
    accuracy_level: int = 4
    static_shapes: bool = False
    ort_format: bool = False

    def __post_init__(self) -> None:
        for name in ("dtype", "kv_dtype"):
            if getattr(self, name) not in FLOAT_TYPES:
                raise ValueError(f"variant {name} must be one of {FLOAT_TYPES}, got {getattr(self, name)!r}")
        if self.accuracy_level not in range(5):
            raise ValueError(f"variant accuracy_level must be 0-4, got {self.accuracy_level!r}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"variant block_size must be a power of two in 16..256, got {self.block_size!r}")


@dataclass(frozen=True)
class Profile:
    """One target edge-run can build a package for and run it on.

    Attributes:
        name: the `--device` name.
        backends: "onnx" (onnxruntime with `provider`) and/or "llamacpp" (GPU offload with `llamacpp_cmake`).
        provider: onnxruntime execution provider (None: llama.cpp only).
        options: provider options.
        ort_device: where OrtValues passed between stage graphs live ("cpu" or "cuda").
        wheel: the package (pip unless said otherwise) that provides the provider.
        plugin: pip package of a plugin EP loaded into plain onnxruntime (None: built in).
        variant: the ONNX package variant export builds for this target.
        kv_cache: where the KV cache lives while decoding ("host" or "device").
        ops: contrib op -> float types the provider has kernels for (the rest of a graph it hands
            back to the CPU provider).
        llamacpp_cmake: CMAKE_ARGS that build llama-cpp-python with this GPU backend.
        evidence: where the facts above come from.
        auto: whether device "auto" may pick it (in file order).
        host_inputs: the provider reads inputs in host memory (CPU, OpenVINO's CPU plugin); a GPU
            provider gets a copy made when an input is bound (see onnx_backend).
    """

    name: str
    backends: tuple[str, ...]
    provider: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    ort_device: str = "cpu"
    wheel: str = ""
    plugin: str | None = None
    variant: GraphVariant = GraphVariant()
    kv_cache: str = "host"
    ops: dict[str, tuple[str, ...]] = field(default_factory=dict)
    llamacpp_cmake: str | None = None
    evidence: str = ""
    auto: bool = False
    host_inputs: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalizing JSON lists on a frozen dataclass
        set_(self, "backends", tuple(self.backends))
        set_(self, "ops", {op: tuple(types) for op, types in self.ops.items()})
        if isinstance(self.variant, dict):
            set_(self, "variant", _strict(GraphVariant, self.variant, f"profile {self.name!r}: variant"))
        if not self.backends or set(self.backends) - set(BACKENDS):
            raise ValueError(f"profile {self.name!r}: backends must be some of {BACKENDS}, got {self.backends}")
        if ("onnx" in self.backends) != (self.provider is not None):
            raise ValueError(f"profile {self.name!r}: an onnx profile names its provider, a llama.cpp-only one none")
        if ("llamacpp" in self.backends and self.name != "cpu") != (self.llamacpp_cmake is not None):
            raise ValueError(f"profile {self.name!r}: a llama.cpp GPU profile names its llamacpp_cmake")
        if self.kv_cache not in KV_PLACES or self.ort_device not in ("cpu", "cuda"):
            raise ValueError(f"profile {self.name!r}: kv_cache must be one of {KV_PLACES} and ort_device cpu or cuda")
        for op, types in self.ops.items():
            if set(types) - set(FLOAT_TYPES):
                raise ValueError(f"profile {self.name!r}: ops[{op!r}] must list types of {FLOAT_TYPES}, got {types}")
        if os.name == "nt" and "backend_path" in self.options:  # libQnnHtp.so -> QnnHtp.dll
            dll = Path(self.options["backend_path"]).stem.removeprefix("lib") + ".dll"
            set_(self, "options", {**self.options, "backend_path": dll})

    @property
    def onnx(self) -> bool:
        return "onnx" in self.backends

    def runs_op(self, op: str, dtype: str = "float32") -> bool:
        """Whether the provider has a kernel for contrib op `op` on `dtype` tensors."""
        return dtype in self.ops.get(op, ())

    def describe(self) -> str:
        """One line: provider, variant and KV placement (or the llama.cpp backend)."""
        if not self.onnx:
            return f"llama.cpp GPU offload ({self.llamacpp_cmake})"
        v = self.variant
        shapes = "static" if v.static_shapes else "dynamic"
        mobile = ", ORT format" if v.ort_format else ""
        return (f"{self.provider}: {v.dtype} activations, {v.kv_dtype} KV on the {self.kv_cache}, int4 block "
                f"{v.block_size}, accuracy level {v.accuracy_level}, {shapes} shapes{mobile}")


@cache
def load_profiles(path: str | Path = PROFILES_FILE) -> dict[str, Profile]:
    """Every profile in `path` by name, in file (= "auto" preference) order.

    Raises:
        ValueError: the file is malformed (names the profile and the field).
    """
    data = json.loads(Path(path).read_text())
    profiles: dict[str, Profile] = {}
    for k, entry in enumerate(data.get("profiles", [])):
        profile = _strict(Profile, entry, f"{path}: profiles[{k}]")
        if profile.name in profiles or profile.name == "auto":
            raise ValueError(f"{path}: profile name {profile.name!r} is taken")
        profiles[profile.name] = profile
    return profiles


def get_profile(name: str) -> Profile:
    """The profile called `name`.

    Raises:
        ValueError: no such profile (lists the known names).
    """
    profiles = load_profiles()
    if name not in profiles:
        raise ValueError(f"unknown device {name!r}; choose one of: {', '.join(profiles)}")
    return profiles[name]


def export_devices() -> tuple[str, ...]:
    """Devices `edge-run export --device` builds an ONNX package for."""
    return tuple(name for name, p in load_profiles().items() if p.onnx)


def check_package_device(built_for: str | None, run_on: str) -> str | None:
    """Whether a package built for device `built_for` may run on `run_on`, and what that costs.

    A package runs elsewhere when the run device's provider takes its variant's float type (all
    edge-run variants today are float32 graphs that every onnxruntime provider loads, handing
    what it lacks back to the CPU provider); the caller logs the returned note.

    Args:
        built_for: the manifest's `device` (None: a package made before profiles, i.e. "cpu").
        run_on: the profile the session runs on.
    Returns:
        None when the package was built for `run_on`, else a one-line note of the fallback.
    Raises:
        ValueError: the package's variant cannot run on `run_on` (names both and the fix).
    """
    built, run = get_profile(built_for or "cpu"), get_profile(run_on)
    if built.name == run.name:
        return None
    if not run.onnx:
        raise ValueError(f"device {run.name!r} runs GGUF packages on llama.cpp only; use --device cpu (or the "
                         f"package's own device {built.name!r}) for this ONNX package, or --backend llamacpp")
    if built.variant.dtype != run.variant.dtype and built.variant.dtype != "float32":
        raise ValueError(f"this package holds {built.variant.dtype} graphs built for device {built.name!r}, which "
                         f"{run.provider} does not run as such; export it again with --device {run.name}")
    return (f"package built for device {built.name!r} ({built.describe()}) runs on {run.name!r} "
            f"({run.describe()}); export with --device {run.name} for that device's own variant")


__all__ = ["GraphVariant", "Profile", "check_package_device", "export_devices", "get_profile", "load_profiles"]
