"""Every knob of an mm1 run, as nested keyword-only dataclasses.

Why this file exists: a run is fully described by one `Config`. Recipes (`mm1.recipes`) build one,
the command line changes it with dotted overrides (`model.connector.kind=attention_pool`), and
`validate` rejects impossible settings with one clear line *before* any compute starts. Every run
writes the resolved config next to its outputs, so a result can always be traced to its settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad key, value or combination in a config; the message is one line naming the key."""


# ----------------------------------------------------------------------------- choices


class ConnectorKind(str, enum.Enum):
    """The three vision-language connectors compared in MM1 (Section 3.2)."""

    AVG_POOL = "avg_pool"
    ATTENTION_POOL = "attention_pool"
    C_ABSTRACTOR = "c_abstractor"


class Activation(str, enum.Enum):
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
    """CLIP pre-trains the image encoder alone; PRETRAIN and SFT train the whole MLLM."""

    CLIP = "clip"
    PRETRAIN = "pretrain"
    SFT = "sft"


class OptimizerKind(str, enum.Enum):
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
    STOP = "stop"
    SKIP = "skip"


# ----------------------------------------------------------------------------- model


@dataclass(kw_only=True)
class VisionConfig:
    """A pre-norm ViT image encoder (CLIP-style by default).

    `init` starts it from pre-trained weights: an HF CLIP or SigLIP folder, or the output of
    `mm1 train --stage clip` (its run folder or `vision.safetensors`). The tower's shape and pixel
    normalisation are then read from there (`mm1.model.pretrained`); `image_size` stays this config's
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
    shape, tokenizer and chat template are then read from there (`mm1.model.pretrained`).
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
    max_seq_len: int = 4096
    init_std: float = 0.02

    @property
    def head_size(self) -> int:
        return self.head_dim or self.width // self.heads


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
    seq_len: int = 4096
    max_images: int = 16


@dataclass(kw_only=True)
class PrepareConfig:
    """`mm1 data prepare`: sources tokenized and packed once, offline, in worker processes."""

    workers: int = 2
    check_images: bool = True  # decode every image once and leave out the ones that fail
    unit_records: int = 5000  # records per work unit (a file is split into units where its format allows)


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
    dense_captions: float = 0.13  # VeCap-style share of captions: MM1's 300M VeCap beside 2B alt-text pairs
    real_text: str = ""  # optional text file (e.g. ../shared/data WikiText-2) mixed into the text-only documents


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
    every: int = 1000
    keep_last: int = 2
    keep_log_spaced: bool = True  # also keep steps 1, 2, 4, 8, ... as Pythia does


@dataclass(kw_only=True)
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    wandb_project: str = ""  # empty: W&B off
    wandb_mode: str = "offline"
    peak_flops: float = 0.0  # FLOP/s for MFU; 0 means the measured default for the device
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
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    components: ComponentConfig = field(default_factory=ComponentConfig)


# ----------------------------------------------------------------------------- eval


@dataclass(kw_only=True)
class EvalConfig:
    tasks: str = "synth_caption,synth_vqa,synth_words"
    shots: str = "0,4,8"
    max_new_tokens: int = 24
    limit: int = 200  # queries per task; 0 means all
    batch_size: int = 16
    seed: int = 0
    ppl_tokens: int = 0  # perplexity tasks: score only the first N tokens (0 = all)
    ppl_window: int = 0  # tokens per window (0 = the model's context)
    ppl_stride: int = 0  # a window every N tokens (0 = the window: no overlap); see mm1.eval.perplexity
    prompt: PromptFormat = PromptFormat.AUTO
    high_res_last: int = 1  # with sub-image decomposition: only the last N images at high resolution


@dataclass(kw_only=True)
class Config:
    recipe: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- overrides


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_scalar(key: str, text: str, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_scalar(key, text, args[0])
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        choices = [m.value for m in typ]
        if text not in choices:
            raise ConfigError(f"{key}: '{text}' is not one of {', '.join(choices)}")
        return typ(text)
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got '{text}'")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got '{text}'") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got '{text}'") from None
    if typ is str:
        return text
    raise ConfigError(f"{key}: cannot be set from the command line")


# The familiar keys of the default sources, kept as names for their place in `data.sources`.
ALIASES = {
    "data.mixture.caption": "data.sources.caption.weight",
    "data.mixture.interleaved": "data.sources.interleaved.weight",
    "data.mixture.text": "data.sources.text.weight",
    "data.caption_shards": "data.sources.caption.paths",
    "data.interleaved_shards": "data.sources.interleaved.paths",
    "data.text_shards": "data.sources.text.paths",
    "data.sft_json": "data.sft_sources.sft.paths",
    "model.vision_init": "model.vision.init",
}


def _step_into_dict(node: dict, name: str, key: str, value_type: Any, is_last: bool, parts: list[str],
                    text: str) -> Any:
    """One step of a dotted key into a `dict[str, SourceConfig]` field; a new name starts a new entry."""
    if is_last:
        raise ConfigError(f"{key}: is a source; set one of its keys, e.g. {key}.weight=...")
    if name not in node:
        if parts[-1] != "kind" or len(parts) < 2:
            raise ConfigError(f"{key}: '{name}' is not a source here ({', '.join(node) or 'none'}); "
                              f"a new source starts with its kind, e.g. {'.'.join(parts[:-1])}.kind=caption")
        node[name] = value_type(kind=_parse_scalar(key, text.strip(), SourceKind))
    return node[name]


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one `dotted.key=value` assignment to `cfg` in place, or raise ConfigError."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key=value")
    key, text = assignment.split("=", 1)
    key = ALIASES.get(key.strip(), key.strip())
    node: Any = cfg
    parts = key.split(".")
    value_type: Any = None
    for depth, name in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            node = _step_into_dict(node, name, key, value_type, last, parts, text)
            continue
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config key '{key}': '{'.'.join(parts[:depth])}' is a value")
        names = [f.name for f in dataclasses.fields(node)]
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean '{'.'.join([*parts[:depth], near[0]])}'?)" if near else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        typ = _field_types(type(node))[name]
        if last:
            if dataclasses.is_dataclass(getattr(node, name)) or isinstance(getattr(node, name), dict):
                raise ConfigError(f"{key}: is a section; set one of its keys, e.g. {key}.<name>=...")
            setattr(node, name, _parse_scalar(key, text.strip(), typ))
        else:
            if typing.get_origin(typ) is dict:
                value_type = typing.get_args(typ)[1]
            node = getattr(node, name)


def apply_overrides(cfg: Config, assignments: list[str]) -> Config:
    for assignment in assignments:
        apply_override(cfg, assignment)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {reason}")


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _validate_model(m: ModelConfig) -> None:
    v, c, d, e = m.vision, m.connector, m.decoder, m.moe
    for key, val in [("model.vision.image_size", v.image_size), ("model.vision.patch_size", v.patch_size),
                     ("model.vision.width", v.width), ("model.vision.depth", v.depth),
                     ("model.vision.heads", v.heads), ("model.decoder.width", d.width),
                     ("model.decoder.depth", d.depth), ("model.decoder.heads", d.heads),
                     ("model.decoder.kv_heads", d.kv_heads), ("model.decoder.ffn_hidden", d.ffn_hidden),
                     ("model.decoder.vocab_size", d.vocab_size), ("model.connector.num_tokens", c.num_tokens)]:
        _require(val > 0, key, f"must be positive, got {val}")
    _require(v.image_size % v.patch_size == 0, "model.vision.image_size",
             f"{v.image_size} is not a multiple of the patch size {v.patch_size}")
    _require(v.width % v.heads == 0, "model.vision.heads",
             f"{v.heads} heads do not divide the width {v.width}")
    _require(d.head_dim >= 0, "model.decoder.head_dim", "must be >= 0 (0: width / heads)")
    _require(bool(d.head_dim) or d.width % d.heads == 0, "model.decoder.heads",
             f"{d.heads} heads do not divide the width {d.width}")
    _require(d.head_size % 2 == 0, "model.decoder.heads", "head dimension must be even for RoPE")
    _require(d.rope_scaling.factor >= 1, "model.decoder.rope_scaling.factor", "must be >= 1")
    _require(d.heads % d.kv_heads == 0, "model.decoder.kv_heads",
             f"{d.kv_heads} key/value heads do not divide the {d.heads} query heads")
    _require(_is_square(c.num_tokens), "model.connector.num_tokens",
             f"{c.num_tokens} is not a square number (the connector pools to a √N×√N grid)")
    grid = v.image_size // v.patch_size
    side = math.isqrt(c.num_tokens)
    if c.kind == ConnectorKind.ATTENTION_POOL:
        _require(d.width % c.heads == 0, "model.connector.heads",
                 f"{c.heads} heads do not divide the decoder width {d.width}")
    _require(side <= grid, "model.connector.num_tokens",
             f"{c.num_tokens} tokens exceed the {grid}×{grid} patch grid")
    _require(-1 <= m.image_token_id < d.vocab_size, "model.image_token_id",
             f"{m.image_token_id} is outside the vocabulary of {d.vocab_size} (-1 for a text-only model)")
    _require(c.depth >= 0, "model.connector.depth", "must be >= 0")
    _require(c.mlp_depth >= 1, "model.connector.mlp_depth", "must be >= 1")
    _require(e.num_experts >= 0, "model.moe.num_experts", "must be >= 0")
    if e.num_experts:
        _require(e.every >= 1, "model.moe.every", "must be >= 1")
        _require(1 <= e.top_k <= e.num_experts, "model.moe.top_k",
                 f"must be between 1 and num_experts={e.num_experts}")
        _require(e.load_balance_coef >= 0 and e.z_loss_coef >= 0, "model.moe",
                 "loss coefficients must be >= 0")


def _validate_sources(sources: dict[str, SourceConfig], key: str) -> None:
    for name, src in sources.items():
        _require(name.isidentifier(), f"{key}.{name}", "a source name must be a plain identifier")
        _require(src.weight >= 0 and math.isfinite(src.weight), f"{key}.{name}.weight",
                 f"weight must be >= 0, got {src.weight}")
        if src.weight > 0:
            _require(bool(src.paths.strip()), f"{key}.{name}.paths", "a source with a weight needs its files")
    _require(sum(s.weight for s in sources.values()) > 0, key, "all source weights are zero")


def _validate_data(d: DataConfig) -> None:
    _validate_sources(d.sources, "data.sources")
    _validate_sources(d.sft_sources, "data.sft_sources")
    _require(16 <= d.packing.seq_len <= 65535, "data.packing.seq_len",
             f"must lie in 16..65535, got {d.packing.seq_len}")
    _require(d.packing.max_images >= 1, "data.packing.max_images", "must be >= 1")
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(d.prepare.workers >= 1, "data.prepare.workers", "must be >= 1")
    _require(d.prepare.unit_records >= 1, "data.prepare.unit_records", "must be >= 1")
    _require(0 <= d.sub_image_grid <= 4, "data.sub_image_grid", "must lie in 0..4")
    _require(0 <= d.synth.dense_captions <= 1, "data.synth.dense_captions", "must lie in [0, 1]")


def _validate_train(t: TrainConfig) -> None:
    _require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
    _require(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    _require(t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0")
    if t.micro_batch_size:
        _require(t.batch_size % t.micro_batch_size == 0, "train.micro_batch_size",
                 f"{t.micro_batch_size} does not divide batch_size {t.batch_size}")
    o, s = t.optimizer, t.schedule
    _require(o.lr >= 0, "train.optimizer.lr", "must be >= 0 (0 means the paper's LR rule)")
    _require(0 <= o.weight_decay < 1, "train.optimizer.weight_decay",
             f"must lie in [0, 1) (a fraction of the learning rate; MM1: 0.1), got {o.weight_decay}")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "train.optimizer", "betas must lie in [0, 1)")
    _require(o.grad_clip >= 0, "train.optimizer.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(s.warmup_steps >= 0, "train.schedule.warmup_steps", "must be >= 0")
    _require(0 <= s.final_lr_fraction <= 1, "train.schedule.final_lr_fraction", "must lie in [0, 1]")
    _require(t.checkpoint.every > 0, "train.checkpoint.every", f"must be positive, got {t.checkpoint.every}")
    _require(t.checkpoint.keep_last >= 1, "train.checkpoint.keep_last", "must be >= 1")
    _require(t.logging.every > 0, "train.logging.every", "must be positive")
    for name in ("vision", "connector", "decoder"):
        mult = getattr(t.components, f"{name}_lr_mult")
        _require(mult >= 0, f"train.components.{name}_lr_mult", "must be >= 0")


def _validate_eval(e: EvalConfig) -> None:
    try:
        shots = [int(s) for s in e.shots.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"eval.shots: expected comma-separated integers, got '{e.shots}'") from None
    _require(bool(shots) and min(shots) >= 0, "eval.shots", "needs at least one shot count >= 0")
    _require(e.max_new_tokens > 0, "eval.max_new_tokens", "must be positive")
    _require(e.high_res_last >= 0, "eval.high_res_last", "must be >= 0")
    _require(e.ppl_window >= 0 and e.ppl_stride >= 0, "eval.ppl_window", "window and stride must be >= 0")
    _require(not (e.ppl_window and e.ppl_stride > e.ppl_window), "eval.ppl_stride",
             f"must not exceed eval.ppl_window ({e.ppl_window})")


def validate(cfg: Config) -> Config:
    """Raise ConfigError (one line, naming the key) for any impossible setting."""
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_train(cfg.train)
    _validate_eval(cfg.eval)
    return cfg


# ----------------------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Any) -> dict[str, Any]:
    def convert(v: Any) -> Any:
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(cfg))


def _value_from_dict(typ: Any, value: Any, full: str) -> Any:
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{full}: expected a section, got {value!r}")
        return from_dict(typ, value, prefix=f"{full}.")
    if typing.get_origin(typ) is dict:
        item = typing.get_args(typ)[1]
        if not isinstance(value, dict):
            raise ConfigError(f"{full}: expected a mapping of names to sections, got {value!r}")
        return {k: _value_from_dict(item, v, f"{full}.{k}") for k, v in value.items()}
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        return _parse_scalar(full, str(value), typ)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Rebuild a config from `to_dict` output; unknown keys raise, missing keys keep defaults."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'")
        kwargs[key] = _value_from_dict(hints[key], value, full)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field (a source's kind) is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def save(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


MOVED = {("model", "vision_init"): ("model", "vision", "init")}  # keys of configs saved by earlier versions


def from_saved(data: dict[str, Any]) -> Config:
    """A `Config` from a saved config.json, keys that have moved since it was written moved too."""
    for old, new in MOVED.items():
        section = data.get(old[0])
        if isinstance(section, dict) and old[1] in section:
            value = section.pop(old[1])
            section.setdefault(new[1], {}).setdefault(new[2], value)
    return from_dict(Config, data)


def load(path: str | Path) -> Config:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    return validate(from_saved(data))
