"""The MM1 paper's configurations: the ablation base, the 3B/7B/30B models and their MoE variants.

The paper (arXiv 2403.09611) gives the image encoder (CLIP ViT-H/14 at 378 px for the final models,
ViT-L/14 at 336 px for ablations), the connector (C-Abstractor, 144 tokens), the data mixture and
the optimisation hyper-parameters, but not the decoders' shapes. Where it is silent we choose
standard shapes, named in each docstring, so that the parameter counts match the model names
(`mm1 config show --recipe R` prints them, computed on the meta device).
"""

from __future__ import annotations

import copy

from mm1.config import (
    Config,
    ConnectorConfig,
    DataConfig,
    DecoderConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    OptimizerKind,
    PackingConfig,
    ScheduleConfig,
    Stage,
    TrainConfig,
    VisionConfig,
)

VOCAB = 100_352  # not given in the paper; a 100k BPE vocabulary padded to a multiple of 128


def vit_l14_336() -> VisionConfig:
    """CLIP ViT-L/14 at 336 px (the ablation encoder): 24 layers, width 1024, 16 heads."""
    return VisionConfig(image_size=336, patch_size=14, width=1024, depth=24, heads=16)


def vit_h14_378() -> VisionConfig:
    """CLIP ViT-H/14 at 378 px (DFN-5B), the encoder of the final MM1 models: 32 layers, width 1280."""
    return VisionConfig(image_size=378, patch_size=14, width=1280, depth=32, heads=16)


def _paper_config(model: ModelConfig) -> Config:
    # Pre-training: 4096-token sequences with up to 16 images, batch 512, 200k steps,
    # warm-up 2000 steps then cosine decay to 10%; lr and weight decay from the paper's rule.
    return Config(
        model=model,
        data=DataConfig(packing=PackingConfig(seq_len=4096, max_images=16)),
        train=TrainConfig(steps=200_000, batch_size=512),
    )


def ablation() -> Config:
    """The ablation base: ViT-L/14 at 336 px, C-Abstractor with 144 tokens, a 1.2B decoder.

    Decoder shape (our choice): width 2048, 24 layers, 16 heads, SwiGLU 5632 (≈1.2B without
    embeddings, TinyLlama-like).
    """
    return _paper_config(ModelConfig(
        vision=vit_l14_336(),
        connector=ConnectorConfig(num_tokens=144),
        decoder=DecoderConfig(vocab_size=VOCAB, width=2048, depth=24, heads=16, kv_heads=16, ffn_hidden=5632),
    ))


def _decoder_3b() -> DecoderConfig:
    """Width 2560, 24 layers, 20 heads of 128 with 4 KV heads, SwiGLU 9728 (our choice)."""
    return DecoderConfig(vocab_size=VOCAB, width=2560, depth=24, heads=20, kv_heads=4, ffn_hidden=9728)


def _decoder_7b() -> DecoderConfig:
    """Width 4096, 32 layers, 32 heads of 128 with 8 KV heads, SwiGLU 12288 (our choice)."""
    return DecoderConfig(vocab_size=VOCAB, width=4096, depth=32, heads=32, kv_heads=8, ffn_hidden=12288)


def _decoder_30b() -> DecoderConfig:
    """Width 6656, 56 layers, 52 heads of 128 with 4 KV heads, SwiGLU 17920 (LLaMA-33B-like, our choice)."""
    return DecoderConfig(vocab_size=VOCAB, width=6656, depth=56, heads=52, kv_heads=4, ffn_hidden=17920)


def _final(decoder: DecoderConfig, moe: MoEConfig | None = None) -> Config:
    return _paper_config(ModelConfig(
        vision=vit_h14_378(), connector=ConnectorConfig(num_tokens=144), decoder=decoder,
        moe=moe or MoEConfig(),
    ))


def mm1_3b() -> Config:
    """MM1-3B: ViT-H/14 378 px, C-Abstractor 144 tokens, the 3B decoder of `_decoder_3b`."""
    return _final(_decoder_3b())


def mm1_7b() -> Config:
    """MM1-7B: ViT-H/14 378 px, C-Abstractor 144 tokens, the 7B decoder of `_decoder_7b`."""
    return _final(_decoder_7b())


def mm1_30b() -> Config:
    """MM1-30B: ViT-H/14 378 px, C-Abstractor 144 tokens, the 30B decoder of `_decoder_30b`."""
    return _final(_decoder_30b())


def mm1_3b_moe() -> Config:
    """MM1-3B-MoE: the 3B model with 64 experts in every 2nd layer, top-2 (≈64B parameters in all)."""
    return _final(_decoder_3b(), MoEConfig(num_experts=64, every=2, top_k=2))


def mm1_7b_moe() -> Config:
    """MM1-7B-MoE: the 7B model with 32 experts in every 4th layer, top-2 (≈47B parameters in all)."""
    return _final(_decoder_7b(), MoEConfig(num_experts=32, every=4, top_k=2))


def sft(base: Config) -> Config:
    """MM1's supervised fine-tuning (Section 4) of a pre-trained `base`.

    AdaFactor with an absolute learning rate of 1e-5 and cosine decay, 10k steps of 256 sequences of
    2048 tokens, the image encoder unfrozen, text-only conversations mixed in (`data.sft_sources`).
    High resolution as in the paper: a 1344×1344 image becomes an overview plus 2×2 sub-images, each
    672×672, so the ViT runs at 672 px on position embeddings interpolated from pre-training
    (once, when the pre-trained weights are loaded) and every image costs 5 × 144 = 720 tokens.
    Where the paper is silent (warm-up, final learning rate, momentum, images per sequence) the
    choices follow LLaVA-1.5, whose SFT recipe MM1 builds on; docs/paper.md lists them.
    """
    cfg = copy.deepcopy(base)
    cfg.train.stage = Stage.SFT
    cfg.train.steps, cfg.train.batch_size = 10_000, 256
    cfg.train.optimizer = OptimizerConfig(kind=OptimizerKind.ADAFACTOR, lr=1e-5, weight_decay=0.0, beta1=0.9)
    cfg.train.schedule = ScheduleConfig(warmup_steps=300, final_lr_fraction=0.0)  # LLaVA-1.5: 3% warm-up
    cfg.model.vision.image_size = 672
    cfg.data.sub_image_grid = 2
    cfg.data.packing = PackingConfig(seq_len=2048, max_images=2)  # 2 × 720 image tokens fit in 2048
    return cfg


def mm1_3b_sft() -> Config:
    return sft(mm1_3b())


def mm1_7b_sft() -> Config:
    return sft(mm1_7b())


def mm1_30b_sft() -> Config:
    return sft(mm1_30b())


def mm1_3b_moe_sft() -> Config:
    return sft(mm1_3b_moe())


def mm1_7b_moe_sft() -> Config:
    return sft(mm1_7b_moe())


def ablation_sft() -> Config:
    return sft(ablation())
