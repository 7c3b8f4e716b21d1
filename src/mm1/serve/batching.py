"""Continuous batching: the one decoding loop. Generations share it, joining and leaving at step boundaries.

Every generation in mm1 runs here: the server's requests as they arrive, and `Engine.complete`
(`mm1 generate`, `mm1 chat`, evaluation) as a batch submitted at once and stepped to its end.
Each of `max_batch` cache rows holds one request at its own length. A step (1) admits
waiting requests into free rows with one batched prompt pass (right-padded; each row's prompt
lands in cache slots 0..L-1), then (2) advances every running row by one token, each writing its
key/value at its own length. Running rows are kept at the front of the cache, so a step only
computes the rows in use and attends over the slots in use (rounded up, to limit distinct shapes);
a finished row's slot is refilled by moving the last running row into it. A greedy row decodes as
it would alone, up to floating-point summation order; greedy picks are made on the model's device
(B ids come back, not B × V logits).

Chunked prefill: while rows are decoding, a prompt longer than `prefill_chunk` tokens (many images)
is not prefilled in one pass that would stall them; it waits in `pending`, then fills the cache row
after the running ones (`filling`) `prefill_chunk` tokens per step, between decoding steps, and joins
the running rows with its first token when its prompt is in. Prompts queue behind it in order.

The batcher is not thread-safe except `submit`, which may be called from any thread; one thread
(the server's worker) calls `step`.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mm1.model.decoder import KVCache
from mm1.serve.generation import Completion, Encoded, GenerationConfig, Request, TokenLogprob, pick

if TYPE_CHECKING:  # the engine owns a batcher for its own generations; the batcher only calls it
    from mm1.serve.engine import Engine

log = logging.getLogger(__name__)
SLOT_ROUND = 64  # attend over the slots in use rounded up to this (fewer distinct shapes)


@dataclass(eq=False)  # a row is itself: equality by fields would compare its requests' image tensors
class _Running:
    request: Request
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already passed to on_text
    text: str = ""
    filled: int = 0  # prompt positions in the cache (chunked prefill)
    embeds_TD: torch.Tensor | None = None  # the prompt's embeddings while it is being chunked
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs_sent: int = 0


class ContinuousBatcher:
    """Continuous batching: requests join and leave a shared KV cache between decoding steps."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_len: int | None = None,
                 prefill_chunk: int = 256) -> None:
        self.engine, self.max_batch = engine, max_batch
        self.prefill_chunk = prefill_chunk  # 0: every prompt in one pass
        self.filling: _Running | None = None  # the prompt being prefilled in chunks (cache row len(rows))
        self.pending: collections.deque[_Running] = collections.deque()  # prompts waiting to be chunked
        self.max_len = max_len or engine.model.cfg.decoder.max_seq_len
        self.cache = engine.model.new_cache(max_batch, self.max_len)
        self.length = torch.zeros(max_batch, dtype=torch.long)  # tokens in each row's cache
        self.last = torch.zeros(max_batch, dtype=torch.long)  # each row's last token (the next input)
        self.rows: list[_Running] = []  # rows [0, len) of the cache, in order
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.wake = threading.Event()

    def submit(self, request: Request) -> None:
        """Queue a request (thread-safe). Its prompt plus max_new_tokens must fit in `max_len`."""
        need = len(request.encoded.ids) + request.gen.max_new_tokens
        if need > self.max_len:
            raise ValueError(f"prompt ({len(request.encoded.ids)} tokens) + max_new_tokens "
                             f"({request.gen.max_new_tokens}) exceeds the context of {self.max_len} tokens")
        self.waiting.put(request)
        self.wake.set()

    def end_all(self, err: BaseException) -> None:
        """End every running and waiting request with `err` (shutdown): no client is left waiting."""
        for row in [*self.rows, *([self.filling] if self.filling else []), *self.pending]:
            _end(row.request, err)
        self.rows, self.filling = [], None
        self.pending.clear()
        while True:
            try:
                _end(self.waiting.get_nowait(), err)
            except queue.Empty:
                return

    def warm_up(self) -> None:
        """Run throw-away requests through the steps this batcher takes (prompt passes of one row, twice,
        and of three; decoding at one row and at three, across a cache-size boundary), so that a compiled engine
        compiles, static shapes first and then the dynamic ones, before the first client waits on it."""
        gen = GenerationConfig(max_new_tokens=max(1, min(SLOT_ROUND + 2, self.max_len - 9)), ignore_eos=True)
        # a single prompt twice (a dim of size 1 is never dynamic, so a lone prompt needs its own dynamic
        # graph), then a batch
        for lengths in ((3,), (6,), (2, 5, 9)):
            for n in lengths:
                self.submit(Request(Encoded([self.engine.pad_id] * n, []), gen))
            while self.busy:
                self.step()

    @property
    def busy(self) -> bool:
        return bool(self.rows) or self.filling is not None or bool(self.pending) or not self.waiting.empty()

    def queued(self) -> int:
        """Requests waiting for a row (what the server's queue limit counts)."""
        return self.waiting.qsize()

    def running(self) -> int:
        return len(self.rows)

    @property
    def image_cache(self):
        return self.engine.image_cache

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits (a short prompt's pass gives its first token; a long one is chunked), prefill
        the next chunk of a long prompt, then advance every row that was already running by one token."""
        self._drop_cancelled()
        running = len(self.rows)
        admitted = self._admit()
        if admitted:
            try:
                chunked = [r for r in admitted if self._chunks(r, running)]
                whole = [r for r in admitted if r not in chunked]
                if whole:
                    self._prefill_each_on_failure(whole)
                self.pending.extend(chunked)
            except Exception as err:  # they were taken off the queue: each must end, the running rows go on
                log.exception("admitting %d requests failed; ending them", len(admitted))
                placed = {id(r) for r in (*self.rows, *self.pending)}
                for r in admitted:
                    if id(r) not in placed:
                        _end(r.request, err)
        if self.filling is not None or self.pending:
            self._fill(self.prefill_chunk if self.rows else 1 << 30)  # no one decoding: no reason to chunk
        if running:
            self._decode(running)

    def _chunks(self, row: _Running, running: int) -> bool:
        """Whether a prompt is prefilled in chunks: it is long while rows decode, or others queue already."""
        if not self.prefill_chunk:
            return False
        return self.filling is not None or bool(self.pending) or (
            running > 0 and len(row.request.encoded.ids) > self.prefill_chunk)

    def _fill(self, budget: int) -> None:
        """Prefill up to `budget` prompt tokens of the pending prompts, in order."""
        while budget > 0 and (self.filling is not None or self.pending):
            if self.filling is None:
                row = self.pending.popleft()
                if row.request.cancelled.is_set():
                    continue
                try:
                    row.embeds_TD = self._embed_prompt(row)
                except Exception as err:
                    _end(row.request, err)
                    continue
                self.filling = row
            row, i = self.filling, len(self.rows)
            total = len(row.request.encoded.ids)
            size = min(budget, total - row.filled)
            try:
                logits = self._prefill_chunk(row, i, size)
            except Exception as err:
                self.filling = None
                _end(row.request, err)
                continue
            row.filled += size
            budget -= size
            if row.filled == total:  # its prompt is in: it joins the running rows with its first token
                self.filling, row.embeds_TD = None, None
                self.length[i] = total
                self.rows.append(row)
                self._emit(logits, range(i, i + 1))

    def _embed_prompt(self, row: _Running) -> torch.Tensor:
        eng, dev = self.engine, self.engine.device
        enc = row.request.encoded
        images = torch.stack(enc.images).to(dev, eng.dtype) if enc.images else None
        return eng.model.embed(torch.tensor([enc.ids], device=dev), images, encode_images=eng.encode_images)[0]

    def _prefill_chunk(self, row: _Running, i: int, size: int) -> torch.Tensor:
        """Positions [p, p + size) of the row's prompt into cache row i; the last position's logits."""
        eng, dev, p = self.engine, self.engine.device, row.filled
        S = p + size
        mask = torch.ones(size, S, dtype=torch.bool).tril(diagonal=p)  # all earlier slots, causal within
        cache = KVCache([k[i:i + 1] for k in self.cache.k], [v[i:i + 1] for v in self.cache.v],
                        torch.arange(p, S, device=dev))
        hidden = eng.model.decoder(row.embeds_TD[p:S][None], torch.arange(p, S, device=dev)[None],
                                   mask[None, None].to(dev), cache).hidden_BTD
        return eng.model.decoder.lm_head(hidden[:, -1]).float()

    def run(self, stop: threading.Event) -> None:
        """The worker loop: step while there is work, sleep until a request arrives otherwise."""
        while not stop.is_set():
            if not self.busy:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            self.step_safely()

    def step_safely(self) -> None:
        """`step`; if the shared decoding step itself fails, the requests in it end with the error and the
        batcher goes on serving."""
        try:
            self.step()
        except Exception as err:
            log.exception("decoding step failed; ending the %d requests in it", len(self.rows))
            for row in self.rows:
                _end(row.request, err)
            self.rows = []

    # -- admission and the prompt pass ------------------------------------------------------------

    def _admit(self) -> list[_Running]:
        new: list[_Running] = []
        queued = len(self.pending) + (self.filling is not None)
        while len(self.rows) + queued + len(new) < self.max_batch:
            try:
                req = self.waiting.get_nowait()
            except queue.Empty:
                break
            if req.cancelled.is_set():
                continue
            try:
                new.append(_Running(req, torch.Generator().manual_seed(req.gen.seed)))
            except Exception as err:  # (a seed torch refuses) this request ends; the others go on
                _end(req, err)
        return new

    def _prefill_each_on_failure(self, new: list[_Running]) -> None:
        """One prompt pass for the admitted rows; if it fails, one pass each, so that only the request
        that fails on its own is ended with the error."""
        try:
            self._prefill(new)
            return
        except Exception as err:
            if len(new) == 1:
                _end(new[0].request, err)
                return
        for row in new:
            try:
                self._prefill([row])
            except Exception as err:
                _end(row.request, err)

    def _prefill(self, new: list[_Running]) -> None:
        eng, first = self.engine, len(self.rows)
        n, dev = len(new), eng.device
        lengths = [len(r.request.encoded.ids) for r in new]
        T = max(lengths)
        tokens = torch.full((n, T), eng.pad_id, dtype=torch.long)
        for i, r in enumerate(new):
            tokens[i, : lengths[i]] = torch.tensor(r.request.encoded.ids)
        valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        mask = (torch.ones(T, T, dtype=torch.bool).tril() & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)
        images = [im for r in new for im in r.request.encoded.images]
        embeds = eng.model.embed(tokens.to(dev), torch.stack(images).to(dev, eng.dtype) if images else None,
                                 encode_images=eng.encode_images)
        rows = slice(first, first + n)
        # contiguous, not an expanded view: a view's strides differ between 1 row and many, and a compiled
        # prompt pass would then compile again for the first single prompt after a batch
        positions = torch.arange(T, device=dev).repeat(n, 1)
        hidden = eng.prefill_fn(embeds, positions, mask[:, None].to(dev), [k[rows] for k in self.cache.k],
                                [v[rows] for v in self.cache.v], torch.arange(T, device=dev))
        last = hidden[torch.arange(n, device=dev), torch.tensor(lengths, device=dev) - 1]
        logits = eng.model.decoder.lm_head(last).float()
        self.length[rows] = torch.tensor(lengths)
        self.rows += new
        self._emit(logits, range(first, first + n))

    # -- one decoding step for every running row -------------------------------------------------

    def _decode(self, n: int) -> None:
        """Rows [0, n) (those admitted before this step) take one token each."""
        eng, dev = self.engine, self.engine.device
        length = self.length[:n]
        S = min(self.max_len, -(-(int(length.max()) + 1) // SLOT_ROUND) * SLOT_ROUND)
        mask_BS = torch.arange(S)[None, :] <= length[:, None]  # the slots written so far, and this one
        logits_BV = eng.decode_fn([k[:n] for k in self.cache.k], [v[:n] for v in self.cache.v],
                                  self.last[:n, None].to(dev), length[:, None].to(dev), mask_BS[:, None, None].to(dev))
        self.length[:n] += 1
        self._emit(logits_BV, range(n))

    def _emit(self, logits_BV: torch.Tensor, rows: range) -> None:
        """Pick each row's next token, pass on its new text, and retire finished rows. Greedy picks are
        made on the logits' device in one call; only rows that sample or report log-probabilities
        bring their logits to the CPU (where the seeded generators are)."""
        gens = [self.rows[i].request.gen for i in rows]
        greedy = logits_BV.argmax(-1).tolist()
        host = logits_BV.float().cpu() if any(g.temperature > 0 or g.logprobs for g in gens) else None
        finished: list[tuple[int, str | Exception]] = []
        for b, i in enumerate(rows):
            row = self.rows[i]
            try:
                gen = row.request.gen
                token = greedy[b] if gen.temperature <= 0 else int(pick(host[b:b + 1], gen, row.generator)[0])
                self.last[i] = token
                if gen.logprobs:
                    row.logprobs.append(_logprob(host[b], token, gen.top_logprobs))
                reason = self._advance(row, token)
            except Exception as err:  # this row's sampling or its client's callback: this row ends
                reason = err
            if reason:
                finished.append((i, reason))
        for i, reason in sorted(finished, key=lambda f: f[0], reverse=True):  # from the back: indices stay valid
            self._finish(i, reason)

    def _advance(self, row: _Running, token: int) -> str | None:
        """Record a token; the finish reason if the row is done."""
        gen = row.request.gen
        if token in self.engine.stop_ids and not gen.ignore_eos:
            self._flush(row, row.text)
            return "stop"
        row.ids.append(token)
        # leading whitespace (mm1's template opens a reply with a space) is never streamed: the deltas add
        # up to the final, stripped text
        row.text = self.engine.tok.decode(row.ids).lstrip()
        hit = [row.text.index(s) for s in gen.stop if s in row.text]
        if hit:
            row.text = row.text[: min(hit)]
            self._flush(row, row.text)
            return "stop"
        if len(row.ids) >= gen.max_new_tokens:
            self._flush(row, row.text)
            return "length"
        # Hold back what could still change: the start of a stop string, or a partial UTF-8
        # character (decoded as U+FFFD until its last byte arrives).
        ready = row.text[: len(row.text) - _held_back(row.text, gen.stop)].rstrip("\ufffd")
        self._flush(row, ready)
        return None

    def _flush(self, row: _Running, final: str) -> None:
        if len(final) > row.sent:
            if row.request.gen.logprobs:  # the entries of the tokens this text comes from, first
                row.request.on_logprobs(row.logprobs[row.logprobs_sent:len(row.ids)])
                row.logprobs_sent = len(row.ids)
            row.request.on_text(final[row.sent:])
            row.sent = len(final)

    def _finish(self, i: int, reason: str | Exception) -> None:
        row = self.rows[i]
        self._remove(i)
        if isinstance(reason, Exception):
            _end(row.request, reason)
        else:
            logprobs = row.logprobs[:len(row.ids)] if row.request.gen.logprobs else None  # not the end token's
            _end(row.request, Completion(row.text.strip(), len(row.request.encoded.ids), len(row.ids), reason,
                                         logprobs, row.ids))

    def _remove(self, i: int) -> None:
        """Free row i: the last running row moves into it (its cache slots, length and last token), and a
        prompt being chunked moves down with it (it stays in the row after the running ones)."""
        last = len(self.rows) - 1
        if i != last:
            self._move(last, i, int(self.length[last]))
            self.length[i], self.last[i] = self.length[last], self.last[last]
            self.rows[i] = self.rows[last]
        self.rows.pop()
        if self.filling is not None and self.filling.filled:
            self._move(last + 1, last, self.filling.filled)

    def _move(self, src: int, dst: int, slots: int) -> None:
        for k in (*self.cache.k, *self.cache.v):
            k[dst, :, :slots] = k[src, :, :slots]

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.rows))):
            if self.rows[i].request.cancelled.is_set():
                self._remove(i)
        if self.filling is not None and self.filling.request.cancelled.is_set():
            self.filling = None


def _logprob(logits_V: torch.Tensor, token: int, top: int) -> TokenLogprob:
    lp_V = torch.log_softmax(logits_V.float(), dim=-1)
    best = lp_V.topk(top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    return TokenLogprob(token, float(lp_V[token]), alternatives)


def _end(request: Request, result: Completion | BaseException) -> None:
    """Give a request its ending; a client callback that fails is logged, never the batcher's problem."""
    if isinstance(result, BaseException):
        log.warning("request ended by an error: %s: %s", type(result).__name__, result)
    try:
        request.on_done(result)
    except Exception:
        log.exception("a request's on_done failed")


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string (not sent yet)."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                held = max(held, k)
                break
    return held
