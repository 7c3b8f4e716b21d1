"""Where a served step's time goes: one prefill of 16 prompts and one batch-16 decoding step, profiled.

    python benchmarks/profile_serve.py [--model runs/bench_serve_vs_vllm/smollm2_135m_hf] [--rows 16] [--compile]

The model is the one `bench_serve_vs_vllm.py` serves (SmolLM2-135M-Instruct as an HF folder, fp32),
loaded as `mm1 serve` loads it (weights in oneDNN's layout unless --plain-weights), with the torch threads
of `mm1 serve`'s engine process (every core). The continuous batcher (no HTTP) takes
`--rows` chat requests of the benchmark's prompts; their prompt pass is profiled, then `--steps` decoding
steps once every row is running (with `--context` tokens already in each row, as mid-way through a
request). Printed: wall time per step, and torch.profiler's operators by self CPU time. With `--compile`
the engine is built as `mm1 serve --compile` builds it (packed weights called through the `mm1::packed_linear`
op, the plain ones kept for the one-row graph); the steps before the profiled ones compile its graphs.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_serve_vs_vllm import prompt
from mm1.data.template import template_for, user_turn
from mm1.serve.batching import ContinuousBatcher, Request
from mm1.serve.cpu_layout import pack_linears
from mm1.serve.engine import Engine, GenerationConfig
from mm1.store.loading import load_model
from mm1.system import available_cores


def table(prof, rows: int = 18) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/bench_serve_vs_vllm/smollm2_135m_hf")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--context", type=int, default=32, help="tokens decoded before the profiled steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: every core, as mm1 serve's engine)")
    ap.add_argument("--plain-weights", action="store_true", help="as mm1 serve --plain-weights")
    ap.add_argument("--compile", action="store_true", help="as mm1 serve --compile")
    ap.add_argument("--unfused", action="store_true", help="q/k/v and gate/up as separate packed layers")
    a = ap.parse_args()
    torch.set_num_threads(a.threads or available_cores())
    model, tok, _ = load_model(a.model)
    packed = 0 if a.plain_weights else pack_linears(model, keep_plain=a.compile, fuse=not a.unfused)
    engine = Engine(model, tok, compile=a.compile)
    batcher = ContinuousBatcher(engine, max_batch=a.rows, max_len=1024)
    template = template_for(tok)
    gen = GenerationConfig(max_new_tokens=a.context + a.steps + 8, ignore_eos=True)  # every row runs on
    for i in range(a.rows):
        parts = template.render([user_turn(prompt(i), [])], generation_prompt=True)
        batcher.submit(Request(engine.encode([p.text for p in parts]), gen))
    print(f"{a.rows} prompts, {sum(len(r.encoded.ids) for r in list(batcher.waiting.queue))} tokens; "
          f"torch threads {torch.get_num_threads()}; {packed} linear layers in oneDNN's layout")
    if a.compile:  # compile the prompt pass for these shapes first (a twin batcher's rows, then dropped)
        twin = ContinuousBatcher(engine, max_batch=a.rows, max_len=1024)
        for r in list(batcher.waiting.queue):
            twin.submit(Request(r.encoded, r.gen))
        t = time.perf_counter()
        twin.step()
        print(f"compiled the prompt pass in {time.perf_counter() - t:.0f} s")
        del twin
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        batcher.step()  # the prompt pass of every row
        prefill = time.perf_counter() - t
    print(f"\n## prefill of {a.rows} prompts: {prefill * 1e3:.1f} ms\n{table(prof)}")
    t = time.perf_counter()
    for _ in range(a.context):  # (with --compile, these compile the decoding step)
        batcher.step()
    print(f"{a.context} steps to the profiled context: {time.perf_counter() - t:.0f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(a.steps):
            batcher.step()
        step = (time.perf_counter() - t) / a.steps
    print(f"\n## decoding step, {len(batcher.rows)} rows: {step * 1e3:.1f} ms "
          f"({len(batcher.rows) / step:.1f} tok/s)\n{table(prof)}")


if __name__ == "__main__":
    main()
