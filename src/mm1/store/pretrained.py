"""Starting from pre-trained models, as MM1 does: the decoder from a text LLM, the encoder from a CLIP.

A run names folders, nothing else: `model.decoder.init=DIR` (an HF Llama / Qwen2 / SmolLM folder)
and `model.vision.init=DIR` (an HF CLIP or SigLIP folder, or the output of `mm1 train --stage clip`).
Two steps use them:

- `resolve_pretrained(cfg)` reads what the folders decide into the config, so that it is saved with
  the run: the decoder's shape (head_dim, RoPE scaling, tied embeddings), its tokenizer (the
  folder's `tokenizer.json`, to which `mm1.data.tokenizer` adds `<image>` and the chat tokens, and
  its Instruct chat template), the vocabulary grown by those added tokens, and the vision tower's
  shape and pixel normalisation (CLIP or SigLIP). The resolution stays the config's: MM1 chooses it,
  and the position table is interpolated.
- `load_pretrained(model, cfg)` copies the weights in, strictly (`mm1.model.weights`); the new
  embedding rows, and those of an untied head, start as the mean of the existing ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from mm1.config import Config, ConfigError, DecoderConfig, VisionConfig, load, validate
from mm1.data.tokenizer import Tokenizer
from mm1.model.weights import (
    decoder_config_from_hf,
    fit_position_tables,
    import_hf_decoder,
    import_hf_vision,
    load_strict,
    vision_config_from_hf,
)

CLIP_WEIGHTS = "vision.safetensors"  # what `mm1 train --stage clip` writes into its run folder


def hf_config(path: Path) -> dict | None:
    """The `config.json` of an HF model folder (one with a `model_type`), else None."""
    file = path / "config.json"
    if not path.is_dir() or not file.exists():
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) and "model_type" in data else None


def _existing(path: str, key: str, hint: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: {p} does not exist ({hint})")
    return p


LM_DECODER = "decoder"  # what `mm1 train --stage lm` writes into its run folder (mm1.train.lm)


def _decoder_folder(dec: DecoderConfig) -> Path:
    """The HF folder `model.decoder.init` names: the folder itself, or an LM stage run's `decoder/`."""
    path = _existing(dec.init, "model.decoder.init", "an HF text-model folder with config.json, *.safetensors "
                     "and tokenizer.json (`mm1 weights from-gguf` writes one for SmolLM2), or the output of "
                     "`mm1 train --stage lm`")
    return path / LM_DECODER if hf_config(path) is None and hf_config(path / LM_DECODER) is not None else path


def _decoder_shape(dec: DecoderConfig, tok: Tokenizer) -> DecoderConfig:
    folder = _decoder_folder(dec)
    hf = hf_config(folder)
    if hf is None:
        raise ConfigError(f"model.decoder.init: {folder} is not an HF model folder (no config.json with a model_type)")
    shape = decoder_config_from_hf(hf)
    # The vocabulary grows by the control tokens mm1 adds (new rows start as the mean row).
    return dataclasses.replace(shape, init=dec.init, init_std=dec.init_std,
                               vocab_size=max(shape.vocab_size, len(tok)))


def _vision_run(path: Path) -> Path:
    """The CLIP-stage run folder of `path` (the folder, or its `vision.safetensors`)."""
    return path.parent if path.is_file() else path


def _vision_shape(v: VisionConfig) -> VisionConfig:
    path = _existing(v.init, "model.vision.init", "an HF CLIP/SigLIP folder, or the output of "
                     "`mm1 train --stage clip`")
    hf = hf_config(path)
    if hf is not None:
        shape = vision_config_from_hf(hf)
    elif (_vision_run(path) / "config.json").exists():
        shape = load(_vision_run(path) / "config.json").model.vision
    else:  # a bare weights file: the configured shape must match it (loading is strict)
        shape = v
    return dataclasses.replace(shape, init=v.init, image_size=v.image_size)


def resolve_pretrained(cfg: Config) -> Config:
    """Fill in (in place) what `model.decoder.init` and `model.vision.init` decide; idempotent."""
    if cfg.model.decoder.init:
        if not cfg.data.tokenizer:
            cfg.data.tokenizer = str(_decoder_folder(cfg.model.decoder) / "tokenizer.json")
        tok = Tokenizer.from_file(cfg.data.tokenizer)
        cfg.model.decoder = _decoder_shape(cfg.model.decoder, tok)
        cfg.model.image_token_id = tok.image_id
    if cfg.model.vision.init:
        cfg.model.vision = _vision_shape(cfg.model.vision)
    return validate(cfg)


def load_vision_weights(vision: nn.Module, init: str) -> None:
    """The image encoder from an HF tower or our CLIP stage; the position table is interpolated to
    this encoder's resolution. Strict: every tensor must match."""
    path = Path(init)
    if hf_config(path) is not None:
        import_hf_vision(vision, path)
        return
    file = _vision_run(path) / CLIP_WEIGHTS if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"model.vision.init: no {CLIP_WEIGHTS} in {path} (train it with `mm1 train --stage clip`)")
    load_strict(vision, fit_position_tables(load_file(str(file)), vision), what=f"vision encoder from {file}")


def load_pretrained(model: nn.Module, cfg: Config) -> None:
    """Copy the pre-trained weights named by the config into an MLLM (after `resolve_pretrained`)."""
    if cfg.model.decoder.init and cfg.model.moe.num_experts:
        _upcycle_hf_decoder(model, cfg)
    elif cfg.model.decoder.init:
        import_hf_decoder(model.decoder, _decoder_folder(cfg.model.decoder))
    if cfg.model.vision.init:
        load_vision_weights(model.vision, cfg.model.vision.init)


def _upcycle_hf_decoder(model: nn.Module, cfg: Config) -> None:
    """An MoE decoder from a dense pre-trained one (sparse upcycling): every expert starts as its layer's
    FFN, so that the MoE model starts where the dense LLM is, as a dense one would."""
    from mm1.model.decoder import Decoder
    from mm1.model.mllm import upcycle_from_dense

    dense = Decoder(cfg.model.decoder)
    import_hf_decoder(dense, _decoder_folder(cfg.model.decoder))
    state = {f"decoder.{k}": v for k, v in dense.state_dict().items()}
    state |= {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    upcycle_from_dense(model, state)
