"""`edge-run serve`: an OpenAI-compatible HTTP server over the engine's scheduler.

FastAPI routes on uvicorn; server-sent events through sse-starlette; metrics with
prometheus_client. Every request is decoded by the engine's continuous-batching scheduler
(runtime/scheduler.py), so concurrent clients share its batch steps.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.manifest import PackageError
from ..runtime.requests import RequestHandle, SchedulerClosed, StreamResponse
from ..runtime.scheduler import QueueFull
from ..runtime.tools import ToolPlan, parse_tool_calls
from .metrics import RequestTracker, ServerMetrics
from .openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    usage_dict,
    validation_message,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 << 20


@dataclass(frozen=True)
class ServeOptions:
    """Settings of the HTTP side (the engine's are the loader's).

    Attributes:
        model_id: the name /v1/models lists and requests must give as `model`.
        api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
        max_batch, prefill_chunk, prompt_cache_bytes, speculative: the scheduler's settings.
        max_body_bytes: larger request bodies get 413.
    """

    model_id: str
    api_key: str | None = None
    max_batch: int = 8
    prefill_chunk: int = 128
    prompt_cache_bytes: int = 256 << 20
    speculative: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class _State:
    """What the routes share: the engine once loaded, its scheduler, the metrics."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.engine = None
        self.scheduler = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.metrics = ServerMetrics(lambda: self.scheduler)

    def ready(self):
        if self.scheduler is None:
            raise ApiError(503, self.load_error or "the model is still loading; retry shortly", "server_error",
                           code="model_loading" if self.load_error is None else "model_load_failed")
        return self.engine, self.scheduler


def create_app(load: Callable[[], object], options: ServeOptions,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The ASGI app. `load()` returns an Engine; it runs in a thread at startup while /health says 503.

    Args:
        load: builds the engine (edgerun.load(...) with the user's settings).
        options: HTTP and scheduler settings.
        on_load_error: called with the message when `load` fails (the CLI stops the server).
    """
    state = _State(options)

    def load_engine() -> None:
        try:
            engine = load()
            scheduler = engine.scheduler(max_batch=options.max_batch, prefill_chunk=options.prefill_chunk,
                                         prompt_cache_bytes=options.prompt_cache_bytes, speculative=options.speculative)
            engine.grammars.ll_tokenizer  # noqa: B018 - built now (seconds at 152k tokens), not on the first request
            state.engine = engine
            state.scheduler = scheduler  # last: routes take a set scheduler as "loaded"
            log.info("serving %s (%s backend, %d rows of %d positions)", options.model_id,
                     engine.backend.name, options.max_batch, engine.max_context)
        except Exception as e:  # noqa: BLE001 - reported on /health and by the CLI, in one line
            state.load_error = f"loading the model failed: {e}"
            if on_load_error is None:
                log.error("%s", state.load_error)
            else:
                on_load_error(state.load_error)

    async def lifespan(app: FastAPI):
        threading.Thread(target=load_engine, name="edgerun-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            state.scheduler.close()

    app = FastAPI(title="edge-run", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.edgerun = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        state.metrics.error(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, ApiError(e.status_code, str(e.detail), "invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return await api_error(request, ApiError(500, f"internal error: {type(e).__name__}", "server_error"))

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if options.api_key and request.url.path != "/health" and not _authorized(request, options.api_key):
            return await api_error(request, ApiError(
                401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.scheduler is None:
            return JSONResponse({"status": "error" if state.load_error else "loading",
                                 **({"message": state.load_error} if state.load_error else {})}, status_code=503)
        if not state.scheduler.alive:
            return JSONResponse({"status": "error", "message": "the scheduler stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        _check_model(state, model_id)
        return JSONResponse(_model_card(state))

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        engine, scheduler = state.ready()
        req = _parse(ChatRequest, await _json_body(request, options.max_body_bytes))
        _check_model(state, req.model)
        req.check_supported()
        response_format, tools = req.response_format, None
        try:
            # rendering and tokenizing run beside the event loop, which goes on streaming to other clients
            if req.tools:
                tokens, tools = await asyncio.to_thread(engine.tool_turn, req.plain_messages(), req.tools,
                                                        req.tool_choice)
                response_format = tools.response_format
            else:
                text = await asyncio.to_thread(engine.apply_chat_template, req.plain_messages())
                tokens = await asyncio.to_thread(engine.encode, text, False)
        except Exception as e:  # noqa: BLE001 - the template's own error (jinja2, package), as a 400
            if req.tools and isinstance(e, ValueError) and not isinstance(e, PackageError):  # bad tools
                raise ApiError(400, str(e), "invalid_request_error", param="tools") from None
            raise ApiError(400, f"the model's chat template cannot render these messages: {e}",
                           "invalid_request_error", param="messages") from None
        handle = _submit(state, tokens, req, req.max_completion_tokens or req.max_tokens,
                         req.top_logprobs or 0 if req.logprobs else None, response_format)
        return await _respond(state, request, handle, req, chat=True, tools=tools)

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine, scheduler = state.ready()
        req = _parse(CompletionRequest, await _json_body(request, options.max_body_bytes))
        _check_model(state, req.model)
        req.check_supported()
        prompt = req.single_prompt()
        tokens = await asyncio.to_thread(engine.encode, prompt) if isinstance(prompt, str) else prompt
        vocab = engine.manifest.model.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise ApiError(400, f"prompt token ids must be in 0..{vocab - 1}", "invalid_request_error", param="prompt")
        handle = _submit(state, tokens, req, req.max_tokens, req.logprobs, req.response_format)
        return await _respond(state, request, handle, req, chat=False)

    return app


def _json(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _authorized(request: Request, key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _model_card(state: _State) -> dict:
    return {"id": state.options.model_id, "object": "model", "created": state.created, "owned_by": "edge-run"}


def _check_model(state: _State, model: str) -> None:
    if model != state.options.model_id:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{state.options.model_id}'",
                       "invalid_request_error", param="model", code="model_not_found")


async def _json_body(request: Request, limit: int) -> dict:
    """The request body parsed as a JSON object; 413 past `limit` bytes, 400 when malformed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit}", "invalid_request_error")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", "invalid_request_error")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_request_error") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_request_error")
    return body


def _parse(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(e)
        raise ApiError(400, message, "invalid_request_error", param=param) from None


def _submit(state: _State, tokens: list[int], req, max_tokens: int | None, logprobs: int | None,
            response_format: dict | None = None) -> RequestHandle:
    """Check the lengths against the context and the response format, and queue the request."""
    engine, scheduler = state.ready()
    context = engine.max_context
    if not tokens:
        raise ApiError(400, "the prompt is empty", "invalid_request_error", param="prompt")
    if len(tokens) >= context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, and the prompt has "
                            f"{len(tokens)}; shorten it", "invalid_request_error", param="messages",
                       code="context_length_exceeded")
    room = context - len(tokens)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"max_tokens is too large: {max_tokens}; the context holds {context} tokens and the "
                            f"prompt takes {len(tokens)}, so at most {room} can be generated",
                       "invalid_request_error", param="max_tokens", code="context_length_exceeded")
    try:
        return scheduler.submit(tokens, max_new_tokens=max_tokens or room, **req.sampling(), logprobs=logprobs,
                                response_format=response_format)
    except ValueError as e:
        param = "response_format" if "response_format" in str(e) else None
        raise ApiError(400, str(e), "invalid_request_error", param=param) from None
    except QueueFull as e:
        raise ApiError(429, str(e), "server_overloaded", code="queue_full") from None
    except SchedulerClosed as e:
        raise ApiError(503, str(e), "server_error") from None


async def _respond(state: _State, request: Request, handle: RequestHandle, req, chat: bool,
                   tools: ToolPlan | None = None):
    completion_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    tracker = state.metrics.track(handle)
    endpoint = "chat" if chat else "completions"
    if req.stream:
        events = _stream(state, tracker, req, chat, completion_id, created, tools)
        return EventSourceResponse(_finishing(tracker, events, endpoint), sep="\n", ping=15,
                                   headers={"Cache-Control": "no-cache"})
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    try:
        responses = [r async for r in _finishing(tracker, _responses(tracker), endpoint)]
    finally:
        watcher.cancel()
    if handle.finish_reason not in ("stop", "length") or handle.usage is None:
        raise ApiError(500, "the request ended without a result", "server_error")
    logprobs = _logprob_builder(state, chat) if handle.settings.logprobs is not None else None
    if not chat:
        return JSONResponse(completion_response(completion_id, created, state.options.model_id, responses, handle,
                                                logprobs))
    calls = parse_tool_calls("".join(r.text for r in responses), tools.wrapped) if tools else None
    return JSONResponse(chat_response(completion_id, created, state.options.model_id, responses, handle, logprobs,
                                      calls))


async def _responses(tracker: RequestTracker) -> AsyncIterator[StreamResponse]:
    async for r in tracker.handle:
        tracker.token(r)
        yield r


async def _finishing(tracker: RequestTracker, items: AsyncIterator, endpoint: str) -> AsyncIterator:
    """Pass `items` through; however it ends (done, error, client gone: the task is cancelled), the
    request is cancelled if still running, so its row is freed before the next step, and counted."""
    try:
        async for item in items:
            yield item
    finally:
        tracker.handle.cancel()  # a no-op once it finished
        tracker.finished(endpoint)


async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
    """A client that hangs up before a non-streamed answer is ready cancels its request."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


def _logprob_builder(state: _State, chat: bool):
    engine = state.engine

    def token_text(token: int) -> str:
        return engine.tokenizer.decode([token], skip_special_tokens=False)

    return (chat_logprobs if chat else completion_logprobs), token_text


async def _stream(state: _State, tracker: RequestTracker, req, chat: bool, completion_id: str,
                  created: int, tools: ToolPlan | None = None) -> AsyncIterator[dict]:
    """Server-sent events of one request: chunks, a usage chunk when asked, then [DONE].

    A turn with tools is sent whole at its end (one delta with the call or the text), since whether
    it is a call is known only then."""
    handle, model_id = tracker.handle, state.options.model_id
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    logprobs = _logprob_builder(state, chat) if handle.settings.logprobs is not None else None
    usage_field = {"usage": None} if with_usage else {}
    if chat:  # the role comes in the first delta only
        yield {"data": _json(chat_chunk(completion_id, created, model_id, {"role": "assistant", "content": ""},
                                             None, None, usage_field))}
    offset, held = 0, []
    try:
        async for r in _responses(tracker):
            lp = logprobs[0]([r], logprobs[1], offset) if logprobs else None
            if tools is not None:
                held.append(r)
                if r.finish_reason is not None:
                    yield {"data": _json(_tool_turn_chunk(held, tools, completion_id, created, model_id, usage_field,
                                                          logprobs))}
            elif r.text or lp or r.finish_reason is not None:
                if chat:
                    delta = {"content": r.text} if r.text or lp else {}
                    chunk = chat_chunk(completion_id, created, model_id, delta, lp, r.finish_reason, usage_field)
                else:
                    chunk = completion_chunk(completion_id, created, model_id, r.text, lp, r.finish_reason,
                                             usage_field)
                yield {"data": _json(chunk)}
            offset += len(r.text)
    except (SchedulerClosed, RuntimeError) as e:  # the stream has started: report in-band, as OpenAI does
        log.error("request %s failed: %s", completion_id, e)
        yield {"data": _json(ApiError(500, f"generation failed: {e}", "server_error").body())}
        return
    if handle.finish_reason not in ("stop", "length"):
        return
    if with_usage and handle.usage is not None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        yield {"data": _json({"id": completion_id, "object": obj, "created": created, "model": model_id,
                                   "choices": [], "usage": usage_dict(handle.usage)})}
    yield {"data": "[DONE]"}


def _tool_turn_chunk(responses: list[StreamResponse], tools: ToolPlan, completion_id: str, created: int,
                     model_id: str, usage_field: dict, logprobs) -> dict:
    """The one chunk of a streamed turn with tools: the call (as delta.tool_calls) or the text."""
    text = "".join(r.text for r in responses)
    calls = parse_tool_calls(text, tools.wrapped)
    lp = logprobs[0](responses, logprobs[1], 0) if logprobs else None
    if calls:
        delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
        return chat_chunk(completion_id, created, model_id, delta, lp, "tool_calls", usage_field)
    return chat_chunk(completion_id, created, model_id, {"content": text}, lp, responses[-1].finish_reason,
                      usage_field)


def serve(load: Callable[[], object], options: ServeOptions, host: str = "127.0.0.1", port: int = 8080,
          log_level: str = "info") -> None:
    """Run the server until interrupted (Ctrl-C); the port is taken before the model loads.

    Raises:
        OSError: the address cannot be bound (port taken, no such interface).
        RuntimeError: the model failed to load (the server stops then).
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port (or --host)") from None
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """Ctrl-C or SIGTERM stop the server gracefully (a second one at once); unlike uvicorn's
            own handler this one does not raise the signal again afterwards (a traceback, exit 130)."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def handle(signum, frame):
                self.force_exit = self.should_exit
                self.should_exit = True

            previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    app = create_app(load, options, on_load_error=stop)
    server = Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failure:
        raise RuntimeError(failure[0])
