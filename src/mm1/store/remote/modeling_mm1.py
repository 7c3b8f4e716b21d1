"""MM1 (McKinnon et al., 2024) in transformers: image encoder → connector → image tokens in a Llama-style decoder.

Written by `mm1 export --hf`; it needs torch and transformers, not mm1. Read top to bottom:

    pixel_values [N, 3, H, W]  (N = every view of every image: 1 per image, 1 + grid² for SFT models)
      → MM1VisionEncoder      a pre-norm ViT (CLIP-trained), patch features [N, P, Dv]
      → connector             average pooling, attention pooling or the C-Abstractor: [N, n, D]
      → scattered into the embeddings of the `<image>` tokens (n per view, in order)
      → MM1TextModel          the decoder LLM (`language_model`): RMSNorm, RoPE, grouped-query attention,
                              SwiGLU or a top-k mixture of experts
      → logits [B, T, V]

Weight names are mm1's own under `model.` (`model.vision.blocks.0.attn.q.weight`), but for the decoder, under
`model.language_model.` as transformers' image-text models name it, the LM head (`lm_head.weight`) and the
experts, packed as Mixtral's (`...ffn.experts.gate_up_proj`); mm1 maps them back bit for bit. Attention goes
through transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`, the `**kwargs` passed on), with a KV
`Cache`, so that `generate()` works and engines that run transformers models (vLLM's and SGLang's transformers
backends) can plug in their own attention and cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_mm1 import MM1Config, MM1TextConfig

# ----------------------------------------------------------------------------- image encoder


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "quick_gelu":  # OpenAI CLIP's sigmoid approximation
        return lambda x: x * torch.sigmoid(1.702 * x)
    approximate = "tanh" if name == "gelu_tanh" else "none"
    return lambda x: F.gelu(x, approximate=approximate)


def resize_pos_embed(pos_PD: torch.Tensor, new_grid: int, *, num_prefix: int) -> torch.Tensor:
    """Bicubically resize a [prefix + g·g, D] position table to new_grid × new_grid (another resolution)."""
    prefix, grid_PD = pos_PD[:num_prefix], pos_PD[num_prefix:]
    old = math.isqrt(grid_PD.shape[0])
    if old == new_grid:
        return pos_PD
    img = grid_PD.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, img.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos_PD.dtype)])


class MM1VisionAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        B, N, D = x_BND.shape
        q, k, v = (p(x_BND).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class MM1VisionBlock(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        width, hidden = vc["width"], int(vc["width"] * vc["mlp_ratio"])
        self.norm1 = nn.LayerNorm(width, eps=vc["norm_eps"])
        self.attn = MM1VisionAttention(width, vc["heads"])
        self.norm2 = nn.LayerNorm(width, eps=vc["norm_eps"])
        self.fc1 = nn.Linear(width, hidden)
        self.act = _activation(vc["activation"])
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x_BND = x_BND + self.attn(self.norm1(x_BND))
        return x_BND + self.fc2(self.act(self.fc1(self.norm2(x_BND))))


class MM1VisionEncoder(nn.Module):
    """Images [N, 3, H, W] (normalised) → patch features [N, (H/p)·(W/p), Dv], the CLS token dropped."""

    def __init__(self, vc: dict) -> None:
        super().__init__()
        width, grid = vc["width"], vc["image_size"] // vc["patch_size"]
        self.num_prefix = 1 if vc["cls_token"] else 0
        self.patch_embed = nn.Conv2d(3, width, vc["patch_size"], vc["patch_size"], bias=vc["patch_bias"])
        self.cls = nn.Parameter(torch.zeros(width)) if vc["cls_token"] else None
        self.pos_embed = nn.Parameter(torch.zeros(self.num_prefix + grid**2, width))
        self.norm_pre = nn.LayerNorm(width, eps=vc["norm_eps"]) if vc["pre_norm"] else nn.Identity()
        self.blocks = nn.ModuleList(MM1VisionBlock(vc) for _ in range(vc["depth"]))
        self.norm_post = nn.LayerNorm(width, eps=vc["norm_eps"]) if vc["post_norm"] else nn.Identity()

    def forward(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images_NCHW)  # [N, Dv, g, g]
        x_NPD = x.flatten(2).transpose(1, 2)
        pos = resize_pos_embed(self.pos_embed, x.shape[-1], num_prefix=self.num_prefix)
        if self.cls is not None:
            x_NPD = torch.cat([self.cls.expand(x_NPD.shape[0], 1, -1), x_NPD], dim=1)
        x_NPD = self.norm_pre(x_NPD + pos)
        for block in self.blocks:
            x_NPD = block(x_NPD)
        return self.norm_post(x_NPD[:, self.num_prefix:])


# ----------------------------------------------------------------------------- connectors (MM1 §3.2)


def _to_grid(x_NPC: torch.Tensor) -> torch.Tensor:
    N, P, C = x_NPC.shape
    side = math.isqrt(P)
    return x_NPC.transpose(1, 2).reshape(N, C, side, side)


class MM1AvgPoolConnector(nn.Module):
    """Average pooling of the patch grid to √n×√n, then a linear projection."""

    def __init__(self, vision_width: int, width: int, cc: dict) -> None:
        super().__init__()
        self.side = math.isqrt(cc["num_tokens"])
        self.proj = nn.Linear(vision_width, width)

    def forward(self, x_NPC: torch.Tensor) -> torch.Tensor:
        return self.proj(F.adaptive_avg_pool2d(_to_grid(x_NPC), self.side).flatten(2).transpose(1, 2))


class MM1AttentionPoolConnector(nn.Module):
    """n learned queries cross-attend to the patch features, then a residual feed-forward layer."""

    def __init__(self, vision_width: int, width: int, cc: dict) -> None:
        super().__init__()
        self.heads = cc["heads"]
        self.queries = nn.Parameter(torch.zeros(cc["num_tokens"], width))
        self.norm_kv = nn.LayerNorm(vision_width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(vision_width, width)
        self.v = nn.Linear(vision_width, width)
        self.o = nn.Linear(width, width)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x_NPC: torch.Tensor) -> torch.Tensor:
        N = x_NPC.shape[0]
        kv = self.norm_kv(x_NPC)
        q = self.q(self.queries).expand(N, -1, -1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(N, t.shape[1], self.heads, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(q), split(self.k(kv)), split(self.v(kv)))
        y_NnD = self.o(y.transpose(1, 2).reshape(N, -1, q.shape[-1])) + self.queries
        return y_NnD + self.ffn(self.norm_ffn(y_NnD))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, *, groups: int = 1, act: bool = True) -> None:
        layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), LayerNorm2d(cout)]
        super().__init__(*layers, *([nn.SiLU()] if act else []))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class RegNetBottleneck(nn.Module):
    """RegNet's bottleneck as Honeybee's C-Abstractor configures it: depthwise 3×3, SE 0.25, SiLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 1)
        self.conv2 = ConvNormAct(cout, cout, 3, groups=cout)
        self.se = SqueezeExcite(cout, round(cin * 0.25))
        self.conv3 = ConvNormAct(cout, cout, 1, act=False)
        self.shortcut = ConvNormAct(cin, cout, 1, act=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.shortcut(x))


class MM1CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: RegNet stage → adaptive pool to √n×√n → RegNet stage → MLP."""

    def __init__(self, vision_width: int, width: int, cc: dict, num_patches: int) -> None:
        super().__init__()
        hidden = cc["hidden"] or vision_width
        self.pos_embed = nn.Parameter(torch.zeros(num_patches, vision_width))
        self.stage1 = nn.Sequential(*(RegNetBottleneck(vision_width if i == 0 else hidden, hidden)
                                      for i in range(cc["depth"])))
        self.side = math.isqrt(cc["num_tokens"])
        self.stage2 = nn.Sequential(*(RegNetBottleneck(hidden, hidden) for _ in range(cc["depth"])))
        layers: list[nn.Module] = [nn.Linear(hidden, width)]
        for _ in range(cc["mlp_depth"] - 1):
            layers += [nn.SiLU(), nn.Linear(width, width)]
        self.readout = nn.Sequential(*layers)

    def forward(self, x_NPC: torch.Tensor) -> torch.Tensor:
        pos = self.pos_embed
        if pos.shape[0] != x_NPC.shape[1]:
            pos = resize_pos_embed(pos, math.isqrt(x_NPC.shape[1]), num_prefix=0)
        x = self.stage1(_to_grid(x_NPC + pos))
        x = self.stage2(F.adaptive_avg_pool2d(x, self.side))
        return self.readout(x.flatten(2).transpose(1, 2))


def build_connector(config: MM1Config) -> nn.Module:
    vc, cc, width = config.vision_config, config.connector_config, config.text_config.hidden_size
    kind, vision_width = cc["kind"], vc["width"]
    if kind == "avg_pool":
        return MM1AvgPoolConnector(vision_width, width, cc)
    if kind == "attention_pool":
        return MM1AttentionPoolConnector(vision_width, width, cc)
    if kind == "c_abstractor":
        return MM1CAbstractor(vision_width, width, cc, (vc["image_size"] // vc["patch_size"]) ** 2)
    raise ValueError(f"unknown connector kind {kind!r}")


# ----------------------------------------------------------------------------- decoder


class MM1RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inverse_frequencies(config: MM1TextConfig, device: torch.device) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim / 2], with `linear` or Llama 3.1's `llama3` scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
    rs = config.rope_frequency_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return inv_freq / rs["factor"]
    if kind == "llama3":
        factor, low, high, original = (rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                                       rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        return torch.where((wavelen <= original / low) & (wavelen >= original / high), mid, scaled)
    return inv_freq


def rope_tables(config: MM1TextConfig, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim], computed from the config each call (no buffer to initialise)."""
    angles_BTh = positions_BT.float()[..., None] * rope_inverse_frequencies(config, positions_BT.device)
    angles_BTd = torch.cat([angles_BTh, angles_BTh], dim=-1)
    return angles_BTd.cos()[:, None], angles_BTd.sin()[:, None]


def apply_rope(x_BHTd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x_BHTd.shape[-1] // 2  # Llama's "rotate half" convention
    rotated = torch.cat([-x_BHTd[..., half:], x_BHTd[..., :half]], dim=-1)
    return (x_BHTd * cos + rotated * sin).to(x_BHTd.dtype)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out (`attn_implementation="eager"`); `attention_mask` is boolean, True = may attend."""
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = scores.float().softmax(-1).to(query.dtype)
    out = F.dropout(weights, p=dropout, training=module.training) @ value
    return out.transpose(1, 2).contiguous(), weights


class MM1Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, through transformers' attention interface."""

    def __init__(self, config: MM1TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                    config.head_dim)
        self.num_key_value_groups = self.heads // self.kv_heads  # read by transformers' sdpa and eager paths
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        width = config.hidden_size
        self.q = nn.Linear(width, self.heads * self.head_dim, bias=bias)
        self.k = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(self.heads * self.head_dim, width, bias=False)

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: Cache | None, **kwargs) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q(x_BTD).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x_BTD).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attend = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        y, _ = attend(self, q, k, v, mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o(y.reshape(B, T, -1))


class MM1SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MM1Experts(nn.Module):
    """An MoE layer's SwiGLU experts, packed as Mixtral's are: `gate_up_proj` [E, 2H, D], `down_proj` [E, D, H].

    The (token, expert) assignments are sorted by expert, each expert runs on its contiguous rows, and the
    results are added back weighted by the router."""

    def __init__(self, num_experts: int, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * hidden, width))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, width, hidden))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        x_ND, K = hidden_states, top_k_index.shape[-1]
        expert_A = top_k_index.reshape(-1)
        order_A = expert_A.argsort(stable=True)
        token_A = order_A // K
        counts = torch.bincount(expert_A, minlength=self.gate_up_proj.shape[0]).tolist()
        outs = []
        for x_CD, w_gu, w_d in zip(x_ND.index_select(0, token_A).split(counts), self.gate_up_proj.unbind(0),
                                   self.down_proj.unbind(0), strict=True):
            gate, up = F.linear(x_CD, w_gu).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w_d))
        y_AD = torch.cat(outs) * top_k_weights.reshape(-1)[order_A, None].to(x_ND.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_A, y_AD)


class MM1MoE(nn.Module):
    """Top-k routing over the experts, the weights renormalised over the top k (MM1-MoE: top-2)."""

    def __init__(self, width: int, hidden: int, moe: dict) -> None:
        super().__init__()
        self.top_k = moe["top_k"]
        self.router = nn.Linear(width, moe["num_experts"], bias=False)
        self.experts = MM1Experts(moe["num_experts"], width, hidden)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        probs_NE = self.router(x_ND).float().softmax(dim=-1)
        weight_NK, expert_NK = probs_NE.topk(self.top_k, dim=-1)
        weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
        return self.experts(x_ND, expert_NK, weight_NK).view(B, T, D)


class MM1DecoderLayer(nn.Module):
    def __init__(self, config: MM1TextConfig, layer_idx: int) -> None:
        super().__init__()
        moe = config.moe_config
        self.attn_norm = MM1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MM1Attention(config, layer_idx)
        self.ffn_norm = MM1RMSNorm(config.hidden_size, config.rms_norm_eps)
        # MM1-MoE replaces the FFN of every k-th layer (the k-th, 2k-th, ... counting from 1)
        experts = moe.get("num_experts", 0) > 0 and (layer_idx + 1) % moe["every"] == 0
        self.ffn = (MM1MoE(config.hidden_size, config.intermediate_size, moe) if experts
                    else MM1SwiGLU(config.hidden_size, config.intermediate_size))

    def forward(self, x_BTD, rope, mask, cache, **kwargs) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rope, mask, cache, **kwargs)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class MM1PreTrainedModel(PreTrainedModel):
    config_class = MM1Config
    base_model_prefix = "model"  # MM1Model inside MM1ForConditionalGeneration: AutoModel loads its weights
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["MM1DecoderLayer", "MM1VisionBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True  # attention only through ALL_ATTENTION_FUNCTIONS, kwargs passed on

    def _init_weights(self, module: nn.Module) -> None:
        # Every weight comes from the export's safetensors; new models start as mm1's do (std 0.02).
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def _output(cls, **fields):
    """transformers 5.20+ names the cache field `cache`, earlier versions `past_key_values`."""
    cache = fields.pop("cache")
    return cls(**fields, **{"cache" if "cache" in cls.__dataclass_fields__ else "past_key_values": cache})


class MM1TextModel(MM1PreTrainedModel):
    """The decoder LLM (its embeddings, layers and final norm; the LM head is the generation model's):
    token ids or embeddings [B, T, D] → last hidden states [B, T, D]. MM1Model's `language_model`."""

    config_class = MM1TextConfig

    def __init__(self, config: MM1TextConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MM1DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MM1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        kwargs.pop("cache_position", None)
        kwargs.pop("return_dict", None)
        cache = cache if cache is not None else past_key_values
        x_BTD = inputs_embeds if inputs_embeds is not None else self.embed(input_ids)
        B, T, _ = x_BTD.shape
        if use_cache if use_cache is not None else self.config.use_cache:
            cache = cache if cache is not None else DynamicCache()
        else:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:  # each row counts its own tokens (left padding takes no position)
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x_BTD.device).expand(B, T)
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else \
            causal_mask(attention_mask, B, T, past, x_BTD.device)
        rope = rope_tables(self.config, position_ids)
        for layer in self.layers:
            x_BTD = layer(x_BTD, rope, mask, cache, **kwargs)
        return _output(BaseModelOutputWithPast, last_hidden_state=self.norm(x_BTD), cache=cache)


def causal_mask(attention_mask: torch.Tensor | None, B: int, T: int, past: int, device) -> torch.Tensor:
    """Boolean [B, 1, T, past + T], True = may attend: causal, padding hidden; each position also sees
    itself, so that a padding row is never all False (its softmax would be NaN and reach the cache)."""
    S = past + T
    query_pos = torch.arange(past, S, device=device)[:, None]
    key_pos = torch.arange(S, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None].expand(B, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -S:].bool()
    return mask | (key_pos == query_pos)[None, None]


# ----------------------------------------------------------------------------- the model


class MM1Model(MM1PreTrainedModel):
    """MM1 without its LM head: `<image>` tokens of `input_ids` are replaced, in order, by the image tokens
    of `pixel_values`, and the decoder (`language_model`) returns its last hidden states. (vLLM's
    transformers backend runs this class, `auto_map.AutoModel`, with a head and a KV cache of its own.)"""

    def __init__(self, config: MM1Config) -> None:
        super().__init__(config)
        self.vision = MM1VisionEncoder(config.vision_config)
        self.connector = build_connector(config)
        self.language_model = MM1TextModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.embed = value

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """[N, 3, H, W] views → patch features (`last_hidden_state` [N, P, Dv]) and their image tokens
        (`pooler_output` [N, num_image_tokens, D]), as transformers' image-text models return them."""
        patches_NPC = self.vision(pixel_values.to(self.vision.patch_embed.weight.dtype))
        return BaseModelOutputWithPooling(last_hidden_state=patches_NPC, pooler_output=self.connector(patches_NPC))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        x_BTD = self.language_model.embed(input_ids)
        slots_BT = input_ids == self.config.image_token_id
        if pixel_values is None or not bool(slots_BT.any()):  # decoding steps: the images are in the cache
            return x_BTD
        img_ND = self.get_image_features(pixel_values).pooler_output.reshape(-1, x_BTD.shape[-1])
        if img_ND.shape[0] != int(slots_BT.sum()):
            raise ValueError(f"input_ids hold {int(slots_BT.sum())} <image> tokens but pixel_values give "
                             f"{img_ND.shape[0]} image tokens ({pixel_values.shape[0]} views)")
        return x_BTD.masked_scatter(slots_BT[..., None], img_ND.to(x_BTD.dtype))

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, **kwargs)


class MM1ForConditionalGeneration(MM1PreTrainedModel, GenerationMixin):
    """MM1 with its LM head: what `AutoModelForImageTextToText` loads and `generate()` runs."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.language_model.embed.weight"}

    def __init__(self, config: MM1Config) -> None:
        super().__init__(config)
        self.model = MM1Model(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.language_model.embed = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        h_BTD = out.last_hidden_state
        logits = self.lm_head(h_BTD[:, -logits_to_keep:] if logits_to_keep else h_BTD).float()
        loss = None
        if labels is not None:  # labels as transformers' causal LMs take them: shifted here, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        cache = out.cache if "cache" in out.__dataclass_fields__ else out.past_key_values
        return _output(CausalLMOutputWithPast, loss=loss, logits=logits, cache=cache)


__all__ = ["MM1ForConditionalGeneration", "MM1Model", "MM1PreTrainedModel", "MM1TextModel"]
