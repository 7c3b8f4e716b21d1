"""Decoding throughput: mm1's KV-cache engine vs HF `generate` on a LLaVA of the same dimensions.

    python benchmarks/bench_decode.py [--dims reference]

Both models: the bench_train.py dimensions (CLIP-layout ViT, Llama decoder, 64 image tokens) or,
with --dims reference, a ~34M-parameter LLaVA (224 px ViT, Llama 512 × 8, 196 image tokens); random
weights, fp32, 2 threads. Each prompt is one image and a short question; 48 new tokens are forced
(no early stop) with greedy decoding. Tokens/s at batch 1 and aggregate tokens/s at batch 16, end
to end (prompt pass included; mm1 also pays for its tokenising and image preprocessing, HF does
not) and for decoding alone (the time beyond a 1-token call), medians over interleaved repeats,
then one JSON line.
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


# --dims reference: the reference LLaVA (a 224 px / patch 16 ViT, 4 layers at width 256,
# 196 image tokens, Llama 512 × 8 layers, vocabulary 8192; ~34M parameters on both sides).
DIMS = {
    "tiny": ["model.connector.num_tokens=64"],
    "reference": ["model.vision.image_size=224", "model.vision.patch_size=16", "model.vision.width=256",
                  "model.vision.depth=4", "model.vision.heads=4", "model.connector.num_tokens=196",
                  "model.connector.hidden=256", "model.decoder.width=512", "model.decoder.depth=8",
                  "model.decoder.heads=8", "model.decoder.kv_heads=8", "model.decoder.ffn_hidden=1408",
                  "model.decoder.vocab_size=8192"],
}


def setup(dims: str = "tiny"):
    from bench_train import hf_llava

    tok = train_bpe(["what colour is the circle? a red circle and a blue square"] * 50, vocab_size=300)
    cfg = apply_overrides(get_recipe("tiny"), DIMS[dims])
    cfg.model.image_token_id = tok.image_id
    ours = MLLM(cfg.model).eval()
    theirs = hf_llava(cfg, tok.image_id).eval()
    return cfg, tok, ours, theirs


def run_ours(engine: Engine, batch: int, image: Image.Image, new: int) -> float:
    prompts = [[image, "what colour is the circle?"] for _ in range(batch)]
    t = time.perf_counter()
    out = engine.generate_ids(prompts, GenerationConfig(max_new_tokens=new))
    dt = time.perf_counter() - t
    assert all(len(o) == new for o in out)
    return dt


@torch.inference_mode()
def run_theirs(model, engine: Engine, batch: int, image: Image.Image, new: int) -> float:
    enc = engine.encode([image, "what colour is the circle?"])  # HF is not charged for preprocessing
    ids = torch.tensor([enc.ids] * batch)
    pixels = torch.stack(enc.images * batch)
    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                         max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == new
    return dt


def measure(fn, batch: int, repeats: int) -> dict[str, float]:
    """End-to-end tokens/s for NEW tokens, and its two phases: the prompt pass (a 1-token call)
    and decoding proper (the extra time for the other NEW - 1 tokens)."""
    full, one = [], []
    for _ in range(repeats):
        full.append(fn(batch, NEW))
        one.append(fn(batch, 1))
    t_full, t_one = statistics.median(full), statistics.median(one)
    return {"tok_s": batch * NEW / t_full, "prefill_ms": t_one * 1e3,
            "decode_tok_s": batch * (NEW - 1) / (t_full - t_one)}


LABELS = {"mm1": "mm1 (compiled)", "mm1_eager": "mm1 (eager)", "hf": "HF generate (eager)"}

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dims", choices=sorted(DIMS), default="tiny",
                    help="tiny: the bench_train.py dimensions; reference: the larger LLaVA of the model issue")
    ap.add_argument("--no-compile", action="store_true",
                    help="mm1's engine without torch.compile of its step, prefill and image encoder")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg, tok, ours, theirs = setup(a.dims)
    engine = Engine(ours, tok, compile=not a.no_compile)  # compile time is spent in the warm-up
    engine.stop_ids = set()  # force NEW tokens, like min_new_tokens on the HF side
    size = cfg.model.vision.image_size
    image = Image.new("RGB", (size, size), (200, 30, 30))
    eager = Engine(ours, tok)
    eager.stop_ids = set()
    prompt = [[image, "what colour is the circle?"]]
    gen = GenerationConfig(max_new_tokens=NEW)
    assert engine.generate_ids(prompt, gen) == eager.generate_ids(prompt, gen), "compiled ≠ eager tokens"
    report: dict[str, float | str] = {"bench": "decode", "dims": a.dims}
    for batch in (1, 16):
        fns = {"mm1": lambda b, n: run_ours(engine, b, image, n),
               "hf": lambda b, n: run_theirs(theirs, engine, b, image, n)}
        if not a.no_compile:  # the eager engine beside the compiled one: what compilation adds
            fns["mm1_eager"] = lambda b, n: run_ours(eager, b, image, n)
        for fn in fns.values():  # warm-up (and compilation) at both lengths
            fn(batch, NEW), fn(batch, 1)
        # interleaved: each repeat times mm1 then HF
        per_repeat = [{k: measure(fn, batch, 1) for k, fn in fns.items()} for _ in range(a.repeats)]
        m = {k: {f: statistics.median(r[k][f] for r in per_repeat) for f in per_repeat[0][k]} for k in fns}
        for k in fns:
            print(f"batch {batch:2d} {LABELS[k] if k != 'mm1' or not a.no_compile else 'mm1 (eager)':22s}: "
                  f"{m[k]['tok_s']:8.1f} tok/s end to end | prompt pass "
                  f"{m[k]['prefill_ms']:6.1f} ms | decoding {m[k]['decode_tok_s']:8.1f} tok/s")
        ratio = m["mm1"]["tok_s"] / m["hf"]["tok_s"]
        decode_ratio = m["mm1"]["decode_tok_s"] / m["hf"]["decode_tok_s"]
        print(f"batch {batch:2d} mm1 / HF: {ratio:.2f}x end to end, {decode_ratio:.2f}x decoding alone")
        report |= {f"mm1_b{batch}": m["mm1"]["tok_s"], f"hf_b{batch}": m["hf"]["tok_s"],
                   f"decode_speedup_b{batch}": ratio, f"decoding_only_speedup_b{batch}": decode_ratio,
                   f"mm1_prefill_ms_b{batch}": m["mm1"]["prefill_ms"], f"hf_prefill_ms_b{batch}": m["hf"]["prefill_ms"]}
        if "mm1_eager" in m:
            print(f"batch {batch:2d} compiled / eager mm1: {m['mm1']['tok_s'] / m['mm1_eager']['tok_s']:.2f}x")
            report |= {f"mm1_eager_b{batch}": m["mm1_eager"]["tok_s"]}
    report["mm1_compiled"] = not a.no_compile
    print(json.dumps(report))


if __name__ == "__main__":
    main()
