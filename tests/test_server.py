"""`edge-run serve` over HTTP: the real server (uvicorn, in a thread) on a free loopback port,
spoken to with the official `openai` client and, for malformed requests, raw HTTP (httpx).

A tiny fp32 model keeps these fast; the slow test runs the bounded load test on SmolLM2.
"""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import edgerun
from edgerun.server import ServeOptions, create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny"
KEY = "sk-test-key"


@contextlib.contextmanager
def running_server(load, options: ServeOptions, wait_ready: bool = True):
    """Serve `load()`'s engine on 127.0.0.1 at a free port; yields (base URL, app)."""
    app = create_app(load, options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        while wait_ready and time.monotonic() < deadline:
            if httpx.get(f"{url}/health").status_code == 200:
                break
            time.sleep(0.05)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def _scheduler(app):
    return app.state.edgerun.scheduler


@pytest.fixture(scope="module")
def tiny_engine(tiny_fp32):
    return edgerun.Engine(tiny_fp32, max_context=128, threads=1)


@pytest.fixture(scope="module")
def reference(tiny_fp32):
    """A second engine for single runs (the server's engine belongs to its scheduler)."""
    return edgerun.Engine(tiny_fp32, max_context=128, threads=1)


@pytest.fixture(scope="module")
def server(tiny_engine):
    options = ServeOptions(model_id=MODEL, max_batch=4, prefill_chunk=8, max_body_bytes=64 << 10)
    with running_server(lambda: tiny_engine, options) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat_tokens(engine, content: str) -> list[int]:
    return engine.encode(engine.apply_chat_template([{"role": "user", "content": content}]), add_special_tokens=False)


def _greedy(engine, tokens, n: int, **kwargs) -> tuple[str, list[int], str]:
    rs = list(engine.generate(tokens, max_new_tokens=n, **kwargs))
    return "".join(r.text for r in rs), [r.token for r in rs], rs[-1].finish_reason


def test_chat_non_streaming_equals_engine_and_counts_usage(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the quick brown fox"}],
                                       max_tokens=12, temperature=0)
    text, tokens, finish = _greedy(reference, _chat_tokens(reference, "the quick brown fox"), 12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(_chat_tokens(reference, "the quick brown fox"))
    assert r.usage.completion_tokens == len(tokens) and r.usage.total_tokens == r.usage.prompt_tokens + len(tokens)


def test_chat_template_renders_multi_turn(client, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "dog"}, {"role": "user", "content": "the fox"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    tokens = reference.encode(reference.apply_chat_template(messages), add_special_tokens=False)
    assert r.usage.prompt_tokens == len(tokens)
    assert r.choices[0].message.content == _greedy(reference, tokens, 6)[0]


def test_chat_streaming_chunks(client, reference):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "edge run"}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text, tokens, finish = _greedy(reference, _chat_tokens(reference, "edge run"), 10)
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert all(c.usage is None for c in chunks[:-1])


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False, "whitespace_pattern": None}}


def test_chat_response_format_json_schema_equals_engine(client, reference):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "the fox"}],
                                       max_tokens=60, temperature=0, response_format=fmt)
    text, _, finish = _greedy(reference, _chat_tokens(reference, "the fox"), 60, response_format=fmt)
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish == "stop"
    answer = json.loads(text)
    assert set(answer) == {"name", "age"} and 0 <= answer["age"] <= 99
    # the same through the completions endpoint (an extension there) and streamed
    stream = client.completions.create(model=MODEL, prompt="the dog", max_tokens=30, temperature=0, stream=True,
                                       extra_body={"response_format": {"type": "regex", "pattern": "[0-9]{3}"}})
    assert len("".join(c.choices[0].text for c in stream)) == 3


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def long_client(tmp_path_factory):
    """A server of a tiny model with room for the tool prompt (its 320-token vocabulary spells it long)."""
    from conftest import build_tiny_llama

    from edgerun.export.pipeline import ExportOptions, export

    root = tmp_path_factory.mktemp("tools")
    export(build_tiny_llama(root / "hf", seed=5, initializer_range=0.2, max_position_embeddings=1024),
           root / "pkg", ExportOptions(formats=("onnx",)))
    engine = edgerun.Engine(root / "pkg", max_context=1024, threads=1)
    with running_server(lambda: engine, ServeOptions(model_id=MODEL, max_batch=2)) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_calls(long_client, stream):
    client = long_client
    messages = [{"role": "user", "content": "weather in Oslo?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                       max_tokens=200, temperature=0, stream=stream)
    if stream:
        chunks = [c for c in r if c.choices]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        call = chunks[-1].choices[0].delta.tool_calls[0]
    else:
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        call = r.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    # the call and its result go back as the next turn's history
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("body, words", [
    ({"response_format": {"type": "regex", "pattern": "a(b"}}, "invalid response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}}, "objectx"),
    ({"response_format": {"type": "yaml"}}, "unknown response_format type"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "do not combine"),
])
def test_bad_structured_requests_are_400(server, body, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **body}
    error = _error(httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=30), 400)
    assert words in error["message"]


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": "the lazy dog", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_stream_and_not_with_logprobs(client, reference):
    text, tokens, finish = _greedy(reference, reference.encode("over the lazy"), 8)
    r = client.completions.create(model=MODEL, prompt="over the lazy", max_tokens=8, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.text == text and choice.finish_reason == finish
    assert len(choice.logprobs.tokens) == len(tokens) and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    streamed = list(client.completions.create(model=MODEL, prompt="over the lazy", max_tokens=8, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    # token ids as the prompt
    r = client.completions.create(model=MODEL, prompt=reference.encode("over the lazy"), max_tokens=8, temperature=0)
    assert r.choices[0].text == text


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fox"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy picks the top one


def test_stop_strings_seed_and_max_tokens(client, reference):
    tokens = reference.encode("quick brown")
    text = _greedy(reference, tokens, 30, ignore_eos=True)[0]
    stop = text[10:13]
    assert stop and text.find(stop) < len(text)
    r = client.completions.create(model=MODEL, prompt="quick brown", max_tokens=30, temperature=0, stop=[stop, "\x00"])
    expected = _greedy(reference, tokens, 30, stop=[stop, "\x00"])
    assert r.choices[0].text == expected[0] and r.choices[0].finish_reason == expected[2]
    sampled = dict(model=MODEL, prompt="quick brown", max_tokens=12, temperature=0.8, top_p=0.9, seed=11)
    a, b = client.completions.create(**sampled), client.completions.create(**sampled)
    assert a.choices[0].text == b.choices[0].text  # the seed makes sampling reproducible
    want = _greedy(reference, tokens, 12, temperature=0.8, top_p=0.9, seed=11)[0]
    assert a.choices[0].text == want
    r = client.completions.create(model=MODEL, prompt="quick brown", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.get(f"{server[0]}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "Traceback" not in response.text
    return body["error"]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": "hello"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n=2"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 500}, 400, "max_tokens is too"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "the fox " * 200}]}, 400, "maximum context length"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99}, 400,
     "top_logprobs"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
])
def test_bad_chat_requests_get_openai_shaped_4xx(server, body, status, words):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    error = _error(httpx.post(f"{server[0]}/v1/chat/completions", timeout=30, **kwargs), status)
    assert words in error["message"]


@pytest.mark.parametrize("body, status, words", [
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "empty"),
    ({"model": MODEL, "prompt": [1, 2, 99999]}, 400, "token ids"),
    ({"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ({"model": MODEL, "prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "x", "seed": -5}, 400, "seed"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
])
def test_bad_completion_requests(server, body, status, words):
    error = _error(httpx.post(f"{server[0]}/v1/completions", json=body, timeout=30), status)
    assert words in error["message"]


def test_oversized_body_unknown_route_and_method(server):
    huge = {"model": MODEL, "prompt": "x" * (100 << 10)}
    assert "limit" in _error(httpx.post(f"{server[0]}/v1/completions", json=huge, timeout=30), 413)["message"]
    _error(httpx.get(f"{server[0]}/v1/nothing"), 404)
    _error(httpx.get(f"{server[0]}/v1/completions"), 405)


def test_disconnect_mid_stream_frees_the_row(server, monkeypatch):
    url, app = server
    scheduler = _scheduler(app)
    # steps of a few ms: the request cannot run to its end before the disconnect reaches the server
    # (on a fast machine the tiny model's 100 tokens took less time than that)
    forward = scheduler.backend.forward
    monkeypatch.setattr(scheduler.backend, "forward", lambda *a, **k: time.sleep(0.005) or forward(*a, **k))
    before = scheduler.stats.finished.get("cancelled", 0)
    body = {"model": MODEL, "prompt": "the quick", "max_tokens": 100, "temperature": 0.5, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert got
    deadline = time.monotonic() + 5
    while scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.running == 0
    assert scheduler.stats.finished.get("cancelled", 0) == before + 1


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="dog", max_tokens=4, temperature=0)
    text = httpx.get(f"{server[0]}/metrics").text
    for name in ("edgerun_requests_total", "edgerun_completion_tokens_total", "edgerun_prompt_tokens_total",
                 "edgerun_queue_depth", "edgerun_batch_occupancy", "edgerun_decode_step_rows_total",
                 "edgerun_time_to_first_token_seconds_bucket", "edgerun_inter_token_latency_seconds_bucket",
                 "edgerun_speculative_acceptance_ratio", "edgerun_request_errors_total"):
        assert name in text, name
    assert 'edgerun_requests_total{endpoint="completions",finish_reason=' in text


def test_api_key_required_except_health(tiny_engine):
    # the module's server holds tiny_engine's scheduler: this one gets its own engine
    engine = edgerun.Engine(tiny_engine.package_dir, max_context=128, threads=1)
    with running_server(lambda: engine, ServeOptions(model_id=MODEL, api_key=KEY)) as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            error = _error(httpx.get(f"{url}/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        _error(httpx.get(f"{url}/metrics"), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        r = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert r.usage.completion_tokens <= 2
    engine.scheduler().close()


def test_health_is_503_while_loading(tiny_engine):
    release = threading.Event()
    engine = edgerun.Engine(tiny_engine.package_dir, max_context=128, threads=1)

    def slow_load():
        release.wait(30)
        return engine

    with running_server(slow_load, ServeOptions(model_id=MODEL), wait_ready=False) as (url, _):
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert "loading" in _error(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}),
                                   503)["message"]
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").status_code == 200
    engine.scheduler().close()


def _load_test(url: str, requests: list[dict], clients: int) -> list:
    """Send every request (clients at a time) with the openai client; the results in order."""
    def one(req: dict):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        kind = req.pop("kind")
        if kind == "chat":
            r = client.chat.completions.create(**req)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        if req.get("stream"):
            chunks = list(client.completions.create(**req))
            return ("".join(c.choices[0].text for c in chunks if c.choices),
                    next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None)
        r = client.completions.create(**req)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, [dict(r) for r in requests]))


def _mixed_requests(model: str, prompts: list[str], n: int, max_tokens: tuple[int, ...]) -> list[dict]:
    """n requests of mixed kinds, prompt lengths and settings (greedy and seeded sampling)."""
    out = []
    for i in range(n):
        prompt = prompts[i % len(prompts)] * (1 + i % 3)
        req = {"model": model, "max_tokens": max_tokens[i % len(max_tokens)],
               "temperature": 0 if i % 4 else 0.7, "seed": i}
        if i % 2:
            out.append({"kind": "chat", "messages": [{"role": "user", "content": f"{i}: {prompt}"}], **req})
        else:
            out.append({"kind": "completion", "prompt": f"{i}: {prompt}", "stream": i % 3 == 0, **req})
    return out


def _check_load(url: str, app, requests: list[dict]) -> None:
    """16 clients x 4 requests each; each result equals its request's single-client result."""
    import psutil

    alone = _load_test(url, requests, clients=1)
    rss_idle = psutil.Process().memory_info().rss
    together = _load_test(url, requests, clients=16)
    assert together == alone  # nothing lost, duplicated or mixed up; greedy and seeded outputs exact
    scheduler = _scheduler(app)
    assert scheduler.running == 0 and scheduler.queue_depth == 0
    assert httpx.get(f"{url}/health").status_code == 200
    assert psutil.Process().memory_info().rss - rss_idle < 64 << 20


def test_bounded_load_tiny(server):
    url, app = server
    requests = _mixed_requests(MODEL, ["the quick brown fox ", "lazy dog ", "edge run exports small models "], 64,
                               (4, 9, 16, 23))
    _check_load(url, app, requests)


@pytest.mark.slow
def test_bounded_load_smollm2(smollm2_package, mt_bench_prompts):
    """SmolLM2 fp32 ONNX, 16 clients x 4 requests: every output equals its single-client run."""
    engine = edgerun.Engine(smollm2_package, max_context=1024)
    with running_server(lambda: engine, ServeOptions(model_id="smollm2", max_batch=8)) as (url, app):
        requests = _mixed_requests("smollm2", [p[:400] for p in mt_bench_prompts], 64, (8, 16, 24, 32))
        _check_load(url, app, requests)
    engine.scheduler().close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_starts_answers_and_stops_on_ctrl_c(tiny_fp32):
    import signal
    import subprocess
    import sys

    port = _free_port()
    cmd = [sys.executable, "-m", "edgerun", "serve", str(tiny_fp32), "--port", str(port), "--max-context", "128",
           "--max-batch", "2", "--api-key", KEY, "--model-name", MODEL, "--threads", "1", "--speculative", "lookup"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        r = client.completions.create(model=MODEL, prompt="the fox", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
        # the port is taken: a second server says so in one line
        taken = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 1 and taken.stderr.strip().splitlines() == [
            f"edge-run: error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another --port "
            f"(or --host)"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and f"http://127.0.0.1:{port}/v1" in stderr


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in 1..65535"),
    (["--max-batch", "0"], "--max-batch must be in"),
    (["--speculative", "nope"], "unknown speculative mode"),
    (["--speculative", "self:4"], "edge-run serve speculates with lookup"),
])
def test_cli_serve_rejects_bad_flags_before_loading(args, message, capsys):
    from edgerun.cli import main

    assert main(["serve", "/nonexistent", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-run: error: ") and message in err[0]


def test_cli_serve_reports_a_failed_load(capsys):
    from edgerun.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "/nonexistent/model", "--port", str(_free_port())])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-run: error: loading the model failed: /nonexistent/model is "
                                               "neither a file, a folder nor a known model")


def test_serving_bench_runs_both_servers_on_a_tiny_model(tiny_fp32, tmp_path, monkeypatch):
    """bench/serving.py end to end on the tiny GGUF (figures are for the README, not asserted)."""
    pytest.importorskip("llama_cpp.server.app")  # llama-cpp-python's server extra
    from edgerun.bench.serving import main

    monkeypatch.setenv("EDGE_RUN_HOME", str(tmp_path / "home"))
    out = tmp_path / "serving.json"
    report = main([str(tiny_fp32 / "model.gguf"), "--clients", "1", "2", "--requests", "2", "--max-tokens", "4",
                   "--threads", "1", "--max-context", "256", "--prompt-chars", "40", "--second-turn", "2",
                   "--target", f"edgerun:{tiny_fp32}@onnx", "--json", str(out)])
    assert json.loads(out.read_text())["results"] == report["results"]
    assert [r["kind"] for r in report["results"]] == ["edgerun", "edgerun", "llamacpp"]
    for result in report["results"]:
        assert [level["clients"] for level in result["levels"]] == [1, 2]
        assert all(level["requests"] == 2 * level["clients"] and level["tokens"] > 0 for level in result["levels"])
    assert "second_turn_ttft_ms_p50" in report["results"][0]["prompt_cache"]
