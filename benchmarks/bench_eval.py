"""`mm1 eval` throughput: batched evaluation (eval.batch_size items per engine call) against one item
at a time, on the same model, task, items and shot count.

    python benchmarks/bench_eval.py [--checkpoint RUN] [--world DIR] [--task synth_vqa] [--shots 4]

By default the quickstart's fine-tuned model (`runs/quickstart/sft`) on its world; items/s for
`eval.batch_size` 1 and 32 (the tiny recipe's), medians over interleaved repeats, the ratio, and one
JSON line. The predictions of both are checked to be equal (batching must not change an answer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mm1.config import EvalConfig, InferenceSettings
from mm1.eval.harness import evaluate
from mm1.eval.tasks import get_task
from mm1.store.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/quickstart/sft")
    ap.add_argument("--world", default="runs/quickstart/world")
    ap.add_argument("--task", default="synth_vqa")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, tok, cfg = load_model(a.checkpoint)
    task = get_task(a.task, world=Path(a.world))
    settings = InferenceSettings.of(cfg)

    def run(batch: int) -> tuple[float, list[str]]:
        ecfg = EvalConfig(limit=a.items, batch_size=batch)
        t = time.perf_counter()
        ev = evaluate(model, tok, [task], [a.shots], ecfg, settings=settings, progress=False)
        return a.items / (time.perf_counter() - t), [r["prediction"] for r in ev.predictions]

    rates: dict[int, list[float]] = {1: [], a.batch: []}
    answers: dict[int, list[str]] = {}
    for _ in range(a.repeats):
        for batch in rates:
            rate, answers[batch] = run(batch)
            rates[batch].append(rate)
    same = sum(x == y for x, y in zip(answers[1], answers[a.batch], strict=True))
    one, many = statistics.median(rates[1]), statistics.median(rates[a.batch])
    print(f"{a.task} {a.shots}-shot, {a.items} items, {settings.prompt_format.value} prompts, {a.checkpoint}")
    print(f"one item at a time: {one:.1f} items/s   batch {a.batch}: {many:.1f} items/s   ratio {many / one:.2f}x")
    print(f"identical predictions: {same} of {a.items}")
    print(json.dumps({"task": a.task, "shots": a.shots, "items": a.items, "items_per_s_batch1": one,
                      f"items_per_s_batch{a.batch}": many, "ratio": many / one, "identical": same}))


if __name__ == "__main__":
    main()
