"""The decoder's weights in oneDNN's blocked layout, or in int8, for serving on a CPU.

Decoding multiplies a few rows (one per running request) by every weight matrix of the decoder. On a CPU,
`F.linear` (MKL's sgemm on the plain row-major weight) does that at a fraction of the rate the memory
allows; oneDNN's matmul on a weight reordered once into its blocked layout (what vLLM's CPU build and
inductor's freezing pass use) is 1.5-2.7× faster on the linear layers of the 135M-parameter SmolLM2 at 1 to
16 rows and on a long prompt's pass, about 1.3× on a whole decoding step (benchmarks/profile_serve.py,
docs/benchmarks.md). The values are the same product up to summation order (about 1e-4 on fp32 logits).

`pack_linears` changes a model loaded for inference only (the packed weight is an opaque oneDNN
tensor: the module can no longer be trained, saved or exported), so its callers are the commands that
load a model to serve or generate with it, and it is off where oneDNN is absent or the model is not on
the CPU. `quantize_linears` (`--int8`) goes further than the fp32 peer engines: int8 weights, a quarter
of the bytes, at the price of a small change in the logits that can show in a small model's text (on
SmolLM2-135M it did: docs/serving.md).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from mm1.model.decoder import Attention, SwiGLU

# Compiled graphs cannot hold oneDNN's opaque packed tensor (inductor fails to lower
# `mkldnn._linear_pointwise` with it as an input), so under torch.compile a packed layer calls this op,
# which finds its packed weight by a number: to inductor it is an opaque kernel with a known output shape.
_PACKED: dict[int, torch.Tensor] = {}


@torch.library.custom_op("mm1::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[handle], None, "none", [], "")


@_packed_linear.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight reordered for oneDNN's CPU matmul: y = x Wᵀ + b.

    With `keep_plain` the row-major weight stays too (twice the memory), for compiled decoding: a graph
    for one row multiplies it with inductor's fused multiply-reduce, which reads it faster than any
    matmul call; graphs for more rows use the packed copy."""

    def __init__(self, linear: nn.Linear, *, keep_plain: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # an attribute, not a buffer: an opaque oneDNN tensor has no storage for state_dict or .to()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.handle = id(self)
        _PACKED[self.handle] = self.packed
        weakref.finalize(self, _PACKED.pop, self.handle, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False) if keep_plain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.weight is not None and x.numel() == x.shape[-1]:
            # One row: written as a multiply-reduce, which inductor fuses into one loop that streams the
            # weight faster than a matrix-vector call (its own mm pass does so only up to 2048 outputs,
            # fewer than a fused gate-up layer has).
            y = (self.weight * x[..., None, :]).sum(-1)
            return y if self.bias is None else y + self.bias
        y = _packed_linear(x, self.handle, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(model: nn.Module) -> bool:
    """oneDNN is built in and the model's weights are fp32 or bf16 tensors on the CPU."""
    p = next(model.parameters(), None)
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and p is not None and p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16))


def _stacked(*linears: nn.Linear) -> nn.Linear:
    """One linear layer computing all of `linears` on the same input: their weights' rows stacked."""
    first = linears[0]
    out = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                    device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in linears]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in linears]))
    return out.requires_grad_(False)


def fuse_projections(root: nn.Module) -> int:
    """Each attention layer's q, k and v as one linear layer, and each dense FFN's gate and up, in place
    (what vLLM's QKV and gate-up layers are): a few rows times one wide weight run faster than times
    three narrow ones on a CPU (measured with SmolLM2-135M's shapes, docs/benchmarks.md). Returns how
    many layers were fused. Inference only, like the packed weights."""
    n = 0
    for m in root.modules():
        if isinstance(m, Attention) and m.qkv is None:
            m.qkv, m.q, m.k, m.v = _stacked(m.q, m.k, m.v), None, None, None
            n += 1
        elif isinstance(m, SwiGLU) and m.gate_up is None:
            m.gate_up, m.gate, m.up = _stacked(m.gate, m.up), None, None
            n += 1
    return n


def pack_linears(model: nn.Module, *, within: str = "decoder", keep_plain: bool = False, fuse: bool = True) -> int:
    """Replace every `nn.Linear` under `model.<within>` (the LM head included) by a `PackedLinear`, in
    place, after fusing q/k/v and gate/up (`fuse_projections`) unless `fuse` is off; returns how many
    packed layers there are. A model that `can_pack` refuses is left as it is (0). `keep_plain` (for
    compiled decoding) keeps the row-major weights beside the packed ones."""
    if not can_pack(model):
        return 0
    root = model.get_submodule(within)
    if fuse:
        fuse_projections(root)
    targets = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child,
                PackedLinear(linear, keep_plain=keep_plain))
    return len(targets)


def quantize_linears(model: nn.Module, *, within: str = "decoder") -> int:
    """Replace the `nn.Linear` layers under `model.<within>` (the LM head included) by int8 ones, in place,
    except each dense FFN's `down` projection, which is packed in fp32 (`PackedLinear`); returns how many
    are int8. Weights are int8 per output channel, activations quantized per call (dynamic quantization,
    fbgemm's x86 kernels): a quarter of fp32's bytes, which is what batch-1 decoding reads.

    Why not `down`: its input (the SwiGLU product) has the outliers that one scale per call cannot hold.
    Measured on SmolLM2-135M and WikiText-2's test split in windows of 512 tokens
    (`benchmarks/bench_int8_quality.py`, first 4,096 tokens; docs/benchmarks.md): perplexity 27.5 in fp32,
    73.3 with every layer in int8 (the same most likely next token at 46% of positions), 34.4 with all but
    `down` (70%). A probe on the first 2,048 tokens: fp32 25.5, all 66.3, all but `down` 30.2, all but
    `down` and the LM head 28.4 (77%). So a small model's text still differs from fp32's (docs/serving.md).
    Speed (2-core AVX2 VM, 2 threads, every layer in int8): the linear layers took 20 ms at 1 row and
    30 ms at 16 rows against oneDNN fp32's 34 and 66 ms. torch.ao's eager quantization is deprecated in
    favour of torchao (not tried here); it still runs in torch 2.13. Core torch's weight-only int8 matmul
    (`aten._weight_int8pack_mm`) was 2-18× slower than fp32 at 1-16 rows on the same VM, and `torch._int_mm`
    (for per-token activation scales) slower still. A model that `can_pack` refuses (not fp32 on the CPU)
    is left as it is (0)."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if not can_pack(model) or next(model.parameters()).dtype != torch.float32:
        return 0
    root = model.get_submodule(within)
    kept = {id(m.down) for m in root.modules() if isinstance(m, SwiGLU)}
    spec = {name: per_channel_dynamic_qconfig for name, m in root.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in kept}
    with warnings.catch_warnings():  # its deprecation notices, once per layer (the docstring says it)
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        quantize_dynamic(root, spec, dtype=torch.qint8, inplace=True)
    pack_linears(model, within=within, fuse=False)  # the `down` layers left in fp32
    return len(spec)
