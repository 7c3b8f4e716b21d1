"""The schema of an mm1 run: every knob as nested keyword-only dataclasses, with their choices.

Why this file exists: it is the one place a newcomer reads to learn what a run can be told, with
the paper's value beside each setting where the paper gives one (docs/paper.md says why).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad key, value or combination in a config; the message is one line naming the key."""


# ----------------------------------------------------------------------------- choices


class ConnectorKind(str, enum.Enum):
    """The three vision-language connectors compared in MM1 (Section 3.2)."""

    AVG_POOL = "avg_pool"
    ATTENTION_POOL = "attention_pool"
    C_ABSTRACTOR = "c_abstractor"


class Activation(str, enum.Enum):
    """The image encoder's MLP activation (OpenAI CLIP uses quick_gelu, SigLIP gelu_tanh)."""
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    QUICK_GELU = "quick_gelu"


class ImageNorm(str, enum.Enum):
    """How pixels are normalised for the image encoder: as its pre-training did."""

    CLIP = "clip"  # OpenAI CLIP's mean/std (also our CLIP stage)
    SIGLIP = "siglip"  # 0.5 / 0.5: pixels in [-1, 1]


class RopeScaling(str, enum.Enum):
    """RoPE frequency scaling of the pre-trained decoders mm1 imports (Llama 3.1's is `llama3`)."""

    NONE = "none"
    LINEAR = "linear"
    LLAMA3 = "llama3"


class AttentionImpl(str, enum.Enum):
    """How the decoder attends within documents of a packed sequence. AUTO: FLEX on CUDA (block-sparse:
    SDPA with a dense boolean mask falls back to a slow kernel there), SDPA elsewhere."""

    AUTO = "auto"
    SDPA = "sdpa"
    FLEX = "flex"


class Stage(str, enum.Enum):
    """CLIP pre-trains the image encoder alone and LM the decoder alone on text (MM1 starts from both
    pre-trained); PRETRAIN and SFT train the whole MLLM."""

    CLIP = "clip"
    LM = "lm"
    PRETRAIN = "pretrain"
    SFT = "sft"


class OptimizerKind(str, enum.Enum):
    """AdamW (MM1's pre-training) or Adafactor (less optimizer memory for large decoders)."""
    ADAMW = "adamw"
    ADAFACTOR = "adafactor"


class Precision(str, enum.Enum):
    """AUTO means fp32 on CPU (no fast bf16 there) and bf16 autocast on GPU."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class ParallelKind(str, enum.Enum):
    """How `torchrun` processes share the work; NONE for a single process."""

    NONE = "none"
    DDP = "ddp"
    FSDP = "fsdp"


class PromptFormat(str, enum.Enum):
    """How evaluation prompts a model: AUTO is CHAT for an SFT checkpoint, PRETRAIN otherwise."""

    AUTO = "auto"
    CHAT = "chat"  # the chat template: demonstrations as earlier turns
    PRETRAIN = "pretrain"  # MM1's pre-training format: `<image>Output:` / `Question: … Short answer:`


class OnNonFinite(str, enum.Enum):
    """What a step with a NaN or infinite loss or gradient does: stop the run, or skip the update."""
    STOP = "stop"
    SKIP = "skip"


# ----------------------------------------------------------------------------- model


@dataclass(kw_only=True)
class VisionConfig:
    """A pre-norm ViT image encoder (CLIP-style by default).

    `init` starts it from pre-trained weights: an HF CLIP or SigLIP folder, or the output of
    `mm1 train --stage clip` (its run folder or `vision.safetensors`). The tower's shape and pixel
    normalisation are then read from there (`mm1.store.pretrained`); `image_size` stays this config's
    (MM1 chooses the resolution; the position table is interpolated).
    """

    init: str = ""
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    activation: Activation = Activation.QUICK_GELU
    cls_token: bool = True
    pre_norm: bool = True  # CLIP's `pre_layrnorm` before the blocks; SigLIP has none
    post_norm: bool = False  # SigLIP's `post_layernorm` on every patch; CLIP applies it to CLS only
    norm_eps: float = 1e-5
    patch_bias: bool = False
    norm: ImageNorm = ImageNorm.CLIP


@dataclass(kw_only=True)
class ConnectorConfig:
    """Maps patch features to `num_tokens` image tokens at the decoder's width."""

    kind: ConnectorKind = ConnectorKind.C_ABSTRACTOR
    num_tokens: int = 144
    depth: int = 3  # RegNet blocks per C-Abstractor stage
    mlp_depth: int = 2  # layers in the C-Abstractor readout MLP
    hidden: int = 0  # C-Abstractor stage width; 0 means the vision width
    heads: int = 8  # attention pooling


@dataclass(kw_only=True)
class RopeScalingConfig:
    """RoPE scaling as HF configs give it (`rope_scaling`); `none` for plain RoPE."""

    kind: RopeScaling = RopeScaling.NONE
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_len: int = 8192  # llama3 only


@dataclass(kw_only=True)
class DecoderConfig:
    """A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

    `init` starts it from a pre-trained HF text model's folder (Llama, Qwen2, SmolLM families); its
    shape, tokenizer and chat template are then read from there (`mm1.store.pretrained`).
    """

    init: str = ""
    vocab_size: int = 32000
    width: int = 2048
    depth: int = 24
    heads: int = 16
    kv_heads: int = 16
    ffn_hidden: int = 5632
    head_dim: int = 0  # 0: width / heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v
    attention: AttentionImpl = AttentionImpl.AUTO
    max_seq_len: int = 4096  # the position table's size: what the model can address
    # Positions the decoder has been trained on: the longest sequence of any stage in its lineage (the
    # pre-trained LLM's context, then each stage's packing.seq_len). Written by the trainer, read by
    # evaluation to count prompts that run past it; 0: unknown (a run from before it was recorded).
    trained_context: int = 0
    init_std: float = 0.02

    @property
    def head_size(self) -> int:
        return self.head_dim or self.width // self.heads

    @property
    def context(self) -> int:
        """Positions a prompt may use without leaving what the model was trained on: the trained
        context where recorded, else (older runs) the position table."""
        return min(self.trained_context or self.max_seq_len, self.max_seq_len)


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture of experts in the decoder's FFNs; `num_experts=0` keeps the decoder dense."""

    num_experts: int = 0
    every: int = 2  # every k-th decoder layer gets experts
    top_k: int = 2
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    grouped_mm: bool = True  # on CUDA in bf16: one grouped GEMM for all experts (torch._grouped_mm)


@dataclass(kw_only=True)
class ModelConfig:
    """The whole MLLM: image encoder, connector, decoder, its MoE layers and the `<image>` token id."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    image_token_id: int = 2  # the tokenizer's `<image>` placeholder (mm1.data.tokenizer.IMAGE); -1: text only


# ----------------------------------------------------------------------------- data


class SourceKind(str, enum.Enum):
    """What a data source holds; each kind has its readers in `mm1.data.formats`."""

    CAPTION = "caption"  # image-text pairs: WebDataset .tar shards or caption .jsonl
    INTERLEAVED = "interleaved"  # documents: OBELICS-style .parquet or mmc4 .jsonl
    TEXT = "text"  # text-only documents: .jsonl, .parquet or .txt
    CONVERSATION = "conversation"  # LLaVA .json conversations (with or without images), for SFT


@dataclass(kw_only=True)
class SourceConfig:
    """One training source: its kind, its files and its share of the stage's packed sequences.

    `paths` are comma-separated globs; `{root}` stands for `data.root`. The weight is a share of
    *sequences* (MM1 draws whole packed sequences from each source), so it is a share of tokens too.
    """

    kind: SourceKind
    paths: str = ""
    weight: float = 1.0
    images: str = ""  # image folder for mmc4 / LLaVA files; empty: `images/` beside each file
    quality: bool = False  # leave out what `mm1 data filter` dropped from this source (all: data.prepare.quality)


def _pretrain_sources() -> dict[str, SourceConfig]:
    # MM1's pre-training mixture: 45% captioned images, 45% interleaved documents, 10% text.
    return {
        "caption": SourceConfig(kind=SourceKind.CAPTION, paths="{root}/captions/*.tar", weight=45.0),
        "interleaved": SourceConfig(kind=SourceKind.INTERLEAVED, paths="{root}/interleaved/*.parquet",
                                    weight=45.0),
        "text": SourceConfig(kind=SourceKind.TEXT, paths="{root}/text/*.jsonl", weight=10.0),
    }


def _sft_sources() -> dict[str, SourceConfig]:
    # MM1's SFT mix is mostly image conversations with text-only conversations mixed in (its share is
    # not given in the paper; see docs/paper.md).
    return {
        "sft": SourceConfig(kind=SourceKind.CONVERSATION, paths="{root}/sft/conversations.json", weight=90.0),
        "sft_text": SourceConfig(kind=SourceKind.CONVERSATION, paths="{root}/sft/text_conversations.json",
                                 weight=10.0),
    }


@dataclass(kw_only=True)
class PackingConfig:
    """How records are packed into training sequences (MM1: 4096 tokens, up to 16 images)."""
    seq_len: int = 4096
    max_images: int = 16


@dataclass(kw_only=True)
class PrepareConfig:
    """`mm1 data prepare`: sources tokenized and packed once, offline, in worker processes."""

    workers: int = 2
    check_images: bool = True  # decode every image once and leave out the ones that fail
    unit_records: int = 5000  # records per work unit (a file is split into units where its format allows)
    dedup: bool = False  # leave out what `mm1 data dedup` found (DATA_ROOT/dedup/<source>.json)
    # leave out what `mm1 data filter` dropped (DATA_ROOT/quality/<source>.json) from every source (one
    # source only: data.sources.NAME.quality)
    quality: bool = False


@dataclass(kw_only=True)
class SynthConfig:
    """Sizes of the embedded synthetic world (`mm1 data synth`)."""

    captions: int = 20000
    interleaved: int = 4000
    text: int = 4000
    sft: int = 8000
    sft_text: int = 1000
    eval_scenes: int = 300
    image_size: int = 256
    # printed words' font size as a share of the image side (0.085: ~11 px tall at 128 px, ~5 px at 64)
    word_size: float = 0.085
    dense_captions: float = 0.13  # VeCap-style share of captions: MM1's 300M VeCap beside 2B alt-text pairs
    real_text: str = ""  # optional text file (e.g. ../shared/data WikiText-2) mixed into the text-only documents
    # low-quality web pages (menus, spam, link lists, scrambled text; `synth/junk.py`) in junk/: no recipe's
    # mixture reads them unless told to; the quality-filtering finding adds them to the crawl
    junk: int = 0


@dataclass(kw_only=True)
class DataConfig:
    """Where the data lives and how it becomes packed sequences.

    `sources` feed pre-training (and the CLIP stage, through its caption sources), `sft_sources`
    feed SFT. `prepared` is where `mm1 data prepare` writes the packed sequences; empty means
    `<root>/prepared`.
    """

    root: str = "runs/data/world"
    tokenizer: str = ""  # a tokenizer.json; empty means `<root>/tokenizer.json`
    prepared: str = ""
    sources: dict[str, SourceConfig] = field(default_factory=_pretrain_sources)
    sft_sources: dict[str, SourceConfig] = field(default_factory=_sft_sources)
    packing: PackingConfig = field(default_factory=PackingConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    sub_image_grid: int = 0  # SFT only: an overview plus grid×grid crops per image (MM1 §4); 0 = off
    num_workers: int = 2
    seed: int = 0


# ----------------------------------------------------------------------------- train


@dataclass(kw_only=True)
class OptimizerConfig:
    """`lr=0` means the paper's rule η(N) = exp(−0.4214·ln N − 0.5535), N the LLM's parameters.

    `weight_decay` is decoupled and relative to the learning rate: each step shrinks weights by
    weight_decay × lr(t). MM1's λ = 0.1·η is `weight_decay=0.1` (see `mm1.train.optim`).
    """

    kind: OptimizerKind = OptimizerKind.ADAMW
    lr: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(kw_only=True)
class ScheduleConfig:
    """Linear warm-up, then cosine decay to `final_lr_fraction` of the peak."""

    warmup_steps: int = 2000
    final_lr_fraction: float = 0.1


@dataclass(kw_only=True)
class CheckpointConfig:
    """How often checkpoints are written and which are kept."""
    every: int = 1000
    keep_last: int = 2
    keep_log_spaced: bool = True  # also keep steps 1, 2, 4, 8, ... as Pythia does


@dataclass(kw_only=True)
class LoggingConfig:
    """Where and how often training metrics go (JSONL always; TensorBoard, W&B, a progress bar)."""
    every: int = 10
    tensorboard: bool = True
    wandb_project: str = ""  # empty: W&B off
    wandb_mode: str = "offline"
    # one device's FLOP/s for MFU (times the world size); 0: a known GPU's bf16 data-sheet peak, else a measured
    # matmul rate
    peak_flops: float = 0.0
    progress: bool = True


@dataclass(kw_only=True)
class ComponentConfig:
    """Per-component training: MM1 keeps everything unfrozen; a multiplier scales the peak LR."""

    vision_frozen: bool = False
    connector_frozen: bool = False
    decoder_frozen: bool = False
    vision_lr_mult: float = 1.0
    connector_lr_mult: float = 1.0
    decoder_lr_mult: float = 1.0


@dataclass(kw_only=True)
class TrainConfig:
    """One training stage (CLIP, pre-training or SFT): steps, batch, precision, parallelism, optimizer."""
    stage: Stage = Stage.PRETRAIN
    steps: int = 200000
    batch_size: int = 512  # sequences per optimizer step, across all ranks
    micro_batch_size: int = 0  # sequences per forward pass per rank; 0 means batch_size / world
    seed: int = 0
    precision: Precision = Precision.AUTO
    parallel: ParallelKind = ParallelKind.NONE
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each repeated block (decoder layers, ViT blocks): fused kernels
    on_non_finite: OnNonFinite = OnNonFinite.STOP
    # After the first step, how long a rank waits inside a collective for its peers before the job fails.
    # On gloo (CPU) it is also how long the others take to notice a rank that ran out of memory; on NCCL
    # they notice within a second (mm1.train.failstop). 600 s is NCCL's own default.
    collective_timeout_s: float = 600.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    components: ComponentConfig = field(default_factory=ComponentConfig)


# ----------------------------------------------------------------------------- eval


@dataclass(kw_only=True)
class EvalConfig:
    """Few-shot evaluation: tasks, shot counts, decoding length, items per task, perplexity windows."""
    tasks: str = "synth_caption,synth_vqa,synth_stripes"
    shots: str = "0,4,8"
    # New tokens per answer; 0: per task, from its references (long enough for 99% of them plus the stop;
    # mm1.eval.harness.generation_length), so that a cap never cuts captions short unnoticed.
    max_new_tokens: int = 0
    limit: int = 200  # queries per task (the first N of its test split); 0 means all
    batch_size: int = 16
    seed: int = 0
    ppl_tokens: int = 0  # perplexity tasks: score only the first N tokens (0 = all)
    ppl_window: int = 0  # tokens per window (0 = the model's context)
    ppl_stride: int = 0  # a window every N tokens (0 = the window: no overlap); see mm1.eval.perplexity
    prompt: PromptFormat = PromptFormat.AUTO
    # Each task's own prompt for a format, replaced for this run when set ("{question}" marks where a VQA
    # question goes; see mm1.eval.tasks.base.PromptSpec). Recorded in results.json with the scores.
    chat_prompt: str = ""
    pretrain_prompt: str = ""
    high_res_last: int = 1  # with sub-image decomposition: only the last N images at high resolution


@dataclass(kw_only=True)
class Config:
    """A whole run: the recipe's name and its model, data, training and evaluation settings."""
    recipe: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
