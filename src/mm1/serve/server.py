"""`mm1 serve`: an OpenAI-compatible HTTP server over the continuous batcher.

    POST /v1/chat/completions   text and image_url parts (data URLs), stream or not
    GET  /v1/models             the one model served
    GET  /metrics               Prometheus counters, gauges and latency histograms
    GET  /health                liveness

The server only validates, queues and streams: one worker thread runs the batcher's `run` — a
`ContinuousBatcher` in this process, or (`mm1 serve`'s default) a `RemoteBatcher` that passes requests to
the model in an engine process of its own (`mm1.serve.engine_process`); each request waits on an asyncio
queue that the worker feeds. Requests
are checked completely (`mm1.serve.requests`) before they are queued, and a refused request gets
an OpenAI-style error body while the server goes on serving the others. The official `openai`
client works unchanged against it (tested).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from mm1.data.template import ChatTemplate, template_for
from mm1.serve.batching import ContinuousBatcher
from mm1.serve.engine import Engine, GenerationConfig
from mm1.serve.engine_process import RemoteBatcher
from mm1.serve.generation import Completion, TokenLogprob
from mm1.serve.generation import Request as GenRequest
from mm1.serve.metrics import ServerMetrics
from mm1.serve.requests import ChatRequest, Limits, RequestError, parse_chat
from mm1.system import available_cores


@dataclass
class ServerState:
    """What the app serves: the engine (for tokenizing: its model may be elsewhere, `RemoteBatcher`), its
    batcher, the limits and the model's name."""

    engine: Engine
    batcher: ContinuousBatcher | RemoteBatcher
    limits: Limits
    model_name: str
    api_key: str | None = None
    template: ChatTemplate | None = None  # None: the model's own (`template_for(engine.tok)`)
    images_first: bool = False  # move each message's images before its text (`mm1 serve --images-first`)
    stop: threading.Event | None = None
    mailbox: _Mailbox | None = None  # made on the first request, in the server's event loop
    metrics: ServerMetrics | None = None

    def __post_init__(self) -> None:
        if self.template is None:
            self.template = template_for(self.engine.tok)
        self.metrics = ServerMetrics(waiting=self.batcher.queued, running=self.batcher.running,
                                     model=self.model_name, image_cache=self.batcher.image_cache)


def _error(err: RequestError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _read_body(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {int(declared):,} bytes; the limit is {limit:,}",
                           code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit:,} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:  # JSON nested thousands deep
        raise RequestError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise RequestError(400, f"the request body holds a value that cannot be read: {err}",
                           code="invalid_json") from None


def _json_content(request: Request) -> None:
    """A POST must say it is JSON: a web page's form or `text/plain` "simple request" (no CORS preflight)
    must not reach the model."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(415, f"Content-Type must be application/json, got {kind or 'none'!r}",
                           code="unsupported_media_type")


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise RequestError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                           kind="authentication_error")


class _Mailbox:
    """Hands items from the worker thread to the event loop with at most one wake-up in flight: a
    decoding step that advances 16 requests wakes the loop once, not 16 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def post(self, queue: asyncio.Queue, item: object) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


class _Sink:
    """Carries a request's text from the worker thread to the event loop."""

    def __init__(self, mailbox: _Mailbox) -> None:
        self.mailbox, self.queue = mailbox, asyncio.Queue()
        self.held: str | Completion | BaseException | None = None
        self.arrived, self.first_text_at = time.perf_counter(), None
        self.pending: list = []  # log-probabilities of tokens whose text is on its way
        self.lock = threading.Lock()

    def logprobs(self, entries: list) -> None:  # (worker thread) always before the text they belong to
        with self.lock:
            self.pending.extend(entries)

    def take_logprobs(self) -> list:
        with self.lock:
            taken, self.pending = self.pending, []
        return taken

    def text(self, piece: str) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        self.mailbox.post(self.queue, piece)

    def done(self, result: Completion | BaseException) -> None:
        self.mailbox.post(self.queue, result)

    async def next(self) -> str | Completion | BaseException:
        """The next item; consecutive text pieces that have already arrived come as one (under load
        the worker runs ahead of the event loop: fewer, larger chunks, the same text)."""
        item = self.held if self.held is not None else await self.queue.get()
        self.held = None
        while isinstance(item, str) and not self.queue.empty():
            nxt = self.queue.get_nowait()
            if not isinstance(nxt, str):
                self.held = nxt
                break
            item += nxt
        return item


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _account(state: ServerState, sink: _Sink, item: Completion | BaseException | None) -> None:
    m = state.metrics
    if isinstance(item, Completion):
        m.requests.labels("completed").inc()
        m.prompt_tokens.inc(item.prompt_tokens)
        m.generated_tokens.inc(item.completion_tokens)
        m.latency.observe(time.perf_counter() - sink.arrived)
        if sink.first_text_at is not None:
            m.ttft.observe(sink.first_text_at - sink.arrived)
    else:
        m.requests.labels("timed_out" if isinstance(item, TimeoutError) else "failed").inc()


async def _next(state: ServerState, sink: _Sink) -> str | Completion | BaseException:
    """The request's next item, or a TimeoutError once it has run for longer than the limit."""
    left = state.limits.request_timeout_s - (time.perf_counter() - sink.arrived)
    try:
        return await asyncio.wait_for(sink.next(), timeout=max(0.0, left))
    except TimeoutError:
        return TimeoutError(f"the request ran for more than {state.limits.request_timeout_s:g} s")


def _logprobs(state: ServerState, entries: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's `logprobs` object: each token with its log-probability, bytes and the top alternatives."""
    if entries is None:
        return None
    tok = state.engine.tok

    def one(token_id: int, logprob: float) -> dict:
        text = tok.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [one(e.token_id, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


async def _one_completion(state: ServerState, sink: _Sink) -> Completion | BaseException:
    while True:
        item = await _next(state, sink)
        if isinstance(item, BaseException | Completion):
            _account(state, sink, item)
            return item


async def _complete(state: ServerState, sinks: list[_Sink]) -> JSONResponse:
    results = await asyncio.gather(*(_one_completion(state, s) for s in sinks))
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:  # this request failed (logged by the batcher); the server goes on
        timeout = isinstance(failed, TimeoutError)
        return JSONResponse({"error": {"message": str(failed) if timeout else f"generation failed: {failed}",
                                       "type": "server_error", "param": None,
                                       "code": "timeout" if timeout else "generation_failed"}},
                            status_code=504 if timeout else 500)
    usage = {"prompt_tokens": results[0].prompt_tokens, "completion_tokens": sum(r.completion_tokens for r in results)}
    return JSONResponse({
        "id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                     "finish_reason": r.finish_reason, "logprobs": _logprobs(state, r.logprobs)}
                    for i, r in enumerate(results)],
        "usage": usage | {"total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}})


async def _stream(state: ServerState, chat: ChatRequest, sink: _Sink, req: GenRequest) -> AsyncIterator[str]:
    cid, created = _completion_id(), int(time.time())

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        logprobs = _logprobs(state, sink.take_logprobs()) if chat.gen.logprobs and "content" in delta else None
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await _next(state, sink)
            if isinstance(item, str):
                yield chunk({"content": item})
            elif isinstance(item, Completion):
                _account(state, sink, item)
                yield chunk({}, item.finish_reason)
                if chat.include_usage:  # OpenAI's last chunk: no choices, the usage
                    last = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": state.model_name, "choices": [], "usage": _usage(item)}
                    yield f"data: {json.dumps(last)}\n\n"
                break
            else:
                _account(state, sink, item)
                message = str(item) if isinstance(item, TimeoutError) else f"generation failed: {item}"
                err = {"error": {"message": message, "type": "server_error"}}
                yield f"data: {json.dumps(err)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled.set()  # a client that went away frees its row at the next step


def _choice(gen: GenerationConfig, i: int) -> GenerationConfig:
    """Choice i of n: its own seed (seed + i, kept within what torch takes)."""
    seed = gen.seed + i if gen.seed + i < 2**64 else gen.seed - i
    return dataclasses.replace(gen, seed=seed)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.stop = threading.Event()
        worker = threading.Thread(target=state.batcher.run, args=(state.stop,), name="mm1-batcher", daemon=True)
        worker.start()
        yield
        state.stop.set()
        worker.join(timeout=10)
        state.batcher.end_all(RuntimeError("the server is shutting down"))  # nothing is left waiting

    app = FastAPI(title="mm1", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def refused(_: Request, err: RequestError) -> JSONResponse:
        return _error(err)

    @app.middleware("http")
    async def every_route_but_health_needs_the_key(request: Request, call_next):
        # /docs, /redoc and /openapi.json included: they describe the server to whoever asks
        if request.url.path != "/health":
            try:
                _authorize(request, state.api_key)
            except RequestError as err:
                return _error(err)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": state.batcher.running(), "waiting": state.batcher.queued()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _authorize(request, state.api_key)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "mm1"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(request, state.api_key)
        _json_content(request)
        body = await _read_body(request, state.limits.max_body_bytes)
        context = state.batcher.max_len
        if state.batcher.queued() >= state.limits.max_waiting:  # before any parsing or tokenizing
            state.metrics.requests.labels("rejected_busy").inc()
            raise RequestError(429, f"the server is busy ({state.limits.max_waiting} requests waiting); retry "
                                    "shortly", code="queue_full", kind="rate_limit_error")
        chat = await run_in_threadpool(parse_chat, body, state.engine, state.limits, state.template, context,
                                       images_first=state.images_first)
        if state.mailbox is None:
            state.mailbox = _Mailbox(asyncio.get_running_loop())
        sinks = [_Sink(state.mailbox) for _ in range(chat.n)]
        reqs = [GenRequest(chat.encoded, _choice(chat.gen, i), on_text=s.text, on_done=s.done,
                           on_logprobs=s.logprobs) for i, s in enumerate(sinks)]
        for req in reqs:
            state.batcher.submit(req)
        if chat.stream:
            return StreamingResponse(_stream(state, chat, sinks[0], reqs[0]), media_type="text/event-stream")
        try:
            return await _complete(state, sinks)
        finally:
            for req in reqs:
                req.cancelled.set()

    return app


def cpu_threads() -> int:
    """Torch threads for serving on a CPU: all cores but one, which the event loop needs. (With every
    core given to torch, its spinning threads starve the loop that streams the tokens: measured on 2
    cores, 16 clients got 2.1x less throughput.)"""
    return max(1, available_cores() - 1)


def serve(state: ServerState, *, host: str, port: int, grace_s: float = 10.0) -> None:
    """Serve until SIGTERM/Ctrl-C; then stop taking requests, give running ones `grace_s` seconds, end the
    rest (their clients get an error) and return."""
    import uvicorn

    class _Server(uvicorn.Server):
        def capture_signals(self):  # uvicorn re-raises SIGTERM after a graceful shutdown: the exit is ours, 0
            self._captured_signals = []
            return super().capture_signals()

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # handled: nothing to raise again on the way out

    config = uvicorn.Config(create_app(state), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=grace_s)
    _Server(config).run()
