"""Serving throughput: `mm1 serve` (continuous batching) under 1, 4 and 16 concurrent clients.

    python benchmarks/bench_serve.py [--requests 32] [--new 32]

A server on 127.0.0.1 (loopback only) over the bench_decode.py model (random weights, fp32, 2
threads). Each request is one image and a question, 32 new tokens forced (no early stop), greedy.
For each concurrency C, C client threads send `--requests` requests in all through the official
`openai` client with streaming; printed: p50/p95 time to first token, p50/p95 latency and aggregate
tokens/s. Beside them, the same requests served one at a time: by our engine (`Engine.generate`,
batch 1, no server) and by HF `generate` on the equivalent LLaVA. Then one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import torch
import uvicorn
from PIL import Image

from bench_decode import run_theirs, setup
from mm1.serve.batching import ContinuousBatcher
from mm1.serve.engine import Engine, GenerationConfig
from mm1.serve.requests import Limits
from mm1.serve.server import ServerState, create_app

QUESTION = "what colour is the circle?"


def start_server(engine: Engine, max_batch: int) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = ServerState(engine, ContinuousBatcher(engine, max_batch=max_batch), Limits(max_tokens=256), "bench")
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server


def one_request(client: openai.OpenAI, image_url: str, new: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model="bench", max_tokens=new, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                               {"type": "text", "text": QUESTION}]}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0, tokens


def served(base_url: str, image_url: str, clients: int, requests: int, new: int) -> dict[str, float]:
    client = openai.OpenAI(base_url=base_url, api_key="-", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: one_request(client, image_url, new), range(requests)))
    wall = time.perf_counter() - t0
    ttft, latency = sorted(r[0] for r in results), sorted(r[1] for r in results)
    return {"ttft_p50": _pct(ttft, 50), "ttft_p95": _pct(ttft, 95), "lat_p50": _pct(latency, 50),
            "lat_p95": _pct(latency, 95), "tok_s": sum(r[2] for r in results) / wall}


def _pct(xs: list[float], p: int) -> float:
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def one_at_a_time(fn, requests: int, new: int) -> float:
    times = [fn() for _ in range(requests)]
    return requests * new / sum(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--new", type=int, default=32, help="new tokens per request (forced)")
    ap.add_argument("--baseline-requests", type=int, default=8, help="requests timed one at a time")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg, tok, ours, theirs = setup("tiny")
    engine = Engine(ours, tok)
    engine.stop_ids = set()  # force --new tokens, like min_new_tokens on the HF side
    size = cfg.model.vision.image_size
    image = Image.new("RGB", (size, size), (200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    gen = GenerationConfig(max_new_tokens=a.new)

    def ours_alone() -> float:
        t = time.perf_counter()
        engine.generate([[image, QUESTION]], gen)
        return time.perf_counter() - t

    def hf_alone() -> float:
        return run_theirs(theirs, engine, 1, image, a.new)

    ours_alone(), hf_alone()  # warm-up
    alone = {"engine": one_at_a_time(ours_alone, a.baseline_requests, a.new),
             "hf": one_at_a_time(hf_alone, a.baseline_requests, a.new)}
    base_url, server = start_server(engine, max_batch=16)
    served(base_url, image_url, 1, 2, a.new)  # warm-up
    report: dict[str, float | str] = {"bench": "serve", "new_tokens": a.new,
                                      "engine_alone_tok_s": alone["engine"], "hf_alone_tok_s": alone["hf"]}
    print(f"one at a time: our engine {alone['engine']:.1f} tok/s, HF generate {alone['hf']:.1f} tok/s")
    for clients in (1, 4, 16):
        m = served(base_url, image_url, clients, max(a.requests, clients), a.new)
        print(f"{clients:2d} clients: TTFT p50 {m['ttft_p50'] * 1e3:7.1f} ms p95 {m['ttft_p95'] * 1e3:7.1f} ms | "
              f"latency p50 {m['lat_p50']:6.2f} s p95 {m['lat_p95']:6.2f} s | {m['tok_s']:7.1f} tok/s "
              f"({m['tok_s'] / alone['engine']:.2f}x our engine one at a time, "
              f"{m['tok_s'] / alone['hf']:.2f}x HF one at a time)")
        report |= {f"c{clients}_{k}": v for k, v in m.items()}
        report[f"c{clients}_vs_engine_alone"] = m["tok_s"] / alone["engine"]
    server.should_exit = True
    print(json.dumps(report))


if __name__ == "__main__":
    main()
