"""The FLOPs of a training step, counted as the work the step needs (what MFU divides by the peak).

Counting every position of every packed row as if it attended to the whole row, and every token as
if it fed the LM head, overstates the work: a packed row of short documents attends within each
document only, and the head's logits matter only where a token has a label. So here:

- decoder matmuls: 2 FLOPs per weight and token forward (experts: the top-k only), 4 more backward;
- LM head: on labelled tokens only;
- attention: 4·heads·head_size FLOPs forward per (query, key) pair inside a document, causal, so
  Σ ℓ(ℓ+1)/2 pairs over the documents of each row (ℓ: a document's tokens in that row);
- the ViT per image: patch embedding, each block's matmuls, and its attention over all patches;
- the connector: 2 FLOPs per weight for each position it is applied at;
- backward: 2× forward for a trained part; for a frozen one, 1× forward (gradients for its input, not
  its weights) when something below it trains, nothing when nothing does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm1.config import Config, ConnectorKind
from mm1.data.packing import IGNORE


@dataclass(frozen=True)
class StepCount:
    """What a step's work depends on, summed over its rows (and, after a reduce, over the ranks)."""
    tokens: int  # real tokens (not padding)
    labelled: int  # tokens with a label: the LM head's rows
    attention_pairs: int  # causal (query, key) pairs inside documents
    images: int  # views encoded by the ViT


def count_batch(tokens_BT: torch.Tensor, labels_BT: torch.Tensor, doc_ids_BT: torch.Tensor, images: int) -> StepCount:
    """`doc_ids_BT`: each token's document within its row (-1: padding)."""
    real = doc_ids_BT >= 0
    B = doc_ids_BT.shape[0]
    width = int(doc_ids_BT.max()) + 2 if doc_ids_BT.numel() else 1
    # one bin per (row, document): a document's tokens in that row
    keys = (torch.arange(B)[:, None] * width + doc_ids_BT.clamp(min=-1) + 1)[real]
    lengths = torch.bincount(keys, minlength=B * width).double()
    pairs = int((lengths * (lengths + 1) / 2).sum())
    return StepCount(int(real.sum()), int((labels_BT != IGNORE).sum()), pairs, images)


def _passes(trained: bool, below_trains: bool) -> int:
    """Forward-equivalents of a part: 3 trained (forward, input and weight gradients), 2 frozen under a
    trained part (forward, input gradients), 1 frozen with nothing to pass gradients to."""
    return 3 if trained else (2 if below_trains else 1)


def vision_forward_flops(cfg: Config) -> float:
    """Forward FLOPs of the ViT on one image: patch embedding, block matmuls, attention over the patches."""
    v = cfg.model.vision
    patches = (v.image_size // v.patch_size) ** 2
    seq = patches + (1 if v.cls_token else 0)
    embed = 2 * patches * 3 * v.patch_size**2 * v.width
    matmuls = 2 * seq * v.depth * (4 * v.width**2 + 2 * v.width * int(v.width * v.mlp_ratio))
    attention = 4 * v.depth * v.width * seq * seq
    return embed + matmuls + attention


def connector_positions(cfg: Config) -> int:
    """Where the connector's weights are applied per image: each patch (convolutions, attention pooling's
    keys), or each output token (average pooling's projection)."""
    v, c = cfg.model.vision, cfg.model.connector
    return c.num_tokens if c.kind == ConnectorKind.AVG_POOL else (v.image_size // v.patch_size) ** 2


def step_flops(cfg: Config, count: StepCount, *, connector_params: int) -> float:
    """Training FLOPs of a step (see the module docstring)."""
    m, d, comp = cfg.model, cfg.model.decoder, cfg.train.components
    vision = _passes(not comp.vision_frozen, False)
    connector = _passes(not comp.connector_frozen, not comp.vision_frozen)
    decoder = _passes(not comp.decoder_frozen, not (comp.vision_frozen and comp.connector_frozen))
    attn_weights = d.width * d.head_size * (2 * d.heads + 2 * d.kv_heads)
    ffn = 3 * d.width * d.ffn_hidden
    moe_layers = len([i for i in range(d.depth) if m.moe.num_experts and (i + 1) % m.moe.every == 0])
    per_token = d.depth * attn_weights + (d.depth - moe_layers) * ffn + moe_layers * m.moe.top_k * ffn
    forward = 2 * per_token * count.tokens + 2 * d.vocab_size * d.width * count.labelled
    forward += 4 * d.depth * d.heads * d.head_size * count.attention_pairs
    images = count.images * (vision * vision_forward_flops(cfg)
                             + connector * 2 * connector_params * connector_positions(cfg))
    return decoder * forward + images
