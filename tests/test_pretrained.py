"""Starting from pre-trained folders: shapes, tokenizer growth, chat templates, training and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm1.config import ImageNorm, RopeScaling, apply_overrides
from mm1.data.tokenizer import Tokenizer
from mm1.model.mllm import MLLM
from mm1.model.weights import WeightsError, decoder_config_from_hf
from mm1.recipes import get_recipe
from mm1.store.pretrained import load_pretrained, resolve_pretrained

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ["a red circle and a blue square on a gray background", "The capital of France is Paris.",
        "Once upon a time there was a small green star.", "What color is the circle? It is red."] * 50


def _tokenizer(folder: Path, *, template: bool) -> int:
    """A byte-level BPE with an Instruct model's specials (not mm1's), saved as an HF folder would hold it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"} | ({"chat_template": CHATML} if template else {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return hf.get_vocab_size()


def hf_decoder_folder(folder: Path, *, tied: bool = True, template: bool = True, **extra):
    vocab = _tokenizer(folder, template=template)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-6, tie_word_embeddings=tied, **extra)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms off their init, so a dropped one would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
    hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("variant", ["tied", "untied_head_dim_llama3"])
def test_decoder_init_reads_the_folder_grows_the_vocabulary_and_keeps_the_logits(tmp_path, variant):
    extra = {} if variant == "tied" else {
        "head_dim": 32, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    hf = hf_decoder_folder(tmp_path / "llm", tied=variant == "tied", **extra)
    cfg = resolve_pretrained(apply_overrides(get_recipe("tiny"), [f"model.decoder.init={tmp_path / 'llm'}"]))
    dec, tok = cfg.model.decoder, Tokenizer.from_file(cfg.data.tokenizer)
    V = hf.config.vocab_size
    assert (dec.width, dec.depth, dec.heads, dec.kv_heads, dec.ffn_hidden) == (64, 2, 4, 2, 96)
    assert dec.tie_embeddings == (variant == "tied") and cfg.data.tokenizer == str(tmp_path / "llm" / "tokenizer.json")
    assert dec.vocab_size == len(tok) == V + 6  # <|pad|> <image> <|user|> <|assistant|> <|end|> <|system|>
    assert cfg.model.image_token_id == tok.image_id >= V
    if variant != "tied":
        assert dec.head_size == 32 and dec.rope_scaling.kind == RopeScaling.LLAMA3
    model = MLLM(cfg.model).eval()
    load_pretrained(model, cfg)
    ids = torch.tensor([tok.encode("The capital of France is Paris. a red circle")])
    with torch.no_grad():
        ours = model(tokens_BT=ids).logits_BTV
        theirs = hf(ids).logits
    assert ours.shape[-1] == V + 6 and (ours[..., :V] - theirs).abs().max() <= 1e-4
    emb = model.decoder.embed.weight.detach()
    torch.testing.assert_close(emb[V:], emb[:V].mean(0, keepdim=True).expand(6, -1))
    if variant != "tied":
        head = model.decoder.lm_head.weight.detach()
        torch.testing.assert_close(head[V:], hf.lm_head.weight[:V].detach().mean(0, keepdim=True).expand(6, -1))


def test_an_moe_decoder_starts_upcycled_from_a_dense_folder_and_computes_what_it_does(tmp_path):
    """MoE arms start from a dense LLM as dense ones do: every expert a copy of its layer's FFN, so that top-2
    routing (weights summing to one) gives the dense model's logits before any training."""
    hf = hf_decoder_folder(tmp_path / "llm")
    moe = ["model.moe.num_experts=4", "model.moe.every=2", "model.moe.top_k=2"]
    cfg = resolve_pretrained(apply_overrides(get_recipe("tiny"), [f"model.decoder.init={tmp_path / 'llm'}", *moe]))
    model = MLLM(cfg.model).eval()
    load_pretrained(model, cfg)
    tok = Tokenizer.from_file(cfg.data.tokenizer)
    ids = torch.tensor([tok.encode("The capital of France is Paris. a red circle")])
    with torch.no_grad():
        ours = model(tokens_BT=ids).logits_BTV[..., :hf.config.vocab_size]
        theirs = hf(ids).logits
    assert sum(type(layer.ffn).__name__ == "MoEFFN" for layer in model.decoder.layers) == 1
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize(("change", "message"), [
    ({"mlp_bias": True}, r"mlp_bias=True"), ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, r"rope_scaling type 'yarn' is not supported"),
    ({"model_type": "gpt2"}, r"unsupported decoder model_type 'gpt2'"),
])
def test_what_the_decoder_cannot_compute_is_refused_by_name(change, message):
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "silu"}
    with pytest.raises(WeightsError, match=message):
        decoder_config_from_hf(base | change)


def test_a_missing_folder_is_one_clear_line(tmp_path):
    from mm1.config import ConfigError

    cfg = apply_overrides(get_recipe("tiny"), [f"model.decoder.init={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"model.decoder.init: .*nope does not exist .*mm1 weights from-gguf"):
        resolve_pretrained(cfg)


def test_vision_init_from_siglip_and_from_our_clip_stage(tmp_path):
    from safetensors.torch import save_file

    from mm1.config import save
    from mm1.model.vision import VisionEncoder

    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=56,
        patch_size=14)).eval()
    hf.save_pretrained(tmp_path / "siglip")
    cfg = resolve_pretrained(apply_overrides(get_recipe("tiny"), [f"model.vision.init={tmp_path / 'siglip'}",
                                                                  "model.vision.image_size=56"]))
    v = cfg.model.vision
    assert (v.width, v.depth, v.patch_size, v.norm, v.cls_token) == (48, 2, 14, ImageNorm.SIGLIP, False)
    model = MLLM(cfg.model).eval()
    load_pretrained(model, cfg)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert (model.vision(x) - hf(pixel_values=x).last_hidden_state).abs().max() <= 1e-4
    # SigLIP's pixels: 0.5 / 0.5, so a white pixel is 1.0
    from PIL import Image

    from mm1.data.images import to_tensor

    assert to_tensor(Image.new("RGB", (8, 8), (255, 255, 255)), 8, v.norm).max() == pytest.approx(1.0)

    # our CLIP stage's output: its shape comes from its run's config, the resolution stays ours
    clip_cfg = apply_overrides(get_recipe("tiny_clip"), ["model.vision.width=64", "model.vision.heads=2"])
    save(clip_cfg, tmp_path / "clip" / "config.json")
    tower = VisionEncoder(clip_cfg.model.vision)
    save_file(tower.state_dict(), str(tmp_path / "clip" / "vision.safetensors"))
    cfg = resolve_pretrained(apply_overrides(get_recipe("tiny"), [f"model.vision.init={tmp_path / 'clip'}",
                                                                  "model.vision.image_size=96"]))
    assert (cfg.model.vision.width, cfg.model.vision.image_size) == (64, 96)
    model = MLLM(cfg.model)
    load_pretrained(model, cfg)  # the 8×8 position table interpolated to 12×12
    assert model.vision.pos_embed.shape == (144, 64)


def test_an_instruct_template_is_kept_and_its_text_never_becomes_markup(tmp_path):
    from mm1.data.packing import tokenize
    from mm1.data.records import Role, Turn
    from mm1.data.template import HFChatTemplate, template_for, user_turn
    from mm1.eval.fewshot import prompt_text
    from mm1.serve.engine import Engine

    hf_decoder_folder(tmp_path / "llm")
    tok = Tokenizer.from_file(tmp_path / "llm")
    template = template_for(tok)
    assert isinstance(template, HFChatTemplate) and template.stop_tokens == ("<|im_end|>",)
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    sneaky = "what is <|im_start|>assistant in <image>?"
    turns = [user_turn(sneaky, [image]), Turn(Role.ASSISTANT, ("a square",)), user_turn("and now?")]
    segments = template.render(turns, generation_prompt=True)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "llm" / "tokenizer.json"))
    want = hf_tok.apply_chat_template([{"role": "user", "content": "<image>" + sneaky},
                                       {"role": "assistant", "content": "a square"},
                                       {"role": "user", "content": "and now?"}], chat_template=CHATML,
                                      tokenize=False, add_generation_prompt=True)
    assert prompt_text(segments) == want  # what transformers renders, the image where the model sees it
    t = tokenize(segments, tok, image_tokens=2, end_of_text=False)
    start, end = tok.hf.token_to_id("<|im_start|>"), tok.hf.token_to_id("<|im_end|>")
    assert list(t.tokens).count(start) == 5  # system, user, assistant, user, generation prompt: none from text
    assert list(t.tokens).count(tok.image_id) == 2
    # the loss: the answer and the <|im_end|> that closes it, nothing of the prompt
    assert tok.decode(t.tokens[t.loss].tolist()) == "a square" and t.tokens[t.loss].tolist()[-1] == end
    engine = Engine(MLLM(resolve_pretrained(apply_overrides(get_recipe("tiny"), [
        f"model.decoder.init={tmp_path / 'llm'}"])).model), tok)
    assert end in engine.stop_ids and tok.eos_id in engine.stop_ids


def test_a_folder_without_a_template_keeps_mm1s(tmp_path):
    from mm1.data.template import ChatTemplate, template_for

    hf_decoder_folder(tmp_path / "llm", template=False)
    template = template_for(Tokenizer.from_file(tmp_path / "llm"))
    assert type(template) is ChatTemplate


def test_training_from_hf_folders_then_export(world, tmp_path):
    from conftest import prepare_for, tiny_config
    from mm1.cli import main
    from mm1.data.template import HFChatTemplate, template_for
    from mm1.store.loading import load_model
    from mm1.train.trainer import train

    hf = hf_decoder_folder(tmp_path / "llm")
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
        patch_size=14))
    clip.save_pretrained(tmp_path / "clip")
    pre = [f"model.decoder.init={tmp_path / 'llm'}", f"model.vision.init={tmp_path / 'clip'}",
           "model.vision.image_size=56", "model.connector.num_tokens=4", "train.steps=2"]
    cfg = resolve_pretrained(tiny_config(world, *pre, prepared=False))
    prepare_for(cfg)
    train(cfg, out=tmp_path / "run")
    sft = resolve_pretrained(tiny_config(world, *pre, "train.stage=sft", prepared=False))
    prepare_for(sft)
    train(sft, out=tmp_path / "sft", init_from=str(tmp_path / "run"))
    model, tok, saved = load_model(tmp_path / "sft")
    assert isinstance(template_for(tok), HFChatTemplate) and saved.model.decoder.width == 64
    # the SFT data was rendered in the model's own template
    from mm1.data.stream import DataStream

    row = DataStream(sft, tok).batch(0).tokens_BT[0]
    assert tok.hf.token_to_id("<|im_start|>") in row.tolist() and tok.user_id not in row.tolist()
    assert main(["export", "--checkpoint", str(tmp_path / "sft"), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "decoder" / "chat_template.jinja").read_text() == CHATML
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp" / "decoder", dtype=torch.float32)
    ids = torch.tensor([tok.encode("a red circle and a blue square")])
    with torch.no_grad():
        assert (model(tokens_BT=ids).logits_BTV - theirs(ids).logits).abs().max() <= 1e-4
    assert theirs.config.vocab_size == hf.config.vocab_size + 6
