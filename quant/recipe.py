"""Quantization recipes: which format each weight gets, as data (JSON or TOML), plus presets.

A recipe is an ordered list of rules; the first rule whose glob pattern matches a tensor's
canonical name (`embed`, `lm_head`, `layers.{i}.{q,k,v,o,gate,up,down}`) decides its format,
and tensors no rule matches take `default`. `{last}` in a pattern stands for the last layer's
index, so `layers.{last}.*` works for any depth. Format "float32" keeps a tensor unquantized. For
models with tied embeddings `lm_head` names the head's use of the embedding table: when it gets
the same format as `embed` both share one quantized copy.

    {"name": "int4-mixed", "method": "gptq",
     "default": {"format": "int4_asym", "block_size": 32},
     "rules": [{"pattern": "embed", "format": "int8_block"},
               {"pattern": "lm_head", "format": "int8_block"},
               {"pattern": "layers.*.down", "format": "int8_block"}],
     "calibration": {"sequences": 32, "tokens": 256}}
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.manifest import PackageError, check_keys, contained_file, show, strict_from_dict
from . import formats  # noqa: F401  (registers the formats)
from .base import QuantFormat, get_format

FLOAT = "float32"
METHODS = ("rtn", "gptq")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Recipe parts: the manifest's strict from_dict (unknown keys, value types), raising ValueError."""
    return strict_from_dict(cls, data, where, error=ValueError, typed=True)


@dataclass(frozen=True)
class TensorRule:
    """Format settings for the tensors matching `pattern` (or for all others, as `default`).

    Attributes:
        format: a registered format name (see `edgerun.quant.format_names()`) or "float32".
        block_size: block length along the input axis; None = the format's default, 0 = per channel.
        scale_dtype: "float16" or "float32"; None = the format's default.
        method: "rtn" or "gptq"; None = the recipe's method.
        pattern: glob over canonical tensor names (unused in `default`).
        fallback: the rule for matched tensors whose shape this format cannot take (for example
            GGUF ternary blocks of 256 on rows of 576), as llama.cpp's quantizer falls back.
        gguf_type: the GGML type to pack into when several hold the format (ternary: TQ2_0 or TQ1_0).
    """

    format: str
    block_size: int | None = None
    scale_dtype: str | None = None
    method: str | None = None
    pattern: str = "*"
    fallback: TensorRule | None = None
    gguf_type: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "rule") -> TensorRule:
        if isinstance(data, dict) and data.get("fallback") is not None:
            fallback = data["fallback"]
            if isinstance(fallback, dict) and "pattern" in fallback:
                raise ValueError(f"{where}: a fallback applies to its rule's tensors; remove its 'pattern'")
            data = {**data, "fallback": cls.from_dict(fallback, f"{where} fallback")}
        rule = _from_dict(cls, data, where)
        fmt = rule.make_format(where)  # validates format, block size and scale dtype early
        if rule.method is not None and rule.method not in METHODS:
            raise ValueError(f"{where}: unknown method {rule.method!r}; use one of {METHODS}")
        if rule.gguf_type is not None:
            from .pack_gguf import gguf_types_of

            if fmt is None or rule.gguf_type not in gguf_types_of(fmt):
                raise ValueError(f"{where}: gguf_type {rule.gguf_type!r} does not hold format {rule.format!r} "
                                 f"(block {rule.block_size}); for ternary block 256 use TQ2_0 or TQ1_0")
        return rule

    def to_dict(self, keep_pattern: bool = True) -> dict[str, Any]:
        """Plain data that `from_dict` reads back (unset fields left out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if getattr(self, f.name) is not None and (keep_pattern or f.name != "pattern")}
        if self.fallback is not None:
            out["fallback"] = self.fallback.to_dict(keep_pattern=False)
        return out

    def make_format(self, where: str = "rule") -> QuantFormat | None:
        """The format instance, or None for float32."""
        if self.format == FLOAT:
            if self.block_size is not None or self.scale_dtype is not None:
                raise ValueError(f"{where}: float32 takes no block_size or scale_dtype")
            return None
        try:
            return get_format(self.format, self.block_size, self.scale_dtype)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class Calibration:
    """Calibration data for GPTQ: `sequences` windows of `tokens` tokens from `data`.

    Attributes:
        data: text file (default: WikiText-2 validation, shipped with edge-run in edgerun.data).
        damp: GPTQ dampening, a fraction of the mean Hessian diagonal added to it.
        act_order: process columns by decreasing Hessian diagonal (groups stay static).
    """

    sequences: int = 32
    tokens: int = 256
    data: str | None = None
    damp: float = 0.01
    act_order: bool = True
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        cal = _from_dict(cls, data, "calibration")
        if cal.sequences < 1 or cal.tokens < 2:
            raise ValueError(f"calibration needs sequences >= 1 and tokens >= 2, got {cal.sequences} x {cal.tokens}")
        if not 0 < cal.damp < 1:
            raise ValueError(f"calibration damp must be in (0, 1), got {cal.damp}")
        return cal


@dataclass(frozen=True)
class Promote:
    """Sensitivity-driven mixed precision: move the tensors whose rounding hurts the model most to
    `format` (8 bits), the most damage avoided per byte first, within a byte budget.

    Before quantizing, every tensor the rules put in a narrower format is scored on the first
    `windows` calibration windows (the recipe's calibration text, WikiText-2 *valid* by default):
    the KL divergence of the float model's next-token distribution from that of the float model
    with only this tensor rounded to nearest in its rule's format (`export.calibrate.tensor_sensitivity`).
    Tensors are then promoted in decreasing order of KL per extra byte while the extra bytes stay
    within `budget` x the bytes of all quantized weights before promotion (a shared embedding / LM
    head counted once); see `export.calibrate.select_promotions`.

    Attributes:
        format, block_size: the format promoted tensors get (None = the format's default block).
        budget: extra weight bytes allowed, as a fraction of the unpromoted quantized weights.
        windows: calibration windows the scan runs on (the first ones of `calibration`).
    """

    format: str = "int8_block"
    block_size: int | None = 32
    budget: float = 0.08
    windows: int = 4

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Promote:
        promote = _from_dict(cls, data, "promote")
        if promote.format == FLOAT:
            raise ValueError("promote: format must be a quantized format (float32 tensors are not counted in bytes)")
        TensorRule(format=promote.format, block_size=promote.block_size).make_format("promote")
        if not 0 <= promote.budget <= 1:
            raise ValueError(f"promote budget must be a fraction in [0, 1], got {promote.budget}")
        if promote.windows < 1:
            raise ValueError(f"promote windows must be >= 1, got {promote.windows}")
        return promote

    def make_format(self) -> QuantFormat:
        return get_format(self.format, self.block_size)


@dataclass(frozen=True)
class Recipe:
    """Ordered rules mapping tensor names to formats; see the module docstring."""

    name: str
    default: TensorRule
    rules: tuple[TensorRule, ...] = ()
    method: str = "rtn"
    calibration: Calibration = field(default_factory=Calibration)
    promote: Promote | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict):
            raise ValueError(f"a recipe must be an object, got {type(data).__name__}")  # noqa: TRY004  (bad data)
        check_keys(cls, data, "recipe", ValueError)
        if "default" not in data:
            raise ValueError('recipe needs a "default" rule, e.g. {"format": "int4_asym", "block_size": 32}')
        if not isinstance(data.get("rules", []), list):
            raise ValueError(f"recipe rules must be a list, got {type(data['rules']).__name__}")  # noqa: TRY004
        rules = []
        for k, raw in enumerate(data.get("rules", [])):
            if not isinstance(raw, dict) or "pattern" not in raw:
                raise ValueError(f"recipe rule {k} ({show(raw)}) needs a 'pattern' glob such as 'layers.*.down'")
            rules.append(TensorRule.from_dict(raw, f"rule {k} ({show(raw['pattern'], 40)})"))
        if isinstance(data["default"], dict) and "pattern" in data["default"]:
            raise ValueError("the default rule applies to every unmatched tensor; remove its 'pattern'")
        method = data.get("method", "rtn")
        if method not in METHODS:
            raise ValueError(f"recipe method {method!r} is unknown; use one of {METHODS}")
        return cls(name=str(data.get("name", "custom")), default=TensorRule.from_dict(data["default"], "default"),
                   rules=tuple(rules), method=method,
                   calibration=Calibration.from_dict(data.get("calibration", {})),
                   promote=None if data.get("promote") is None else Promote.from_dict(data["promote"]))

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `from_dict` reads back (unset fields left out)."""
        out = {"name": self.name, "method": self.method, "default": self.default.to_dict(keep_pattern=False),
               "rules": [r.to_dict() for r in self.rules], "calibration": dataclasses.asdict(self.calibration)}
        if self.promote is not None:
            out["promote"] = dataclasses.asdict(self.promote)
        return out

    def resolve(self, names: Iterable[str]) -> dict[str, TensorRule]:
        """The rule deciding each tensor (first matching rule, else the default).

        Raises:
            ValueError: a rule whose pattern matches none of `names`.
        """
        names = list(names)
        layers = [int(n.split(".")[1]) for n in names if n.startswith("layers.")]
        last = str(max(layers)) if layers else "-1"
        chosen: dict[str, TensorRule] = {}
        for k, rule in enumerate(self.rules):
            hits = fnmatch.filter(names, rule.pattern.replace("{last}", last))
            if not hits:
                raise ValueError(f"recipe {self.name!r} rule {k}: pattern {rule.pattern!r} matches no tensor; "
                                 f"quantizable tensors are {_summarize(names)}")
            for name in hits:
                chosen.setdefault(name, rule)
        return {name: chosen.get(name, self.default) for name in names}

    def method_of(self, rule: TensorRule) -> str:
        return rule.method or self.method


def _summarize(names: list[str]) -> str:
    layer_parts = sorted({n.split(".", 2)[2] for n in names if n.startswith("layers.")})
    layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("layers.")})
    rest = [n for n in names if not n.startswith("layers.")]
    span = f"layers.{{{layers[0]}..{layers[-1]}}}.{{{','.join(layer_parts)}}}" if layers else ""
    return ", ".join(rest + ([span] if span else []))


_INT8 = {"format": "int8_block", "block_size": 32}
# the embedding / tied LM head share one int8 copy
_TABLES = [{"pattern": "embed", **_INT8, "method": "rtn"}, {"pattern": "lm_head", **_INT8, "method": "rtn"}]
# the tensors most sensitive to 4-bit rounding, kept at 8 bits: v in every layer and the whole
# last layer (README: design notes on export and quantization)
_SENSITIVE = [{"pattern": "layers.*.v", **_INT8}, {"pattern": "layers.{last}.*", **_INT8}]
_INT4 = {"format": "int4_asym", "block_size": 32}
PRESETS: dict[str, dict[str, Any]] = {
    # block 16: at accuracy level 4 activations are quantized per weight block, so smaller blocks
    # keep int8 closer to the reference (README: design notes on export and quantization)
    "int8": {"name": "int8", "default": {"format": "int8_block", "block_size": 16}, "rules": _TABLES},
    "int4": {"name": "int4", "default": _INT4, "rules": _TABLES + _SENSITIVE},
    # plus the tensors a calibration scan finds most sensitive, at 8 bits within +10% of the weight
    # bytes (Promote; README: design notes on export and quantization)
    "int4-gptq": {"name": "int4-gptq", "method": "gptq", "default": _INT4, "rules": _TABLES + _SENSITIVE,
                  "promote": {**_INT8, "budget": 0.10, "windows": 4}},
    "ternary": {"name": "ternary", "default": {"format": "ternary", "block_size": 64}, "rules": _TABLES},
}
# The same presets for a GGUF, in the formats its block types hold (int8_block b32 = Q8_0,
# int4_min b32 = Q4_1, ternary b256 = TQ2_0). Ternary rows must be multiples of 256: other
# tensors fall back to Q4_0, as llama.cpp's own quantizer does.
_Q4_1 = {"format": "int4_min", "block_size": 32}
GGUF_PRESETS: dict[str, dict[str, Any]] = {
    "int8": {"name": "int8", "default": _INT8},
    "int4": {"name": "int4", "default": _Q4_1, "rules": _TABLES + _SENSITIVE},
    "int4-gptq": {"name": "int4-gptq", "method": "gptq", "default": _Q4_1, "rules": _TABLES + _SENSITIVE},
    "ternary": {"name": "ternary", "default": {"format": "ternary", "block_size": 256,
                                               "fallback": {"format": "int4_sym", "block_size": 32}},
                "rules": _TABLES},
}
TARGETS = {"onnx": PRESETS, "gguf": GGUF_PRESETS}


def load_recipe(spec: str | Path | dict[str, Any] | Recipe, target: str = "onnx") -> Recipe:
    """A preset name (int8, int4, int4-gptq, ternary), a .json / .toml recipe file, a dict, or a Recipe.

    Args:
        target: "onnx" or "gguf": which variant of a preset (GGUF presets use GGML block formats).
    Raises:
        ValueError: unknown preset, unreadable file, or an invalid recipe.
    """
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return Recipe.from_dict(spec)
    presets = TARGETS[target]
    if str(spec) in presets:
        return Recipe.from_dict(presets[str(spec)])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--quant {spec!r} is neither a preset ({', '.join(presets)}) nor a recipe file")
    kind = "TOML" if path.suffix == ".toml" else "JSON"
    try:
        text = path.read_text(encoding="utf-8")
        if kind == "TOML":
            import tomllib

            data = tomllib.loads(text)  # its errors give the line and column
        else:
            data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, TOMLDecodeError, UnicodeDecodeError, deep nesting
        raise ValueError(f"recipe {path} is not valid {kind}: {e}") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
        calibration = data.get("calibration")
        if isinstance(calibration, dict) and isinstance(calibration.get("data"), str):
            # relative to the recipe's folder and inside it: a recipe file reads nothing outside its folder
            try:
                where = contained_file(path.parent, calibration["data"], "calibration.data", "recipe",
                                       "fix the recipe")
            except PackageError as e:
                raise ValueError(str(e)) from None
            data["calibration"] = {**calibration, "data": str(where)}
    try:
        return Recipe.from_dict(data)
    except ValueError as e:  # name the file; the message names the rule and the key
        raise ValueError(f"recipe {path}: {e}") from None
