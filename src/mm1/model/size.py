"""How much memory a model will need, from its config alone, checked before anything is allocated.

A config handed over by someone else (`decoder.depth=100000`, an HF config.json with a huge layer
count) would otherwise allocate until the machine runs out. The estimate here is arithmetic on the
config (no module is built, not even on the meta device, which itself takes minutes for 100,000
layers): parameters, the optimizer's state, and activations at the configured micro-batch. It is
a lower bound that errs small, so it refuses only what cannot fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mm1.config import Config, ConfigError, ModelConfig


@dataclass(frozen=True)
class Footprint:
    """Parameters by part and the bytes a run needs."""
    decoder: int
    vision: int
    connector: int
    bytes: int

    @property
    def parameters(self) -> int:
        return self.decoder + self.vision + self.connector


def decoder_parameters(m: ModelConfig) -> int:
    d, moe = m.decoder, m.moe
    attention = d.width * d.head_size * 2 * (d.heads + d.kv_heads)
    ffn = 3 * d.width * d.ffn_hidden
    moe_layers = len([i for i in range(d.depth) if moe.num_experts and (i + 1) % moe.every == 0])
    layers = d.depth * (attention + 2 * d.width) + (d.depth - moe_layers) * ffn
    layers += moe_layers * (moe.num_experts * ffn + moe.num_experts * d.width)
    return layers + d.vocab_size * d.width * (1 if d.tie_embeddings else 2)


def vision_parameters(m: ModelConfig) -> int:
    v = m.vision
    grid = (v.image_size // v.patch_size) ** 2
    mlp = int(v.width * v.mlp_ratio)
    return 3 * v.patch_size**2 * v.width + (grid + 1) * v.width + v.depth * (4 * v.width**2 + 2 * v.width * mlp)


def footprint(cfg: Config, *, training: bool, world_size: int = 1) -> Footprint:
    """Bytes per rank: fp32 weights (and for training their gradients and AdamW's two moments, sharded
    over the ranks under FSDP), plus activations of one micro-batch (about 34·s·h bytes per token and
    layer in half precision without recomputation, after Korthikanti et al.; twice that in fp32)."""
    m = cfg.model
    dec, vis = decoder_parameters(m), vision_parameters(m)
    conn = 4 * m.vision.width * m.decoder.width
    params = dec + vis + conn
    shards = world_size if training and cfg.train.parallel.value == "fsdp" else 1
    state = params * (16 if training else 4) // shards
    if not training:
        return Footprint(dec, vis, conn, state)
    micro = cfg.train.micro_batch_size or max(1, cfg.train.batch_size // world_size)
    tokens = micro * cfg.data.packing.seq_len
    per_layer = 2 if cfg.train.activation_checkpointing else 68
    activations = tokens * m.decoder.width * m.decoder.depth * per_layer + tokens * m.decoder.vocab_size * 8
    return Footprint(dec, vis, conn, state + activations)


def available_bytes(device: str = "cpu") -> int | None:
    """Memory the run may use: the GPU's total, or the host's available memory (None where unknown)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[1]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None


def check_fits(cfg: Config, *, training: bool, world_size: int = 1, device: str = "cpu") -> Footprint:
    """Refuse, in one line naming the sizes, a model that cannot fit before any of it is allocated."""
    fp = footprint(cfg, training=training, world_size=world_size)
    have = available_bytes(device)
    if have is None or fp.bytes <= have:
        return fp
    m = cfg.model
    if fp.decoder >= fp.vision:
        d = m.decoder
        keys = (f"model.decoder.depth={d.depth}, model.decoder.width={d.width}, "
                f"model.decoder.ffn_hidden={d.ffn_hidden}, model.decoder.vocab_size={d.vocab_size}")
    else:
        v = m.vision
        keys = f"model.vision.depth={v.depth}, model.vision.width={v.width}, model.vision.image_size={v.image_size}"
    what = "to train (weights, gradients, AdamW state, activations)" if training else "for its weights"
    raise ConfigError(f"{keys}: a model of {fp.parameters / 1e9:.2f}B parameters needs about "
                      f"{fp.bytes / 2**30:.1f} GiB {what}, more than the {have / 2**30:.1f} GiB this {device} has")
