"""Serving throughput: `mm1 serve` (continuous batching) under 1, 4, 16 and 32 concurrent clients.

    python benchmarks/bench_serve.py [--requests 32] [--new 32] [--clients 1,4,16,32]

The server runs in its own process on 127.0.0.1 (loopback only), its model in an engine process of its own
with every core (`mm1 serve`'s default) or, with --in-process, in the server's process with all cores but
one (`mm1 serve --in-process`), over the bench_decode.py model: random weights, fp32, its
output restricted to tokens that decode to text (so that streamed text flows as from a trained
model), exported with `mm1 export`. Each request is one image and a question, 32 new tokens forced
(no early stop), greedy. Two image mixes: every request the same image (`repeated`: the engine's image
cache encodes it once) and every request its own (`distinct`: every image encoded). For each mix and
concurrency C, C client threads send `--requests` requests in all, streamed and read by hand (the
official `openai` client is checked once against the same server); printed: p50/p95 time to first
token, p50/p95 inter-token latency (the gaps between a stream's chunks), p50/p95 latency and aggregate
tokens/s. Beside them, the same requests served one at a time: by our engine (`Engine.generate`, batch 1,
no server, 2 threads) and by HF `generate` on the equivalent LLaVA. Then chunked prefill's case (--mixed-clients):
short requests with every fourth one carrying 6 distinct images, against a server that prefills long prompts in
chunks and one that prefills them whole: the short streams' TTFT and inter-token latency p95. Then one JSON line.
(`bench_serve_aiperf.py` measures the servers with a third-party load generator.)
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import torch
import uvicorn
from PIL import Image

from bench_decode import run_theirs, setup
from mm1.serve.batching import ContinuousBatcher
from mm1.serve.cpu_layout import pack_linears
from mm1.serve.engine import Engine, GenerationConfig
from mm1.serve.engine_process import EngineSpec, RemoteBatcher
from mm1.serve.requests import Limits
from mm1.serve.server import ServerState, cpu_threads, create_app
from mm1.store.hf import export
from mm1.store.loading import load_model

QUESTION = "what colour is the circle?"
LONG_IMAGES = 6  # images in each long request of the mixed load (64 positions each: 400 of the 512-position context)
IN_PROCESS = False  # --in-process


def start_server(folder: Path, prefill_chunk: int = 256) -> tuple[str, subprocess.Popen]:
    """`mm1 serve` in a subprocess (the clients' threads must not share its interpreter lock)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    mode = ["--in-process"] if IN_PROCESS else []
    # its log to a file: a pipe nobody reads fills up and blocks the server mid-run
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(folder), "--port", str(port), *mode,
                             "--prefill-chunk", str(prefill_chunk)], env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url + "/v1", proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start: {(folder / 'server.log').read_text()[-2000:]}")


def serve_forced(folder: Path, port: int, engine_process: bool, prefill_chunk: int = 256) -> None:
    """The server side: `mm1 serve`'s state, with no end token (every request gets --new tokens): the model
    in an engine process (`mm1 serve`'s default) or in this one (`--in-process`)."""
    model, tok, _ = load_model(folder)
    if engine_process:
        torch.set_num_threads(1)
        engine = Engine(model.to("meta"), tok)
        batcher = RemoteBatcher(EngineSpec(str(folder), max_batch=16, ignore_eos=True, prefill_chunk=prefill_chunk))
    else:
        torch.set_num_threads(cpu_threads())  # as `mm1 serve --in-process` does on a CPU
        pack_linears(model)
        engine = Engine(model, tok)
        engine.stop_ids = set()
        batcher = ContinuousBatcher(engine, max_batch=16, prefill_chunk=prefill_chunk)
    state = ServerState(engine, batcher, Limits(max_tokens=256, max_images=LONG_IMAGES), "bench")
    uvicorn.run(create_app(state), host="127.0.0.1", port=port, log_level="warning")


def text_only_outputs(model, tok) -> None:
    """Zero the output rows of ids that are not whole text pieces (random weights otherwise pick ids
    beyond the tokenizer or lone UTF-8 bytes, whose text the server holds back until it is whole)."""
    with torch.no_grad():
        w = model.decoder.lm_head.weight
        for i in range(w.shape[0]):
            piece = tok.decode([i]) if i < len(tok) else ""
            if not piece.strip() or "\ufffd" in piece or i in (tok.eos_id, tok.end_id):
                w[i] = 0


def one_request(client: httpx.Client, base_url: str, image_url: str | list[str], new: int) -> dict:
    """One streamed request; the server-sent events are parsed by hand (the openai client's per-chunk
    models would cost the 2-core machine more than the server's work). Its TTFT, the gaps between its
    text chunks (inter-token latency), its latency and its tokens."""
    body = {"model": "bench", "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                *({"type": "image_url", "image_url": {"url": u}} for u in ([image_url] if isinstance(image_url, str)
                                                                           else image_url)),
                {"type": "text", "text": QUESTION}]}]}
    t0 = time.perf_counter()
    chunks, tokens = [], 0
    with client.stream("POST", base_url + "/chat/completions", json=body) as resp:
        for line in resp.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                chunks.append(time.perf_counter() - t0)
            if '"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    end = time.perf_counter() - t0
    return {"ttft": chunks[0] if chunks else end, "gaps": [b - a for a, b in itertools.pairwise(chunks)],
            "latency": end, "tokens": tokens}


def check_with_openai(base_url: str, image_url: str) -> None:
    """The official client reads the same server (once, untimed)."""
    out = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0).chat.completions.create(
        model="bench", max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                               {"type": "text", "text": QUESTION}]}])
    assert out.usage.completion_tokens == 4, out


def served(base_url: str, image_urls: list[str], clients: int, requests: int, new: int) -> dict[str, float]:
    """`requests` requests from `clients` threads, request i with image i (modulo the list)."""
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(client, base_url, image_urls[i % len(image_urls)], new),
                                range(requests)))
    wall = time.perf_counter() - t0
    ttft, latency = sorted(r["ttft"] for r in results), sorted(r["latency"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"]) or [0.0]
    return {"ttft_p50": _pct(ttft, 50), "ttft_p95": _pct(ttft, 95), "itl_p50": _pct(gaps, 50),
            "itl_p95": _pct(gaps, 95), "lat_p50": _pct(latency, 50), "lat_p95": _pct(latency, 95),
            "tok_s": sum(r["tokens"] for r in results) / wall}


def mixed(base_url: str, short_url: str, long_urls: list[list[str]], clients: int, requests: int,
          new: int) -> dict[str, float]:
    """Chunked prefill's case: `clients` threads send short requests (one cached image), and every fourth
    request is a long one (LONG_IMAGES distinct images, all encoded and prefilled). TTFT and inter-token
    latency p95 of the short streams (whose pace a long prompt pass would stall) and TTFT of the long ones."""
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=clients))
    long_at = set(range(3, requests, 4))
    todo = {i: long_urls.pop() if i in long_at else short_url for i in range(requests)}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = dict(zip(todo, pool.map(lambda i: one_request(client, base_url, todo[i], new), todo), strict=True))
    wall = time.perf_counter() - t0
    short = [r for i, r in results.items() if i not in long_at]
    gaps = sorted(g for r in short for g in r["gaps"]) or [0.0]
    return {"short_ttft_p95": _pct(sorted(r["ttft"] for r in short), 95), "short_itl_p50": _pct(gaps, 50),
            "short_itl_p95": _pct(gaps, 95), "short_itl_max": gaps[-1],
            "long_ttft_p50": _pct(sorted(results[i]["ttft"] for i in long_at), 50),
            "tok_s": sum(r["tokens"] for r in results.values()) / wall}


def _pct(xs: list[float], p: int) -> float:
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def images(size: int, n: int) -> list[Image.Image]:
    """n different solid-colour pictures (distinct content, so distinct cache keys)."""
    return [Image.new("RGB", (size, size), (200 - i % 150, 30 + (7 * i) % 200, (13 * i) % 256)) for i in range(n)]


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_at_a_time(fn, requests: int, new: int) -> float:
    times = [fn() for _ in range(requests)]
    return requests * new / sum(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run the server process
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level and image mix")
    ap.add_argument("--new", type=int, default=32, help="new tokens per request (forced)")
    ap.add_argument("--clients", default="1,4,16,32", help="concurrency levels")
    ap.add_argument("--baseline-requests", type=int, default=8, help="requests timed one at a time")
    ap.add_argument("--in-process", action="store_true", help="the model in the server's process (as `mm1 serve "
                                                              "--in-process`), not an engine process")
    ap.add_argument("--prefill-chunk", type=int, default=256, help=argparse.SUPPRESS)  # internal: the server's
    ap.add_argument("--mixed-clients", type=int, default=8, help="clients of the mixed short/long load (0: skip it)")
    a = ap.parse_args()
    global IN_PROCESS
    IN_PROCESS = a.in_process
    if a.serve:
        return serve_forced(Path(a.serve), a.port, engine_process=not a.in_process, prefill_chunk=a.prefill_chunk)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg, tok, ours, theirs = setup("tiny")
    text_only_outputs(ours, tok)
    engine = Engine(ours, tok)
    engine.stop_ids = set()  # force --new tokens, like min_new_tokens on the HF side
    levels = [int(c) for c in a.clients.split(",")]
    # every request of the run its own picture in the distinct mix: the baselines' and every level's
    long_requests = (a.requests + 3) // 4 * 2  # the mixed load's long requests, with and without chunking
    pictures = images(cfg.model.vision.image_size, a.baseline_requests * 2 + 2 + sum(max(a.requests, c)
                                                                                       for c in levels)
                      + long_requests * LONG_IMAGES)
    mixes = {"repeated": [data_url(pictures[0])], "distinct": None}
    gen = GenerationConfig(max_new_tokens=a.new)
    fresh = iter(pictures[1:])

    def ours_alone(repeated: bool) -> float:
        t = time.perf_counter()
        engine.generate([[pictures[0] if repeated else next(fresh), QUESTION]], gen)
        return time.perf_counter() - t

    def hf_alone() -> float:  # HF's LLaVA has no image cache: every image is encoded either way
        return run_theirs(theirs, engine, 1, pictures[0], a.new)

    ours_alone(True), hf_alone()  # warm-up
    alone = {"engine_repeated": one_at_a_time(lambda: ours_alone(True), a.baseline_requests, a.new),
             "engine_distinct": one_at_a_time(lambda: ours_alone(False), a.baseline_requests, a.new),
             "hf": one_at_a_time(hf_alone, a.baseline_requests, a.new)}
    folder = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    export(ours, cfg, folder)
    tok.save(folder / "tokenizer.json")
    base_url, server = start_server(folder)
    check_with_openai(base_url, mixes["repeated"][0])
    served(base_url, mixes["repeated"], 1, 2, a.new)  # warm-up
    report: dict[str, float | str] = {"bench": "serve", "new_tokens": a.new,
                                      "model_in": "the server's process" if a.in_process else "an engine process",
                                      **{f"{k}_alone_tok_s": v for k, v in alone.items()}}
    print(f"one at a time: our engine {alone['engine_repeated']:.1f} tok/s (repeated image), "
          f"{alone['engine_distinct']:.1f} (distinct images); HF generate {alone['hf']:.1f} tok/s")
    for mix in mixes:
        for clients in levels:
            n = max(a.requests, clients)
            urls = mixes[mix] or [data_url(next(fresh)) for _ in range(n)]
            m = served(base_url, urls, clients, n, a.new)
            ref = alone[f"engine_{mix}"]
            print(f"{mix:8s} {clients:2d} clients: TTFT p50 {m['ttft_p50'] * 1e3:6.1f} ms p95 "
                  f"{m['ttft_p95'] * 1e3:6.1f} ms | ITL p50 {m['itl_p50'] * 1e3:5.1f} ms p95 "
                  f"{m['itl_p95'] * 1e3:5.1f} ms | latency p50 {m['lat_p50']:5.2f} s p95 {m['lat_p95']:5.2f} s | "
                  f"{m['tok_s']:7.1f} tok/s ({m['tok_s'] / ref:.2f}x our engine one at a time, "
                  f"{m['tok_s'] / alone['hf']:.2f}x HF one at a time)")
            report |= {f"{mix}_c{clients}_{k}": v for k, v in m.items()}
            report[f"{mix}_c{clients}_vs_engine_alone"] = m["tok_s"] / ref
    server.terminate()
    server.wait(timeout=30)
    if a.mixed_clients:
        report |= mixed_loads(folder, mixes["repeated"][0], fresh, a)
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report))


def mixed_loads(folder: Path, short_url: str, fresh, a) -> dict[str, float]:
    """The mixed short/long load against a server that prefills long prompts in chunks of 64 positions
    (`mm1 serve --prefill-chunk 64`; a long request here is ~400 positions, 64 per image on this model) and
    one that prefills each prompt whole (`--prefill-chunk 0`)."""
    out: dict[str, float] = {}
    n_long = len(range(3, a.requests, 4))
    for chunk in (64, 0):
        long_urls = [[data_url(next(fresh)) for _ in range(LONG_IMAGES)] for _ in range(n_long)]
        base_url, server = start_server(folder, prefill_chunk=chunk)
        try:
            served(base_url, [short_url], 1, 2, a.new)  # warm-up
            m = mixed(base_url, short_url, long_urls, a.mixed_clients, a.requests, a.new)
        finally:
            server.terminate()
            server.wait(timeout=30)
        name = f"chunk {chunk}" if chunk else "whole prompts"
        print(f"mixed, {a.mixed_clients} clients, every 4th request {LONG_IMAGES} images, {name:13s}: short streams "
              f"TTFT p95 {m['short_ttft_p95'] * 1e3:6.1f} ms, ITL p50 {m['short_itl_p50'] * 1e3:5.1f} ms p95 "
              f"{m['short_itl_p95'] * 1e3:5.1f} ms max {m['short_itl_max'] * 1e3:6.1f} ms | long TTFT p50 "
              f"{m['long_ttft_p50'] * 1e3:6.1f} ms | {m['tok_s']:6.1f} tok/s")
        out |= {f"mixed_chunk{chunk}_{k}": v for k, v in m.items()}
    return out


if __name__ == "__main__":
    main()
