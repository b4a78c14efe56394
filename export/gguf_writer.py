"""Write a `Checkpoint` (ModelSpec + canonical weights + tokenizer) as a GGUF file llama.cpp runs.

    write_gguf(ckpt, "model.gguf", dtype="f16")

Metadata comes from the ModelSpec, so a depth-pruned checkpoint (fewer, renumbered layers) gets
the right block count; the tokenizer fields are copied verbatim from a GGUF source and derived
from tokenizer.json for a Hugging Face one. Q/K rows get llama.cpp's interleaved-pair RoPE
layout back. Quantized tensors are packed elsewhere (`quant/`) and handed over as
`PackedTensor`s; this module only places bytes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..runtime.manifest import PackageError
from .checkpoint import Checkpoint
from .families import get_family, layer_names
from .onnx_graph import inverse_frequencies

log = logging.getLogger(__name__)

# --dtype -> (numpy dtype of matrices, general.file_type)
GGUF_DTYPES: dict[str, tuple[type, gguf.LlamaFileType]] = {
    "f32": (np.float32, gguf.LlamaFileType.ALL_F32),
    "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
}


@dataclass(frozen=True)
class PackedTensor:
    """A weight already packed in a GGML storage type (by `quant/`), in llama.cpp's layout.

    Attributes:
        data: uint8 [rows..., bytes per row]: the GGML blocks of each row, as llama.cpp stores them.
        ggml_type: the GGML type of the blocks (e.g. gguf.GGMLQuantizationType.Q8_0).
    """

    data: np.ndarray
    ggml_type: gguf.GGMLQuantizationType

    def __post_init__(self) -> None:
        if self.data.dtype != np.uint8:
            raise ValueError(f"PackedTensor.data must be uint8 bytes, got {self.data.dtype}")


def gguf_layout(ckpt: Checkpoint, canonical: str) -> np.ndarray:
    """Weight `canonical` of `ckpt` as llama.cpp expects it (Q/K rows permuted); quantize this."""
    family = get_family(ckpt.spec.architecture)
    return family.to_gguf_tensor(canonical, ckpt.weights[canonical], ckpt.spec)


def _tokenizer_fields(ckpt: Checkpoint) -> dict[str, tuple[Any, tuple]]:
    """The `tokenizer.ggml.*` (and descriptive `general.*`) keys to write."""
    if any(k.startswith("tokenizer.ggml.") for k in ckpt.gguf_metadata):
        return dict(ckpt.gguf_metadata)  # a GGUF source: keep its tokenizer exactly
    from .tokenizer import gguf_tokenizer_fields

    try:
        return dict(ckpt.gguf_metadata) | gguf_tokenizer_fields(
            ckpt.tokenizer, ckpt.spec.vocab_size, ckpt.bos_token_id,
            next(iter(ckpt.eos_token_ids), None), ckpt.add_bos_token)
    except ValueError as e:
        raise PackageError(f"cannot describe the tokenizer of {ckpt.source.get('path')} in GGUF: {e}") from None


def _add_metadata(writer: gguf.GGUFWriter, ckpt: Checkpoint, file_type: gguf.LlamaFileType) -> None:
    spec = ckpt.spec
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    if spec.head_dim * spec.num_heads != spec.hidden_size:
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    if spec.sliding_window:  # llama.cpp derives which layers slide, and their rope base, from the architecture
        writer.add_sliding_window(spec.sliding_window)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(int(file_type))
    for key, (value, types) in _tokenizer_fields(ckpt).items():
        writer.add_key_value(key, value, types[0], sub_type=types[-1] if len(types) > 1 else None)
    if ckpt.chat_template:
        writer.add_chat_template(ckpt.chat_template)


def _tensors(ckpt: Checkpoint, dtype: type, packed: Mapping[str, PackedTensor]) -> dict[str, tuple]:
    """GGUF name -> (array, raw_dtype or None) for every weight, in file order."""
    family = get_family(ckpt.spec.architecture)
    names = layer_names(family.gguf_names, ckpt.spec.num_layers)
    scale = ckpt.spec.attention_scale
    if scale is not None and not np.isclose(scale, ckpt.spec.head_dim ** -0.5):
        raise PackageError(f"attention scale {scale:g} (not 1/sqrt(head_dim)) has no GGUF key llama.cpp reads; "
                           f"export --format onnx")
    unknown = sorted(set(packed) - set(names))
    if unknown:
        raise ValueError(f"packed tensors {unknown[:4]} name no weight of this model")
    dropped = sorted(set(ckpt.weights) - set(names))
    if dropped:  # never write a file that silently runs a different model
        raise PackageError(f"weights {dropped[:4]} have no place in a {family.name} GGUF, so llama.cpp would run "
                           f"the model without them; healed cut corrections (--heal) run in ONNX packages only: "
                           f"export --format onnx, or leave out --heal")
    out = {}
    if ckpt.spec.rope_scaling:  # llama.cpp divides each rope frequency by its factor in `rope_freqs`
        plain = inverse_frequencies(dataclasses.replace(ckpt.spec, rope_scaling=None))
        out["rope_freqs.weight"] = ((plain / inverse_frequencies(ckpt.spec)).astype(np.float32), None)
    for canonical, gguf_name in names.items():
        if canonical in packed:
            out[gguf_name] = (packed[canonical].data, packed[canonical].ggml_type)
            continue
        if canonical not in ckpt.weights:
            if canonical == "lm_head" and ckpt.spec.tie_embeddings:
                continue
            raise PackageError(f"checkpoint lacks weight {canonical!r} for block count "
                               f"{ckpt.spec.num_layers}; a pruned model must renumber its layers 0..n-1")
        w = gguf_layout(ckpt, canonical)
        # 1-D tensors (norms) stay F32, as llama.cpp expects
        out[gguf_name] = (np.ascontiguousarray(w, dtype=np.float32 if w.ndim == 1 else dtype), None)
    return out


def write_gguf(ckpt: Checkpoint, path: str | Path, dtype: str = "f32",
               packed: Mapping[str, PackedTensor] | None = None,
               file_type: gguf.LlamaFileType | None = None, progress: bool = False) -> Path:
    """Write `ckpt` as a GGUF file, atomically (a temporary sibling renamed when complete).

    Args:
        ckpt: the model; its ModelSpec decides the metadata (block count, heads, ...).
        path: the .gguf file to create (replaced if it exists).
        dtype: "f32" or "f16" for float matrices; 1-D tensors are always F32.
        packed: canonical weight name -> tensor already packed by `quant/` (in `gguf_layout`).
        file_type: `general.file_type` to record (default: from dtype); pass the quantized
            type when `packed` holds most of the weights.
        progress: show a progress bar on stderr.
    Returns:
        The path written.
    Raises:
        ValueError: unknown dtype. PackageError: a weight is missing or the tokenizer has no
            GGUF description.
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of: {', '.join(GGUF_DTYPES)}")
    np_dtype, default_type = GGUF_DTYPES[dtype]
    family = get_family(ckpt.spec.architecture)
    path = Path(path)
    tensors = _tensors(ckpt, np_dtype, packed or {})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=family.name)
        if "general.name" not in ckpt.gguf_metadata:
            writer.add_name(Path(str(ckpt.source.get("path", "model"))).stem)
        _add_metadata(writer, ckpt, file_type or default_type)
        for name, (array, raw_dtype) in tensors.items():
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s (%s, %d tensors, %d blocks)", path, dtype, len(tensors), ckpt.spec.num_layers)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
