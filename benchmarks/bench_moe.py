"""MoE layer cost: mm1's grouped dispatch vs a dense FFN of equal active FLOPs, and vs HF Mixtral.

    python benchmarks/bench_moe.py

8 experts, top-2, width 256, expert hidden 512, 4096 tokens (`--width`, `--hidden`, `--tokens`);
forward + backward, fp32, 2 threads.
The dense reference is a SwiGLU with hidden 2 × 512 (the same FLOPs per token as two experts);
the loop reference is transformers' `MixtralSparseMoeBlock` with the same weights, run with its
per-expert loop ("eager") and, where this transformers version offers it, with its `grouped_mm`
experts. (Its `batched_mm` gathers a weight matrix per routed token, [8192, 1024, 256] here, and
does not fit in memory.) Medians over interleaved repeats, then one JSON line.

The allocator is held steady by default (glibc's `mallopt`: freed memory is neither trimmed nor
unmapped), because glibc otherwise returns the dense FFN's 16 MB activations to the OS after each
pass and the next pass page-faults them back in: a cost of the allocator and of the host's load, not
of either layer, that made the dense reference up to 30% slower in some runs and the ratio read
low. `--allocator glibc` measures with glibc's defaults, as this script did before 2026-12-04.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import statistics
import time

import torch

from mm1.config import MoEConfig
from mm1.model.decoder import SwiGLU
from mm1.model.moe import MoEFFN

WIDTH, HIDDEN, E, K, TOKENS = 256, 512, 8, 2, 4096


def hold_allocator_steady() -> bool:
    """Stop glibc from trimming the heap or serving large blocks with mmap (no page faults on reuse)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hold
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 1 << 30)) and bool(mallopt(m_mmap_threshold, 1 << 30))


def timed(fn, x) -> float:
    t = time.perf_counter()
    out = fn(x)
    (out[0] if isinstance(out, tuple) else out).sum().backward()
    return time.perf_counter() - t


def hf_grouped_mm_available() -> bool:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # transformers before its experts interface: the loop only
        return False
    return "grouped_mm" in ALL_EXPERTS_FUNCTIONS


def mixtral_block(moe: MoEFFN, D: int, H: int, implementation: str = "eager"):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=K,
                        experts_implementation=implementation)
    block = MixtralSparseMoeBlock(cfg)
    state = block.state_dict()
    with torch.no_grad():  # copy our weights in, whatever layout this transformers version uses
        for name, tensor in state.items():
            if "gate_up_proj" in name:
                tensor.copy_(moe.w_gate_up if tensor.shape[1] == 2 * H else moe.w_gate_up.transpose(1, 2))
            elif "down_proj" in name and tensor.ndim == 3:
                tensor.copy_(moe.w_down if tensor.shape[1] == D else moe.w_down.transpose(1, 2))
            elif name.endswith("gate.weight") and tensor.shape == moe.router.weight.shape:
                tensor.copy_(moe.router.weight)
    return block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--allocator", choices=["steady", "glibc"], default="steady")
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="each expert's; the dense FFN has top-k times it")
    ap.add_argument("--tokens", type=int, default=TOKENS)
    a = ap.parse_args()
    D, H, N = a.width, a.hidden, a.tokens
    allocator = "steady" if a.allocator == "steady" and hold_allocator_steady() else "default"
    print(f"allocator: {allocator}")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    moe = MoEFFN(D, H, MoEConfig(num_experts=E, top_k=K))
    dense = SwiGLU(D, K * H)
    x = torch.randn(1, N, D, requires_grad=True)
    fns = {"mm1_moe": moe, "dense_equal_active": dense, "hf_mixtral": mixtral_block(moe, D, H)}
    if hf_grouped_mm_available():
        fns["hf_mixtral_grouped_mm"] = mixtral_block(moe, D, H, "grouped_mm")
    times = {k: [] for k in fns}
    for fn in fns.values():
        timed(fn, x)
    for _ in range(a.repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, x))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:20s} {v:8.2f} ms (forward + backward, {N} tokens)")
    print(f"mm1 MoE / dense: {med['mm1_moe'] / med['dense_equal_active']:.2f}x   "
          f"HF Mixtral / mm1 MoE: {med['hf_mixtral'] / med['mm1_moe']:.2f}x")
    # The dense FFN of equal active FLOPs is the floor for any dispatch: no implementation can be
    # more than (HF / dense) times faster than HF.
    print(f"HF Mixtral / dense: {med['hf_mixtral'] / med['dense_equal_active']:.2f}x")
    ratios = {"moe_over_dense": med["mm1_moe"] / med["dense_equal_active"],
              "hf_loop_over_moe": med["hf_mixtral"] / med["mm1_moe"],
              "hf_loop_over_dense": med["hf_mixtral"] / med["dense_equal_active"]}
    if "hf_mixtral_grouped_mm" in med:
        ratios["hf_grouped_mm_over_moe"] = med["hf_mixtral_grouped_mm"] / med["mm1_moe"]
        print(f"HF Mixtral grouped_mm / mm1 MoE: {ratios['hf_grouped_mm_over_moe']:.2f}x")
    print(json.dumps({"bench": "moe", "allocator": allocator, "width": D, "hidden": H, "tokens": N,
                      **{f"{k}_ms": v for k, v in med.items()}, **ratios}))


if __name__ == "__main__":
    main()
