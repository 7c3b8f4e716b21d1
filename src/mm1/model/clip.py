"""A small CLIP for pre-training the image encoder with a contrastive loss, as MM1's encoders are.

MM1 starts from a ViT trained with a CLIP loss (DFN-5B + VeCap). With no pretrained encoder on
hand (none ships offline), `mm1 train --stage clip` trains our ViT contrastively on the caption
data first; the MLLM then starts its vision tower from it (`model.vision.init`). The text side is a
small pre-norm transformer over caption tokens, mean-pooled. `forward` gives both embeddings and
the learned temperature; the symmetric InfoNCE loss of Radford et al. (2021), with negatives
gathered across ranks, is the CLIP stage's objective (`mm1.train.clip`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import VisionConfig
from mm1.model.vision import VisionBlock, VisionEncoder


@dataclass
class CLIPEmbeddings:
    """What the CLIP model returns: unit-norm image and text embeddings and the temperature."""
    image_ND: torch.Tensor  # unit-norm image embeddings
    text_ND: torch.Tensor  # unit-norm caption embeddings
    logit_scale: torch.Tensor  # exp(learned log-temperature), at most 100


class TextEncoder(nn.Module):
    """CLIP's caption encoder: a small pre-norm transformer, read out as the mean of its real tokens."""

    def __init__(self, vocab: int, width: int, depth: int, heads: int, max_len: int) -> None:
        super().__init__()
        cfg = VisionConfig(width=width, depth=depth, heads=heads)
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)  # reset_parameters: the same draw
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids_BL: torch.Tensor, valid_BL: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids_BL) + self.pos[: ids_BL.shape[1]]
        mask = valid_BL[:, None, None, :]  # keys: real tokens only
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        w = valid_BL[..., None].float()
        return (x * w).sum(1) / w.sum(1).clamp(min=1)


class CLIP(nn.Module):
    """The image encoder with a text tower, trained with the contrastive loss of MM1's CLIP stage."""

    def __init__(self, vision: VisionConfig, *, vocab: int, embed_dim: int = 128, text_width: int = 128,
                 text_depth: int = 2, text_heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.vision = VisionEncoder(vision)
        self.text = TextEncoder(vocab, text_width, text_depth, text_heads, max_len)
        self.vision_proj = nn.Linear(vision.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # 1-D: FSDP2 shards no scalars

    def reset_parameters(self) -> None:
        """Its own logit scale; `reset_all` (mm1.model.init) resets every part."""
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))

    def forward(self, images_BCHW: torch.Tensor, ids_BL: torch.Tensor, valid_BL: torch.Tensor) -> CLIPEmbeddings:
        img = F.normalize(self.vision_proj(self.vision(images_BCHW).mean(1)), dim=-1)
        txt = F.normalize(self.text_proj(self.text(ids_BL, valid_BL)), dim=-1)
        return CLIPEmbeddings(img, txt, self.logit_scale.clamp(max=math.log(100)).exp())
