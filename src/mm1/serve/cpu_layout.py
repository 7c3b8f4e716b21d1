"""The decoder's weights in oneDNN's blocked layout, for serving on a CPU.

Decoding multiplies a few rows (one per running request) by every weight matrix of the decoder. On a CPU,
`F.linear` (MKL's sgemm on the plain row-major weight) does that at a fraction of the rate the memory
allows; oneDNN's matmul on a weight reordered once into its blocked layout (what vLLM's CPU build and
inductor's freezing pass use) is 1.5-2.7× faster on the linear layers of the 135M-parameter SmolLM2 at 1 to
16 rows and on a long prompt's pass, about 1.3× on a whole decoding step (benchmarks/profile_serve.py,
docs/benchmarks.md). The values are the same product up to summation order (about 1e-4 on fp32 logits).

`pack_linears` changes a model loaded for inference only (the packed weight is an opaque oneDNN
tensor: the module can no longer be trained, saved or exported), so its callers are the commands that
load a model to serve or generate with it, and it is off where oneDNN is absent or the model is not on
the CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight reordered for oneDNN's CPU matmul: y = x Wᵀ + b."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # an attribute, not a buffer: an opaque oneDNN tensor has no storage for state_dict or .to()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(model: nn.Module) -> bool:
    """oneDNN is built in and the model's weights are fp32 or bf16 tensors on the CPU."""
    p = next(model.parameters(), None)
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and p is not None and p.device.type == "cpu" and p.dtype in (torch.float32, torch.bfloat16))


def pack_linears(model: nn.Module, *, within: str = "decoder") -> int:
    """Replace every `nn.Linear` under `model.<within>` (the LM head included) by a `PackedLinear`, in
    place; returns how many. A model that `can_pack` refuses is left as it is (0)."""
    if not can_pack(model):
        return 0
    root = model.get_submodule(within)
    targets = [(name, m) for name, m in root.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, PackedLinear(linear))
    return len(targets)
