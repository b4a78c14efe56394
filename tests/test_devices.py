"""Device profiles (devices/profiles.json): selection, export variants, mobile ORT format, fallback, placement."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.cli import main
from edgerun.devices.profiles import check_package_device, load_profiles
from edgerun.devices.providers import DEVICES, LLAMACPP_GPU_DEVICES, llamacpp_offload, resolve_device
from edgerun.export.pipeline import ExportOptions, export
from edgerun.runtime.manifest import Manifest, PackageError, read_manifest

TOKENS = [1, 5, 9, 33, 70, 120, 7, 250, 64]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-dev", seed=5, initializer_range=0.2)


@pytest.fixture(scope="module")
def android_int4(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "android"
    export(tiny_hf, out, ExportOptions(quant="int4", device="android"))
    return out


# -- the profile table ---------------------------------------------------------------------------------
def test_profiles_are_the_one_device_table():
    profiles = load_profiles()
    assert {"cpu", "cuda", "webgpu", "openvino", "android", "ios", "vulkan", "metal"} <= set(profiles)
    # providers.DEVICES is derived from the profiles: every onnx profile, nothing else
    assert list(DEVICES) == [name for name, p in profiles.items() if p.onnx]
    for name, device in DEVICES.items():
        assert device.provider == profiles[name].provider and device.options == profiles[name].options
    assert set(LLAMACPP_GPU_DEVICES) == {"cuda", "vulkan", "metal"}
    cpu = profiles["cpu"]
    assert cpu.variant.accuracy_level == 4 and cpu.kv_cache == "host"
    assert cpu.runs_op("GroupQueryAttention") and not profiles["cuda"].runs_op("GroupQueryAttention", "float32")
    assert profiles["cuda"].runs_op("GroupQueryAttention", "float16")
    assert not profiles["coreml"].ops and profiles["android"].variant.ort_format
    assert "ORT format" in profiles["ios"].describe() and "GGML_VULKAN" in profiles["vulkan"].describe()


def test_malformed_profile_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"profiles": [{"name": "x", "backends": ["onnx"], "provider": "P", "colour": 1}]}))
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        load_profiles(bad)
    bad.write_text(json.dumps({"profiles": [{"name": "x", "backends": ["onnx"], "provider": "P",
                                             "variant": {"dtype": "float8"}}]}))
    with pytest.raises(ValueError, match="variant dtype must be one of"):
        load_profiles(bad)


def test_device_selection_and_its_errors():
    from edgerun.devices.providers import available_devices

    present = available_devices()
    assert resolve_device("auto").name == next(n for n in present if load_profiles()[n].auto)  # cpu at the latest
    assert "cpu" in present and "vulkan" not in present
    assert resolve_device("android").provider == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="llama.cpp GPU backend; run a GGUF package with --backend llamacpp"):
        resolve_device("vulkan")
    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="install onnxruntime-openvino in place of onnxruntime"):
            resolve_device("openvino")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_llamacpp_gpu_offload_error_names_the_cmake_args():
    with pytest.raises(ValueError, match=r'CMAKE_ARGS="-DGGML_VULKAN=on" pip install --force-reinstall'):
        llamacpp_offload("vulkan", gpu_available=False)
    with pytest.raises(ValueError, match="-DGGML_METAL=on"):
        llamacpp_offload("metal", gpu_available=False)
    assert llamacpp_offload("cuda", gpu_available=True) and not llamacpp_offload("cpu", gpu_available=True)
    # a GPU build of another backend: the system info line names the backends llama.cpp was built with
    cuda_build = "CPU : AVX2 = 1 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 |"
    assert llamacpp_offload("cuda", True, cuda_build)
    with pytest.raises(ValueError, match=r'without the vulkan backend; rebuild it with CMAKE_ARGS="-DGGML_VULKAN=on"'):
        llamacpp_offload("vulkan", True, cuda_build)
    with pytest.raises(ValueError, match="not one llama.cpp runs on"):
        llamacpp_offload("openvino", gpu_available=True)


def test_llamacpp_device_without_gpu_build_fails_in_one_line(tiny_hf, tmp_path, capsys):
    import llama_cpp

    export(tiny_hf, tmp_path / "g", ExportOptions(formats=("gguf",)))
    status = main(["run", str(tmp_path / "g"), "hi", "-n", "2", "--device", "vulkan"])
    err = capsys.readouterr().err
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python was built with GPU offload")
    assert status == 1 and err.count("\n") == 1 and 'CMAKE_ARGS="-DGGML_VULKAN=on"' in err


# -- export variants, the manifest record, loading elsewhere -------------------------------------------------
def test_export_records_the_profile_and_its_variant(tiny_hf, tmp_path):
    export(tiny_hf, tmp_path / "cuda", ExportOptions(quant="int4", device="cuda"))
    manifest = read_manifest(tmp_path / "cuda")
    assert manifest.device == "cuda" and manifest.quantization["accuracy_level"] == 0
    # (onnx.checker cannot take these graphs: SimplifiedLayerNormalization is onnxruntime's op in the
    # default domain, as in onnxruntime-genai's graphs; onnxruntime itself loads them below and in the engine)
    model = onnx.load(str(tmp_path / "cuda" / "stage0.onnx"))
    ort.InferenceSession(str(tmp_path / "cuda" / "stage0.onnx"), providers=["CPUExecutionProvider"])
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {0}
    # the GPU-resident variant: fp16 GroupQueryAttention (casts around it) over an fp16 KV cache
    assert manifest.model.kv_dtype == "float16"
    past = [v for v in model.graph.input if v.name.startswith("past_")]
    assert past and {v.type.tensor_type.elem_type for v in past} == {onnx.TensorProto.FLOAT16}
    casts = {n.output[0] for n in model.graph.node if n.op_type == "Cast"}
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == manifest.model.num_layers and all(n.input[0] in casts for n in attention)
    export(tiny_hf, tmp_path / "float-ov", ExportOptions(device="openvino"))  # float packages take a profile too
    assert read_manifest(tmp_path / "float-ov").device == "openvino"
    assert not read_manifest(tmp_path / "float-ov").ort_models


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "unknown --device 'tpu'; export builds ONNX variants for --device cuda"),
    (["--device", "vulkan"], "vulkan is a llama.cpp GPU backend: export --format gguf"),
    (["--device", "android", "--format", "gguf"], "add onnx to --format"),
    (["--accuracy-level", "2"], "use it with --quant and --format onnx"),
    (["--device", "cuda", "--kv-cache", "f32"], "--device cuda builds a f16 KV cache (CUDAExecutionProvider has no "
                                                "float32 GroupQueryAttention kernel)"),
])
def test_bad_export_device_is_a_one_line_error(tiny_hf, tmp_path, capsys, argv, message):
    assert main(["export", str(tiny_hf), "-o", str(tmp_path / "x"), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_old_manifests_load_and_bad_device_fields_are_refused(android_int4):
    data = json.loads((android_int4 / "manifest.json").read_text())
    old = {k: v for k, v in data.items() if k not in ("device", "ort_models", "required_operators")}
    assert Manifest.from_dict(old).device is None  # made before profiles: the cpu variant
    with pytest.raises(PackageError, match="device must be null or a device profile"):
        Manifest.from_dict({**data, "device": "vulkan"})
    with pytest.raises(PackageError, match="ort_models must be one ORT-format file per stage"):
        Manifest.from_dict({**data, "ort_models": ["a.ort", "b.ort"]})


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="the CUDA provider is here")
def test_cuda_without_its_provider_is_a_one_line_error(android_int4):
    with pytest.raises(ValueError, match="device 'cuda' needs CUDAExecutionProvider, which this onnxruntime build "
                                         "lacks .*install onnxruntime-gpu"):
        edgerun.Engine(android_int4, device="cuda", max_context=32)


def test_package_on_another_device_is_a_logged_fallback(android_int4, caplog):
    assert check_package_device("cpu", "cpu") is None and check_package_device(None, "cpu") is None
    note = check_package_device("cuda", "cpu")
    assert "built for device 'cuda'" in note and "export with --device cpu" in note
    with pytest.raises(ValueError, match="runs GGUF packages on llama.cpp only"):
        check_package_device("cpu", "vulkan")
    with caplog.at_level(logging.WARNING, "edgerun"):
        edgerun.Engine(android_int4, device="cpu", max_context=32)
    assert "package built for device 'android'" in caplog.text


# -- mobile: ORT format --------------------------------------------------------------------------------
def test_android_package_has_ort_models_that_match_the_onnx_graphs(android_int4):
    manifest = read_manifest(android_int4)
    assert manifest.device == "android" and manifest.ort_models == ("stage0.ort",)
    config = (android_int4 / manifest.required_operators).read_text()
    assert "com.microsoft;1;" in config and "MatMulNBits" in config and "GroupQueryAttention" in config
    assert str(android_int4.parent) not in config  # no temporary paths in the shipped file
    # onnxruntime loads the .ort file itself
    session = ort.InferenceSession(str(android_int4 / "stage0.ort"), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} >= {"input_ids", "seqlens_k", "past_key_0"}
    # the engine on the android profile runs the ORT-format graphs; logits equal the ONNX graphs'
    mobile = edgerun.Engine(android_int4, device="android", max_context=32)
    assert mobile.backend.sessions[0]._model_path.endswith("stage0.ort")
    desktop = edgerun.Engine(android_int4, device="cpu", max_context=32)
    assert desktop.backend.sessions[0]._model_path.endswith("stage0.onnx")
    np.testing.assert_allclose(mobile.logits(TOKENS), desktop.logits(TOKENS), rtol=1e-4, atol=1e-4)
    assert mobile.complete("the quick", max_new_tokens=8) == desktop.complete("the quick", max_new_tokens=8)


def test_ort_model_leading_outside_the_package_is_refused(android_int4, tmp_path):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(android_int4, copy)
    data = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**data, "ort_models": ["../../elsewhere.ort"]}))
    with pytest.raises(PackageError, match=r"ort_models\[0\] '../../elsewhere.ort' resolves to .* outside the package"):
        read_manifest(copy)


# -- edge-run devices: onnxruntime's own placement ------------------------------------------------------
def test_devices_lists_targets_and_the_package_node_split(android_int4, capsys):
    assert main(["devices", str(android_int4)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:14] if line.strip()}
    assert set(load_profiles()) <= set(rows)
    assert rows["cpu"].split()[2] == "yes" and f" {ort.__version__} " in rows["cpu"]
    assert "llama-cpp-python" in rows["vulkan"] and "onnxruntime-openvino" in rows["openvino"]
    assert "built for device 'android'" in out and "ORT format" in out
    # the CPU provider's count is onnxruntime's node count after its basic optimizations
    from edgerun.devices.inventory import node_placement

    placed = node_placement([android_int4 / "stage0.onnx"], "CPUExecutionProvider")
    graph_nodes = len(onnx.load(str(android_int4 / "stage0.onnx"), load_external_data=False).graph.node)
    assert 0 < placed.nodes <= graph_nodes and placed.share == 1.0
    assert f"CPUExecutionProvider: runs 100% of {placed.nodes} nodes" in out


def test_placement_of_a_provider_that_cannot_load_is_a_clear_error(tmp_path):
    from edgerun.devices.inventory import node_placement

    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ValueError, match="CPUExecutionProvider cannot load .*bad.onnx"):
        node_placement([tmp_path / "bad.onnx"], "CPUExecutionProvider")


# -- OpenVINO (onnxruntime-openvino, installed in place of onnxruntime) -------------------------------------
needs_openvino = pytest.mark.skipif("OpenVINOExecutionProvider" not in ort.get_available_providers(),
                                    reason="OpenVINOExecutionProvider absent: onnxruntime-openvino is not the "
                                           "installed onnxruntime (it replaces the onnxruntime module; use a venv)")


@needs_openvino
@pytest.mark.parametrize("quant", [None, "int4"])
def test_openvino_greedy_parity_with_cpu(tiny_hf, tmp_path, quant):
    export(tiny_hf, tmp_path / "ov", ExportOptions(quant=quant, device="openvino"))
    openvino = edgerun.Engine(tmp_path / "ov", device="openvino", max_context=64)
    cpu = edgerun.Engine(tmp_path / "ov", device="cpu", max_context=64)
    np.testing.assert_allclose(openvino.logits(TOKENS), cpu.logits(TOKENS), rtol=1e-3, atol=1e-3)
    assert openvino.complete("the quick", max_new_tokens=24) == cpu.complete("the quick", max_new_tokens=24)
    from edgerun.devices.inventory import node_placement

    placed = node_placement([tmp_path / "ov" / "stage0.onnx"], "OpenVINOExecutionProvider", {"device_type": "CPU"})
    # onnxruntime-openvino 1.24: GroupQueryAttention (one per layer) stays on the CPU provider
    assert 0.5 < placed.share < 1.0 and placed.on_cpu >= 4 and placed.subgraphs >= 1


# -- memory budget -------------------------------------------------------------------------------------
def test_parse_size():
    from edgerun.runtime.memory import parse_size

    assert parse_size("400MB") == 400_000_000 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("512MiB") == 512 << 20 and parse_size("300m") == 300_000_000 and parse_size(4096) == 4096
    for bad in ("4x", "-3MB", "", "MB", "0"):
        with pytest.raises(ValueError, match="--max-memory must be a size such as 400MB"):
            parse_size(bad)


def test_fit_memory_picks_the_longest_context_and_kv_type_that_fit():
    from edgerun.runtime.memory import MB, activation_bytes, fit_memory, memory_need

    spec = read_manifest_spec()
    loaded = 100 * 10**6
    need_1024 = memory_need(spec, loaded, 1024)
    assert need_1024.total == loaded + spec.kv_bytes(1, 1025) + activation_bytes(spec, 1024)
    fit = fit_memory(spec, need_1024.total, loaded)
    assert (fit.max_context, fit.kv_cache) == (1024, "f32") and fit.total <= need_1024.total
    assert fit_memory(spec, need_1024.total - 1, loaded).max_context == 512
    # an f16 KV cache (llama.cpp) is taken when it fits a longer context than f32 does
    f16 = memory_need(spec, loaded, 2048, "f16")
    assert memory_need(spec, loaded, 2048, "f32").total > f16.total
    fit = fit_memory(spec, f16.total, loaded, ("f32", "f16"))
    assert (fit.max_context, fit.kv_cache) == (2048, "f16")
    # and q8_0 (34 bytes per 32 values) where neither does
    q8 = memory_need(spec, loaded, 2048, "q8_0")
    assert q8.kv_bytes == spec.kv_bytes(1, 2049, 34 / 32) < f16.kv_bytes
    fit = fit_memory(spec, q8.total, loaded, ("f32", "f16", "q8_0"))
    assert (fit.max_context, fit.kv_cache) == (2048, "q8_0")
    assert fit_memory(spec, 10**12, loaded, max_context=300).max_context == 300  # the caller's cap
    smallest = memory_need(spec, loaded, 128)
    with pytest.raises(ValueError, match=rf"nothing fits --max-memory 100 MB: the smallest fit needs "
                                         rf"{smallest.total / MB:.0f} MB .* at 128 tokens\); raise --max-memory to"):
        fit_memory(spec, loaded, loaded)


def read_manifest_spec():
    from edgerun.runtime.manifest import ModelSpec

    return ModelSpec(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                     num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5,
                     context_length=8192)  # SmolLM2-135M's shapes


def test_engine_max_memory_sets_the_context_and_refuses_in_one_line(android_int4, capsys):
    engine = edgerun.Engine(android_int4, max_memory=500 * 10**6)
    assert engine.max_context == 256 and engine.memory_fit.max_context == 256  # the model's own context
    loaded = engine.memory_fit.loaded
    assert loaded >= engine.backend.weight_bytes  # measured after load, never below the weights
    from edgerun.runtime.memory import fit_memory

    budget = loaded + 1_500_000  # the context then depends on what this load measured: checked against it
    small = edgerun.Engine(android_int4, max_memory=budget)
    assert small.memory_fit == fit_memory(small.manifest.model, budget, small.memory_fit.loaded, ("f32",), 256)
    assert small.memory_fit.total <= budget and small.max_context == small.memory_fit.max_context
    assert small.complete("the quick", max_new_tokens=4)
    assert main(["run", str(android_int4), "hi", "-n", "2", "--max-memory", "50KB"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing fits --max-memory 0 MB" in err and "raise --max-memory to" in err


def test_info_prints_the_memory_need(android_int4, capsys):
    assert main(["info", str(android_int4)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("memory need"))
    assert " MB at 256 tokens (weights" in line


# -- WebGPU (onnxruntime-ep-webgpu plugin EP; needs a Vulkan adapter) -------------------------------------
def _webgpu_present() -> bool:
    from edgerun.devices.providers import available_devices

    return "webgpu" in available_devices()


needs_webgpu = pytest.mark.skipif(not _webgpu_present(), reason="no WebGPU device: onnxruntime-ep-webgpu is not "
                                  "installed or Dawn finds no adapter (software Vulkan: mesa lavapipe >= 24 and "
                                  "ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER=1; see README, Devices)")


@needs_webgpu
@pytest.mark.parametrize("quant", [None, "int4"])
def test_webgpu_greedy_parity_with_cpu(tiny_hf, tmp_path, quant):
    export(tiny_hf, tmp_path / "w", ExportOptions(quant=quant, device="webgpu"))
    webgpu = edgerun.Engine(tmp_path / "w", device="webgpu", max_context=64)
    assert webgpu.backend.sessions[0].get_providers()[0] == "WebGpuExecutionProvider"
    cpu = edgerun.Engine(tmp_path / "w", device="cpu", max_context=64)
    np.testing.assert_allclose(webgpu.logits(TOKENS), cpu.logits(TOKENS), rtol=1e-3, atol=1e-3)
    # decode steps after the first read the KV cache bound again (onnxruntime copies inputs at binding)
    assert webgpu.complete("the quick", max_new_tokens=24) == cpu.complete("the quick", max_new_tokens=24)
    from edgerun.devices.inventory import node_placement

    placed = node_placement([tmp_path / "w" / "stage0.onnx"], "WebGpuExecutionProvider", {}, "onnxruntime_ep_webgpu")
    assert placed.share > 0.9


def test_export_max_memory_records_the_fit_or_refuses(tiny_hf, tmp_path, capsys):
    assert main(["export", str(tiny_hf), "-o", str(tmp_path / "fits"), "--quant", "int4", "--max-memory", "50MB"]) == 0
    assert "fits --max-memory 50 MB at up to 256 tokens" in capsys.readouterr().err
    fit = read_manifest(tmp_path / "fits").extra["memory_budget"]
    assert fit["bytes"] == 50_000_000 and fit["max_context"] == 256 and fit["need"] <= 50_000_000
    assert main(["export", str(tiny_hf), "-o", str(tmp_path / "no"), "--max-memory", "300KB"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edge-run:")]
    assert len(errors) == 1 and "nothing fits --max-memory 0 MB: the smallest fit needs" in errors[0]
    assert not (tmp_path / "no").exists() and not list(tmp_path.glob(".no.*"))  # nothing left behind
    with pytest.raises(ValueError, match="--max-memory must be a size"):
        ExportOptions(max_memory="lots")


def test_rebinding_every_step_for_providers_with_their_own_memory_decodes_the_same(android_int4):
    """A GPU provider gets a copy of a host input when it is bound, so the backend binds the KV cache and
    the small inputs again every step there; on the CPU provider that path must give the same tokens."""
    import dataclasses

    plain = edgerun.Engine(android_int4, max_context=64)
    rebinding = edgerun.Engine(android_int4, max_context=64)
    rebinding.backend.device = dataclasses.replace(rebinding.backend.device, host_inputs=False)
    for prompts in (["the quick"], ["the quick", "edge run exports"]):
        assert [r.token for r in rebinding.generate(prompts, max_new_tokens=12)] == \
            [r.token for r in plain.generate(prompts, max_new_tokens=12)]
    prompt = ["the quick brown fox the quick brown"]  # speculation verifies several tokens per step
    assert [r.token for r in rebinding.generate(prompt, max_new_tokens=12, speculative="lookup")] == \
        [r.token for r in plain.generate(prompt, max_new_tokens=12)]
