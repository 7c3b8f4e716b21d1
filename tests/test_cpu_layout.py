"""`mm1.serve.cpu_layout`: the decoder's linear layers in oneDNN's layout compute what they computed before;
in int8 they compute it to within quantization's error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mm1.serve.cpu_layout import PackedLinear, can_pack, pack_linears, quantize_linears


def _model(world, *overrides: str):
    from mm1.config import apply_overrides
    from mm1.data.tokenizer import Tokenizer
    from mm1.model.mllm import MLLM
    from mm1.recipes import get_recipe

    tok = Tokenizer.from_file(world / "tokenizer.json")
    cfg = apply_overrides(get_recipe("tiny"), [f"data.root={world}", f"model.decoder.vocab_size={len(tok)}",
                                               f"model.image_token_id={tok.image_id}", *overrides])
    torch.manual_seed(0)
    model = MLLM(cfg.model).eval()
    with torch.no_grad():  # off the initialisation, so that a wrong or transposed weight shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, tok


pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def test_a_packed_linear_is_the_linear_for_any_number_of_rows():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    packed = PackedLinear(linear)
    for shape in ((1, 96), (7, 96), (2, 5, 96)):
        x = torch.randn(shape)
        assert (packed(x) - linear(x)).abs().max() < 1e-5
    assert "in_features=96, out_features=40, bias=True" in repr(packed)


def test_a_packed_linear_compiles_for_one_row_and_for_many():
    """Under torch.compile a packed layer calls the `mm1::packed_linear` op (inductor cannot hold the
    packed tensor) for many rows, and its kept row-major weight for one."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    packed = PackedLinear(linear, keep_plain=True)
    compiled = torch.compile(packed, dynamic=True)
    with torch.inference_mode():
        for shape in ((1, 96), (7, 96), (2, 5, 96), (1, 96)):
            x = torch.randn(shape)
            assert (compiled(x) - linear(x)).abs().max() < 1e-5


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("overrides", [(), ("model.moe.num_experts=4", "model.moe.every=2"),
                                       ("model.decoder.qkv_bias=true",)], ids=["dense", "moe", "qkv_bias"])
def test_packed_decoder_generates_the_same_tokens(world, overrides, fuse):
    from mm1.model.decoder import Attention, SwiGLU
    from mm1.serve.engine import Engine, GenerationConfig

    model, tok = _model(world, *overrides)
    packed = copy.deepcopy(model)
    linears = sum(isinstance(m, nn.Linear) for m in model.decoder.modules())
    attn = sum(isinstance(m, Attention) for m in model.decoder.modules())
    dense = sum(isinstance(m, SwiGLU) for m in model.decoder.modules())
    # every one, the LM head and the MoE routers included; fused, q/k/v are one layer and gate/up one
    assert pack_linears(packed, fuse=fuse) == (linears - 2 * attn - dense if fuse else linears) > 0
    assert not any(isinstance(m, nn.Linear) for m in packed.decoder.modules())
    layer = packed.decoder.layers[0]
    assert (layer.attn.qkv is not None and layer.attn.q is None) == fuse
    assert isinstance(packed.vision.blocks[0].attn.q, nn.Linear)  # only the decoder's
    ids = torch.randint(5, len(tok), (2, 24))
    with torch.no_grad():
        a = model.decoder(model.decoder.embed(ids), torch.arange(24)[None].expand(2, 24), None).hidden_BTD
        b = packed.decoder(packed.decoder.embed(ids), torch.arange(24)[None].expand(2, 24), None).hidden_BTD
        assert (model.decoder.lm_head(a) - packed.decoder.lm_head(b)).abs().max() < 1e-4
    prompts = [["a small red circle and"], ["two blue squares on a"]]
    gen = GenerationConfig(max_new_tokens=10)
    assert Engine(packed, tok).generate_ids(prompts, gen) == Engine(model, tok).generate_ids(prompts, gen)


def test_a_model_that_cannot_be_packed_is_left_alone():
    on_meta = nn.Sequential(nn.Linear(4, 4, device="meta"))
    assert not can_pack(on_meta)
    half = nn.Module()
    half.decoder = nn.Linear(4, 4, dtype=torch.float16)
    assert pack_linears(half) == 0 and isinstance(half.decoder, nn.Linear)


def test_an_int8_decoder_stays_close_to_fp32_and_generates(world):
    from mm1.serve.engine import Engine, GenerationConfig

    model, tok = _model(world)
    q = copy.deepcopy(model)
    from mm1.model.decoder import SwiGLU

    linears = sum(isinstance(m, nn.Linear) for m in model.decoder.modules())
    dense = sum(isinstance(m, SwiGLU) for m in model.decoder.modules())
    assert quantize_linears(q) == linears - dense > 0  # every one but the FFNs' down projections
    assert not any(type(m) is nn.Linear for m in q.decoder.modules())  # every one replaced, the LM head too
    assert all(isinstance(m.down, PackedLinear) for m in q.decoder.modules() if isinstance(m, SwiGLU))
    assert type(q.vision.blocks[0].attn.q) is nn.Linear  # only the decoder's
    ids = torch.randint(5, len(tok), (2, 24))
    with torch.no_grad():
        a = model.decoder.lm_head(model.decoder(model.decoder.embed(ids), torch.arange(24)[None].expand(2, 24),
                                                None).hidden_BTD)
        b = q.decoder.lm_head(q.decoder(q.decoder.embed(ids), torch.arange(24)[None].expand(2, 24),
                                        None).hidden_BTD)
    err = float((a - b).abs().max() / a.abs().max())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    print(f"int8: logits moved by {err:.3f} of the largest; the same top token at {agree:.2f} of positions")
    # changed (it is int8), by a fraction of the largest logit (0.11 on this random tiny model, whose
    # activations are quantized per tensor; 0.015 on SmolLM2-135M), and mostly the same top token (0.73
    # here, where random weights leave near-ties; a broken layer agrees at about 1 / vocabulary)
    assert 0 < err < 0.2 and agree >= 0.6
    prompts = [["a small red circle and"], ["two blue squares on a"]]
    out = Engine(q, tok).generate_ids(prompts, GenerationConfig(max_new_tokens=10))
    assert [len(o) for o in out] == [10, 10] or all(0 < len(o) <= 10 for o in out)
    half = nn.Module()
    half.decoder = nn.Linear(4, 4, dtype=torch.bfloat16)
    assert quantize_linears(half) == 0 and type(half.decoder) is nn.Linear  # fp32 only


def test_int8_refuses_the_flags_it_cannot_go_with(tmp_path, capsys):
    from mm1.cli import main

    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--int8", "--compile"]) == 2
    assert "--int8 cannot be combined with --compile" in capsys.readouterr().err
