"""Weight name maps and strict tensor loading: HF Llama/Qwen2/SmolLM decoders and CLIP/SigLIP vision
towers into our modules, and our names back out (the folders themselves are `mm1.store`'s).

Loading is strict, as nanoGPT's `from_pretrained` is: every tensor of the source must map to one of
ours (or be on a short, named list of tensors we deliberately do not use), every one of ours must
be filled, and shapes must agree — anything else raises `WeightsError` naming the keys.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mm1.config import (
    Activation,
    DecoderConfig,
    ImageNorm,
    RopeScaling,
    RopeScalingConfig,
    VisionConfig,
)


class WeightsError(ValueError):
    """Missing, unexpected or mis-shaped tensors; the message names them."""


# ----------------------------------------------------------------------------- name maps

# (HF name, ours) for a Llama/Qwen2 decoder, read both ways (import and export). `{i}` is a layer
# index and `{a|b}` one of several names, carried over to the other side.
DECODER_NAMES = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.self_attn.{q|k|v}_proj.{weight|bias}", "layers.{i}.attn.{q|k|v}.{weight|bias}"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o.weight"),
    ("model.layers.{i}.mlp.{gate|up|down}_proj.weight", "layers.{i}.ffn.{gate|up|down}.weight"),
]


def name_rules(pairs: list[tuple[str, str]], *, reverse: bool = False) -> list[tuple[str, str]]:
    """(regex, replacement) rules for `map_names` from (source, target) name templates."""
    rules = []
    for src, dst in ((b, a) if reverse else (a, b) for a, b in pairs):
        fields = re.findall(r"\{([^}]*)\}", src)
        pattern = "".join(
            re.escape(part) if k % 2 == 0 else (r"(\d+)" if part == "i" else f"({part})")
            for k, part in enumerate(re.split(r"\{([^}]*)\}", src)))
        replacement = re.sub(r"\{([^}]*)\}", lambda m, fields=fields: f"\\{fields.index(m.group(1)) + 1}", dst)
        rules.append((pattern, replacement))
    return rules


DECODER_MAP = name_rules(DECODER_NAMES)
DECODER_UNUSED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]

VISION_MAP = [
    (r"(?:vision_model\.)?embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.\1"),
    (r"(?:vision_model\.)?embeddings\.class_embedding", "cls"),
    (r"(?:vision_model\.)?embeddings\.position_embedding\.weight", "pos_embed"),
    (r"(?:vision_model\.)?pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
    (r"(?:vision_model\.)?encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"(?:vision_model\.)?encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.o.\2"),
    (r"(?:vision_model\.)?encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"(?:vision_model\.)?encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
]
SIGLIP_POST = (r"(?:vision_model\.)?post_layernorm\.(weight|bias)", r"norm_post.\1")
# CLIP's post_layernorm only normalises the pooled CLS output; SigLIP's attention-pooling head
# makes a single image embedding. MM1 uses patch features, so neither is loaded.
VISION_UNUSED = [r"(?:vision_model\.)?post_layernorm\.(weight|bias)", r"(?:vision_model\.)?head\..*",
                 r"(?:vision_model\.)?embeddings\.position_ids", r"text_model\..*", r"text_projection\..*",
                 r"visual_projection\..*", r"logit_scale", r"logit_bias"]


def map_names(source: dict[str, torch.Tensor], rules: list[tuple[str, str]], unused: list[str]
              ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, tensor in source.items():
        for pattern, target in rules:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, target, name)] = tensor
                break
        else:
            if not any(re.fullmatch(p, name) for p in unused):
                unexpected.append(name)
    if unexpected:
        raise WeightsError(f"unexpected tensors with no mapping: {', '.join(sorted(unexpected)[:10])}"
                           + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    return out


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Copy `state` into `module`; raise naming missing, unexpected or mis-shaped tensors."""
    own = module.state_dict()
    tied = {k for k in own if k.endswith("lm_head.weight")} if getattr(
        getattr(module, "cfg", None), "tie_embeddings", False) else set()
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: ours {tuple(own[k].shape)} vs {tuple(v.shape)}" for k, v in state.items()
              if k in own and own[k].shape != v.shape]
    problems = ([f"missing {', '.join(missing[:8])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:8])}"] if unexpected else []) + \
               ([f"shape mismatch {'; '.join(shapes[:8])}"] if shapes else [])
    if problems:
        raise WeightsError(f"{what}: " + " | ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def fit_position_tables(state: dict[str, torch.Tensor], model: nn.Module, *, prefix: str = "") -> dict:
    """Resize (bicubic) the ViT's and the C-Abstractor's position tables in `state` to `model`'s grid.

    MM1 fine-tunes at a higher resolution than it pre-trains (672 vs 378 px): weights trained at one
    resolution load into a config of another, the tables interpolated once here.
    """
    from mm1.model.vision import resize_pos_embed

    own = model.state_dict()
    out = dict(state)
    for name, prefix_tokens in ((f"{prefix}vision.pos_embed", None), (f"{prefix}connector.pos_embed", 0),
                                (f"{prefix}pos_embed", None)):
        if name not in state or name not in own or state[name].shape == own[name].shape:
            continue
        if prefix_tokens is None:  # the ViT: a CLS row first when the tower has one
            prefix_tokens = own[name].shape[0] - math.isqrt(own[name].shape[0]) ** 2
        grid = math.isqrt(own[name].shape[0] - prefix_tokens)
        out[name] = resize_pos_embed(state[name], grid, num_prefix=prefix_tokens)
    return out


# ----------------------------------------------------------------------------- configs


def _rope_scaling_from_hf(hf: dict) -> RopeScalingConfig:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers 5 writes rope_parameters
    kind = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else "default"
    if kind == "default":
        return RopeScalingConfig()
    if kind == "linear":
        return RopeScalingConfig(kind=RopeScaling.LINEAR, factor=float(rs["factor"]))
    if kind == "llama3":
        return RopeScalingConfig(kind=RopeScaling.LLAMA3, factor=float(rs["factor"]),
                                 low_freq_factor=float(rs["low_freq_factor"]),
                                 high_freq_factor=float(rs["high_freq_factor"]),
                                 original_max_len=int(rs["original_max_position_embeddings"]))
    raise WeightsError(f"rope_scaling type '{kind}' is not supported (none, linear, llama3)")


HF_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def _check_hf_sizes(hf: dict) -> None:
    """An HF config.json is checked as ours is, by its own key names, before any shape is built from it."""
    for key in (*HF_SIZES, "num_key_value_heads", "max_position_embeddings", "head_dim"):
        value = hf.get(key)
        if key not in HF_SIZES and value is None:
            continue
        if type(value) is not int or value <= 0:
            raise WeightsError(f"config.json: {key}={value!r} must be a positive integer")
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if heads % kv:
        raise WeightsError(f"config.json: num_key_value_heads={kv} does not divide num_attention_heads={heads}")
    if not hf.get("head_dim") and hf["hidden_size"] % heads:
        raise WeightsError(f"config.json: num_attention_heads={heads} does not divide hidden_size={hf['hidden_size']}")


def decoder_config_from_hf(hf: dict) -> DecoderConfig:
    """Our decoder config for an HF Llama / Qwen2 / Mistral (SmolLM is Llama) config.json; anything
    our decoder would compute differently is refused here, by name, rather than loaded wrongly."""
    if hf.get("model_type") not in ("llama", "qwen2", "mistral"):
        raise WeightsError(f"unsupported decoder model_type '{hf.get('model_type')}' (llama, qwen2, mistral)")
    unsupported = [f"{key}={hf[key]!r}" for key, ok in (
        ("hidden_act", lambda v: v == "silu"), ("mlp_bias", lambda v: not v),
        ("sliding_window", lambda v: not v or not hf.get("use_sliding_window", hf.get("model_type") == "mistral")),
        ("attention_bias", lambda v: not v or hf.get("model_type") == "qwen2"),
    ) if key in hf and not ok(hf[key])]
    if unsupported:
        raise WeightsError(f"the decoder uses what mm1's does not implement: {', '.join(unsupported)}")
    _check_hf_sizes(hf)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or 0
    return DecoderConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
        head_dim=0 if head_dim * heads == hf["hidden_size"] else head_dim,
        rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling_from_hf(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=hf.get("model_type") == "qwen2",
        max_seq_len=hf.get("max_position_embeddings", 4096),
        # an mm1 export says what it trained on; for another LLM, its own pre-training context
        trained_context=hf.get("mm1_trained_context", hf.get("max_position_embeddings", 4096)),
    )


def vision_config_from_hf(hf: dict) -> VisionConfig:
    if "vision_config" in hf:
        hf = hf["vision_config"] | {"model_type": hf.get("model_type", "")}
    siglip = "siglip" in hf.get("model_type", "")
    act = {"quick_gelu": Activation.QUICK_GELU, "gelu_pytorch_tanh": Activation.GELU_TANH}.get(
        hf.get("hidden_act", "quick_gelu"), Activation.GELU)
    return VisionConfig(
        image_size=hf["image_size"], patch_size=hf["patch_size"], width=hf["hidden_size"],
        depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        mlp_ratio=hf["intermediate_size"] / hf["hidden_size"], activation=act, cls_token=not siglip,
        pre_norm=not siglip, post_norm=siglip, norm_eps=hf.get("layer_norm_eps", 1e-5), patch_bias=siglip,
        norm=ImageNorm.SIGLIP if siglip else ImageNorm.CLIP,
    )


# ----------------------------------------------------------------------------- import


def grow_rows(weight_VD: torch.Tensor, rows: int, *, what: str) -> torch.Tensor:
    """An embedding (or output head) with rows added up to `rows`, each the mean of the existing ones:
    tokens the pre-trained model never saw (`<image>`, chat tokens) start as its average token."""
    have = weight_VD.shape[0]
    if have > rows:
        raise WeightsError(f"{what}: {have} rows do not fit a vocabulary of {rows}")
    if have == rows:
        return weight_VD
    return torch.cat([weight_VD, weight_VD.mean(0, keepdim=True).expand(rows - have, -1)])


def import_hf_decoder(decoder: nn.Module, folder: Path) -> None:
    """An HF decoder's weights into ours; a larger vocabulary (tokens we added) grows by mean rows."""
    state = map_names(read_safetensors(folder), DECODER_MAP, DECODER_UNUSED)
    if decoder.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    for name in ("embed.weight", "lm_head.weight"):
        if name in state:
            state[name] = grow_rows(state[name], decoder.cfg.vocab_size, what=f"{folder} {name}")
    load_strict(decoder, state, what=f"decoder from {folder}")


def import_hf_vision(vision: nn.Module, folder: Path, *, resize_to: int | None = None) -> None:
    """CLIP or SigLIP tower → our ViT; position embeddings resized bicubically if resolutions differ."""
    from mm1.model.vision import resize_pos_embed

    rules = VISION_MAP + ([SIGLIP_POST] if vision.cfg.post_norm else [])
    unused = [u for u in VISION_UNUSED if not (vision.cfg.post_norm and "post_layernorm" in u)]
    state = map_names(read_safetensors(folder), rules, unused)
    if "patch_embed.bias" in state and not vision.cfg.patch_bias:
        raise WeightsError("source has a patch-embedding bias but the config says patch_bias=false")
    grid = vision.grid if resize_to is None else resize_to // vision.cfg.patch_size
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], grid, num_prefix=vision.num_prefix)
    load_strict(vision, state, what=f"vision tower from {folder}")
