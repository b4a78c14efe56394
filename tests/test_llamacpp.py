"""The llama.cpp backend and the GGUF writer: same results as the ONNX path on the same weights.

Tiny random Llama models (fast) check logits, cache chunks, rollback, batches, pruned and F16
exports, the writer's round trip and bad input; the real SmolLM2 checks greedy output against the
fp32 ONNX package, batch invariance and the Q4_1 file's top-1 agreement with the float reference.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import build_tiny_llama, torch_logits

import edgerun
from edgerun.cli import main
from edgerun.export.checkpoint import Checkpoint, load_checkpoint
from edgerun.export.gguf_writer import write_gguf
from edgerun.export.package import write_package
from edgerun.export.pipeline import ExportOptions, export
from edgerun.hub import resolve_package
from edgerun.runtime.manifest import PackageError, read_manifest

TOKENS = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33]


pytestmark = pytest.mark.usefixtures("home")  # a private edge-run cache per test (conftest)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=5)


@pytest.fixture(scope="module")
def tiny_both(tiny_hf, tmp_path_factory) -> Path:
    """ONNX graphs and an F32 GGUF of the same tiny model in one package."""
    out = tmp_path_factory.mktemp("pkg") / "tiny-both"
    export(tiny_hf, out, ExportOptions(formats=("onnx", "gguf")))
    return out


@pytest.fixture(scope="module")
def tiny_llama(tiny_both):
    return edgerun.Engine(tiny_both, backend="llamacpp", max_context=64)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_both):
    return edgerun.Engine(tiny_both, backend="onnx", max_context=64)


def _step(engine, cache, tokens, positions=None):
    ids = np.asarray([tokens], dtype=np.int64)
    pos = np.arange(len(tokens))[None] if positions is None else np.asarray([positions])
    return engine.backend.forward(ids, cache, np.array([len(tokens)]), pos)[0]


# -- tiny models -----------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gguf_export_logits_match_onnx_and_transformers(tmp_path, tie):
    folder = build_tiny_llama(tmp_path / "hf", tie=tie, seed=3)
    export(folder, tmp_path / "pkg", ExportOptions(formats=("onnx", "gguf")))
    ours = edgerun.Engine(tmp_path / "pkg", backend="llamacpp").logits(TOKENS)
    onnx = edgerun.Engine(tmp_path / "pkg", backend="onnx").logits(TOKENS)
    np.testing.assert_allclose(ours, onnx, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, torch_logits(folder, TOKENS), atol=1e-4, rtol=0)


def test_package_with_only_a_gguf(tiny_hf, tmp_path):
    manifest = export(tiny_hf, tmp_path / "pkg", ExportOptions(formats=("gguf",)))
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["manifest.json", "model.gguf", "tokenizer.json"]
    assert manifest.stages == () and manifest.gguf == "model.gguf" and manifest.backends == ("llamacpp",)
    engine = edgerun.Engine(tmp_path / "pkg")  # auto: the only backend it has
    assert engine.backend.name == "llamacpp"
    with pytest.raises(PackageError, match="nothing for the onnx backend"):
        edgerun.Engine(tmp_path / "pkg", backend="onnx")


def test_cache_chunks_equal_one_pass(tiny_llama):
    full = tiny_llama.logits(TOKENS)
    cache = tiny_llama.backend.new_cache(1, 64)
    rows = [_step(tiny_llama, cache, TOKENS[:4])]
    rows += [_step(tiny_llama, cache, [t]) for t in TOKENS[4:7]]
    rows += [_step(tiny_llama, cache, TOKENS[7:])]
    np.testing.assert_allclose(np.concatenate(rows), full, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [len(TOKENS)]


def test_decode_split_over_several_llama_decode_calls(tiny_llama):
    cache = tiny_llama.backend.new_cache(2, 32)
    ids = np.array([TOKENS, TOKENS[::-1]], dtype=np.int64)
    positions = np.array([[10, 0, 3], [2, 9, 9]])
    whole = tiny_llama.backend.forward(ids, cache, np.array([11, 11]), positions)
    cache.reset()
    cache.n_batch = 4  # forces 6 llama_decode calls for 22 tokens
    split = tiny_llama.backend.forward(ids, cache, np.array([11, 11]), positions)
    np.testing.assert_allclose(split, whole, atol=1e-6, rtol=0)  # other GEMM shapes: last-bit differences


def test_logits_only_at_real_tokens(tiny_llama, tiny_onnx):
    """Rows with fewer tokens (or none) give zeros past their end; real ones match ONNX."""
    ids = np.array([TOKENS[:5], [9, 8, 0, 0, 0], [0] * 5], dtype=np.int64)
    counts, positions = np.array([5, 2, 0]), np.array([[4, 1], [1, 3], [0, 0]])
    ours = tiny_llama.backend.forward(ids, tiny_llama.backend.new_cache(3, 16), counts, positions)
    ref = tiny_onnx.backend.forward(ids, tiny_onnx.backend.new_cache(3, 16), counts, positions)
    assert ours.shape == (3, 2, tiny_llama.manifest.model.vocab_size)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[1, 0], ref[1, 0], atol=1e-4, rtol=0)
    assert not ours[1, 1].any() and not ours[2].any()


def test_rollback_then_decode_again_gives_identical_logits(tiny_llama):
    cache = tiny_llama.backend.new_cache(2, 64)
    ids = np.array([TOKENS[:6], TOKENS[3:9]], dtype=np.int64)
    tiny_llama.backend.forward(ids, cache, np.array([6, 4]), np.zeros((2, 1), np.int64))
    draft = np.array([[11, 12, 13], [14, 15, 16]], dtype=np.int64)
    first = tiny_llama.backend.forward(draft, cache, np.array([3, 3]), np.array([[0, 1, 2]] * 2))
    cache.rollback(np.array([6, 4]))
    assert cache.lengths.tolist() == [6, 4]
    other = tiny_llama.backend.forward(draft[:, ::-1].copy(), cache, np.array([3, 3]), np.array([[0, 1, 2]] * 2))
    cache.rollback(np.array([6, 4]))
    again = tiny_llama.backend.forward(draft, cache, np.array([3, 3]), np.array([[0, 1, 2]] * 2))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(other, first)


def test_batch_of_unequal_prompts_equals_single_rows(tiny_llama, tiny_onnx):
    prompts = [TOKENS[:3], TOKENS, TOKENS[2:8], TOKENS[5:]]
    batched = list(tiny_llama.generate(prompts, max_new_tokens=12))
    for row, prompt in enumerate(prompts):
        single = [r.token for r in tiny_llama.generate(prompt, max_new_tokens=12)]
        assert [r.token for r in batched if r.index == row] == single
        assert single == [r.token for r in tiny_onnx.generate(prompt, max_new_tokens=12)]


def test_context_limit_ends_with_length(tiny_both):
    engine = edgerun.Engine(tiny_both, backend="llamacpp", max_context=16)
    responses = list(engine.generate(TOKENS, max_new_tokens=50, ignore_eos=True))
    assert len(TOKENS) + len(responses) == 17
    assert responses[-1].finish_reason == "length"


def test_f16_export_runs_close_to_f32(tiny_hf, tiny_llama, tmp_path):
    export(tiny_hf, tmp_path / "f16", ExportOptions(formats=("gguf",), gguf_dtype="f16"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "f16" / "model.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert read_manifest(tmp_path / "f16").weights["attention"] == "float16"
    f16 = edgerun.Engine(tmp_path / "f16").logits(TOKENS)
    np.testing.assert_allclose(f16, tiny_llama.logits(TOKENS), atol=5e-3, rtol=0)


def _prune(ckpt: Checkpoint, keep: list[int]) -> Checkpoint:
    """Keep only `keep` blocks, renumbered 0..n-1 (what depth pruning hands the writer)."""
    import dataclasses

    weights = {k: v for k, v in ckpt.weights.items() if not k.startswith("layers.")}
    for new, old in enumerate(keep):
        prefix = f"layers.{old}."
        weights |= {f"layers.{new}.{k[len(prefix):]}": v for k, v in ckpt.weights.items() if k.startswith(prefix)}
    spec = dataclasses.replace(ckpt.spec, num_layers=len(keep))
    return dataclasses.replace(ckpt, spec=spec, weights=weights)


def test_depth_pruned_model_exports_renumbered_blocks(tiny_hf, tmp_path):
    pruned = _prune(load_checkpoint(tiny_hf), [0, 3])
    write_package(pruned, tmp_path / "pkg", formats=("onnx", "gguf"))
    reader = gguf.GGUFReader(tmp_path / "pkg" / "model.gguf")
    assert reader.get_field("llama.block_count").contents() == 2
    assert {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")} == {"0", "1"}
    ours = edgerun.Engine(tmp_path / "pkg", backend="llamacpp").logits(TOKENS)
    np.testing.assert_allclose(ours, edgerun.Engine(tmp_path / "pkg", backend="onnx").logits(TOKENS), atol=1e-4, rtol=0)


def test_gguf_round_trip_from_hf(tiny_hf, tiny_both, tmp_path):
    """HF -> GGUF -> checkpoint: same weights, spec, tokenizer; and GGUF -> GGUF keeps every key."""
    src = load_checkpoint(tiny_hf)
    back = load_checkpoint(tiny_both / "model.gguf")
    assert back.weights.keys() == src.weights.keys()
    for name, w in src.weights.items():
        np.testing.assert_array_equal(back.weights[name], w, err_msg=name)
    assert back.spec.num_layers == src.spec.num_layers and back.spec.head_dim == src.spec.head_dim
    assert back.chat_template == src.chat_template and back.eos_token_ids == src.eos_token_ids
    text = "the quick brown fox 123 edge run, it's 'll  spaces\n"
    assert back.tokenizer.encode(text).ids == src.tokenizer.encode(text).ids
    write_gguf(back, tmp_path / "again.gguf")
    first, second = gguf.GGUFReader(tiny_both / "model.gguf"), gguf.GGUFReader(tmp_path / "again.gguf")
    assert {k: f.contents() for k, f in first.fields.items()} == {k: f.contents() for k, f in second.fields.items()}
    for a, b in zip(first.tensors, second.tensors, strict=True):
        assert a.name == b.name and a.tensor_type == b.tensor_type
        np.testing.assert_array_equal(a.data, b.data)


# -- loading paths and bad input ----------------------------------------------------------------
def test_gguf_path_loads_on_llamacpp_without_copying(tiny_both, home):
    engine = edgerun.load(tiny_both / "model.gguf", max_context=64)
    assert engine.backend.name == "llamacpp"
    assert engine.package_dir.parent == home / "packages"
    assert engine.manifest.gguf == str((tiny_both / "model.gguf").resolve())
    assert engine.manifest.stages == ()
    assert sorted(p.name for p in engine.package_dir.iterdir()) == ["manifest.json", "tokenizer.json"]
    assert resolve_package(tiny_both / "model.gguf") == engine.package_dir  # made once, reused


def test_backend_choice_when_resolving_checkpoints(tiny_hf, tiny_both):
    onnx = read_manifest(resolve_package(tiny_both / "model.gguf", backend="onnx"))
    assert onnx.backends == ("onnx",)
    assert read_manifest(resolve_package(tiny_hf)).backends == ("onnx",)
    assert read_manifest(resolve_package(tiny_hf, backend="llamacpp")).backends == ("llamacpp",)
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        resolve_package(tiny_hf, backend="tensorrt")


def _rename_architecture(src: Path, dest: Path, arch: str) -> Path:
    """Copy a GGUF, declaring another architecture (its keys renamed to match)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dest, arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        types = field.types
        writer.add_key_value(key.replace("llama.", f"{arch}.", 1), field.contents(), types[0],
                             sub_type=types[-1] if len(types) > 1 else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def test_unknown_architecture_is_a_clear_error(tiny_both, tmp_path):
    path = _rename_architecture(tiny_both / "model.gguf", tmp_path / "odd.gguf", "frobnicator")
    with pytest.raises(PackageError,
                       match=r"llama\.cpp cannot load .*odd\.gguf.*unknown model architecture: 'frobnicator'"):
        edgerun.load(path)


def test_truncated_gguf_is_a_clear_error(tiny_both, tmp_path):
    data = (tiny_both / "model.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(PackageError, match=r"cut\.gguf.*(truncated|corrupt|cannot load)"):
        edgerun.load(tmp_path / "cut.gguf")
    # a package whose GGUF was cut after the package was written: llama.cpp's own check
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_both, pkg)
    (pkg / "model.gguf").write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(PackageError, match=r"llama\.cpp cannot load .*model\.gguf"):
        edgerun.Engine(pkg, backend="llamacpp")


def test_unknown_device_for_llamacpp(tiny_both):
    with pytest.raises(ValueError, match="not one llama.cpp runs on"):
        edgerun.Engine(tiny_both, backend="llamacpp", device="coreml")


# -- command line ---------------------------------------------------------------------------------
def test_cli_export_gguf_and_run_it(tiny_hf, tmp_path, capsys):
    assert main(["export", str(tiny_hf), "--format", "gguf", "--dtype", "f16", "-o", str(tmp_path / "g")]) == 0
    assert "model.gguf (f16)" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "g")
    assert manifest.gguf == "model.gguf" and manifest.stages == ()
    assert main(["run", str(tmp_path / "g" / "model.gguf"), "the quick", "--raw", "-n", "4"]) == 0
    assert main(["run", str(tmp_path / "g"), "the quick", "--raw", "-n", "4", "--backend", "llamacpp"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "g")]) == 0
    assert "backends       llamacpp" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx", "--dtype", "f16"], "--dtype f16 applies to GGUF only"),
    (["--format", "tflite"], "--format must be onnx, gguf or onnx,gguf"),
    (["--format", "gguf", "--stage-boundaries", "2"], "split ONNX graphs"),
])
def test_cli_export_rejects_bad_format_flags(tiny_hf, tmp_path, capsys, argv, message):
    assert main(["export", str(tiny_hf), "-o", str(tmp_path / "x"), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- the real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_llama(smollm2_package):
    """Our F32 GGUF export of SmolLM2 on llama.cpp (same weights as smollm2_engine's ONNX graphs)."""
    return edgerun.Engine(smollm2_package, backend="llamacpp", max_context=512)


@pytest.mark.slow
def test_f32_gguf_greedy_equals_fp32_onnx(smollm2_engine, smollm2_llama, chat_prompts):
    for tokens in chat_prompts:
        onnx = [r.token for r in smollm2_engine.generate(tokens, max_new_tokens=32)]
        assert [r.token for r in smollm2_llama.generate(tokens, max_new_tokens=32)] == onnx
    np.testing.assert_allclose(smollm2_llama.logits(chat_prompts[0]), smollm2_engine.logits(chat_prompts[0]),
                               atol=2e-3, rtol=0)


@pytest.mark.slow
def test_gguf_written_from_gguf_keeps_tensors_tokenizer_metadata(smollm2_gguf, smollm2_package):
    original, ours = gguf.GGUFReader(smollm2_gguf), gguf.GGUFReader(smollm2_package / "model.gguf")
    kept = {k: f.contents() for k, f in original.fields.items()
            if k.startswith(("tokenizer.", "llama.")) or k in ("general.architecture", "general.name")}
    written = {k: f.contents() for k, f in ours.fields.items()}
    assert {k: written.get(k) for k in kept} == kept
    assert written["general.file_type"] == 0  # ALL_F32
    theirs = {t.name: t for t in original.tensors}
    assert sorted(theirs) == sorted(t.name for t in ours.tensors)
    for t in ours.tensors:  # same layout (Q/K permutation re-applied), dequantized values equal
        src = theirs[t.name]
        np.testing.assert_array_equal(t.data, gguf.quants.dequantize(src.data, src.tensor_type), err_msg=t.name)


@pytest.mark.slow
def test_q4_1_gguf_batch4_equals_batch1_and_agrees_with_float(smollm2_gguf, smollm2_engine, chat_prompts):
    engine = edgerun.load(smollm2_gguf, max_context=1024)  # the user's file, as `edge-run run` loads it
    assert engine.backend.name == "llamacpp"
    group = chat_prompts[:4]
    batched = list(engine.generate(group, max_new_tokens=32))
    for row, tokens in enumerate(group):
        assert [r.token for r in batched if r.index == row] == \
            [r.token for r in engine.generate(tokens, max_new_tokens=32)]
    from edgerun import data

    text = data.wikitext("test")[:20000]
    tokens = smollm2_engine.encode(text)[:512]
    reference = smollm2_engine.logits(tokens).argmax(-1)  # fp32 ONNX of the dequantized Q4_1 weights
    agreement = float((engine.logits(tokens).argmax(-1) == reference).mean())
    print(f"\nQ4_1 GGUF on llama.cpp: top-1 agreement with the fp32 reference (dequantized Q4_1 weights, "
          f"ONNX) over {len(tokens)} WikiText-2 test tokens: {agreement:.4f}")
    assert agreement >= 0.8


def test_load_gguf_with_onnx_backend_exports_onnx(tiny_both, home):
    """`backend="onnx"` keeps the old path for a GGUF: an fp32 ONNX package exported once."""
    engine = edgerun.load(tiny_both / "model.gguf", backend="onnx", max_context=64)
    assert engine.backend.name == "onnx" and engine.manifest.stages
    assert engine.package_dir.name.endswith("-fp32")


@pytest.mark.slow
def test_lookup_speculation_on_the_f32_gguf_equals_plain(smollm2_llama, chat_prompts):
    """With F32 weights and the default F32 KV cache, llama.cpp's logits for a chunk of k tokens
    match k single steps to ~3e-5, and verification reproduces plain greedy (quantized types do
    not guarantee it: see `inexact_verification_types`)."""
    engine = smollm2_llama
    for tokens in chat_prompts:
        plain = [r.token for r in engine.generate(tokens, max_new_tokens=64)]
        assert [r.token for r in engine.generate(tokens, max_new_tokens=64, speculative="lookup")] == plain
    group = chat_prompts[:4]
    plain = [[r.token for r in engine.generate(group, max_new_tokens=64) if r.index == i] for i in range(4)]
    spec = list(engine.generate(group, max_new_tokens=64, speculative="lookup"))
    assert [[r.token for r in spec if r.index == i] for i in range(4)] == plain


def test_kv_cache_type_choice(tiny_both):
    half = edgerun.Engine(tiny_both, backend="llamacpp", max_context=64, kv_cache="f16")
    assert (half.backend.kv_bytes_per_token * 2
            == edgerun.Engine(tiny_both, backend="llamacpp").backend.kv_bytes_per_token)
    np.testing.assert_allclose(half.logits(TOKENS), edgerun.Engine(tiny_both, backend="llamacpp").logits(TOKENS),
                               atol=5e-2, rtol=0)
    with pytest.raises(ValueError, match="ONNX package's KV cache is f32.*export with --kv-cache f16"):
        edgerun.Engine(tiny_both, backend="onnx", kv_cache="f16")
    with pytest.raises(ValueError, match="kv_cache must be one of f32, f16, q8_0"):
        edgerun.Engine(tiny_both, backend="llamacpp", kv_cache="q8")


@pytest.mark.slow
def test_q8_0_kv_cache_on_llamacpp(smollm2_llama, smollm2_package, chat_prompts):
    """q8_0 K/V (llama.cpp's flash attention) holds 34/128 of the f32 cache's bytes, decodes close to
    it, and is refused where batch-invariant steps are needed; ONNX packages do not have it."""
    q8 = edgerun.Engine(smollm2_package, backend="llamacpp", max_context=256, kv_cache="q8_0")
    assert q8.backend.kv_bytes_per_token * 128 == smollm2_llama.backend.kv_bytes_per_token * 34
    tokens = chat_prompts[0]
    full, quant = smollm2_llama.logits(tokens), q8.logits(tokens)
    assert (full.argmax(-1) == quant.argmax(-1)).mean() > 0.9
    greedy = [r.token for r in q8.generate(tokens, max_new_tokens=16)]
    assert greedy[:4] == [r.token for r in smollm2_llama.generate(tokens, max_new_tokens=4)]
    with pytest.raises(ValueError, match="q8_0 KV cache needs llama.cpp's flash attention.*--kv-cache f16 or f32"):
        edgerun.Engine(smollm2_package, backend="llamacpp", kv_cache="q8_0", batch_invariant=True)
    with pytest.raises(ValueError, match="ONNX packages have f32 or f16"):
        edgerun.Engine(smollm2_package, backend="onnx", kv_cache="q8_0")
