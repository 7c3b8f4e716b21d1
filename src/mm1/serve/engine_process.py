"""The continuous batcher in a process of its own, as vLLM's engine core.

In one process, the model's torch threads and the server's event loop (parsing, tokenizing, streaming)
take turns at one interpreter: on 2 cores a second torch thread made batch-1 decoding slower, not faster
(docs/benchmarks.md). Here the API process validates, tokenizes and streams, and a child process (spawned,
so it shares nothing it did not ask for) loads the model and runs the `ContinuousBatcher` with the cores
to itself. They talk over two queues:

    API → engine   ("submit", id, token ids, images as arrays, GenerationConfig) | ("cancel", id) | ("stop",)
    engine → API   ("ready", context) | ("failed", why) | ("text", id, piece) | ("logprobs", id, entries)
                   | ("done", id, Completion) | ("error", id, why) | ("stats", queued, running, cache counts)

`RemoteBatcher` has the batcher's interface (`submit`, `run`, `end_all`, `queued`, `running`,
`image_cache`, `max_len`), so the server does not know which it has. A request's callbacks run in the
API process's worker thread, as the batcher's do. If the engine process dies, every request it held ends
with an error (the client gets a 5xx or an error chunk, never a hang) and a new engine process starts;
after `max_restarts` deaths in a row the batcher stops taking requests and says why.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from dataclasses import dataclass

from mm1.serve.batching import _end
from mm1.serve.generation import Completion, Request
from mm1.system import available_cores

log = logging.getLogger(__name__)
STATS_EVERY_S = 0.1


@dataclass(frozen=True)
class EngineSpec:
    """How the engine process builds its engine (picklable: the spawned process rebuilds it from this)."""

    checkpoint: str
    device: str = "cpu"
    threads: int = 0  # torch threads; 0: every core (the API process needs little)
    max_batch: int = 16
    prefill_chunk: int = 256
    plain_weights: bool = False  # keep the decoder's weights row-major (mm1.serve.cpu_layout)
    int8: bool = False  # the decoder's linear layers in int8 (mm1.serve.cpu_layout.quantize_linears)
    compile: bool = False  # torch.compile the engine's passes, compiled before the first request is taken
    ignore_eos: bool = False  # every request runs to its max_tokens (benchmarks, as vLLM's ignore_eos)


# ----------------------------------------------------------------------------- the engine process


def _build(spec: EngineSpec):
    import torch

    from mm1.serve.batching import ContinuousBatcher
    from mm1.serve.cpu_layout import pack_linears, quantize_linears
    from mm1.serve.engine import Engine
    from mm1.store.loading import load_model

    torch.set_num_threads(spec.threads or available_cores())
    model, tok, cfg = load_model(spec.checkpoint, device=spec.device)
    if spec.int8:
        quantize_linears(model)
    elif not spec.plain_weights:  # compiled: the plain weights too, for the one-row graph
        pack_linears(model, keep_plain=spec.compile)
    engine = Engine.for_run(model, tok, cfg, compile=spec.compile)
    batcher = ContinuousBatcher(engine, max_batch=spec.max_batch, prefill_chunk=spec.prefill_chunk)
    if spec.compile:
        batcher.warm_up()
    if spec.ignore_eos:
        engine.stop_ids = set()
    return batcher


def _submit(batcher, local: dict, events, rid: int, ids: list[int], images: list, gen) -> None:
    import torch

    from mm1.serve.engine import Encoded

    def done(result: Completion | BaseException) -> None:
        local.pop(rid, None)
        if isinstance(result, Completion):
            events.put(("done", rid, result))
        else:
            events.put(("error", rid, f"{type(result).__name__}: {result}"))

    request = Request(Encoded(ids, [torch.from_numpy(im) for im in images]), gen,
                      on_text=lambda piece: events.put(("text", rid, piece)), on_done=done,
                      on_logprobs=lambda entries: events.put(("logprobs", rid, entries)))
    local[rid] = request
    try:
        batcher.submit(request)
    except Exception as err:  # (checked before, in the API process) it ends alone
        done(err)


def engine_main(spec: EngineSpec, commands, events) -> None:
    """The engine process: build the batcher, then take commands and step until told to stop."""
    # Ctrl-C in a terminal reaches the whole process group: the server shuts its engine down itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        batcher = _build(spec)
    except Exception as err:
        events.put(("failed", f"{type(err).__name__}: {err}"))
        return
    events.put(("ready", batcher.max_len))
    local: dict[int, Request] = {}
    last_stats = 0.0
    while True:
        try:  # every command that has arrived; wait for one only when there is nothing to decode
            msg = commands.get(timeout=0.2) if not batcher.busy else commands.get_nowait()
            while True:
                if msg[0] == "submit":
                    _submit(batcher, local, events, *msg[1:])
                elif msg[0] == "cancel" and msg[1] in local:  # the batcher drops it at its next step
                    local.pop(msg[1]).cancelled.set()
                elif msg[0] == "stop":
                    batcher.end_all(RuntimeError("the server is shutting down"))
                    return
                msg = commands.get_nowait()
        except queue.Empty:
            pass
        if batcher.busy:
            batcher.step_safely()
        now = time.monotonic()
        if now - last_stats >= STATS_EVERY_S:
            cache = batcher.image_cache
            events.put(("stats", batcher.queued(), batcher.running(), cache.hits, cache.misses, cache.bytes))
            last_stats = now


# ----------------------------------------------------------------------------- the API process's side


@dataclass
class CacheStats:
    """The engine process's image-cache counts, as its last report gave them (read by /metrics)."""

    hits: int = 0
    misses: int = 0
    bytes: int = 0


class EngineDiedError(RuntimeError):
    """The engine process exited while it held the request."""


class RemoteBatcher:
    """A `ContinuousBatcher` in an engine process: the same interface, for the server's worker thread."""

    def __init__(self, spec: EngineSpec, *, max_restarts: int = 3, start_timeout_s: float = 600.0) -> None:
        self.spec, self.max_restarts, self.start_timeout_s = spec, max_restarts, start_timeout_s
        self.ctx = mp.get_context("spawn")
        self.open: dict[int, Request] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.stats = (0, 0)  # (queued, running) in the engine, as last reported
        self.image_cache = CacheStats()
        self.deaths = 0
        self.broken: str | None = None  # why no engine runs (after max_restarts deaths in a row)
        self.proc = None
        self.commands, self.events = self.ctx.Queue(), self.ctx.Queue()
        self._start()

    def _start(self) -> None:
        """Start an engine process on the current queues and wait until it has built its model."""
        self.proc = self.ctx.Process(target=engine_main, args=(self.spec, self.commands, self.events),
                                     name="mm1-engine", daemon=True)
        self.proc.start()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            try:
                msg = self.events.get(timeout=0.5)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise EngineDiedError(f"the engine process exited with code {self.proc.exitcode} while "
                                          "starting") from None
                continue
            if msg[0] == "ready":
                self.max_len = msg[1]
                return
            if msg[0] == "failed":
                self.proc.join(timeout=10)
                raise RuntimeError(f"the engine process could not start: {msg[1]}")
        self.proc.kill()
        raise RuntimeError(f"the engine process did not start within {self.start_timeout_s:g} s")

    # -- what the server calls ----------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request (thread-safe); its prompt plus max_new_tokens must fit in `max_len`."""
        need = len(request.encoded.ids) + request.gen.max_new_tokens
        if need > self.max_len:
            raise ValueError(f"prompt ({len(request.encoded.ids)} tokens) + max_new_tokens "
                             f"({request.gen.max_new_tokens}) exceeds the context of {self.max_len} tokens")
        if self.broken is not None:
            raise EngineDiedError(self.broken)
        rid = next(self.ids)
        images = [im.detach().cpu().numpy() for im in request.encoded.images]  # pickled by value
        with self.lock:
            self.open[rid] = request
            self.commands.put(("submit", rid, list(request.encoded.ids), images, request.gen))

    def queued(self) -> int:
        with self.lock:
            return max(0, len(self.open) - self.stats[1])

    def running(self) -> int:
        with self.lock:
            return min(self.stats[1], len(self.open))

    @property
    def busy(self) -> bool:
        with self.lock:
            return bool(self.open)

    def run(self, stop: threading.Event) -> None:
        """The worker loop: pass the engine's events to their requests, forward cancellations, and
        restart the engine process if it dies."""
        while not stop.is_set():
            try:
                self._handle(self.events.get(timeout=0.05))
                while True:
                    self._handle(self.events.get_nowait())
            except queue.Empty:
                pass
            except (EOFError, OSError):  # the queue's pipe broke with the process
                pass
            self._forward_cancels()
            if self.proc is not None and not self.proc.is_alive() and not stop.is_set():
                self._restart()

    def end_all(self, err: BaseException) -> None:
        """Stop the engine process (its running requests end) and end every request still open here."""
        if self.proc is not None and self.proc.is_alive():
            with contextlib.suppress(OSError, ValueError):  # a queue already closed
                self.commands.put(("stop",))
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        self._end_open(err)

    # -- inside ----------------------------------------------------------------------------------------

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "stats":
            with self.lock:
                self.stats = (msg[1], msg[2])
            self.image_cache.hits, self.image_cache.misses, self.image_cache.bytes = msg[3:6]
            self.deaths = 0  # an engine that reports is a healthy one
            return
        with self.lock:
            request = self.open.get(msg[1])
            if kind in ("done", "error"):
                self.open.pop(msg[1], None)
        if request is None:
            return
        if kind == "text":
            request.on_text(msg[2])
        elif kind == "logprobs":
            request.on_logprobs(msg[2])
        elif kind == "done":
            _end(request, msg[2])
        elif kind == "error":
            _end(request, RuntimeError(msg[2]))

    def _forward_cancels(self) -> None:
        """A request its client gave up: no longer open here (the server listens no more), and dropped by
        the engine's batcher at its next step, freeing its row."""
        with self.lock:
            gone = [rid for rid, r in self.open.items() if r.cancelled.is_set()]
            for rid in gone:
                del self.open[rid]
        for rid in gone:
            self.commands.put(("cancel", rid))

    def _end_open(self, err: BaseException) -> None:
        with self.lock:
            lost, self.open = list(self.open.values()), {}
            self.stats = (0, 0)
        for request in lost:
            _end(request, err)

    def _restart(self) -> None:
        code = self.proc.exitcode
        self.deaths += 1
        log.error("the engine process exited with code %s; ending its requests and starting a new one", code)
        with self.lock:  # what the dead process held ends; what comes from now on waits for the new one
            lost, self.open = list(self.open.values()), {}
            self.stats = (0, 0)
            self.commands, self.events = self.ctx.Queue(), self.ctx.Queue()
        for request in lost:
            _end(request, EngineDiedError(f"the engine process exited (code {code}) while it held this request"))
        if self.deaths > self.max_restarts:
            self.broken = f"the engine process died {self.deaths} times in a row (last exit code {code})"
            self.proc = None
            return
        try:
            self._start()
        except Exception as err:
            self.broken = f"the engine process could not be restarted: {err}"
            self.proc = None
