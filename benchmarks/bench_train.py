"""Training throughput: mm1 on the packed stream vs HF LLaVA on the same samples with padding.

    python benchmarks/bench_train.py --world runs/quickstart/world

Both models have the same dimensions: a CLIP-layout ViT (64 px, patch 8, width 128, 3 layers) and
a Llama decoder (width 192, 4 layers, 6 heads / 2 KV heads, SwiGLU 512, vocabulary 2048), 64
image tokens per image (LLaVA feeds all patches through its MLP projector; mm1's C-Abstractor
keeps 64 here so that both see the same number of tokens). mm1 trains on packed 384-token
sequences; HF trains on the same documents, one per row, padded to the longest in the batch, as
LLaVA's collator does. Useful tokens are the non-padding ones. mm1 runs twice: eager and with
its decoder layers and ViT blocks compiled (`train.compile=true`, the compile time reported apart).
fp32, 2 threads, interleaved repeats; medians, MFU (against this CPU's measured
fp32 matmul rate, the trainer's default `train.logging.peak_flops`)
and the ratios, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mm1.config import apply_overrides
from mm1.data.prepare import prepare
from mm1.data.stream import DataStream, load_tokenizer
from mm1.model.mllm import MLLM
from mm1.recipes import get_recipe
from mm1.train.flops import count_batch, step_flops
from mm1.train.lm import resolve_model_config
from mm1.train.metrics import default_peak_flops


def hf_llava(cfg, image_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    v, d = cfg.model.vision, cfg.model.decoder
    vision = CLIPVisionConfig(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                              num_hidden_layers=v.depth, num_attention_heads=v.heads, image_size=v.image_size,
                              patch_size=v.patch_size)
    text = LlamaConfig(vocab_size=d.vocab_size, hidden_size=d.width, intermediate_size=d.ffn_hidden,
                       num_hidden_layers=d.depth, num_attention_heads=d.heads, num_key_value_heads=d.kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=d.tie_embeddings)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)


def padded_batches(stream: DataStream, steps: int, image_id: int, pad_id: int):
    """The same documents as the packed steps, one per row, right-padded (LLaVA's usual collation)."""
    out = []
    for step in range(steps):
        b = stream.batch(step)
        rows, imgs_per_row, img_at = [], [], 0
        for i in range(b.tokens_BT.shape[0]):
            docs, n_img = b.doc_ids_BT[i], b.images_per_row[i]
            for d in range(int(docs.max()) + 1):
                sel = docs == d
                toks, labs = b.tokens_BT[i][sel], b.labels_BT[i][sel]
                k = int((toks == image_id).sum()) // 64
                rows.append((toks, labs, b.images_NCHW[img_at:img_at + k] if k else None))
                img_at += k
            assert img_at == sum(b.images_per_row[: i + 1]) and n_img >= 0
        for chunk in range(0, len(rows), 16):
            part = rows[chunk:chunk + 16]
            L = max(len(t) for t, _, _ in part)
            ids = torch.full((len(part), L), pad_id)
            labels = torch.full((len(part), L), -100)
            mask = torch.zeros(len(part), L, dtype=torch.long)
            for r, (t, lab, _) in enumerate(part):
                ids[r, : len(t)], mask[r, : len(t)] = t, 1
                # HF shifts labels itself: give it the targets at their own positions
                lab_hf = torch.full_like(lab, -100)
                lab_hf[1:] = torch.where(lab[:-1] != -100, t[1:], torch.full_like(t[1:], -100))
                labels[r, : len(t)] = lab_hf
            images = [im for _, _, im in part if im is not None]
            imgs_per_row.append(sum(len(i) for i in images))
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                        "pixel_values": torch.cat(images) if images else None, "useful": int(mask.sum())})
    return out


def time_steps(fn, batches) -> list[float]:
    times = []
    for b in batches:
        t = time.perf_counter()
        fn(b)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", default="runs/quickstart/world")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = apply_overrides(get_recipe("tiny"), [f"data.root={a.world}", "model.connector.num_tokens=64",
                                                "data.packing.max_images=5"])
    tok = load_tokenizer(cfg)
    prepare(cfg, cfg.train.stage, tok, progress=False)  # this benchmark's packing (64 image tokens) once
    resolve_model_config(cfg, len(tok), tok.image_id)
    stream = DataStream(cfg, tok)
    ours = MLLM(cfg.model)
    compiled = MLLM(cfg.model)
    compiled.load_state_dict(ours.state_dict())
    for block in [*compiled.decoder.layers, *compiled.vision.blocks]:
        block.compile()
    theirs = hf_llava(cfg, tok.image_id)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in
            (("ours", ours), ("compiled", compiled), ("theirs", theirs))}
    packed = [stream.batch(s) for s in range(a.steps)]
    padded = padded_batches(stream, a.steps, tok.image_id, tok.pad_id)
    useful_packed = sum(int((b.doc_ids_BT >= 0).sum()) for b in packed)
    useful_padded = sum(b["useful"] for b in padded)
    assert useful_packed == useful_padded, (useful_packed, useful_padded)
    # what share of the positions each side computes are real tokens: the packer's fill, the collator's
    fill = {"mm1": useful_packed / sum(b.tokens_BT.numel() for b in packed),
            "hf": useful_padded / sum(b["input_ids"].numel() for b in padded)}
    connector = sum(p.numel() for p in MLLM(cfg.model).connector.parameters())
    flops = sum(step_flops(cfg, count_batch(b.tokens_BT, b.labels_BT, b.doc_ids_BT, sum(b.images_per_row)),
                           connector_params=connector) for b in packed)

    def step(model, opt, b):
        model(**b.model_inputs()).loss.backward()
        opt.step()
        opt.zero_grad()

    def step_theirs(b):
        kw = {k: v for k, v in b.items() if k != "useful" and v is not None}
        theirs(**kw).loss.backward()
        opts["theirs"].step()
        opts["theirs"].zero_grad()

    step(ours, opts["ours"], packed[0])
    step_theirs(padded[0])  # warm-up
    t = time.perf_counter()
    for b in packed:  # compiles for each new number of images, then automatic dynamic shapes
        step(compiled, opts["compiled"], b)
    compile_s = time.perf_counter() - t
    rates = {"mm1": [], "mm1_compiled": [], "hf": []}
    for _ in range(a.repeats):  # interleaved, so machine noise hits all alike
        rates["mm1"].append(useful_packed / sum(time_steps(lambda b: step(ours, opts["ours"], b), packed)))
        rates["mm1_compiled"].append(useful_packed / sum(time_steps(
            lambda b: step(compiled, opts["compiled"], b), packed)))
        rates["hf"].append(useful_padded / sum(time_steps(step_theirs, padded)))
    med = {k: statistics.median(v) for k, v in rates.items()}
    peak = default_peak_flops(torch.device("cpu"))
    mfu = {k: med[k] * flops / useful_packed / peak for k in ("mm1", "mm1_compiled")}
    print(f"peak (best fp32 matmul rate here): {peak / 1e9:.0f} GFLOP/s")
    print(f"mm1 (packed):           {med['mm1']:8.0f} useful tokens/s  MFU {mfu['mm1']:.2f}  {rates['mm1']}")
    print(f"mm1 compiled (packed):  {med['mm1_compiled']:8.0f} useful tokens/s  MFU {mfu['mm1_compiled']:.2f}  "
          f"{rates['mm1_compiled']} (first pass with compilation: {compile_s:.0f} s)")
    print(f"HF LLaVA (padded):      {med['hf']:8.0f} useful tokens/s  {rates['hf']}")
    print(f"real tokens among the positions computed: mm1 {fill['mm1']:.0%} (packed), HF {fill['hf']:.0%} (padded)")
    print(f"mm1 / HF: {med['mm1'] / med['hf']:.2f}x   compiled / eager: {med['mm1_compiled'] / med['mm1']:.2f}x")
    print(json.dumps({"bench": "train", "mm1_tokens_per_s": med["mm1"],
                      "mm1_compiled_tokens_per_s": med["mm1_compiled"], "hf_tokens_per_s": med["hf"],
                      "train_speedup": med["mm1"] / med["hf"],
                      "compiled_over_eager": med["mm1_compiled"] / med["mm1"], "mfu": mfu["mm1"],
                      "mfu_compiled": mfu["mm1_compiled"], "peak_flops": peak, "compile_s": compile_s,
                      "fill_mm1": fill["mm1"], "fill_hf": fill["hf"]}))


if __name__ == "__main__":
    main()
