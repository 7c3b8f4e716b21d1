"""The MM1 image encoder: a pre-norm ViT, as trained with a CLIP loss, kept unfrozen during training.

MM1 found resolution to matter most (224 → 336 px: about +3%), so the learned position embeddings
are interpolated bicubically to any square grid — on the fly when an image of another resolution
comes in, and once when loading weights trained at another resolution (`resize_pos_embed`).
The layer layout matches HF's CLIP and SigLIP vision towers so that `mm1.model.weights` can import
them with a plain name mapping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import Activation, VisionConfig


def activation(kind: Activation) -> nn.Module:
    if kind == Activation.QUICK_GELU:
        return QuickGELU()
    return nn.GELU(approximate="tanh" if kind == Activation.GELU_TANH else "none")


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU, for towers trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention over image patches."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)

    def forward(self, x_BND: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x_BND.shape
        q, k, v = (p(x_BND).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, N, D))


class VisionBlock(nn.Module):
    """One pre-norm ViT block: attention then an MLP, each with a residual."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.act = activation(cfg.activation)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x_BND: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x_BND = x_BND + self.attn(self.norm1(x_BND), mask)
        return x_BND + self.fc2(self.act(self.fc1(self.norm2(x_BND))))


def resize_pos_embed(pos_PD: torch.Tensor, new_grid: int, *, num_prefix: int) -> torch.Tensor:
    """Bicubically resize a [prefix + g·g, D] position table to a new_grid × new_grid one."""
    prefix, grid_PD = pos_PD[:num_prefix], pos_PD[num_prefix:]
    old = math.isqrt(grid_PD.shape[0])
    if old == new_grid:
        return pos_PD
    img = grid_PD.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid_PD = img.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos_PD.dtype)
    return torch.cat([prefix, grid_PD], dim=0)


class VisionEncoder(nn.Module):
    """Images [B, 3, H, W] (normalised) → patch features [B, (H/p)·(W/p), D] (CLS dropped)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.num_prefix = 1 if cfg.cls_token else 0
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.cls = nn.Parameter(torch.zeros(cfg.width)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(torch.randn(self.num_prefix + self.grid**2, cfg.width) * 0.02)
        self.norm_pre = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.norm_post = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.post_norm else nn.Identity()

    def reset_parameters(self) -> None:
        if self.cls is not None:
            nn.init.zeros_(self.cls)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images_BCHW)  # [B, D, g, g]
        grid = x.shape[-1]
        x_BND = x.flatten(2).transpose(1, 2)
        pos = resize_pos_embed(self.pos_embed, grid, num_prefix=self.num_prefix)
        if self.cls is not None:
            x_BND = torch.cat([self.cls.expand(x_BND.shape[0], 1, -1), x_BND], dim=1)
        x_BND = self.norm_pre(x_BND + pos)
        for block in self.blocks:
            x_BND = block(x_BND)
        return self.norm_post(x_BND[:, self.num_prefix:])
