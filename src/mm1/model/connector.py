"""The three vision-language connectors of MM1 Section 3.2, each giving N image tokens of width D.

MM1 found the kind of connector matters little next to the number of image tokens and the image
resolution; it kept the C-Abstractor (Honeybee, Cha et al. 2024) for a small edge. All three take
patch features [B, g·g, Dv] on a square grid and return [B, N, D] with N a square number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import ConnectorConfig, ConnectorKind
from mm1.model.vision import resize_pos_embed


def _to_grid(x_BPC: torch.Tensor) -> torch.Tensor:
    B, P, C = x_BPC.shape
    side = math.isqrt(P)
    return x_BPC.transpose(1, 2).reshape(B, C, side, side)


class AvgPoolConnector(nn.Module):
    """Average pooling of the patch grid to √N×√N, then a linear projection (as in Emu2).

    Adaptive pooling, so every square token count that fits works: MM1's 144 tokens come from
    ViT-L/14's 16×16 grid at 224 px and from ViT-H/14's 27×27 grid at 378 px alike.
    """

    def __init__(self, vision_width: int, width: int, cfg: ConnectorConfig) -> None:
        super().__init__()
        self.side = math.isqrt(cfg.num_tokens)
        self.proj = nn.Linear(vision_width, width)

    def forward(self, x_BPC: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(_to_grid(x_BPC), self.side)
        return self.proj(pooled.flatten(2).transpose(1, 2))


class AttentionPoolConnector(nn.Module):
    """N learned queries cross-attend to the patch features, then a residual feed-forward layer."""

    def __init__(self, vision_width: int, width: int, cfg: ConnectorConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.queries = nn.Parameter(torch.randn(cfg.num_tokens, width) * 0.02)  # reset_parameters: the same draw
        self.norm_kv = nn.LayerNorm(vision_width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(vision_width, width)
        self.v = nn.Linear(vision_width, width)
        self.o = nn.Linear(width, width)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.queries, std=0.02)

    def forward(self, x_BPC: torch.Tensor) -> torch.Tensor:
        B = x_BPC.shape[0]
        kv = self.norm_kv(x_BPC)
        q = self.q(self.queries).expand(B, -1, -1)
        split = lambda t: t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(q), split(self.k(kv)), split(self.v(kv)))
        y_BND = self.o(y.transpose(1, 2).reshape(B, -1, q.shape[-1])) + self.queries
        return y_BND + self.ffn(self.norm_ffn(y_BND))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNormAct(nn.Sequential):
    """Convolution, channel LayerNorm and SiLU: the C-Abstractor's building block."""

    def __init__(self, cin: int, cout: int, kernel: int, *, groups: int = 1, act: bool = True) -> None:
        layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), LayerNorm2d(cout)]
        super().__init__(*layers, *([nn.SiLU()] if act else []))


class SqueezeExcite(nn.Module):
    """Channel re-weighting by a global average (the squeeze-excite of the C-Abstractor's ResNet blocks)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class RegNetBottleneck(nn.Module):
    """timm's RegNet bottleneck as Honeybee configures it: ratio 1, depthwise 3×3, SE 0.25, SiLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 1)
        self.conv2 = ConvNormAct(cout, cout, 3, groups=cout)
        self.se = SqueezeExcite(cout, round(cin * 0.25))
        self.conv3 = ConvNormAct(cout, cout, 1, act=False)
        self.shortcut = ConvNormAct(cin, cout, 1, act=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(y + self.shortcut(x))


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: RegNet stage → adaptive pool to √N×√N → RegNet stage → MLP."""

    def __init__(self, vision_width: int, width: int, cfg: ConnectorConfig, num_patches: int) -> None:
        super().__init__()
        hidden = cfg.hidden or vision_width
        self.pos_embed = nn.Parameter(torch.randn(num_patches, vision_width) * 0.02)  # reset_parameters: the same
        self.stage1 = nn.Sequential(*(RegNetBottleneck(vision_width if i == 0 else hidden, hidden)
                                      for i in range(cfg.depth)))
        self.side = math.isqrt(cfg.num_tokens)
        self.stage2 = nn.Sequential(*(RegNetBottleneck(hidden, hidden) for _ in range(cfg.depth)))
        layers: list[nn.Module] = [nn.Linear(hidden, width)]
        for _ in range(cfg.mlp_depth - 1):
            layers += [nn.SiLU(), nn.Linear(width, width)]
        self.readout = nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, x_BPC: torch.Tensor) -> torch.Tensor:
        pos = self.pos_embed
        if pos.shape[0] != x_BPC.shape[1]:  # another resolution: resize like the ViT's table
            pos = resize_pos_embed(pos, math.isqrt(x_BPC.shape[1]), num_prefix=0)
        x = self.stage1(_to_grid(x_BPC + pos))
        x = self.stage2(F.adaptive_avg_pool2d(x, self.side))
        return self.readout(x.flatten(2).transpose(1, 2))


def build_connector(cfg: ConnectorConfig, *, vision_width: int, width: int, num_patches: int) -> nn.Module:
    if cfg.kind == ConnectorKind.AVG_POOL:
        return AvgPoolConnector(vision_width, width, cfg)
    if cfg.kind == ConnectorKind.ATTENTION_POOL:
        return AttentionPoolConnector(vision_width, width, cfg)
    if cfg.kind == ConnectorKind.C_ABSTRACTOR:
        return CAbstractor(vision_width, width, cfg, num_patches)
    raise ValueError(f"unknown connector kind {cfg.kind}")
