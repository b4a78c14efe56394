"""Model files the peers need, made once from one GGUF and cached under $EDGE_RUN_HOME/bench/.

- a Hugging Face folder (config.json, model.safetensors, tokenizer files) holding the GGUF's
  dequantized weights: what transformers loads and onnxruntime-genai's model builder reads;
- onnxruntime-genai models built by its own builder from that folder (int4 / int8 / fp32);
- GGUF files at other llama.cpp precisions (F32 and F16 written by edge-run from the dequantized
  weights, Q8_0 / Q4_0 / ... made from the F32 file by llama.cpp's own quantizer).

Everything is keyed by the source file's path, size and mtime, so a changed source is rebuilt.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
ORTGENAI_PRECISIONS = ("int4", "int8", "fp16", "fp32")  # fp16: with execution_provider "cuda"
# llama.cpp precisions made from the float weights (names as llama.cpp's LLAMA_FTYPE_MOSTLY_*)
LLAMACPP_QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q6_K", "Q4_K_M")
LLAMACPP_FLOATS = ("F32", "F16")


def bench_cache(source: Path) -> Path:
    """The cache folder of artifacts made from checkpoint `source`."""
    from ..hub import cache_home, checkpoint_key

    return cache_home() / "bench" / checkpoint_key(source)


def _publish(tmp: Path, target: Path) -> Path:
    """Move a finished temporary folder or file into place (atomic: a half-built one never shows)."""
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    os.replace(tmp, target)
    return target


def hf_folder(gguf_path: Path) -> Path:
    """A Hugging Face folder with the GGUF's dequantized float32 weights (made once, cached).

    Raises:
        PackageError: the GGUF cannot be read, or its family has no Hugging Face names.
    """
    target = bench_cache(gguf_path) / "hf"
    if (target / "config.json").is_file():
        return target
    from ..export.checkpoint import load_checkpoint

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if load_checkpoint(gguf_path, weights=False).spec.architecture == "llama":
        write_hf_folder(load_checkpoint(gguf_path), tmp)
    else:
        save_with_transformers(Path(gguf_path), tmp)
    log.info("wrote a Hugging Face folder for %s to %s", gguf_path, target)
    return _publish(tmp, target)


def write_hf_folder(ckpt, folder: Path) -> None:
    """Write a Checkpoint as HF safetensors + config.json + tokenizer files into `folder`."""
    from safetensors.numpy import save_file

    from ..export.families import get_family, layer_names

    spec = ckpt.spec
    if spec.architecture != "llama":
        raise NotImplementedError(f"the Hugging Face folder writer knows llama models only, not "
                                  f"{spec.architecture!r}; hf_folder writes other families with transformers")
    names = layer_names(get_family(spec.architecture).hf_names, spec.num_layers)
    tensors = {names[k]: w for k, w in ckpt.weights.items() if not (k == "lm_head" and spec.tie_embeddings)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    token = ckpt.tokenizer.id_to_token
    eos = list(ckpt.eos_token_ids)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.context_length, "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": ckpt.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": eos[0] if eos else None,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ckpt.bos_token_id, "eos_token_id": config["eos_token_id"], "do_sample": False}, indent=2))
    ckpt.tokenizer.save(str(folder / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": spec.context_length,
                  "add_bos_token": ckpt.add_bos_token, "clean_up_tokenization_spaces": False,
                  "bos_token": token(ckpt.bos_token_id) if ckpt.bos_token_id is not None else None,
                  "eos_token": token(eos[0]) if eos else None, "pad_token": token(eos[0]) if eos else None}
    if ckpt.chat_template:
        tok_config["chat_template"] = ckpt.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def save_with_transformers(gguf_path: Path, folder: Path) -> None:
    """Write a GGUF of any family transformers' GGUF loader reads (Gemma 3, Qwen2, ...) as an HF folder:
    its dequantized float32 weights, config and tokenizer (transformers and torch: the bench extra)."""
    import torch
    import transformers

    kw = {"gguf_file": gguf_path.name}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kw)
    # the loader marks the model as GGUF-quantized (which save_pretrained refuses) though its weights
    # are dequantized: a plain model of the same config takes them
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(str(folder))
    del model
    transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw).save_pretrained(str(folder))


def ortgenai_model(gguf_path: Path, precision: str, execution_provider: str = "cpu") -> Path:
    """onnxruntime-genai's own model builder run on the HF folder (made once, cached), for
    `execution_provider` (its builder's `-e`: "cpu", or "cuda" for its CUDA fp16 / int4 graphs).

    Raises:
        ValueError: unknown precision.
        RuntimeError: the builder failed (its last output lines are in the message).
    """
    if precision not in ORTGENAI_PRECISIONS:
        raise ValueError(f"unknown onnxruntime-genai precision {precision!r}; choose from {ORTGENAI_PRECISIONS}")
    suffix = "" if execution_provider == "cpu" else f"-{execution_provider}"
    target = bench_cache(gguf_path) / f"ortgenai-{precision}{suffix}"
    if (target / "genai_config.json").is_file():
        return target
    source = hf_folder(gguf_path)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(tmp),
           "-p", precision, "-e", execution_provider, "-c", str(tmp.with_name(tmp.name + ".hfcache"))]
    log.info("building the onnxruntime-genai %s model: %s", precision, " ".join(cmd))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(tmp.with_name(tmp.name + ".hfcache"), ignore_errors=True)
    if result.returncode != 0 or not (tmp / "genai_config.json").is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"onnxruntime-genai's builder failed for {precision} (exit {result.returncode}):\n{tail}")
    return _publish(tmp, target)


def llamacpp_gguf(gguf_path: Path, kind: str) -> Path:
    """The model as a GGUF of llama.cpp precision `kind` ("source" = the file itself; cached).

    F32 / F16 are written by edge-run from the dequantized weights; quantized kinds come from
    llama.cpp's own quantizer run on the F32 file (its default recipe per type).

    Raises:
        ValueError: unknown kind. RuntimeError: llama.cpp's quantizer failed.
    """
    if kind == "source":
        return Path(gguf_path)
    if kind not in LLAMACPP_FLOATS + LLAMACPP_QUANTS:
        raise ValueError(f"unknown llama.cpp precision {kind!r}; choose source or one of "
                         f"{', '.join(LLAMACPP_FLOATS + LLAMACPP_QUANTS)}")
    target = bench_cache(gguf_path) / f"{Path(gguf_path).stem}.{kind}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    if kind in LLAMACPP_FLOATS:
        from ..export.checkpoint import load_checkpoint
        from ..export.gguf_writer import write_gguf

        write_gguf(load_checkpoint(gguf_path), tmp, dtype=kind.lower())
    else:
        # in a process of its own: llama.cpp logs every tensor to the terminal, and a crash stays there
        source = llamacpp_gguf(gguf_path, "F32")
        cmd = [sys.executable, "-m", "edgerun.bench.artifacts", "quantize", str(source), str(tmp), kind]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"llama.cpp could not quantize {source} to {kind} (exit {result.returncode}): {tail}")
    log.info("wrote %s", target)
    return _publish(tmp, target)


def _quantize(source: str, dest: str, kind: str) -> int:
    """llama.cpp's own quantizer (`export.package.llama_quantize`), its default recipe for `kind`; 0 on success."""
    import llama_cpp as llc

    from ..export.package import llama_quantize
    from ..runtime.manifest import PackageError

    try:
        llama_quantize(Path(source), Path(dest), getattr(llc, f"LLAMA_FTYPE_MOSTLY_{kind}"))
    except PackageError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "quantize":
    sys.exit(_quantize(*sys.argv[2:]))
