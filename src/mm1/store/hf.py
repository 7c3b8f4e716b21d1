"""Folders in Hugging Face's and mm1's export formats: reading them as MLLMs, writing them.

- `load_hf_model`: a local HF decoder folder (Llama, Qwen2, SmolLM2) as an MLLM for text-only evaluation.
- `export` / `import_exported`: the whole model in mm1's format (`mm1 export`; `--hf` writes the same
  weights with transformers' modeling files: `mm1.store.transformers`).
- `export_hf_decoder`: the decoder alone as a `LlamaForCausalLM` / `Qwen2ForCausalLM` folder.

The name maps and strict tensor loading these use are `mm1.model.weights`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mm1.config import (
    Config,
    DecoderConfig,
    ModelConfig,
    RopeScaling,
    RopeScalingConfig,
    VisionConfig,
    from_saved,
    to_dict,
)
from mm1.data.tokenizer import Tokenizer
from mm1.model.size import check_fits
from mm1.model.weights import (
    DECODER_NAMES,
    WeightsError,
    decoder_config_from_hf,
    import_hf_decoder,
    load_strict,
    map_names,
    name_rules,
)


def load_hf_model(folder: Path, device: str | torch.device = "cpu"):
    """A local HF decoder folder as an MLLM (random small vision side) for text-only evaluation."""
    from mm1.model.mllm import MLLM

    hf = json.loads((folder / "config.json").read_text())
    dec = decoder_config_from_hf(hf)
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    cfg = Config(recipe=f"hf:{folder.name}")
    cfg.model = ModelConfig(vision=VisionConfig(image_size=56, patch_size=14, width=64, depth=1, heads=2),
                            decoder=dec)
    cfg.model.connector.num_tokens = 4
    # An HF decoder's vocabulary lacks our `<image>`: no token of a prompt may stand for an image.
    cfg.model.image_token_id = tok.image_id if tok.image_id < dec.vocab_size else -1
    check_fits(cfg, training=False, device=torch.device(device).type)
    model = MLLM(cfg.model)
    import_hf_decoder(model.decoder, folder)
    return model.to(device).eval(), tok, cfg


def export(model: nn.Module, cfg: Config, folder: Path) -> Path:
    """Our model as `model.safetensors` + `mm1_config.json` (tied weights stored once)."""
    from mm1.files import atomic_path, write_json

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.model.decoder.tie_embeddings:
        state.pop("decoder.lm_head.weight", None)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(folder / "mm1_config.json", to_dict(cfg))
    return folder


def import_exported(folder: Path):
    """A folder written by `mm1 export` (with or without `--hf`) as our model and config, bit for bit."""
    from mm1.files import read_json
    from mm1.model.mllm import MLLM
    from mm1.store.runs import load_weights

    cfg = from_saved(read_json(folder / "mm1_config.json"))
    check_fits(cfg, training=False)
    model = MLLM(cfg.model)
    index = folder / "model.safetensors.index.json"  # `mm1 export --hf` shards a large model
    files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {k: v for f in files for k, v in load_weights(folder / f).items()}
    if (folder / "config.json").exists() and read_json(folder / "config.json").get("model_type") == "mm1":
        from mm1.store.transformers import FROM_TRANSFORMERS

        state = map_names(state, FROM_TRANSFORMERS, [])  # `mm1 export --hf` names
    load_strict(model, state | ({"decoder.lm_head.weight": state["decoder.embed.weight"]}
                                if cfg.model.decoder.tie_embeddings else {}), what=str(folder))
    return model, cfg


EXPORT_DECODER_MAP = name_rules(DECODER_NAMES, reverse=True)


def hf_decoder_config(dec: DecoderConfig, *, bos_id: int | None, eos_id: int | list[int] | None) -> dict:
    """Our decoder's shape as a transformers config.json: Qwen2 when q/k/v have biases, else Llama."""
    qwen = dec.qkv_bias
    return {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": dec.vocab_size, "hidden_size": dec.width, "num_hidden_layers": dec.depth,
        "num_attention_heads": dec.heads, "num_key_value_heads": dec.kv_heads, "intermediate_size": dec.ffn_hidden,
        "head_dim": dec.head_size, "hidden_act": "silu", "rms_norm_eps": dec.norm_eps,
        "rope_theta": dec.rope_theta, "rope_scaling": rope_scaling_to_hf(dec.rope_scaling),
        "max_position_embeddings": dec.max_seq_len,
        # the longest sequence trained on, for evaluation's context check (transformers ignores the key)
        "mm1_trained_context": dec.trained_context or dec.max_seq_len,
        "tie_word_embeddings": dec.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
    }


def rope_scaling_to_hf(rs: RopeScalingConfig) -> dict | None:
    if rs.kind == RopeScaling.NONE:
        return None
    if rs.kind == RopeScaling.LINEAR:
        return {"rope_type": "linear", "factor": rs.factor}
    return {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor, "original_max_position_embeddings": rs.original_max_len}


def export_hf_decoder(decoder: nn.Module, folder: Path, *, tokenizer: Tokenizer | None = None) -> Path:
    """The decoder as a standard HF causal-LM folder (config.json, model.safetensors, tokenizer.json)
    that `transformers.AutoModelForCausalLM` loads with our logits. An MoE decoder has no such
    standard form here and is refused."""
    cfg: DecoderConfig = decoder.cfg
    state = {k: v for k, v in decoder.state_dict().items()}
    if any(".experts." in k or ".router." in k for k in state):
        raise WeightsError("an MoE decoder cannot be exported as a Llama/Qwen2 folder; `mm1 export` still "
                           "writes the whole model in mm1's format")
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    hf_state = {k: v.detach().contiguous().cpu() for k, v in map_names(state, EXPORT_DECODER_MAP, []).items()}
    eos_id: int | list[int] | None = None
    if tokenizer is not None:  # the end of text, and what ends a turn in the model's chat template
        from mm1.data.template import stop_token_ids

        eos_id = stop_token_ids(tokenizer)
    from mm1.files import atomic_folder, write_json

    with atomic_folder(folder) as tmp:  # a folder that exists is whole
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_decoder_config(cfg, bos_id=None, eos_id=eos_id))
        if tokenizer is not None:  # with our added tokens, and the chat template the model was tuned with
            tokenizer.save(tmp / "tokenizer.json")
    return folder
