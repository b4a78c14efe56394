"""The benchmark harness: statistics, bandwidth, weight accounting, prompts, worker protocol,
failure reporting, and a smoke run on the real model against every installed peer."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os

import numpy as np
import pytest

from edgerun.bench import harness, stats, weights, worker


# -- statistics ---------------------------------------------------------------------------
@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 1, 17) ** 2)])
@pytest.mark.parametrize("q", [0, 10, 50, 90, 100])
def test_percentile_matches_numpy(values, q):
    assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summarize_and_bad_input():
    assert stats.summarize([3.0, 1.0, 2.0, 10.0]) == {"min": 1.0, "median": 2.5, "max": 10.0, "n": 4}
    with pytest.raises(ValueError, match="no values"):
        stats.summarize([])
    with pytest.raises(ValueError, match="0..100"):
        stats.percentile([1.0], 101)


def test_timing_record_batch_1():
    # 100-token prompt; first token at 0.5 s, then steps of 0.1, 0.1, 0.1, 0.2 s
    record = stats.TimingRecord(prompt_tokens=100, batch=1, stamps=(0.5, 0.6, 0.7, 0.8, 1.0))
    figures = record.figures()
    assert figures["ttft_ms"] == pytest.approx(500)
    assert figures["prefill_tok_s"] == pytest.approx(200)
    assert figures["decode_tok_s"] == pytest.approx(4 / 0.5)
    assert figures["total_tok_s"] == pytest.approx(5.0)
    assert figures["itl_ms_median"] == pytest.approx(100)
    assert figures["itl_ms_p90"] == pytest.approx(float(np.percentile([100, 100, 100, 200], 90)))


def test_timing_record_batch_steps():
    # batch 2, each step's two tokens reported at the same time
    record = stats.TimingRecord(prompt_tokens=10, batch=2, stamps=(0.2, 0.2, 0.3, 0.3, 0.4, 0.4))
    assert record.new_tokens == 3
    assert record.ttft_s == pytest.approx(0.2)
    assert record.prefill_tok_s == pytest.approx(2 * 10 / 0.2)
    assert record.decode_tok_s == pytest.approx(4 / 0.2)
    assert record.inter_token_s() == pytest.approx([0.1, 0.1])


def test_timing_record_rejects_bad_records():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        stats.TimingRecord(prompt_tokens=4, batch=1, stamps=(0.1,))
    with pytest.raises(ValueError, match="must not decrease"):
        stats.TimingRecord(prompt_tokens=4, batch=1, stamps=(0.2, 0.1))


def _synthetic_run(weight_bytes: int = 100_000_000) -> tuple[harness.EngineRun, list[harness.Case]]:
    spec = harness.EngineSpec("fake int4", "edgerun", "int4", prepare=lambda: "x", ours=True)
    run = harness.EngineRun(spec, status="ok", model="x",
                            info={"weight_bytes_per_token": weight_bytes, "file_bytes": 123_000_000, "batch": False})
    case = harness.Case("prompt_100", [[1] * 100], new_tokens=5)
    for stamps in [(0.5, 0.6, 0.7, 0.8, 0.9), (0.5, 0.55, 0.6, 0.65, 0.7), (0.5, 0.7, 0.9, 1.1, 1.3)]:
        figures = stats.TimingRecord(100, 1, stamps).figures() | {"cpu_share": 1.0}
        run.records.setdefault(case.name, []).append(figures)
    return run, [case, harness.Case("batch_2", [[1] * 100] * 2, new_tokens=5)]


def test_bandwidth_figure_on_a_synthetic_record():
    run, cases = _synthetic_run()
    entry = harness.engine_result(run, cases, machine_bw=4e9)
    decode = entry["results"]["prompt_100"]["decode_tok_s"]
    assert (decode["min"], decode["median"], decode["max"]) == pytest.approx((5.0, 10.0, 20.0))
    assert stats.achieved_bandwidth(100_000_000, 10.0) == pytest.approx(1e9)
    assert entry["bandwidth_gb_s"] == pytest.approx(1.0)  # 100 MB per token x 10 tok/s (median)
    assert entry["bandwidth_fraction"] == pytest.approx(0.25)
    assert entry["weight_mb_per_token"] == pytest.approx(100)
    assert entry["results"]["batch_2"] == {"unsupported": "the engine's API generates one sequence at a time"}
    with pytest.raises(ValueError):
        stats.achieved_bandwidth(-1, 10.0)


def test_comparisons_pair_equal_precision_classes():
    ours, cases = _synthetic_run()
    peer, _ = _synthetic_run()
    peer.spec = harness.EngineSpec("llama.cpp Q4_0", "llamacpp", "Q4_0", prepare=lambda: "x")
    for rows in peer.records.values():
        for r in rows:
            r["decode_tok_s"] /= 2
    other = harness.EngineRun(harness.EngineSpec("llama.cpp F16", "llamacpp", "F16", prepare=lambda: "x"), status="ok")
    engines = [harness.engine_result(r, cases, 1e10) for r in (ours, peer, other)]
    rows = harness.comparisons(engines, cases)
    assert len(rows) == 1 and rows[0]["peer"] == "llama.cpp Q4_0" and rows[0]["precision_class"] == "4-bit"
    assert rows[0]["decode_tok_s_prompt_100"] == pytest.approx(2.0)


@pytest.mark.parametrize("name, expected", [("fp32", "fp32"), ("F32", "fp32"), ("F16", "fp16"), ("Q8_0", "8-bit"),
                                            ("int8", "8-bit"), ("Q4_1", "4-bit"), ("int4-gptq", "4-bit"),
                                            ("Q4_K_M", "4-bit"), ("ternary", "ternary"), ("TQ2_0", "ternary")])
def test_precision_class(name, expected):
    assert harness.precision_class(name) == expected


# -- weight accounting --------------------------------------------------------------------
def test_onnx_bytes_per_token_leaves_out_gathered_tables(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((50, 8), np.float32), "embed")  # only gathered: left out
    weight = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[table, weight])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert weights.onnx_bytes_per_token(tmp_path / "m.onnx") == 8 * 4 * 4
    # a table that is also the head (tied embeddings) is read whole every token
    graph.node.append(helper.make_node("Gemm", ["h", "embed"], ["logits"], transB=1))
    onnx.save(helper.make_model(graph), tmp_path / "tied.onnx")
    assert weights.onnx_bytes_per_token(tmp_path / "tied.onnx") == (8 * 4 + 50 * 8) * 4


def test_gguf_bytes_per_token_untied_embedding(tmp_path):
    import gguf

    for tied in (True, False):
        path = tmp_path / f"{tied}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
        writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), np.float16))
        if not tied:
            writer.add_tensor("output.weight", np.zeros((16, 8), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        expected = 16 * 8 * 4 + 8 * 8 * 2 if tied else 8 * 8 * 2 + 16 * 8 * 4
        assert weights.gguf_bytes_per_token(path) == expected


# -- prompts ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 10],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    """A small data folder in place of the shipped data ($EDGE_RUN_DATA, set for the test)."""
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text(" = Title = \n" + "Some words of text here . " * 400)
    (tmp_path / "prompts").mkdir()
    rows = [{"question_id": i, "category": "c", "turns": [f"Question number {i} about foxes?", "x"]} for i in range(5)]
    (tmp_path / "prompts" / "mt_bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setenv("EDGE_RUN_DATA", str(tmp_path))
    return tmp_path


def test_prompts_have_exact_lengths(small_tokenizer, data_dir):
    from edgerun.bench.prompts import make_prompts, perplexity_windows

    wiki = make_prompts(small_tokenizer, "wikitext", 32, 3)
    assert [len(p) for p in wiki] == [32, 32, 32] and len({tuple(p) for p in wiki}) == 3
    template = ("{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
                "{% if add_generation_prompt %}<bot>{% endif %}")
    chat = make_prompts(small_tokenizer, "mt_bench", 40, 2, chat_template=template)
    assert [len(p) for p in chat] == [40, 40] and chat[0] != chat[1]
    head = small_tokenizer.encode("<user>", add_special_tokens=False).ids
    tail = small_tokenizer.encode("</user><bot>", add_special_tokens=False).ids
    assert chat[0][:len(head)] == head and chat[0][-len(tail):] == tail
    assert [len(w) for w in perplexity_windows(small_tokenizer, 2, 16)] == [16, 16]
    with pytest.raises(ValueError, match="cannot hold the chat template"):
        make_prompts(small_tokenizer, "mt_bench", 3, 1, chat_template=template)
    with pytest.raises(ValueError, match="unknown prompt set"):
        make_prompts(small_tokenizer, "poems", 8, 1)


# -- worker protocol and failure reporting -------------------------------------------------
class _Echo(worker.Engine):
    """A fake engine: 'generates' tokens at fixed times; fails on an empty prompt."""

    def __init__(self, model, threads, max_context):
        self.info = {"version": "0", "batch": True}

    def generate(self, prompts, new_tokens):
        if not prompts[0]:
            raise ValueError("empty prompt")
        return [0.01 * (1 + k // len(prompts)) for k in range(len(prompts) * new_tokens)], [7] * new_tokens

    def logits(self, tokens):
        return np.zeros((len(tokens), 4), np.float32)  # uniform: perplexity 4


def _serve(requests: list[dict], monkeypatch) -> list[dict]:
    monkeypatch.setitem(worker.ENGINES, "echo", _Echo)
    out = io.StringIO()
    worker.serve(io.StringIO("".join(json.dumps(r) + "\n" for r in requests)), out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_worker_protocol(monkeypatch):
    answers = _serve([{"op": "generate", "prompts": [[1]], "new_tokens": 2},
                      {"op": "load", "engine": "echo", "model": "m", "threads": 1, "max_context": 8},
                      {"op": "generate", "prompts": [[1, 2], [3, 4]], "new_tokens": 3},
                      {"op": "generate", "prompts": [[]], "new_tokens": 3},
                      {"op": "nll", "windows": [[1, 2, 3]]},
                      {"op": "quit"}, {"op": "generate", "prompts": [[1]], "new_tokens": 2}], monkeypatch)
    assert len(answers) == 5  # nothing after quit
    assert not answers[0]["ok"] and "before a successful load" in answers[0]["error"]
    assert answers[1]["ok"] and answers[1]["info"]["batch"] and answers[1]["peak_rss_mb"] > 0
    assert answers[2]["ok"] and len(answers[2]["stamps"]) == 6
    assert not answers[3]["ok"] and answers[3]["error"] == "ValueError: empty prompt" and answers[3]["traceback"]
    assert math.exp(answers[4]["nll"] / answers[4]["count"]) == pytest.approx(4.0)


def test_missing_and_failing_engines_are_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(harness.REQUIRES, "transformers", ("no_such_module_for_edge_run",))

    def broken() -> str:
        raise RuntimeError("the builder exploded")

    specs = [harness.EngineSpec("transformers fp32", "transformers", "fp32", prepare=lambda: "x"),
             harness.EngineSpec("llama.cpp broken", "edgerun", "Q4_0", prepare=broken)]
    messages: list[str] = []
    runs = harness.start_engines(specs, 1, 64, tmp_path, 60, messages.append)
    assert [r.status for r in runs] == ["skipped", "failed"]
    assert "no_such_module_for_edge_run not installed" in runs[0].error and "edge-run[bench]" in runs[0].error
    assert "RuntimeError: the builder exploded" in runs[1].error
    cases = [harness.Case("prompt_4", [[1, 2, 3, 4]], 2)]
    entries = [harness.engine_result(r, cases, 1e10) for r in runs]
    assert [(e["status"], e["results"]) for e in entries] == [("skipped", {}), ("failed", {})]


def test_worker_death_is_an_error_not_a_hang(tmp_path):
    w = harness.Worker(tmp_path / "w.log", threads=1, timeout=60)
    try:
        with pytest.raises(harness.WorkerError, match="unknown engine"):
            w.request(op="load", engine="nonexistent", model="m", threads=1, max_context=8)
        w.proc.kill()  # the worker dies; the next request must fail at once, naming that
        w.proc.wait(timeout=60)
        with pytest.raises(harness.WorkerError, match="worker exited"):
            w.request(op="generate", prompts=[[1]], new_tokens=2)
    finally:
        w.close()


# -- the real thing, short -----------------------------------------------------------------
@pytest.mark.slow
def test_smoke_run_against_installed_peers(smollm2_gguf, smollm2_package, tmp_path):
    """Every peer that is installed produces numbers; one that is not is skipped, named."""
    from edgerun.bench import report as report_module

    out = tmp_path / "bench"
    report = harness.main([str(smollm2_gguf), "--packages", str(smollm2_package), "--prompt-tokens", "16",
                           "--new-tokens", "8", "--batch", "2", "--repeats", "1", "--llamacpp", "source",
                           "--ortgenai", "int4", "--ppl-windows", "1", "--ppl-window-tokens", "32",
                           "--bandwidth-mb", "64", "--threads", "1", "--out", str(out)])
    saved = json.loads((out / "bench.json").read_text())
    assert saved["schema"] == harness.SCHEMA and saved["engines"] == json.loads(json.dumps(report["engines"]))
    assert {"model", "physical_cores", "simd", "read_bandwidth", "load_average_before"} <= set(saved["machine"])
    assert saved["machine"]["read_bandwidth"]["bytes_per_s"] > 0 and saved["versions"]["edge-run"]
    assert {"prompt_tokens", "new_tokens", "batch", "repeats", "threads"} <= set(saved["settings"])
    kinds = {e["engine"] for e in saved["engines"]}
    assert kinds == {"edgerun", "llamacpp", "ortgenai", "transformers"}
    for e in saved["engines"]:
        needed = harness.missing_modules(e["engine"], e["options"].get("backend"))
        if e["status"] == "skipped":
            assert needed, f"{e['label']} was skipped although installed: {e['error']}"
            continue
        assert e["status"] == "ok", f"{e['label']} failed: {e['error']}"
        prompt = e["results"]["prompt_16"]
        for figure in harness.PROMPT_FIGURES:
            assert set(prompt[figure]) == {"min", "median", "max", "n"} and prompt[figure]["median"] > 0
        batch = e["results"]["batch_2"]
        assert "unsupported" in batch if e["engine"] == "llamacpp" else batch["decode_tok_s"]["median"] > 0
        assert e["peak_rss_mb"] > 0 and e["file_mb"] > 0 and e["weight_mb_per_token"] > 0
        assert e["bandwidth_gb_s"] > 0 and 0 < e["bandwidth_fraction"]
        assert 1 < e["perplexity"] < 1e4
    ran = {e["label"] for e in saved["engines"] if e["status"] == "ok"}
    if {"edge-run llama.cpp Q4_1", "llama.cpp Q4_1"} <= ran:
        assert {"ours": "edge-run llama.cpp Q4_1", "peer": "llama.cpp Q4_1"}.items() <= \
            next(c for c in saved["comparisons"] if c["peer"] == "llama.cpp Q4_1").items()
    if importlib.util.find_spec("matplotlib"):
        assert (out / "bench.png").stat().st_size > 0
    assert "| engine |" in report_module.markdown(saved)


def test_speculative_bench_compares_both_engines_and_checks_exactness(data_dir, tmp_path, monkeypatch):
    """bench.speculative_runs (edge-run bench --speculative) on a tiny INT4 package: every runner on
    both prompt sets, the invariant engine's lookup identical to its plain run, the opt-out runs
    against the default plain run, end-to-end and decode-only ratios, the JSON report."""
    from conftest import build_tiny_llama

    from edgerun.bench import speculative_runs as speculative
    from edgerun.export.pipeline import ExportOptions, export

    monkeypatch.setenv("EDGE_RUN_HOME", str(tmp_path / "home"))
    export(build_tiny_llama(tmp_path / "hf", seed=3, max_position_embeddings=2048), tmp_path / "int4",
           ExportOptions(quant="int4"))
    report = speculative.main([str(tmp_path / "int4"), "--drafters", "lookup", "--n", "1", "--new-tokens", "12",
                               "--threads", "1", "--batch-invariant", "--draft-tokens", "auto", "3",
                               "--inexact-speculation", "--json", str(tmp_path / "r.json")])
    rows = {(r["prompts"], r["drafter"]): r for r in report["results"]}
    runners = ("plain", "lookup", "lookup k=3", "lookup [inexact]", "lookup k=3 [inexact]",
               "plain [inv]", "lookup [inv]", "lookup k=3 [inv]")
    assert rows[("edit", "lookup [inexact]")]["baseline"] == "plain"
    assert set(rows) == {(s, d) for s in ("mt_bench", "edit") for d in runners}
    assert rows[("edit", "lookup k=3 [inv]")]["identical"] is True
    inv = rows[("edit", "lookup [inv]")]
    assert inv["identical"] is True and inv["baseline"] == "plain [inv]"
    assert inv["speedup"] > 0 and inv["decode_speedup"] > 0 and inv["speedup_over_default_plain"] > 0
    saved = json.loads((tmp_path / "r.json").read_text())["results"]
    assert ([(r["drafter"], r.get("speedup")) for r in saved]
            == [(r["drafter"], r.get("speedup")) for r in report["results"]])
    with pytest.raises(SystemExit):  # argparse names the bad length
        speculative.main([str(tmp_path / "int4"), "--draft-tokens", "0"])


def test_speculative_bench_runs_end_at_the_end_of_turn_unless_told(data_dir, tmp_path, monkeypatch):
    """Runs stop at the model's EOS as a user's do (plain and speculative alike); --ignore-eos
    generates --new-tokens every run. The tiny model's EOS is set to its 4th greedy MT-Bench token.
    Run through bench/experiments/speculative.py (the shipped runs plus its own flags)."""
    from conftest import build_tiny_llama, experiment

    from edgerun import hub
    from edgerun.bench.speculative_runs import prompt_sets
    from edgerun.export.pipeline import export

    speculative = experiment("speculative")
    export(build_tiny_llama(tmp_path / "hf", seed=4, max_position_embeddings=2048), tmp_path / "pkg")
    load = hub.load

    def load_with_eos(*args, **kwargs):
        engine = load(*args, **kwargs)
        prompt = engine.apply_chat_template([{"role": "user", "content": prompt_sets(1)["mt_bench"][0]}])
        tokens = [r.token for r in engine.generate(engine.encode(prompt, add_special_tokens=False), max_new_tokens=4,
                                                   ignore_eos=True)]
        engine.eos_token_ids = frozenset(tokens[3:])
        return engine

    monkeypatch.setattr(hub, "load", load_with_eos)
    common = [str(tmp_path / "pkg"), "--drafters", "lookup", "--n", "1", "--new-tokens", "12", "--threads", "1"]
    ended = {(r["prompts"], r["drafter"]): r for r in speculative.main(common)["results"]}
    assert ended[("mt_bench", "plain")]["tokens_per_run"] <= 4
    assert ended[("mt_bench", "lookup")]["tokens_per_run"] == ended[("mt_bench", "plain")]["tokens_per_run"]
    assert all(r["identical"] for r in ended.values() if "identical" in r)
    forced = speculative.main(common + ["--ignore-eos"])["results"]
    assert {r["tokens_per_run"] for r in forced} == {12}


def test_step_cost_times_every_width_against_one_token(data_dir, tmp_path, monkeypatch):
    """bench/experiments/step_cost.py on a tiny package: a row per width (width 1 added as the
    reference), the ratio of width 1 is 1, the JSON report; bad values end in argparse's error."""
    from conftest import build_tiny_llama, experiment

    from edgerun.export.pipeline import export

    step_cost = experiment("step_cost")
    export(build_tiny_llama(tmp_path / "hf", seed=5, max_position_embeddings=2048), tmp_path / "pkg")
    results = step_cost.main([str(tmp_path / "pkg"), "--prompt-tokens", "40", "--widths", "4", "2",
                              "--repeats", "2", "--threads", "1", "--json", str(tmp_path / "r.json")])
    rows = results[0]["rows"]
    assert [r["width"] for r in rows] == [1, 2, 4] and rows[0]["ratio_to_one"] == 1.0
    assert all(r["min_ms"] > 0 and r["median_ms"] >= r["min_ms"] for r in rows)
    assert json.loads((tmp_path / "r.json").read_text())["results"] == results
    with pytest.raises(SystemExit):
        step_cost.main([str(tmp_path / "pkg"), "--widths", "0"])
    with pytest.raises(ValueError, match="lower them"):
        step_cost.main([str(tmp_path / "pkg"), "--prompt-tokens", "10000000"])


def test_json_reports_are_written_whole_or_not_at_all(tmp_path):
    from edgerun.bench.report import write_json

    target = tmp_path / "r.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and not list(tmp_path.glob("*.partial"))
    with pytest.raises(TypeError):
        write_json(target, {"a": object()})  # not serialisable: the earlier report stays as it was
    assert json.loads(target.read_text()) == {"a": 1} and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("command, prog", [
    (["bench/experiments/speculative.py"], "python bench/experiments/speculative.py"),  # from the checkout
    (["-m", "edgerun.bench.speculative_runs"], "python -m edgerun.bench.speculative_runs"),  # shipped
])
def test_bench_scripts_fail_in_one_line(tmp_path, command, prog):
    """A bench script run as a command on a missing package: one line on stderr, exit status 1,
    no report written."""
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, *command, str(tmp_path / "missing"), "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and not out.exists() and not list(tmp_path.glob("*.partial"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ")
    assert "missing" in lines[0]
    bad_option = subprocess.run([sys.executable, *command, str(tmp_path / "missing"), "--draft-tokens", "0"],
                                capture_output=True, text=True, cwd=REPO)
    lines = [line for line in bad_option.stderr.splitlines() if line.strip()]
    assert bad_option.returncode == 2 and len(lines) == 1 and "--draft-tokens takes integers" in lines[0]
    assert lines[0].startswith(f"{prog}: error: ")


@pytest.mark.parametrize("name", ["speculative", "llamacpp_overhead", "early_exit", "decode_speed", "step_cost",
                                  "step_invariance", "quant_table", "prune_sweep", "exact_speculation"])
def test_experiments_run_from_the_checkout_and_are_not_installed(name):
    """Research scripts live in bench/experiments: importable from the checkout (as they run, by
    path), never part of the installed edgerun.bench package."""
    import importlib.util

    from conftest import REPO, experiment

    assert callable(experiment(name).main)
    assert importlib.util.find_spec(f"edgerun.bench.{name}") is None
    assert "experiments" not in (REPO / "pyproject.toml").read_text()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_worker_peak_rss_restarts_per_request():
    """Each generate answer's peak is its own request's, so batch-1 memory is not hidden by a batch-8 peak."""
    big = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB resident
    high = worker.peak_rss_mb()
    del big
    worker.reset_peak_rss()
    assert worker.peak_rss_mb() < high - 32
