"""Benchmark worker: one engine in its own process, driven by JSON lines on stdin.

    python bench/worker.py        (the harness starts it by path, see harness.Worker)

Each request is one JSON line; each answer is one JSON line on the original stdout (anything a
library prints goes to stderr instead, so the protocol stays clean):

    {"op": "load", "engine": "llamacpp", "model": "m.gguf", "threads": 2, "max_context": 1024}
        -> {"ok": true, "info": {"version": ..., "batch": true, "load_s": ..., "baseline_rss_mb": ...}}
    {"op": "generate", "prompts": [[ids], ...], "new_tokens": 128}
        -> {"ok": true, "stamps": [seconds after the call of every generated token], "first": [ids],
            "cpu_s": this process's CPU time during the call (all threads), "wall_s": ...}
    {"op": "nll", "windows": [[ids], ...]}  -> {"ok": true, "nll": sum, "count": scored positions}
    {"op": "quit"}
Every answer also carries "peak_rss_mb" (this process's high-water mark so far); a failure
answers {"ok": false, "error": "...", "traceback": "..."}.

This file imports only the standard library and numpy at start (it runs by path, outside the
edgerun package), so a peer's process carries no edge-run or onnxruntime baggage in its memory
figure; each engine imports its own library when loaded (weights are counted by the harness,
bench/weights.py). Generation is greedy and always makes
exactly `new_tokens` tokens per prompt (end-of-sequence is ignored), so every engine does the
same work.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ENGINES: dict[str, Callable[..., Engine]] = {}


def register(name: str):
    def wrap(cls):
        ENGINES[name] = cls
        return cls
    return wrap


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark in MiB.

    Linux's VmHWM belongs to the process image, so it starts afresh at exec; ru_maxrss would
    carry over the harness's own peak from the fork that started this worker.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def reset_peak_rss() -> None:
    """Start the high-water mark afresh from the current RSS (Linux: /proc/self/clear_refs "5");
    elsewhere the mark keeps covering the whole process."""
    clear = Path("/proc/self/clear_refs")
    if clear.exists():
        clear.write_text("5")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_nll(logits: np.ndarray, tokens: list[int]) -> float:
    """Negative log-likelihood of tokens[1:] given logits [len(tokens), vocab] (eval.py's protocol)."""
    lp = log_softmax(np.asarray(logits, dtype=np.float32)[:-1])
    return float(-lp[np.arange(len(tokens) - 1), tokens[1:]].sum(dtype=np.float64))


class Engine:
    """What every engine adapter provides."""

    info: dict

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[int]]:
        """Greedy generation; (time of every generated token after the call, first prompt's tokens)."""
        raise NotImplementedError

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] of one sequence from an empty state."""
        raise NotImplementedError


@register("edgerun")
class EdgeRun(Engine):
    """edge-run itself: any package (ONNX, or a GGUF on the llama.cpp backend with backend=llamacpp)."""

    def __init__(self, model: str, threads: int, max_context: int, backend: str = "auto"):
        # absolute, and only here: this file runs by path, and a peer's worker carries no edge-run
        from edgerun.hub import load
        from edgerun.version import __version__

        self.engine = load(model, threads=threads, max_context=max_context, backend=backend)
        self.info = {"version": __version__, "backend": self.engine.backend.name,
                     "package": str(self.engine.package_dir), "batch": True}

    def generate(self, prompts, new_tokens):
        start = time.perf_counter()
        stamps, first = [], []
        # ignore_eos: always generate new_tokens
        for r in self.engine.generate(prompts if len(prompts) > 1 else prompts[0], max_new_tokens=new_tokens,
                                      ignore_eos=True):
            stamps.append(time.perf_counter() - start)
            if r.index == 0:
                first.append(r.token)
        return stamps, first

    def logits(self, tokens):
        return self.engine.logits(tokens)


@register("llamacpp")
class LlamaCpp(Engine):
    """llama.cpp through llama-cpp-python's high-level `Llama` and its own generate loop."""

    def __init__(self, model: str, threads: int, max_context: int):
        import llama_cpp

        self.path, self.threads = model, threads
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=max_context, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=0, verbose=False)
        self.scorer = None  # a second context with logits for every position, made on first use
        self.info = {"version": llama_cpp.__version__, "batch": False}

    def generate(self, prompts, new_tokens):
        if len(prompts) != 1:
            raise NotImplementedError("llama-cpp-python's Llama generates one sequence at a time")
        self.llm.reset()  # no prefix reuse from the previous call: every prompt is prefilled
        start = time.perf_counter()
        stamps, out = [], []
        for token in self.llm.generate(prompts[0], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter() - start)
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return stamps, out

    def logits(self, tokens):
        import llama_cpp

        if self.scorer is None or self.scorer.n_ctx() < len(tokens):
            self.scorer = llama_cpp.Llama(model_path=self.path, n_ctx=len(tokens), n_batch=len(tokens),
                                          n_threads=self.threads, n_threads_batch=self.threads, logits_all=True,
                                          verbose=False)
        self.scorer.reset()
        self.scorer.eval(tokens)
        return np.array(self.scorer.scores[:len(tokens)])


@register("ortgenai")
class OrtGenai(Engine):
    """onnxruntime-genai on a model its own builder made (greedy search, min_length = max_length)."""

    def __init__(self, model: str, threads: int, max_context: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(model)
        config.clear_providers()  # CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.info = {"version": og.__version__, "batch": True}

    def _generator(self, prompts: list[list[int]], new_tokens: int):
        params = self.og.GeneratorParams(self.model)
        length = max(map(len, prompts)) + new_tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=len(prompts))
        return self.og.Generator(self.model, params)

    def generate(self, prompts, new_tokens):
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("the onnxruntime-genai adapter batches prompts of equal length only")
        start = time.perf_counter()
        generator = self._generator(prompts, new_tokens)
        generator.append_tokens(np.array(prompts, dtype=np.int32))
        stamps, first = [], []
        while not generator.is_done():
            generator.generate_next_token()
            tokens = generator.get_next_tokens()
            now = time.perf_counter() - start
            stamps.extend([now] * len(tokens))
            first.append(int(tokens[0]))
        return stamps, first

    def logits(self, tokens):
        generator = self._generator([tokens], 1)
        generator.append_tokens(np.array([tokens], dtype=np.int32))
        return np.asarray(generator.get_output("logits"))[0]


@register("transformers")
class Transformers(Engine):
    """Hugging Face transformers on CPU torch (float32), `model.generate` with a timing streamer."""

    def __init__(self, model: str, threads: int, max_context: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.info = {"version": transformers.__version__, "torch": torch.__version__, "batch": True}

    def generate(self, prompts, new_tokens):
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        width = max(map(len, prompts))
        pad = self.model.config.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        stamps: list[float] = []

        class Stamps(BaseStreamer):
            seen_prompt = False

            def put(self, value):
                if not self.seen_prompt:  # generate() first hands the prompt over
                    self.seen_prompt = True
                    return
                stamps.extend([time.perf_counter() - start] * len(prompts))

            def end(self):
                pass

        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, num_beams=1, streamer=Stamps(), pad_token_id=pad,
                                      temperature=None, top_p=None, top_k=None)
        return stamps, out[0, width:].tolist()

    def logits(self, tokens):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([tokens])).logits[0].float().numpy()


def handle(state: dict, request: dict) -> dict:
    """Run one request against the worker's engine (state["engine"] once loaded)."""
    op = request.get("op")
    if op == "load":
        kind = request["engine"]
        if kind not in ENGINES:
            raise ValueError(f"unknown engine {kind!r}; choose one of {sorted(ENGINES)}")
        start = time.perf_counter()
        base = peak_rss_mb()
        state["engine"] = ENGINES[kind](request["model"], int(request["threads"]), int(request["max_context"]),
                                        **request.get("options", {}))
        return {"info": state["engine"].info | {"load_s": time.perf_counter() - start, "baseline_rss_mb": base}}
    engine = state.get("engine")
    if engine is None:
        raise ValueError(f"op {op!r} before a successful load")
    if op == "generate":
        reset_peak_rss()  # the answer's peak is this request's: batch-1 memory apart from batch runs
        cpu, wall = time.process_time(), time.perf_counter()
        stamps, first = engine.generate(request["prompts"], int(request["new_tokens"]))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        expected = len(request["prompts"]) * int(request["new_tokens"])
        if len(stamps) != expected:
            raise RuntimeError(f"engine produced {len(stamps)} tokens, expected {expected}")
        return {"stamps": stamps, "first": first, "cpu_s": cpu, "wall_s": wall}
    if op == "nll":
        total, count = 0.0, 0
        for tokens in request["windows"]:
            total += window_nll(engine.logits(tokens), tokens)
            count += len(tokens) - 1
        return {"nll": total, "count": count}
    raise ValueError(f"unknown op {op!r}; expected load, generate, nll or quit")


def serve(inp, out) -> None:
    """Answer requests from `inp` on `out`, one JSON line each, until quit or end of input."""
    state: dict = {}
    for line in inp:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        try:
            answer = {"ok": True} | handle(state, request)
        except Exception as e:  # reported to the harness, which marks the engine failed
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        answer["peak_rss_mb"] = peak_rss_mb()
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # C libraries that print to stdout now print to stderr
    sys.stdout = sys.stderr
    serve(sys.stdin, protocol)


if __name__ == "__main__":
    main()
