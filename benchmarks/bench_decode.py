"""Decoding throughput: mm1's KV-cache engine vs HF `generate` on a LLaVA of the same dimensions.

    python benchmarks/bench_decode.py

Both models: the bench_train.py dimensions (CLIP-layout ViT, Llama decoder, 64 image tokens), random
weights, fp32, 2 threads. Each prompt is one image and a short question; 48 new tokens are forced
(no early stop) with greedy decoding. Tokens/s at batch 1 and aggregate tokens/s at batch 16,
medians over interleaved repeats, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from PIL import Image

from mm1.config import apply_overrides
from mm1.data.tokenizer import train_bpe
from mm1.model.mllm import MLLM
from mm1.recipes import get_recipe
from mm1.serve.engine import Engine, GenerationConfig

NEW = 48


def setup():
    from bench_train import hf_llava

    tok = train_bpe(["what colour is the circle? a red circle and a blue square"] * 50, vocab_size=300)
    cfg = apply_overrides(get_recipe("tiny"), ["model.connector.num_tokens=64"])
    cfg.model.image_token_id = tok.image_id
    ours = MLLM(cfg.model).eval()
    theirs = hf_llava(cfg, tok.image_id).eval()
    return cfg, tok, ours, theirs


def run_ours(engine: Engine, batch: int, image: Image.Image) -> float:
    prompts = [[image, "what colour is the circle?"] for _ in range(batch)]
    t = time.perf_counter()
    out = engine.generate_ids(prompts, GenerationConfig(max_new_tokens=NEW))
    dt = time.perf_counter() - t
    assert all(len(o) == NEW for o in out)
    return batch * NEW / dt


@torch.inference_mode()
def run_theirs(model, engine: Engine, batch: int, image: Image.Image) -> float:
    enc = engine.encode([image, "what colour is the circle?"])
    ids = torch.tensor([enc.ids] * batch)
    pixels = torch.stack(enc.images * batch)
    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                         max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == NEW
    return batch * NEW / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true",
                    help="mm1's engine without torch.compile of its step, prefill and image encoder")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    _, tok, ours, theirs = setup()
    engine = Engine(ours, tok, compile=not a.no_compile)  # compile time is spent in the warm-up
    engine.stop_ids = set()  # force NEW tokens, like min_new_tokens on the HF side
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    eager = Engine(ours, tok)
    eager.stop_ids = set()
    prompt = [[image, "what colour is the circle?"]]
    gen = GenerationConfig(max_new_tokens=NEW)
    assert engine.generate_ids(prompt, gen) == eager.generate_ids(prompt, gen), "compiled ≠ eager tokens"
    results = {}
    for batch in (1, 16):
        run_ours(engine, batch, image)
        run_theirs(theirs, engine, batch, image)  # warm-up
        o, t = [], []
        for _ in range(a.repeats):
            o.append(run_ours(engine, batch, image))
            t.append(run_theirs(theirs, engine, batch, image))
        results[batch] = (statistics.median(o), statistics.median(t))
        print(f"batch {batch:2d}: mm1 {results[batch][0]:8.1f} tok/s, HF generate {results[batch][1]:8.1f} tok/s, "
              f"ratio {results[batch][0] / results[batch][1]:.2f}x")
    print(json.dumps({"bench": "decode", "mm1_b1": results[1][0], "hf_b1": results[1][1],
                      "decode_speedup_b1": results[1][0] / results[1][1], "mm1_b16": results[16][0],
                      "hf_b16": results[16][1], "decode_speedup_b16": results[16][0] / results[16][1]}))


if __name__ == "__main__":
    main()
