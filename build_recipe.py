"""The `edge-run build` recipe: a TOML file naming one source model, the calibration and evaluation
settings, the variants to build and the gates each must pass. It is checked whole before any work,
and every error names the file, the line and the key (`recipe.toml:14: variants.int4.quant: ...`).

    [source]
    model = "smollm2-135m"      # a known model, or: path = "model.gguf" (a GGUF file or Hugging Face
    sha256 = "b179c952..."      # folder, relative to the recipe); optional sha256: checked before any work

    [calibration]               # every calibrated variant's (GPTQ; a quant recipe's own is replaced)
    sequences = 32              # windows of `tokens` tokens of `data` (default: WikiText-2 validation)
    tokens = 256

    [evaluation]                # `edge-run eval`'s protocol on `windows` WikiText-2 test windows
    windows = 40
    reference = "fp32"          # a float variant (default: an fp32 ONNX export of the source)
    baseline = "fp32"           # decode speed ratios are against this variant, measured in the same run

    [variants.int4]
    format = "onnx"             # onnx, gguf or both (both: float weights only)
    quant = "int4-gptq"         # a preset, a llama.cpp type (GGUF), a recipe file, or an inline recipe table
    gates = { max_ppl_increase = 0.05, min_top1 = 0.85, max_size_mb = 120, min_decode_ratio = 1.5 }

A variant also takes prune_layers / keep_layers / heal, exit_layers, stage_boundaries, device /
accuracy_level (the device profile of a quantized ONNX package), gguf_dtype and context_length.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .quant.recipe import TARGETS, Calibration, Recipe, load_recipe
from .runtime.manifest import PackageError, contained_file

if TYPE_CHECKING:  # the export pipeline imports onnx (a second): only when a recipe is read
    from .export.pipeline import ExportOptions

FORMATS = {"onnx": ("onnx",), "gguf": ("gguf",), "both": ("onnx", "gguf")}
# gate -> what it bounds; "max_*" gates are upper bounds, "min_*" lower ones
GATES = {
    "max_ppl_increase": "perplexity over the reference's, as a fraction (0.05: at most +5%)",
    "min_top1": "top-1 agreement with the reference (0..1)",
    "max_kl": "KL(reference || variant) in nats per position",
    "max_size_mb": "package size on disk in MB (1e6 bytes)",
    "min_decode_ratio": "decode tokens/s over the baseline variant's, measured side by side in the same run",
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# files the build writes beside the packages, and the cache's name for its own fp32 reference
RESERVED = ("report.json", "report.md", "report.png", "reference")
# value kinds: a check and the name an error shows
_KINDS = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "boolean": (lambda v: isinstance(v, bool), "true or false"),
    "table": (lambda v: isinstance(v, dict), "a table"),
    "integers": (lambda v: isinstance(v, list) and all(_KINDS["integer"][0](x) for x in v), "an array of integers"),
    "string or table": (lambda v: isinstance(v, (str, dict)), "a string or a table"),
}
TOP_KEYS = {"name": "string", "source": "table", "calibration": "table", "evaluation": "table", "variants": "table"}
SOURCE_KEYS = {"model": "string", "path": "string", "sha256": "string"}
CALIBRATION_KEYS = {"sequences": "integer", "tokens": "integer", "seed": "integer", "damp": "number",
                    "act_order": "boolean", "data": "string"}
EVALUATION_KEYS = {"windows": "integer", "window_tokens": "integer", "reference": "string", "baseline": "string",
                   "decode_tokens": "integer", "prompt_tokens": "integer", "rounds": "integer", "threads": "integer"}
VARIANT_KEYS = {"format": "string", "quant": "string or table", "gguf_dtype": "string", "prune_layers": "integer",
                "keep_layers": "integers", "heal": "boolean", "exit_layers": "integers",
                "stage_boundaries": "integers", "device": "string", "accuracy_level": "integer",
                "context_length": "integer", "gates": "table"}
# ExportOptions' messages name CLI flags; a recipe error names the variant's keys instead
_FLAG_KEYS = {"--format": "format", "--dtype": "gguf_dtype", "--stage-boundaries": "stage_boundaries",
              "--exit-layers": "exit_layers", "--prune-layers": "prune_layers", "--keep-layers": "keep_layers",
              "--heal": "heal", "--quant": "quant", "--device": "device", "--accuracy-level": "accuracy_level"}


class RecipeError(ValueError):
    """A build recipe that cannot be built; the message starts with `file:line: key:`."""


# -- where a key is: tomllib gives no line numbers, so the text is scanned -------------------------
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_ASSIGN = re.compile(rf"^\s*({_DOTTED})\s*=")


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip("\"'") for p in re.findall(_PART, dotted))


@dataclass(frozen=True)
class KeyLines:
    """The line of every table header and key assignment in a TOML text, as full key paths."""

    entries: tuple[tuple[int, tuple[str, ...]], ...]

    @classmethod
    def scan(cls, text: str) -> KeyLines:
        table: tuple[str, ...] = ()
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if header := _HEADER.match(line):
                table = _parts(header[1])
                entries.append((number, table))
            elif assign := _ASSIGN.match(line):
                entries.append((number, table + _parts(assign[1])))
        return cls(tuple(entries))

    def line(self, path: tuple[str, ...]) -> int:
        """The line assigning `path`; else the first line of its nearest enclosing table or key
        (an inline table, a missing key); 1 when nothing of it is in the file."""
        best, best_depth = 1, 0
        for number, entry in self.entries:
            depth = len(os.path.commonprefix([entry, path]))
            if depth == len(path):
                return number
            if depth > best_depth:
                best, best_depth = number, depth
        return best


@dataclass(frozen=True)
class _Reader:
    """Checks plain TOML data against the schema; errors carry the file, line and key."""

    file: Path
    lines: KeyLines

    def error(self, path: tuple[str, ...], message: str) -> RecipeError:
        key = ".".join(path) or "recipe"
        return RecipeError(f"{self.file}:{self.lines.line(path)}: {key}: {message}")

    def table(self, data: dict, path: tuple[str, ...], keys: dict[str, str]) -> dict:
        """`data` with every key known and of its kind."""
        for key, value in data.items():
            if key not in keys:
                raise self.error(path + (key,), f"unknown key; {'.'.join(path) or 'the recipe'} takes "
                                                f"{', '.join(keys)}")
            check, kind = _KINDS[keys[key]]
            if not check(value):
                raise self.error(path + (key,), f"expected {kind}, got {_toml_type(value)} {value!r}")
        return data


def _toml_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


# -- the recipe ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """The model every variant is built from.

    Attributes:
        spelled: the source as the recipe writes it (a known model name or a path); manifests record
            it instead of a machine's absolute path, so packages do not depend on where files sit.
        model: a known model name (pulled through pip), or None.
        path: a GGUF file or Hugging Face folder (resolved against the recipe's folder), or None.
        sha256: the expected checksum (of the GGUF file; of a Hugging Face folder, as manifests record it).
    """

    spelled: str
    model: str | None = None
    path: Path | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Evaluation:
    """How variants are measured: `edge-run eval`'s protocol and interleaved decode timing.

    Attributes:
        windows, window_tokens: WikiText-2 test windows scored for perplexity, KL and top-1.
        reference: the variant whose next-token distributions are the reference (a float, full-depth
            one); None: an fp32 ONNX export of the source, built for the run.
        baseline: the variant decode speed ratios are against; None: no ratios.
        decode_tokens, prompt_tokens, rounds: each round decodes `decode_tokens` greedy tokens after a
            `prompt_tokens`-token WikiText-2 prompt on every variant in turn; medians over rounds.
        threads: intra-op threads (default: physical cores).
    """

    windows: int = 40
    window_tokens: int = 512
    reference: str | None = None
    baseline: str | None = None
    decode_tokens: int = 64
    prompt_tokens: int = 16
    rounds: int = 5
    threads: int | None = None


@dataclass(frozen=True)
class Variant:
    """One package to build.

    Attributes:
        section: the recipe's table without its gates: what the package is made from (the manifest
            records it, and it is part of the cache key).
        options: the export settings it maps to (quant recipes loaded, calibration applied).
        quant: the quantization a table shows: a preset or llama.cpp type, "custom", or a float dtype.
        gates: gate name -> limit (see GATES).
        calibration: which calibration text the build reads: "gptq" (the recipe's [calibration]) and/or
            "layers" (pruning scores, healing and exit fitting read WikiText-2 validation).
    """

    name: str
    section: dict[str, Any]
    options: ExportOptions
    quant: str
    context_length: int | None = None
    gates: dict[str, float] = field(default_factory=dict)
    calibration: tuple[str, ...] = ()

    @property
    def is_float(self) -> bool:
        return self.options.quant is None and not self.options.prunes and self.options.gguf_dtype == "f32"


@dataclass(frozen=True)
class BuildRecipe:
    """A checked build recipe; `error` makes a RecipeError for a problem found later (at build time)."""

    file: Path
    name: str
    source: Source
    calibration: Calibration
    evaluation: Evaluation
    variants: tuple[Variant, ...]
    lines: KeyLines
    calibration_file: str | None = None  # calibration.data as written (calibration.data is resolved)
    overrides: dict[str, int] = field(default_factory=dict)  # command-line settings that replaced the recipe's

    def error(self, path: tuple[str, ...], message: str) -> RecipeError:
        return _Reader(self.file, self.lines).error(path, message)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def load_build_recipe(file: str | Path, windows: int | None = None,
                      calibration_sequences: int | None = None) -> BuildRecipe:
    """Read and check a build recipe (see the module docstring); nothing is built or downloaded.

    Args:
        file: the TOML file.
        windows: evaluation windows instead of the recipe's (`--eval-windows`, a CI-sized slice).
        calibration_sequences: calibration windows instead of the recipe's (`--calibration-sequences`).
    Raises:
        RecipeError: naming the file, line and key of the first problem.
    """
    import tomllib

    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {file}: {getattr(e, 'strerror', None) or e}") from None
    reader = _Reader(file, KeyLines.scan(text))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        where = re.search(r"at line (\d+)", str(e))
        raise RecipeError(f"{file}:{where[1] if where else 1}: invalid TOML: {e}") from None
    reader.table(data, (), TOP_KEYS)
    for key, example in (("source", 'model = "smollm2-135m" or path = "model.gguf"'),
                         ("variants", '[variants.int8] with quant = "int8"')):
        if key not in data:
            raise reader.error((key,), f"missing; a recipe needs a [{key}] table, e.g. {example}")
    calibration = _calibration(reader, data.get("calibration", {}), file.parent, calibration_sequences)
    variants = tuple(_variant(reader, name, section, calibration, file.parent)
                     for name, section in _variant_tables(reader, data["variants"]))
    evaluation = _evaluation(reader, data.get("evaluation", {}), variants, windows)
    overrides = {k: v for k, v in (("eval_windows", windows), ("calibration_sequences", calibration_sequences))
                 if v is not None}
    return BuildRecipe(file=file, name=data.get("name", file.stem), source=_source(reader, data["source"], file.parent),
                       calibration=calibration, evaluation=evaluation, variants=variants, lines=reader.lines,
                       calibration_file=data.get("calibration", {}).get("data"), overrides=overrides)


def _source(reader: _Reader, data: dict, folder: Path) -> Source:
    from .hub import known_models

    reader.table(data, ("source",), SOURCE_KEYS)
    if ("model" in data) == ("path" in data):
        raise reader.error(("source",), "give exactly one of model = KNOWN_NAME or path = FILE_OR_FOLDER")
    sha = data.get("sha256")
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise reader.error(("source", "sha256"), f"expected 64 lower-case hex digits, got {sha!r}")
    if "model" in data:
        known = known_models()
        if data["model"] not in known:
            raise reader.error(("source", "model"), f"unknown model {data['model']!r}; known models: "
                                                    f"{', '.join(sorted(known))} (or use path = ...)")
        return Source(spelled=data["model"], model=data["model"], sha256=sha)
    path = folder / data["path"]
    if not path.exists():
        raise reader.error(("source", "path"), f"{path} does not exist; give a .gguf file or a Hugging Face "
                                               f"folder, relative to the recipe's folder")
    return Source(spelled=data["path"], path=path, sha256=sha)


def _calibration(reader: _Reader, data: dict, folder: Path, sequences: int | None) -> Calibration:
    reader.table(data, ("calibration",), CALIBRATION_KEYS)
    values = dict(data)
    if "data" in values:
        try:  # a recipe from anyone (a pull request) reads nothing outside its own folder
            path = contained_file(folder, values["data"], "calibration.data", "recipe", "fix the recipe")
        except PackageError as e:
            raise reader.error(("calibration", "data"), str(e)) from None
        if not path.is_file():
            raise reader.error(("calibration", "data"), f"{path} is not a file; give a text file relative to "
                                                        f"the recipe's folder")
        values["data"] = str(path.resolve())
    if sequences is not None:
        values["sequences"] = sequences
    try:
        return Calibration.from_dict(values)
    except ValueError as e:
        key = next((k for k in data if k in str(e)), None)
        raise reader.error(("calibration",) + ((key,) if key else ()), str(e)) from None


def _variant_tables(reader: _Reader, data: dict) -> list[tuple[str, dict]]:
    if not data:
        raise reader.error(("variants",), "no variants; add a table such as [variants.int8] with quant = \"int8\"")
    for name, section in data.items():
        if not isinstance(section, dict):
            raise reader.error(("variants", name), f"expected a table, got {_toml_type(section)} {section!r}")
        if not NAME.match(name) or name in RESERVED:
            raise reader.error(("variants", name), "a variant name is a folder name: letters, digits, '.', '_', "
                                                   f"'-' (not {', '.join(RESERVED)})")
    return list(data.items())


def _quant(reader: _Reader, path: tuple[str, ...], quant: str | dict, target: str, calibration: Calibration,
           folder: Path) -> Recipe | str:
    """The variant's quantization: a Recipe (with the build's calibration) or a llama.cpp type name."""
    if isinstance(quant, dict):
        if "calibration" in quant:
            raise reader.error(path + ("calibration",), "one calibration per build: set it in [calibration]")
        spec: Any = quant
    elif quant in TARGETS[target]:
        spec = quant
    elif (folder / quant).is_file():
        try:  # a recipe file the build recipe names lies in its folder too
            spec = contained_file(folder, quant, "quant", "recipe", "fix the recipe")
        except PackageError as e:
            raise reader.error(path, str(e)) from None
    elif target == "gguf" and quant.lower() in _llama_types():
        return quant.lower()
    else:
        extra = ", a llama.cpp type (q4_k_m, q6_k, ...)" if target == "gguf" else ""
        raise reader.error(path, f"unknown preset {quant!r}; use a preset ({', '.join(TARGETS[target])}){extra}, "
                                 f"a recipe file relative to the recipe's folder, or an inline recipe table")
    try:
        recipe = load_recipe(spec, target=target)
    except ValueError as e:
        raise reader.error(path, str(e)) from None
    return dataclasses.replace(recipe, calibration=calibration)


def _llama_types() -> dict[str, int]:
    from .export.quantize import llama_quant_types

    return llama_quant_types()


def _variant(reader: _Reader, name: str, data: dict, calibration: Calibration, folder: Path) -> Variant:
    from .export.pipeline import ExportOptions

    path = ("variants", name)
    reader.table(data, path, VARIANT_KEYS)
    gates = reader.table(data.get("gates", {}), path + ("gates",), {g: "number" for g in GATES})
    for gate, limit in gates.items():
        low_ok = limit >= 0 if gate in ("max_ppl_increase", "max_kl") else limit > 0
        if not low_ok or (gate == "min_top1" and limit > 1):
            bound = "in 0..1" if gate == "min_top1" else ">= 0" if gate.startswith("max_") and gate != "max_size_mb" \
                else "> 0"
            raise reader.error(path + ("gates", gate), f"must be {bound} ({GATES[gate]}), got {limit}")
    fmt = data.get("format", "onnx")
    if fmt not in FORMATS:
        raise reader.error(path + ("format",), f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "both" and "quant" in data:
        raise reader.error(path + ("format",), "both puts ONNX graphs and a GGUF in one package, which holds "
                                               "float weights only; split a quantized variant into an onnx "
                                               "and a gguf variant")
    quant = None
    if "quant" in data:
        quant = _quant(reader, path + ("quant",), data["quant"], FORMATS[fmt][0], calibration, folder)
    options = {k: data[k] for k in ("gguf_dtype", "prune_layers", "keep_layers", "heal", "exit_layers",
                                    "stage_boundaries", "device", "accuracy_level") if k in data}
    try:
        export_options = ExportOptions(formats=FORMATS[fmt], quant=quant, **options)
    except ValueError as e:
        message = re.sub(r"--[a-z-]+", lambda m: _FLAG_KEYS.get(m[0], m[0]), str(e))
        key = next((k for k in data if re.search(rf"\b{k}\b", message)), None)
        raise reader.error(path + ((key,) if key else ()), message) from None
    context = data.get("context_length")
    if context is not None and context < 2:
        raise reader.error(path + ("context_length",), f"must be >= 2, got {context}")
    gptq = isinstance(quant, Recipe) and "gptq" in {quant.method, quant.default.method,
                                                    *(r.method for r in quant.rules)}
    layers = bool(export_options.prune_layers or export_options.exit_layers or export_options.heal)
    section = {k: v for k, v in data.items() if k != "gates"}
    shown = data["quant"] if isinstance(data.get("quant"), str) else "custom" if quant is not None else \
        ("float16" if export_options.gguf_dtype == "f16" else "float32")
    return Variant(name=name, section=section, options=export_options, quant=shown, context_length=context,
                   gates=dict(gates), calibration=tuple(k for k, used in (("gptq", gptq), ("layers", layers)) if used))


def _evaluation(reader: _Reader, data: dict, variants: tuple[Variant, ...], windows: int | None) -> Evaluation:
    path = ("evaluation",)
    reader.table(data, path, EVALUATION_KEYS)
    minimum = {"windows": 1, "window_tokens": 2, "decode_tokens": 2, "prompt_tokens": 1, "rounds": 1, "threads": 1}
    for key, low in minimum.items():
        if key in data and data[key] < low:
            raise reader.error(path + (key,), f"must be >= {low}, got {data[key]}")
    names = {v.name: v for v in variants}
    for key in ("reference", "baseline"):
        if key in data and data[key] not in names:
            raise reader.error(path + (key,), f"names no variant; variants: {', '.join(names)}")
    if "reference" in data and not names[data["reference"]].is_float:
        raise reader.error(path + ("reference",), f"{data['reference']} is not a float, full-depth variant; the "
                                                  f"reference must be (or leave it out: an fp32 export is made)")
    evaluation = Evaluation(**data)
    for variant in variants:
        if "min_decode_ratio" in variant.gates and evaluation.baseline is None:
            raise reader.error(("variants", variant.name, "gates", "min_decode_ratio"),
                               "needs a baseline variant to compare against: set [evaluation] baseline")
        need = max(evaluation.window_tokens, evaluation.prompt_tokens + evaluation.decode_tokens) + 1
        if variant.context_length is not None and variant.context_length < need:
            raise reader.error(("variants", variant.name, "context_length"),
                               f"{variant.context_length} cannot hold an evaluation window of "
                               f"{evaluation.window_tokens} tokens or a {evaluation.prompt_tokens}-token prompt "
                               f"and {evaluation.decode_tokens} decoded ones; raise it or lower [evaluation]'s")
    if windows is not None:
        evaluation = dataclasses.replace(evaluation, windows=windows)
    return evaluation


__all__ = ["GATES", "BuildRecipe", "Evaluation", "KeyLines", "RecipeError", "Source", "Variant",
           "load_build_recipe"]
