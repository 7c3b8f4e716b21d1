"""Impossible settings refused with one line naming the key, before any compute starts."""

from __future__ import annotations

import math

from mm1.config.schema import (
    Config,
    ConfigError,
    ConnectorKind,
    DataConfig,
    EvalConfig,
    ModelConfig,
    SourceConfig,
    Stage,
    TrainConfig,
)


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
    _require(d.trained_context >= 0, "model.decoder.trained_context", "must be >= 0 (0: not recorded)")
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
    _require(0 < d.synth.word_size <= 0.5, "data.synth.word_size", "must lie in (0, 0.5] (a share of the image side)")


def _validate_train(t: TrainConfig) -> None:
    _require(t.steps > 0, "train.steps", f"must be positive, got {t.steps}")
    _require(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    _require(t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0")
    _require(t.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0 seconds")
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
    _require(0 <= e.max_new_tokens <= 4096, "eval.max_new_tokens",
             f"must lie in 0..4096 (0: from each task's references), got {e.max_new_tokens}")
    _require(e.high_res_last >= 0, "eval.high_res_last", "must be >= 0")
    _require(e.ppl_window >= 0 and e.ppl_stride >= 0, "eval.ppl_window", "window and stride must be >= 0")
    _require(not (e.ppl_window and e.ppl_stride > e.ppl_window), "eval.ppl_stride",
             f"must not exceed eval.ppl_window ({e.ppl_window})")


def validate(cfg: Config) -> Config:
    """Raise ConfigError (one line, naming the key) for any impossible setting."""
    _require(not (cfg.train.stage == Stage.LM and cfg.model.moe.num_experts), "model.moe.num_experts",
             "the LM stage trains a dense decoder (a later stage upcycles it into experts): set it to 0 there")
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_train(cfg.train)
    _validate_eval(cfg.eval)
    return cfg
