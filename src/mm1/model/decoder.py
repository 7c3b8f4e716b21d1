"""The MM1 language model: a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU).

It takes input *embeddings* rather than token ids, so the MLLM can place image tokens among the
text tokens before the first layer. Attention goes through `F.scaled_dot_product_attention` with
either plain causal masking or a boolean mask (document-causal for packed sequences, padding-aware
for batched decoding), or through flex attention when the mask is a `BlockMask` (document masks on
CUDA, where only the blocks a document can see are computed). Every `moe.every`-th layer may swap
its FFN for a mixture of experts.
Nothing here is distributed: `mm1.train.parallel` wraps these modules from the outside.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from mm1.config import DecoderConfig, MoEConfig, RopeScaling
from mm1.model.moe import MoEFFN, MoEStats


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, as Llama uses."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_frequencies(cfg: DecoderConfig, device: torch.device | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim / 2], with the scaling of the imported model (HF's
    `rope_scaling`: `linear` divides every frequency, Llama 3.1's `llama3` only the low ones)."""
    d = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
    rs = cfg.rope_scaling
    if rs.kind == RopeScaling.LINEAR:
        return inv_freq / rs.factor
    if rs.kind == RopeScaling.LLAMA3:
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = rs.original_max_len / rs.low_freq_factor, rs.original_max_len / rs.high_freq_factor
        smooth = (rs.original_max_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        mid = (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        return torch.where((wavelen <= low_wavelen) & (wavelen >= high_wavelen), mid, scaled)
    return inv_freq


def rope_tables(inv_freq: torch.Tensor, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, 1, T, head_dim] for the given (per-row) positions."""
    angles_BTh = positions_BT.float()[..., None] * inv_freq.float()
    angles_BTd = torch.cat([angles_BTh, angles_BTh], dim=-1)
    return angles_BTd.cos()[:, None], angles_BTd.sin()[:, None]


def apply_rope(x_BHTd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # The "rotate half" convention of HF Llama, so imported weights need no permutation.
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat([-x_BHTd[..., half:], x_BHTd[..., :half]], dim=-1)
    return (x_BHTd * cos + rotated * sin).to(x_BHTd.dtype)


@dataclass
class KVCache:
    """Pre-allocated keys and values, one [B, kv_heads, max_len, head_dim] tensor per layer.

    A forward pass writes its T keys/values at the slots `pos` ([T], shared by all rows, or [B, T],
    one set per row when rows are at different lengths) and attends
    over the first S slots, S being the mask's last dimension: decoding steps attend over the whole
    cache, so every step has the same shapes (compilable); the caller's mask hides slots not yet
    written and padding. One tensor per layer, not one stacked tensor, because torch.compile
    updates a graph input in place but copies the whole of a tensor when a slice of it is updated.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: torch.Tensor | None = None

    @classmethod
    def empty(cls, cfg: DecoderConfig, batch: int, max_len: int, *, device, dtype) -> KVCache:
        shape = (batch, cfg.kv_heads, max_len, cfg.head_size)

        def zeros() -> list[torch.Tensor]:
            return [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.depth)]
        return cls(zeros(), zeros())


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, a document mask and an optional KV cache."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        qkv_bias = cfg.qkv_bias
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.head_size
        self.q = nn.Linear(cfg.width, cfg.heads * self.head_dim, bias=qkv_bias)
        self.k = nn.Linear(cfg.width, cfg.kv_heads * self.head_dim, bias=qkv_bias)
        self.v = nn.Linear(cfg.width, cfg.kv_heads * self.head_dim, bias=qkv_bias)
        self.o = nn.Linear(cfg.heads * self.head_dim, cfg.width, bias=False)
        # q, k and v as one matmul, [q; k; v] by output rows: set (in place of q, k, v) by the serving
        # layout, `mm1.serve.cpu_layout`, where one wide matmul runs faster than three narrow ones.
        self.qkv: nn.Module | None = None

    def project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, T, out] from the input."""
        if self.qkv is None:
            return self.q(x_BTD), self.k(x_BTD), self.v(x_BTD)
        kv = self.kv_heads * self.head_dim
        return self.qkv(x_BTD).split([self.heads * self.head_dim, kv, kv], dim=-1)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.project(x_BTD)
        q = q.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            if mask is None or cache.pos is None:
                raise ValueError("decoding with a KV cache needs write positions and an attention mask")
            if cache.pos.dim() == 1:
                cache.k[layer].index_copy_(2, cache.pos, k)
                cache.v[layer].index_copy_(2, cache.pos, v)
            else:  # [B, T]: each row writes at its own slots (continuous batching)
                rows = torch.arange(B, device=k.device)[:, None].expand_as(cache.pos)
                cache.k[layer][rows, :, cache.pos] = k.transpose(1, 2)
                cache.v[layer][rows, :, cache.pos] = v.transpose(1, 2)
            # Attend over the first S slots, S from the mask: the whole cache when decoding (static
            # shapes), only the prompt's own slots in the prefill pass.
            S = mask.shape[-1]
            k, v = cache.k[layer][:, :, :S], cache.v[layer][:, :, :S]
        if isinstance(mask, BlockMask):
            y = _flex_attention(q, k, v, mask, self.kv_heads != self.heads)
        else:
            k, v, gqa = grouped_kv(k, v, self.heads, expand=mask is not None and q.device.type == "cuda")
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def grouped_kv(k: torch.Tensor, v: torch.Tensor, heads: int, *, expand: bool):
    """K and V for SDPA with fewer KV heads than query heads: as they are, with `enable_gqa`, or (`expand`)
    each repeated for its group of query heads. On CUDA only the flash kernel takes `enable_gqa`, and it
    takes no mask: SDPA with both (the document mask in training, the engine's prefill and decode masks)
    falls back to the math kernel, so there the heads are expanded and the memory-efficient kernel
    runs (transformers' sdpa_attention does the same)."""
    group = heads // k.shape[1]
    if group == 1:
        return k, v, False
    if expand:
        return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), False
    return k, v, True


_COMPILED_FLEX = None


def _flex_attention(q, k, v, block_mask: BlockMask, gqa: bool) -> torch.Tensor:
    """Flex attention, compiled on CUDA (its fast kernel); eager elsewhere, which computes the same
    values slowly (forward only: it has no CPU backward) and is what the CPU tests check against SDPA."""
    global _COMPILED_FLEX
    if q.device.type != "cuda":
        if torch.is_grad_enabled() and q.requires_grad:
            raise ValueError("model.decoder.attention=flex: flex attention has no backward on the CPU; use sdpa "
                             "(auto chooses flex on CUDA only)")
        with warnings.catch_warnings():  # eager flex warns that it is for debugging: here it is for tests
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX(q, k, v, block_mask=block_mask, enable_gqa=gqa)


class SwiGLU(nn.Module):
    """The decoder's dense feed-forward layer: down(silu(gate(x)) * up(x))."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        # gate and up as one matmul, [gate; up] by output rows: set (in place of both) by the serving
        # layout, `mm1.serve.cpu_layout`, as Attention.qkv is.
        self.gate_up: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm decoder block: attention, then a dense or mixture-of-experts FFN."""

    def __init__(self, cfg: DecoderConfig, *, moe: MoEConfig | None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.ffn: nn.Module = (
            MoEFFN(cfg.width, cfg.ffn_hidden, moe) if moe is not None else SwiGLU(cfg.width, cfg.ffn_hidden)
        )

    def forward(self, x, rope, mask, cache=None, layer=0) -> LayerOutput:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, layer)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoEFFN):
            out, stats = self.ffn(h)
            return LayerOutput(x + out, stats)
        return LayerOutput(x + self.ffn(h))


@dataclass
class LayerOutput:
    """A decoder layer's output and, for an MoE layer, its routing statistics. Returned, never appended to
    an argument: FSDP2 with a mixed-precision policy rebuilds a layer's arguments (a list argument
    becomes a copy, and what the layer appends to it is lost), while it walks returned dataclasses and
    hooks the tensors inside for backward."""
    hidden_BTD: torch.Tensor
    moe: MoEStats | None = None


@dataclass
class DecoderOutput:
    """The decoder's final hidden states and the MoE layers' routing statistics."""
    hidden_BTD: torch.Tensor
    moe_stats: list[MoEStats] = field(default_factory=list)


def is_moe_layer(index: int, moe: MoEConfig) -> bool:
    """MM1 replaces the FFN of every k-th layer (the k-th, 2k-th, ... counting from 1)."""
    return moe.num_experts > 0 and (index + 1) % moe.every == 0


class Decoder(nn.Module):
    """The Llama-style decoder LLM: embeddings, layers, final norm and the LM head."""

    def __init__(self, cfg: DecoderConfig, moe: MoEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        moe = moe or MoEConfig()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, moe=moe if is_moe_layer(i, moe) else None)
            for i in range(cfg.depth)
        )
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)  # derived: not in checkpoints

    def reset_parameters(self) -> None:
        """The derived RoPE frequencies (the weights are its children's): after `to_empty` they are garbage."""
        self.inv_freq.copy_(rope_frequencies(self.cfg, self.inv_freq.device))

    def forward(
        self,
        x_BTD: torch.Tensor,
        positions_BT: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> DecoderOutput:
        """`mask` is boolean [B, 1, T, S] (True = may attend; S = cache length with a cache) or None
        for plain causal attention."""
        rope = rope_tables(self.inv_freq, positions_BT)
        stats: list[MoEStats] = []
        for i, layer in enumerate(self.layers):
            out: LayerOutput = layer(x_BTD, rope, mask, cache, i)
            x_BTD = out.hidden_BTD
            if out.moe is not None:
                stats.append(out.moe)
        return DecoderOutput(self.norm(x_BTD), stats)
