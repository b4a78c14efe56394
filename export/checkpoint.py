"""Read a checkpoint (GGUF file or Hugging Face safetensors folder) into float weights.

Both sources end in the same `Checkpoint`: a `ModelSpec`, float32 weights under canonical
names (see `families`), a `tokenizers.Tokenizer` and the chat template.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..runtime.manifest import ModelSpec, PackageError
from .families import Family, find_family, get_family, layer_names, supported_architectures

log = logging.getLogger(__name__)
GGUF_MAGIC = b"GGUF"


@dataclass
class Checkpoint:
    """A model read from disk, in edge-run's canonical form."""

    spec: ModelSpec
    weights: dict[str, np.ndarray]  # canonical name -> float32 array, [out, in] for matrices
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos_token: bool
    source: dict[str, Any]  # path, format, sha256, source dtypes
    kept_layers: tuple[int, ...] | None = None  # original index of each block (None: all, in order)
    transforms: list[dict[str, Any]] = field(default_factory=list)  # what export changed, for the manifest
    # GGUF keys a GGUF export carries over verbatim (tokenizer.ggml.*, descriptive general.*):
    # key -> (value, GGUF value types as the reader gives them, e.g. (ARRAY, STRING))
    gguf_metadata: dict[str, tuple[Any, tuple[Any, ...]]] = field(default_factory=dict)
    # GGML type name of every tensor in the source file, by its GGUF name (GGUF sources only)
    source_types: dict[str, str] = field(default_factory=dict)


def head_weight_name(weights: dict[str, np.ndarray]) -> str:
    """The weight the LM head multiplies by: "lm_head", or "embed" for a tied model."""
    return "lm_head" if "lm_head" in weights else "embed"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_kind(path: Path) -> str:
    """Return "gguf" or "hf" for a checkpoint path, or raise a PackageError saying why not."""
    path = Path(path)
    if not path.exists():
        raise PackageError(f"{path} does not exist; pass a .gguf file, a Hugging Face folder, "
                           f"a package folder or a known model name (`edge-run pull --list`)")
    if path.is_dir():
        missing = [n for n in ("config.json", "tokenizer.json") if not (path / n).is_file()]
        if missing or not any(path.glob("*.safetensors")):
            missing += [] if any(path.glob("*.safetensors")) else ["*.safetensors"]
            raise PackageError(f"{path} is not a Hugging Face checkpoint folder: missing "
                               f"{', '.join(missing)}")
        return "hf"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise PackageError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return "gguf"


def load_checkpoint(path: str | Path, weights: bool = True) -> Checkpoint:
    """Read a GGUF file or HF folder.

    Args:
        path: a `.gguf` file or a folder with config.json + *.safetensors + tokenizer.json.
        weights: False reads only a GGUF's metadata and tokenizer (`weights` stays empty), which
            is all a llama.cpp package needs; its architecture then need not be one edge-run
            can export, only one llama.cpp can run.
    Returns:
        The checkpoint with dequantized float32 weights.
    Raises:
        PackageError: for a missing, malformed, truncated or unsupported checkpoint.
    """
    path = Path(path)
    if checkpoint_kind(path) == "gguf":
        return _load_gguf(path, weights)
    if not weights:
        raise PackageError(f"{path} is a Hugging Face folder; only a GGUF file can be read without its weights")
    return _load_hf(path)


def _collect(family: Family, spec: ModelSpec, tensors: dict[str, Any], names: dict[str, str],
             convert) -> dict[str, np.ndarray]:
    """Pick every canonical weight out of `tensors` (external name -> raw), converting each."""
    weights = {}
    for canonical, external in layer_names(names, spec.num_layers).items():
        if external not in tensors:
            if canonical == "lm_head" and spec.tie_embeddings:
                continue
            raise PackageError(f"checkpoint lacks tensor {external!r} ({canonical}); "
                               f"the file is incomplete or not a {family.name} model")
        weights[canonical] = convert(canonical, tensors[external])
    return weights


# GGUF keys a GGUF export copies from its source: the tokenizer and what names the model
_CARRIED_PREFIXES = ("tokenizer.ggml.", "general.")
_NOT_CARRIED = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}


def _generic_spec(arch: str, meta: dict[str, Any]) -> ModelSpec:
    """A ModelSpec from the `{arch}.*` keys every llama.cpp architecture shares (no family needed)."""
    def g(key: str, *alternatives: str) -> Any:
        for k in (key, *alternatives):
            if k in meta:
                value = meta[k]
                return max(value) if isinstance(value, list) else value  # per-layer arrays
        raise PackageError(f"unsupported architecture {arch!r}: edge-run exports "
                           f"{', '.join(supported_architectures())} "
                           f"and runs other decoder transformers on llama.cpp, but this file lacks {arch}.{key}")

    heads, hidden = int(g("attention.head_count")), int(g("embedding_length"))
    head_dim = int(meta.get("attention.key_length") or hidden // heads)
    return ModelSpec(
        architecture=arch,
        vocab_size=int(meta.get("vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta["attention.head_count_kv"]) if "attention.head_count_kv" in meta else heads,
        head_dim=head_dim,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        context_length=int(g("context_length")),
        tie_embeddings="output.weight" not in meta["tensor_names"],
    )


@contextmanager
def _metadata_errors(path: Path) -> Iterator[None]:
    """Turn what a metadata value of the wrong type or size raises into a PackageError naming `path`."""
    try:
        yield
    except PackageError as e:
        raise PackageError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError, ArithmeticError) as e:  # int("x"), hidden // 0, a missing key
        raise PackageError(f"{path}: its metadata does not describe a model ({type(e).__name__}: {e}); "
                           f"the file is corrupt") from None


def _load_gguf(path: Path, with_weights: bool = True) -> Checkpoint:
    import gguf

    from .tokenizer import build_tokenizer, read_gguf_tokenizer

    try:
        with np.errstate(all="raise"):  # an offset that overflows is corruption, not a warning on stderr
            reader = gguf.GGUFReader(path)
            fields = {k: f.contents() for k, f in reader.fields.items()}
    except (ValueError, IndexError, KeyError, OSError, EOFError, ArithmeticError, RecursionError) as e:
        raise PackageError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
                           f"download it again") from None
    arch = str(fields.get("general.architecture"))
    family = find_family(arch)
    if family is None and with_weights:
        family = get_family(arch)  # raises, naming the supported architectures
    meta = {k[len(arch) + 1:]: v for k, v in fields.items() if k.startswith(f"{arch}.")}
    meta["tokenizer.ggml.tokens"] = fields.get("tokenizer.ggml.tokens", [])
    meta["tensor_names"] = {t.name for t in reader.tensors}
    with _metadata_errors(path):
        spec = family.spec_from_gguf(meta) if family else _generic_spec(arch, meta)
    tensors = {t.name: t for t in reader.tensors}

    def convert(canonical: str, t: Any) -> np.ndarray:
        try:
            with np.errstate(all="ignore"):  # non-finite values are refused below, not warned about
                w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            w = w.reshape([int(d) for d in reversed(t.shape)])
        except (ValueError, NotImplementedError, TypeError, IndexError, ArithmeticError) as e:
            raise PackageError(f"{path}: tensor {t.name} cannot be read ({type(e).__name__}: {e}); "
                               f"the file is corrupt or uses a type this gguf package lacks") from None
        if not np.isfinite(w).all():
            raise PackageError(f"{path}: tensor {t.name} holds NaN or infinite values; the file is corrupt")
        return family.from_gguf_tensor(canonical, w, spec)

    weights = _collect(family, spec, tensors, family.gguf_names, convert) if with_weights else {}
    try:
        tok = read_gguf_tokenizer(reader)
        tokenizer = build_tokenizer(tok)
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for a vocabulary it cannot use)
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise PackageError(f"{path}: cannot rebuild its tokenizer: {reason}") from None
    with _metadata_errors(path):
        eos = tuple(dict.fromkeys(int(e) for e in (tok.eos_token_id, fields.get("tokenizer.ggml.eot_token_id"),
                                                   *_end_of_turn(family, tokenizer)) if e is not None))
    carried = {k: (fields[k], tuple(f.types)) for k, f in reader.fields.items()
               if k.startswith(_CARRIED_PREFIXES) and k not in _NOT_CARRIED}
    return Checkpoint(
        spec=spec,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=_template_or_standard(fields.get("tokenizer.chat_template"), family, path),
        bos_token_id=tok.bos_token_id,
        eos_token_ids=eos,
        add_bos_token=tok.add_bos_token,
        source={"path": str(path.resolve()), "format": "gguf", "sha256": sha256_file(path),
                "dtypes": sorted({t.tensor_type.name for t in reader.tensors})},
        gguf_metadata=carried,
        source_types={t.name: t.tensor_type.name for t in reader.tensors},
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _safetensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        # framework="numpy" cannot read bfloat16; torch is used only when a file needs it
        try:
            try:
                with safe_open(file, framework="numpy") as f:
                    for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                        yield name, f.get_tensor(name)
            except TypeError:
                import torch  # noqa: F401  (bf16 checkpoints need torch to decode)

                with safe_open(file, framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                        yield name, f.get_tensor(name).float().numpy()
        except SafetensorError as e:
            raise PackageError(f"{file} is truncated or corrupt ({e}); download it again") from None


def _load_hf(folder: Path) -> Checkpoint:
    config = _read_json(folder / "config.json")
    family = get_family(str(config.get("model_type")))
    with _metadata_errors(folder / "config.json"):
        spec = family.spec_from_hf(config)
    tensors = dict(_safetensors(folder))
    dtypes = sorted({str(a.dtype) for a in tensors.values()})
    def convert(canonical: str, a: np.ndarray) -> np.ndarray:
        w = np.ascontiguousarray(a, dtype=np.float32)
        return family.from_hf_tensor(canonical, w, spec) if family.from_hf_tensor else w

    weights = _collect(family, spec, tensors, family.hf_names, convert)
    return Checkpoint(spec=spec, weights=weights, **hf_metadata(folder, config, family, dtypes))


def hf_metadata(folder: Path, config: dict[str, Any], family: Family | None, dtypes: list[str]) -> dict[str, Any]:
    """A Hugging Face folder's Checkpoint fields besides spec and weights: tokenizer, chat template,
    BOS/EOS ids, and the source record (path, sha256 of the safetensors files, their `dtypes`).

    Raises:
        PackageError: tokenizer.json or tokenizer_config.json is malformed.
    """
    tok_config = _read_json(folder / "tokenizer_config.json")
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for malformed files)
        raise PackageError(f"{folder / 'tokenizer.json'} is not a valid tokenizer file ({e}); "
                           f"copy it again from the model's repository") from None
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()

    def token_id(key: str) -> list[int]:
        value = config.get(f"{key}_token_id")
        if value is None and isinstance(tok_config.get(f"{key}_token"), str):
            value = tokenizer.token_to_id(tok_config[f"{key}_token"])
        return [] if value is None else [value] if isinstance(value, int) else list(value)

    bos = token_id("bos")
    sha = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        sha.update(sha256_file(file).encode())
    return dict(
        tokenizer=tokenizer,
        chat_template=_template_or_standard(template, family, folder),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=tuple(dict.fromkeys([*token_id("eos"), *_end_of_turn(family, tokenizer)])),
        add_bos_token=bool(tok_config.get("add_bos_token", False)),
        source={"path": str(folder.resolve()), "format": "safetensors",
                "sha256": sha.hexdigest(), "dtypes": dtypes},
    )


def _template_or_standard(template: str | None, family, source: Path) -> str | None:
    """The checkpoint's own chat template, else its family's standard one (with a log line)."""
    if template or family is None or family.chat_template is None:
        return template
    log.info("%s ships no chat template; using the %s family's standard one", source, family.name)
    return family.chat_template


def _end_of_turn(family, tokenizer: Tokenizer) -> list[int]:
    """Ids of the family's end-of-turn tokens this tokenizer has."""
    ids = [tokenizer.token_to_id(t) for t in (family.end_of_turn if family else ())]
    return [i for i in ids if i is not None]
