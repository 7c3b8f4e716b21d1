"""Loader throughput and packing efficiency for the tiny recipe, against the trainer's consumption.

    python benchmarks/bench_loader.py --world runs/quickstart/world

Prints samples/s and sequences/s of the DataLoader with 0 and 2 workers, packing efficiency (real
tokens / total slots) over several blocks, the trainer's step rate on the same batches, and one
final JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mm1.config import apply_overrides
from mm1.data.loader import DataStream, load_tokenizer, make_loader
from mm1.model.mllm import MLLM
from mm1.recipes import get_recipe
from mm1.train.trainer import resolve_model_config


def loader_rate(stream: DataStream, workers: int, steps: int) -> tuple[float, float]:
    loader = make_loader(stream, start=0, stop=steps + 2, num_workers=workers)
    it = iter(loader)
    next(it)  # start-up (fork, first batch) is not throughput
    t = time.perf_counter()
    samples = seqs = 0
    for _ in range(steps):
        b = next(it)
        samples += sum(len(d) for d in b.docs)
        seqs += b.tokens_BT.shape[0]
    dt = time.perf_counter() - t
    return samples / dt, seqs / dt


def trainer_rate(stream: DataStream, cfg, steps: int) -> float:
    model = MLLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [stream.batch(s) for s in range(steps + 1)]
    times = []
    for b in batches:
        t = time.perf_counter()
        out = model(**b.model_inputs())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return cfg.train.batch_size / statistics.median(times[1:])  # sequences/s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="runs/quickstart/world")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = apply_overrides(get_recipe("tiny"), [f"data.root={a.world}"])
    tok = load_tokenizer(cfg)
    resolve_model_config(cfg, len(tok), tok.image_id)
    stream = DataStream(cfg, tok)
    eff = [stream.block_report(b) for b in range(3)]
    efficiency = statistics.mean(r["efficiency"] for r in eff)
    left = statistics.mean(r["left_over"] for r in eff)
    print(f"packing efficiency {efficiency:.4f} (real tokens / slots), left over {left:.4f} of chunks")
    s0, q0 = loader_rate(stream, 0, a.steps)
    s2, q2 = loader_rate(stream, 2, a.steps)
    print(f"loader, 0 workers: {s0:.0f} samples/s, {q0:.1f} sequences/s")
    print(f"loader, 2 workers: {s2:.0f} samples/s, {q2:.1f} sequences/s")
    tr = trainer_rate(stream, cfg, 6)
    print(f"trainer consumes {tr:.1f} sequences/s; loader(2 workers) / trainer = {q2 / tr:.1f}x")
    print(json.dumps({"bench": "loader", "packing_efficiency": efficiency, "left_over": left,
                      "loader_samples_per_s_0w": s0, "loader_samples_per_s_2w": s2,
                      "loader_seqs_per_s_2w": q2, "trainer_seqs_per_s": tr, "loader_over_trainer": q2 / tr}))


if __name__ == "__main__":
    main()
