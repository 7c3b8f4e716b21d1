"""Data at corpus scale: prepare throughput, stream start-up, loader rate, packing fill, mixture shares.

    python benchmarks/bench_loader.py --world runs/quickstart/world [--records 1000000]

1. Writes a caption corpus of `--records` WebDataset pairs (a thousand distinct rendered scenes,
   captions from the world's language) and prepares it with 1 and 2 worker processes: records/s.
2. Opens the stream on 10 thousand vs all prepared records in a fresh process: start-up seconds
   and resident memory (aim: flat, under 2 s).
3. On the tiny recipe's world: loader samples/s (2 workers) against what the tiny trainer consumes
   (aim ≥ 5×), packing fill per source (aim ≥ 98%), and each source's share of sequences and of
   tokens over 10 thousand drawn sequences against the weights (aim: within 1 point).
Prints a final JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mm1.config import apply_overrides
from mm1.data.formats.webdataset import write_shards
from mm1.data.prepare import prepare
from mm1.data.stream import DataStream, load_tokenizer, make_loader
from mm1.data.synth import language as lang
from mm1.data.synth.scene import png_bytes, render, sample_scene
from mm1.model.mllm import MLLM
from mm1.recipes import get_recipe
from mm1.train.lm import resolve_model_config

STARTUP = """
import sys, time
t = time.perf_counter()
from mm1.config import apply_overrides
from mm1.recipes import get_recipe
from mm1.data.stream import DataStream, load_tokenizer
cfg = apply_overrides(get_recipe("tiny"), sys.argv[1:])
t_import = time.perf_counter()
stream = DataStream(cfg, load_tokenizer(cfg))
t_open = time.perf_counter()
stream.batch(123)
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
print(t_open - t_import, time.perf_counter() - t_open, int(peak) / 1024)
"""  # VmHWM: this process image's peak (ru_maxrss would carry the parent's over the exec)


def write_corpus(out: Path, records: int) -> None:
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(1000)]
    pngs = [png_bytes(render(s, 64)) for s in scenes]

    def gen():
        for i in range(records):
            k = rng.randrange(len(scenes))
            yield f"{i:09d}", pngs[k], "png", lang.short_caption(scenes[k], rng), None

    write_shards(gen(), out, per_shard=2000)


def corpus_config(world: Path, shards: str, prepared: Path, workers: int) -> list[str]:
    return [f"data.root={world}", f"data.caption_shards={shards}", "data.mixture.interleaved=0",
            "data.mixture.text=0", f"data.prepared={prepared}", f"data.prepare.workers={workers}"]


def startup(overrides: list[str], repeats: int = 3) -> tuple[float, float, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", STARTUP, *overrides], capture_output=True, text=True, check=True)
        runs.append([float(x) for x in out.stdout.split()])
    return tuple(statistics.median(r[i] for r in runs) for i in range(3))


def loader_rate(stream: DataStream, workers: int, steps: int) -> tuple[float, float]:
    it = iter(make_loader(stream, start=0, stop=steps + 2, num_workers=workers))
    next(it)  # start-up (fork, first batch) is not throughput
    t, samples, seqs = time.perf_counter(), 0, 0
    for _ in range(steps):
        b = next(it)
        samples += sum(len(d) for d in b.docs)
        seqs += b.tokens_BT.shape[0]
    dt = time.perf_counter() - t
    return samples / dt, seqs / dt


def trainer_rate(stream: DataStream, cfg, steps: int) -> float:
    model = MLLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for s in range(steps + 1):
        b = stream.batch(s)
        t = time.perf_counter()
        model(**b.model_inputs()).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return cfg.train.batch_size / statistics.median(times[1:])  # sequences/s


def scale_figures(world: Path, records: int, work: Path) -> dict:
    shards = work / "corpus"
    t = time.perf_counter()
    write_corpus(shards, records)
    print(f"wrote {records:,} caption pairs in {time.perf_counter() - t:.0f} s")
    out: dict = {"records": records}
    for workers in (1, 2):
        cfg = apply_overrides(get_recipe("tiny"), corpus_config(world, f"{shards}/*.tar", work / f"p{workers}",
                                                                workers))
        t = time.perf_counter()
        summary = prepare(cfg, cfg.train.stage, load_tokenizer(cfg), progress=False)
        dt = time.perf_counter() - t
        out[f"prepare_records_per_s_{workers}w"] = records / dt
        out["caption_fill"] = summary["sources"]["caption"]["fill"]
        print(f"prepare, {workers} worker(s): {records / dt:,.0f} records/s ({dt:.0f} s), "
              f"fill {summary['sources']['caption']['fill']:.4f}")
    small = work / "small"
    small.mkdir()
    for p in sorted(shards.glob("*.tar"))[:5]:  # 10 thousand records
        shutil.copy(p, small / p.name)
    for name, glob_, prep in (("10k", f"{small}/*.tar", work / "psmall"), ("all", f"{shards}/*.tar", work / "p2")):
        overrides = corpus_config(world, glob_, prep, 2)
        if name == "10k":
            cfg = apply_overrides(get_recipe("tiny"), overrides)
            prepare(cfg, cfg.train.stage, load_tokenizer(cfg), progress=False)
        open_s, batch_s, rss = startup(overrides)
        out[f"startup_s_{name}"], out[f"first_batch_s_{name}"], out[f"rss_mb_{name}"] = open_s, batch_s, rss
        print(f"stream over {name} records: opens in {open_s:.3f} s, step 123's batch in {batch_s:.3f} s, "
              f"peak RSS {rss:.0f} MB")
    return out


def world_figures(world: Path, steps: int) -> dict:
    cfg = apply_overrides(get_recipe("tiny"), [f"data.root={world}"])
    tok = load_tokenizer(cfg)
    summary = prepare(cfg, cfg.train.stage, tok, progress=False)
    resolve_model_config(cfg, len(tok), tok.image_id)
    stream = DataStream(cfg, tok)
    out: dict = {f"fill_{n}": s["fill"] for n, s in summary["sources"].items()}
    print("packing fill: " + ", ".join(f"{n} {s['fill']:.4f}" for n, s in summary["sources"].items()))
    seqs, tokens = np.zeros(len(stream.names)), np.zeros(len(stream.names))
    for g in range(10_000):
        s, _, j = stream.mixture.locate(g)
        seqs[s] += 1
        tokens[s] += int((stream.sources[stream.names[s]].sequence(j).doc_ids >= 0).sum())
    weights = np.array([summary["sources"][n]["weight"] for n in stream.names])
    weights = weights / weights.sum()
    for i, n in enumerate(stream.names):
        out[f"share_seq_{n}"], out[f"share_tok_{n}"] = seqs[i] / seqs.sum(), tokens[i] / tokens.sum()
        print(f"{n}: weight {weights[i]:.3f}, sequences {out[f'share_seq_{n}']:.3f}, "
              f"tokens {out[f'share_tok_{n}']:.3f}")
    out["max_share_error_points"] = 100 * max(np.abs(seqs / seqs.sum() - weights).max(),
                                              np.abs(tokens / tokens.sum() - weights).max())
    s0, _ = loader_rate(stream, 0, steps)
    s2, q2 = loader_rate(stream, 2, steps)
    tr = trainer_rate(stream, cfg, 6)
    out |= {"loader_samples_per_s_0w": s0, "loader_samples_per_s_2w": s2, "loader_seqs_per_s_2w": q2,
            "trainer_seqs_per_s": tr, "loader_over_trainer": q2 / tr}
    print(f"loader: {s0:.0f} samples/s with 0 workers, {s2:.0f} with 2 ({q2:.1f} sequences/s); trainer consumes "
          f"{tr:.1f} sequences/s: loader / trainer = {q2 / tr:.1f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="runs/quickstart/world")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    world = Path(a.world).resolve()
    if not (world / "tokenizer.json").exists():
        raise SystemExit(f"no world with a tokenizer at {world}: run `mm1 quickstart` first or pass --world")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="mm1-bench-loader-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = world_figures(world, a.steps) | scale_figures(world, a.records, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"bench": "loader", **figures}))


if __name__ == "__main__":
    main()
