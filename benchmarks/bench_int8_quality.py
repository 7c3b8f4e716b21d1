"""What `--int8` costs in quality: the served decoder in fp32 (oneDNN's layout, as `mm1 serve` runs it) and in
int8 (`mm1.serve.cpu_layout.quantize_linears`), scored on the same held-out text.

    python benchmarks/bench_int8_quality.py [--model runs/smollm2_135m_hf] [--text FILE] [--tokens N]

Both models read the same windows of the text (teacher-forced): printed are each one's perplexity, how
often their most likely next tokens agree, and the mean KL divergence of int8's next-token distribution from
fp32's. Greedy text that differs somewhere in a paragraph (bench_serve_vs_vllm.py's check) says little on its
own; these say how far apart the two models are on every position, and the perplexity says which way.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mm1.serve.cpu_layout import pack_linears, quantize_linears
from mm1.store.loading import load_model

ROOT = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def logits(model, tokens_BT: torch.Tensor) -> torch.Tensor:
    d = model.decoder
    T = tokens_BT.shape[1]
    hidden = d(d.embed(tokens_BT), torch.arange(T)[None].expand_as(tokens_BT), None).hidden_BTD
    return d.lm_head(hidden).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "runs" / "smollm2_135m_hf"))
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext2_tokenized" / "test.txt"))
    ap.add_argument("--tokens", type=int, default=16384, help="the text's first N tokens")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    if not Path(a.text).exists():
        raise SystemExit(f"{a.text}: not found (WikiText-2 is in ../shared/data; --text names another file)")
    model, tok, _ = load_model(a.model)
    fp32, int8 = model, copy.deepcopy(model)
    pack_linears(fp32)
    if not quantize_linears(int8):
        raise SystemExit("int8 needs an fp32 model on a CPU with oneDNN")
    ids = torch.tensor(tok.encode(Path(a.text).read_text()[: a.tokens * 8]), dtype=torch.long)[: a.tokens + 1]
    n = (len(ids) - 1) // a.window
    x_NT = ids[: n * a.window].view(n, a.window)
    y_NT = ids[1: n * a.window + 1].view(n, a.window)
    nll = {"fp32": 0.0, "int8": 0.0}
    agree = kl = 0.0
    t = time.perf_counter()
    for i in range(0, n, a.batch):
        x, y = x_NT[i:i + a.batch], y_NT[i:i + a.batch]
        lp32 = F.log_softmax(logits(fp32, x), -1)
        lp8 = F.log_softmax(logits(int8, x), -1)
        nll["fp32"] += float(-lp32.gather(-1, y[..., None]).sum())
        nll["int8"] += float(-lp8.gather(-1, y[..., None]).sum())
        agree += float((lp32.argmax(-1) == lp8.argmax(-1)).sum())
        kl += float((lp32.exp() * (lp32 - lp8)).sum())
    count = n * a.window
    print(f"{a.model} on {Path(a.text).name}: {count} tokens in {n} windows of {a.window} "
          f"({time.perf_counter() - t:.0f} s)")
    print(f"perplexity fp32 {math.exp(nll['fp32'] / count):.3f}, int8 {math.exp(nll['int8'] / count):.3f} "
          f"({math.exp((nll['int8'] - nll['fp32']) / count):.4f}x)")
    print(f"the same most likely next token at {agree / count:.1%} of positions; "
          f"KL(fp32 || int8) {kl / count:.4f} nats a token")


if __name__ == "__main__":
    main()
