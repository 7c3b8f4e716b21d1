"""MFU's numerator against a hand count: documents attend within themselves, the head works on labelled
tokens, the ViT's patch embedding and attention and the connector count, frozen parts cost less."""

from __future__ import annotations

import torch

from mm1.config import apply_overrides
from mm1.data.packing import IGNORE
from mm1.recipes import get_recipe
from mm1.train.flops import count_batch, step_flops

SHAPE = ["model.decoder.width=8", "model.decoder.depth=2", "model.decoder.heads=2", "model.decoder.kv_heads=1",
         "model.decoder.ffn_hidden=16", "model.decoder.vocab_size=32", "model.vision.image_size=16",
         "model.vision.patch_size=8", "model.vision.width=8", "model.vision.depth=1", "model.vision.heads=2",
         "model.vision.mlp_ratio=4", "model.vision.cls_token=false", "model.connector.num_tokens=4"]


def test_step_flops_equal_a_hand_count():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    labels = torch.tensor([[5, 5, IGNORE, 5, 5, IGNORE], [IGNORE, 5, 5, 5, IGNORE, IGNORE]])
    count = count_batch(torch.zeros(2, 6, dtype=torch.long), labels, doc_ids, images=1)
    # tokens 11; labelled 7; pairs: row 0 documents of 3 and 2 tokens (6 + 3), row 1 one of 6 (21)
    assert (count.tokens, count.labelled, count.attention_pairs, count.images) == (11, 7, 30, 1)
    cfg = apply_overrides(get_recipe("tiny"), SHAPE)
    # decoder per token: attention weights 8·4·(2·2 + 2·1) = 192, FFN 3·8·16 = 384, two layers, 2 FLOPs each
    # forward: 2·576·2·11 = 25344; head 2·32·8·7 = 3584; attention 4·2 layers·2 heads·4·30 pairs = 1920
    decoder = 3 * (25344 + 3584 + 1920)
    # ViT: 4 patches; embedding 2·4·3·64·8 = 12288; block matmuls 2·4·(4·64 + 2·8·32) = 6144; attention 4·8·16 = 512
    vit = 12288 + 6144 + 512
    connector = 2 * 100 * 4  # 100 weights applied at the 4 patches (C-Abstractor's convolutions)
    assert step_flops(cfg, count, connector_params=100) == decoder + 3 * vit + 3 * connector
    frozen = apply_overrides(get_recipe("tiny"), [*SHAPE, "train.components.vision_frozen=true"])
    assert step_flops(frozen, count, connector_params=100) == decoder + vit + 3 * connector  # forward only
    frozen_decoder = apply_overrides(get_recipe("tiny"), [*SHAPE, "train.components.decoder_frozen=true"])
    assert step_flops(frozen_decoder, count, connector_params=100) == 2 * decoder // 3 + 3 * vit + 3 * connector
