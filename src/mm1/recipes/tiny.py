"""The tiny recipe: the whole MM1 procedure on the embedded synthetic world, on 2 CPU cores.

Sized from measurements on a 2-core CPU: a ~2-3M-parameter model at 64 px with 16 image tokens
trains at a few hundred samples/s, enough to learn the world's captions and VQA in minutes (64
image tokens would be ~5× slower). Warm-up and run length are scaled down from the paper's
2,000-step warm-up; the peak learning rate still comes from the paper's rule (≈1e-3 at this size).
"""

from __future__ import annotations

import copy

from mm1.config import (
    Activation,
    CheckpointConfig,
    Config,
    ConnectorConfig,
    ConnectorKind,
    DataConfig,
    DecoderConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    PackingConfig,
    ScheduleConfig,
    Stage,
    SynthConfig,
    TrainConfig,
    VisionConfig,
    apply_overrides,
)
from mm1.recipes.pipeline import Handoff, Pipeline, PipelineStage


def tiny() -> Config:
    model = ModelConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=3, heads=4,
                            activation=Activation.GELU, cls_token=False, pre_norm=True, post_norm=True,
                            patch_bias=True),
        # Average pooling, not MM1's C-Abstractor: at this scale the C-Abstractor model's VQA was its
        # question-only baseline (colours 0.08 against 0.62 with average pooling; a probe, commit 2826ab7).
        connector=ConnectorConfig(kind=ConnectorKind.AVG_POOL, num_tokens=16, depth=1, hidden=128),
        decoder=DecoderConfig(vocab_size=2048, width=192, depth=4, heads=6, kv_heads=2, ffn_hidden=512,
                              tie_embeddings=True, max_seq_len=512),
    )
    data = DataConfig(
        root="runs/data/world",
        packing=PackingConfig(seq_len=384, max_images=16),
        # 30,000 text documents: the LM stage reads each about once (with 2,000 it read each many times
        # and memorised them, its held-out perplexity worse than after multimodal training; MM1 starts
        # from an LLM that generalises)
        synth=SynthConfig(captions=12000, interleaved=2000, text=30000, sft=3000, eval_scenes=200,
                          image_size=128, junk=1000),
        num_workers=2,
    )
    # 300 steps of 8 sequences from the LM stage's decoder: more updates, not more samples, is what the
    # model needs here. Measured 2026-12-07 (world v10, the quickstart's CLIP and LM stages, one seed each,
    # 100 held-out items): 150 × 16 (the same tokens) gave 0-shot captioning 0.795 CIDEr-D (1.9× the
    # baseline of 0.409) and VQA 0.42; 300 × 8 gave 1.366 (3.3×) and VQA 0.45; 400 × 4 (2/3 of the
    # tokens) 1.179 and 0.51.
    train = TrainConfig(
        steps=300, batch_size=8, schedule=ScheduleConfig(warmup_steps=30, final_lr_fraction=0.1),
        checkpoint=CheckpointConfig(every=200, keep_last=2), logging=LoggingConfig(every=10),
    )
    return Config(model=model, data=data, train=train,
                  eval=EvalConfig(limit=100, batch_size=32))


def tiny_clip(base: Config) -> Config:
    """Stage 0: CLIP pre-training of the tiny ViT on the world's captions (MM1 starts from a CLIP
    encoder; none ships offline). 100 steps of 128 pairs: the loss falls from 4.8 to ~1.1. Measured in the
    quickstart: 200 steps change the pre-trained captioning score by +0.02 CIDEr, 80 steps by -0.24."""
    cfg = copy.deepcopy(base)
    cfg.train.stage = Stage.CLIP
    cfg.train.steps, cfg.train.batch_size = 100, 128
    cfg.train.schedule = ScheduleConfig(warmup_steps=10, final_lr_fraction=0.1)
    return cfg


def tiny_lm(base: Config) -> Config:
    """Stage 0 of the decoder: language pre-training on the world's text-only documents (and the real
    text mixed into them where `data.synth.real_text` is set), as MM1 starts from a pre-trained LLM.
    Its `decoder/` folder is what `model.decoder.init` names for the multimodal stage.

    Since world version 12 the text is 30,000 documents (about 1.5M tokens): LM_STEPS steps of 8
    sequences of 384 tokens read about a fifth of it, so the LM generalises rather than memorises. With
    the 2,000 documents of earlier worlds (about 90k tokens), 16 sequences a step over-learned one of
    their phrases: the pre-trained model then ended every caption with 'with the word "cat"' (0.40
    CIDEr-D against 0.96 at 8 sequences, one seed each)."""
    cfg = copy.deepcopy(base)
    cfg.train.stage = Stage.LM
    cfg.train.steps, cfg.train.batch_size = LM_STEPS, 8
    cfg.train.schedule = ScheduleConfig(warmup_steps=10, final_lr_fraction=0.1)
    cfg.train.checkpoint.every = LM_STEPS
    return cfg


LM_STEPS = 100


def tiny_sft(base: Config) -> Config:
    """Stage 2: supervised fine-tuning on the world's conversations (with text-only ones mixed in), at
    high resolution as MM1 does it, at this scale: each 128-px image as an overview plus 2×2 views of
    64 px (the world renders at 128 px, where its printed words are legible).

    270 steps of 8 sequences. Measured 2026-12-07 on the quickstart's pre-trained model (300 × 8; its
    synth_vqa 0-shot 0.45 in its own format), the fine-tuned model's synth_vqa 0-shot in the chat format
    at high resolution, 100 questions, one seed each: 135 × 8 gave 0.30 (below the model it started
    from: colour and size answers fell from 0.69 to 0.38 and 0.31; with one view per image instead of
    sub-images 0.31, so the views are not the cause), 135 × 8 at lr 3e-4 0.32, 540 × 2 0.40, 270 × 4 0.42,
    270 × 8 0.52. The learning rate stays the rule's (1.28e-3); MM1's 1e-5 with AdaFactor is for 10k
    steps of a 3B model."""
    cfg = copy.deepcopy(base)
    cfg.train.stage = Stage.SFT
    cfg.data.sub_image_grid = 2
    cfg.train.steps, cfg.train.batch_size = 270, 8
    cfg.train.schedule = ScheduleConfig(warmup_steps=20, final_lr_fraction=0.1)
    return cfg


def tiny_pipeline(base: Config, *, clip: list[str] = (), lm: list[str] = (), sft: list[str] = ()) -> Pipeline:
    """MM1's order at the tiny scale: CLIP encoder and text LLM → multimodal pre-training (`base`) → SFT.
    `clip`, `lm` and `sft` are overrides of that stage only."""
    vision, decoder = (Handoff.VISION, "clip"), (Handoff.DECODER, "lm")
    return Pipeline((
        PipelineStage("clip", apply_overrides(tiny_clip(base), list(clip))),
        PipelineStage("lm", apply_overrides(tiny_lm(base), list(lm))),
        PipelineStage("pretrain", base, (vision, decoder)),
        PipelineStage("sft", apply_overrides(tiny_sft(base), list(sft)),
                      (vision, decoder, (Handoff.WHOLE, "pretrain"))),
    ))
