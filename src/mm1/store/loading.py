"""Loading a trained model for inference from a run directory, a checkpoint, an export, or an HF folder.

Accepted paths: a run directory (`config.json`, `tokenizer.json`, `checkpoints/latest`), one
checkpoint inside it (`.../checkpoints/step_00000600`), a folder written by `mm1 export` (with or
without `--hf`: `mm1_config.json` beside the weights), or a local Hugging Face decoder folder
(`config.json` with a `model_type`, safetensors weights), imported by `mm1.store.hf`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mm1.config import Config, load
from mm1.data.tokenizer import Tokenizer
from mm1.model.mllm import MLLM
from mm1.model.size import check_fits
from mm1.store import runs as ckpt
from mm1.store.pretrained import hf_config


def describe_checkpoint(path: str | Path) -> dict:
    """What a result was computed from: the folder, its kind, and for a run the checkpoint and its step."""
    path = Path(path).resolve()
    if (path / "mm1_config.json").exists():
        return {"path": str(path), "kind": "mm1 export" + (" (transformers)" if hf_config(path) else "")}
    if hf_config(path) is not None:
        return {"path": str(path), "kind": "transformers folder"}
    run, ck = ckpt.resolve(path)
    return {"path": str(run), "kind": "mm1 run", "checkpoint": str(ck), "step": ckpt.load_meta(ck)["step"],
            "config": str(run / "config.json")}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MLLM, Tokenizer, Config]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / "mm1_config.json").exists():  # a folder written by `mm1 export` (`--hf` too)
        from mm1.store.hf import import_exported
        from mm1.store.transformers import read_tokenizer

        model, cfg = import_exported(path)
        return model.to(device).eval(), read_tokenizer(path), cfg
    if hf_config(path) is not None:
        from mm1.store.hf import load_hf_model

        return load_hf_model(path, device=device)
    run, ck = ckpt.resolve(path)
    cfg = load(run / "config.json")
    tok = Tokenizer.from_file(run / "tokenizer.json")
    check_fits(cfg, training=False, device=torch.device(device).type)  # before any allocation
    model = MLLM(cfg.model)
    ckpt.load_model_weights(ck, model)
    return model.to(device).eval(), tok, cfg
