"""Mixture-of-experts FFN for the MM1-MoE decoders (Section 3.5): top-2 routing, grouped dispatch.

The experts' weights live in two stacked tensors in nn.Linear layout ([E, 2H, D] for gate and up
stacked, [E, D, H] for down; the layout of HF's Mixtral experts) so that a dense FFN upcycles by
copying, and tokens are processed grouped by expert: the (token, expert) assignments are sorted by
expert once, each expert runs two matmuls over its contiguous slice (on CUDA in bf16, all experts'
in two grouped GEMMs, `torch._grouped_mm`), and the results are scattered back weighted by the
router. No loop over tokens, and no expert computes tokens that were not routed to it.

The auxiliary losses follow the paper: a load-balance loss (Switch Transformer form, coefficient
0.01 by default) and a router z-loss (ST-MoE, coefficient 0.001); the trainer adds `aux_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import MoEConfig


@dataclass
class MoEStats:
    """One MoE layer's auxiliary losses and expert shares for a forward pass."""
    aux_loss: torch.Tensor  # coefficient-weighted sum of the two losses below
    load_balance_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_share_E: torch.Tensor  # fraction of routed (token, expert) pairs per expert, detached


class MoEFFN(nn.Module):
    """MM1's mixture-of-experts FFN: top-k routing over SwiGLU experts, load-balance and router z-losses."""

    def __init__(self, width: int, hidden: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        self.router = nn.Linear(width, E, bias=False)
        self.hidden = hidden
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * hidden, width))
        self.w_down = nn.Parameter(torch.empty(E, width, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        width, hidden = self.w_gate_up.shape[2], self.w_down.shape[2]
        for w, fan_in in ((self.w_gate_up, width), (self.w_down, hidden)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def _experts(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Each expert's SwiGLU on its rows (x_AD sorted by expert, counts_E rows each)."""
        if self.uses_grouped_mm(x_AD):
            # Under autocast the residual stream stays fp32 (RMSNorm is not an autocast op): the grouped
            # GEMM runs in bf16 and its result returns in the stream's dtype, as torchtitan does it.
            return _grouped_swiglu(x_AD.to(torch.bfloat16), counts_E, self.w_gate_up, self.w_down).to(x_AD.dtype)
        # unbind, not w[e]: indexing one expert's slice makes its backward fill a zero tensor the size of
        # all experts' weights and add it, once per expert; unbind's backward stacks the E gradients once.
        outs = []
        for x_CD, w_gu, w_d in zip(x_AD.split(counts_E.tolist()), self.w_gate_up.unbind(0), self.w_down.unbind(0),
                                   strict=True):  # contiguous rows per expert
            gate, up = F.linear(x_CD, w_gu).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w_d))
        return torch.cat(outs)

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """The grouped GEMM: on CUDA (where it is faster than the loop), when the input is bf16 or autocast
        computes in bf16 (the per-expert loop's host sync, `counts_E.tolist()`, is what it avoids)."""
        if not (self.cfg.grouped_mm and x.device.type in GROUPED_DEVICES and hasattr(torch, "_grouped_mm")):
            return False
        autocast_bf16 = torch.is_autocast_enabled(x.device.type) and \
            torch.get_autocast_dtype(x.device.type) == torch.bfloat16
        return x.dtype == torch.bfloat16 or autocast_bf16

    @torch.no_grad()
    def upcycle_from(self, gate_HD: torch.Tensor, up_HD: torch.Tensor, down_DH: torch.Tensor) -> None:
        """Start every expert as the given dense SwiGLU FFN (weights in nn.Linear layout)."""
        self.w_gate_up.copy_(torch.cat([gate_HD, up_HD], dim=0).expand_as(self.w_gate_up))
        self.w_down.copy_(down_DH.expand_as(self.w_down))

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        N, E, K = x_ND.shape[0], self.cfg.num_experts, self.cfg.top_k

        logits_NE = self.router(x_ND).float()
        probs_NE = logits_NE.softmax(dim=-1)
        weight_NK, expert_NK = probs_NE.topk(K, dim=-1)
        weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)

        # Group the N·K assignments by expert.
        expert_A = expert_NK.reshape(-1)
        order_A = expert_A.argsort(stable=True)
        token_A = order_A // K
        counts_E = torch.bincount(expert_A, minlength=E)
        # index_select: its backward is one index_add (a plain index's is an accumulating index_put)
        y_AD = self._experts(x_ND.index_select(0, token_A), counts_E) * weight_NK.reshape(-1)[order_A, None].to(
            x_ND.dtype)
        out_ND = torch.zeros_like(x_ND).index_add_(0, token_A, y_AD)

        share_E = counts_E.float() / (N * K)
        load_balance = E * (share_E * probs_NE.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits_NE, dim=-1).square().mean()
        aux = self.cfg.load_balance_coef * load_balance + self.cfg.z_loss_coef * z_loss
        return out_ND.view(B, T, D), MoEStats(aux, load_balance, z_loss, share_E.detach())


GROUPED_DEVICES = {"cuda"}  # where the grouped GEMM is taken (the tests add "cpu": torch runs it there too)
GROUP_ALIGN = 16  # rows per group the grouped GEMM kernel wants each group padded to


def _grouped_swiglu(x_AD: torch.Tensor, counts_E: torch.Tensor, w_gate_up: torch.Tensor,
                    w_down: torch.Tensor) -> torch.Tensor:
    """All experts in two grouped GEMMs (`torch._grouped_mm`, CUDA, bf16) instead of 2·E small ones.

    Each expert's rows are padded with zero rows to a multiple of GROUP_ALIGN; `offs` marks where each
    group ends. Zero rows cost a little compute and contribute nothing, to outputs or gradients.
    """
    A, E = x_AD.shape[0], counts_E.shape[0]
    padded_E = (counts_E + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    ends_E = padded_E.cumsum(0)
    expert_A = torch.repeat_interleave(torch.arange(E, device=x_AD.device), counts_E, output_size=A)
    # row a of expert e goes to (e's padded start) + (a's place among e's rows)
    shift_E = (ends_E - padded_E) - (counts_E.cumsum(0) - counts_E)
    dest_A = torch.arange(A, device=x_AD.device) + shift_E[expert_A]
    total = int(ends_E[-1])
    buf_PD = x_AD.new_zeros(total, x_AD.shape[1]).index_copy(0, dest_A, x_AD)
    offs = ends_E.to(torch.int32)
    dtype = x_AD.dtype
    gate, up = torch._grouped_mm(buf_PD, w_gate_up.to(dtype).transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    out_PD = torch._grouped_mm(F.silu(gate) * up, w_down.to(dtype).transpose(-2, -1), offs=offs)
    return out_PD[dest_A]
