"""The model: connectors, document masking, MoE dispatch and losses, cached decoding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mm1.config import ConnectorConfig, ConnectorKind, MoEConfig, apply_overrides
from mm1.model.connector import build_connector
from mm1.model.decoder import SwiGLU
from mm1.model.mllm import MLLM, document_causal_mask
from mm1.model.moe import MoEFFN
from mm1.recipes import get_recipe
from mm1.serve.engine import Engine, GenerationConfig


def tiny_model(*overrides: str) -> MLLM:
    torch.manual_seed(0)
    cfg = apply_overrides(get_recipe("tiny"), ["model.decoder.vocab_size=64", "model.decoder.depth=2", *overrides])
    return MLLM(cfg.model).eval()


@pytest.mark.parametrize("kind", list(ConnectorKind))
@pytest.mark.parametrize("tokens", [4, 16, 64])
def test_connectors_give_n_tokens_at_decoder_width(kind, tokens):
    conn = build_connector(ConnectorConfig(kind=kind, num_tokens=tokens, depth=1, heads=4), vision_width=32,
                           width=48, num_patches=64)
    out = conn(torch.randn(3, 64, 32))
    assert out.shape == (3, tokens, 48)
    out.sum().backward()
    assert all(p.grad is not None for p in conn.parameters())


@pytest.mark.parametrize(("image_size", "grid"), [(224, 16), (378, 27), (336, 24)])
@pytest.mark.parametrize("tokens", [64, 144])
def test_average_pooling_at_every_paper_setting(image_size, grid, tokens):
    """MM1's settings: 64 or 144 tokens from ViT-L/14 at 224/336 px and ViT-H/14 at 378 px."""
    cfg = apply_overrides(get_recipe("tiny"), ["model.connector.kind=avg_pool", f"model.connector.num_tokens={tokens}",
                                               f"model.vision.image_size={image_size}", "model.vision.patch_size=14"])
    conn = build_connector(cfg.model.connector, vision_width=8, width=12, num_patches=grid * grid)
    x = torch.arange(grid * grid, dtype=torch.float32).repeat(8, 1).t()[None]  # [1, g·g, 8]
    pooled = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(1, 8, grid, grid), int(tokens**0.5))
    out = conn(x)
    assert out.shape == (1, tokens, 12)
    torch.testing.assert_close(out, conn.proj(pooled.flatten(2).transpose(1, 2)))


def test_c_abstractor_structure_follows_honeybee():
    conn = build_connector(ConnectorConfig(kind=ConnectorKind.C_ABSTRACTOR, num_tokens=16, depth=3, hidden=32),
                           vision_width=24, width=40, num_patches=64)
    assert len(conn.stage1) == 3 and len(conn.stage2) == 3
    block = conn.stage1[0]
    assert block.conv2[0].groups == block.conv2[0].in_channels  # depthwise 3×3
    assert isinstance(block.conv1[1], torch.nn.LayerNorm) and isinstance(block.conv1[2], torch.nn.SiLU)
    assert block.se.fc1.out_channels == round(24 * 0.25)  # SE ratio 0.25 of the block's input
    assert [type(m).__name__ for m in conn.readout] == ["Linear", "SiLU", "Linear"]


def test_vision_position_embeddings_interpolate_to_new_resolution():
    model = tiny_model()
    feats = model.vision(torch.randn(2, 3, 96, 96))  # trained at 64 px, patch 8 → 12×12 grid here
    assert feats.shape == (2, 144, model.cfg.vision.width)
    assert model.encode_images(torch.randn(2, 3, 96, 96)).shape == (2, 16, model.cfg.decoder.width)


def test_document_mask_equals_separate_sequences():
    model = tiny_model()
    a, b = torch.randint(3, 64, (1, 7)), torch.randint(3, 64, (1, 5))
    packed = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    out = model(tokens_BT=packed, doc_ids_BT=doc, positions_BT=pos).logits_BTV
    ref = torch.cat([model(tokens_BT=a).logits_BTV, model(tokens_BT=b).logits_BTV], 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    mask = document_causal_mask(doc)[0, 0]
    assert not mask[7:, :7].any() and mask[6, :7].all()


def test_grouped_query_heads_expanded_for_a_masked_sdpa_equal_enable_gqa():
    """On CUDA a masked SDPA with enable_gqa falls back to the math kernel, so there K/V are repeated per
    query group instead; both ways compute the same attention."""
    from mm1.model.decoder import grouped_kv

    q, k, v = torch.randn(2, 6, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = document_causal_mask(torch.tensor([[0] * 4 + [1] * 5, [0] * 9]))
    outs = []
    for expand in (False, True):
        kk, vv, gqa = grouped_kv(k, v, 6, expand=expand)
        assert gqa != expand and kk.shape[1] == (6 if expand else 2)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=gqa))
    torch.testing.assert_close(outs[0], outs[1])
    assert grouped_kv(q, q, 6, expand=True)[2] is False  # as many KV heads as query heads: nothing to do


def test_the_loss_with_its_label_count_given_equals_the_loss_that_counts_them():
    """Training passes the count of labelled positions (counted on the CPU), so the loss gathers its rows
    with no host sync; the result is the same."""
    from mm1.data.stream import Batch

    model = tiny_model()
    b = _packed_batch()
    batch = Batch(b["tokens_BT"], b["labels_BT"], b["positions_BT"], b["doc_ids_BT"],
                  torch.zeros_like(b["tokens_BT"]), None, [0, 0, 0]).to(torch.device("cpu"))
    assert batch.num_labelled == int((b["labels_BT"] != -100).sum())
    given = model(**batch.model_inputs(), num_sources=1)
    counted = model(**(batch.model_inputs() | {"num_labelled": None}), num_sources=1)
    torch.testing.assert_close(given.loss_sum, counted.loss_sum)
    torch.testing.assert_close(given.source_loss_sum_S, counted.source_loss_sum_S)
    assert given.num_predicted == counted.num_predicted == batch.num_labelled


def _packed_batch(B: int = 3, T: int = 160):
    """Documents crossing 128-token blocks, padding (-1) at the end of a row, labels on real tokens."""
    doc = torch.tensor([[0] * 50 + [1] * 90 + [-1] * 20, [0] * 160, [0] * 10 + [1] * 10 + [2] * 130 + [3] * 10])
    pos = torch.stack([torch.cat([torch.arange((row == d).sum()) for d in row.unique_consecutive()]) for row in doc])
    tokens = torch.randint(3, 64, (B, T))
    labels = torch.where(doc >= 0, torch.randint(3, 64, (B, T)), -100)
    return {"tokens_BT": tokens, "labels_BT": labels, "positions_BT": pos, "doc_ids_BT": doc}


def test_flex_attention_document_mask_equals_sdpa_with_the_dense_mask():
    """The CUDA path (flex attention over a BlockMask) run eagerly on the CPU: the same logits and loss.
    (Flex has no CPU backward; gradients are compared in the GPU test.)"""
    from mm1.model.mllm import document_block_mask

    torch.manual_seed(1)
    sdpa, flex = tiny_model("model.decoder.attention=sdpa"), tiny_model("model.decoder.attention=flex")
    flex.load_state_dict(sdpa.state_dict())
    batch = _packed_batch()
    with torch.no_grad():
        a = sdpa(**batch, return_logits=True)
        b = flex(**batch, return_logits=True)
    torch.testing.assert_close(b.logits_BTV, a.logits_BTV, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)
    doc = batch["doc_ids_BT"]
    blocks = document_block_mask(doc).to_dense()  # [B, 1, T/128, T/128]: blocks some query may see
    assert blocks.shape[-1] == 2 and not blocks[:, 0, 0, 1].any()  # the future is never computed
    flex.train()
    with pytest.raises(ValueError, match="flex attention has no backward on the CPU; use sdpa"):
        flex(**batch).loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_flex_attention_loss_and_gradients_equal_sdpa():
    torch.manual_seed(1)
    sdpa = tiny_model("model.decoder.attention=sdpa").cuda().train()
    flex = tiny_model("model.decoder.attention=flex").cuda().train()
    flex.load_state_dict(sdpa.state_dict())
    batch = {k: v.cuda() for k, v in _packed_batch().items()}
    grads = []
    for model in (sdpa, flex):
        out = model(**batch)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=1e-4)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, atol=1e-4, rtol=1e-3, msg=name)


def test_images_are_scattered_into_placeholders_in_order():
    model = tiny_model()
    n = model.num_image_tokens
    tokens = torch.tensor([[5] + [2] * n + [6] + [2] * n + [7]])
    images = torch.randn(2, 3, 64, 64)
    x = model.embed(tokens, images)
    enc = model.encode_images(images)
    torch.testing.assert_close(x[0, 1:1 + n], enc[0])
    torch.testing.assert_close(x[0, 2 + n:2 + 2 * n], enc[1])
    with pytest.raises(ValueError, match=r"has 32 <image> slots but 1 images"):
        model.embed(tokens, images[:1])


def test_loss_ignores_unlabelled_positions_and_reports_sources():
    model = tiny_model()
    tokens = torch.randint(3, 64, (2, 10))
    labels = torch.full((2, 10), -100)
    labels[0, :4] = tokens[0, 1:5]
    labels[1, 2:5] = tokens[1, 3:6]
    source = torch.tensor([[0] * 10, [2] * 10])
    out = model(tokens_BT=tokens, labels_BT=labels, source_BT=source)
    logits = model(tokens_BT=tokens).logits_BTV
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)
    assert out.num_predicted == 7 and out.source_count_S.tolist() == [4, 0, 3, 0]


def _naive_moe(moe: MoEFFN, x_ND: torch.Tensor) -> torch.Tensor:
    probs = moe.router(x_ND).float().softmax(-1)
    w, idx = probs.topk(moe.cfg.top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        for j in range(moe.cfg.top_k):
            e = int(idx[n, j])
            gate, up = moe.w_gate_up[e, : moe.hidden], moe.w_gate_up[e, moe.hidden:]
            h = F.silu(gate @ x_ND[n]) * (up @ x_ND[n])
            out[n] += w[n, j] * (moe.w_down[e] @ h)
    return out


def test_moe_grouped_dispatch_equals_per_token_reference():
    torch.manual_seed(0)
    moe = MoEFFN(16, 32, MoEConfig(num_experts=4, top_k=2))
    x = torch.randn(2, 9, 16)
    out, stats = moe(x)
    torch.testing.assert_close(out.reshape(-1, 16), _naive_moe(moe, x.reshape(-1, 16)), atol=1e-5, rtol=1e-5)
    assert stats.expert_share_E.sum() == pytest.approx(1.0)
    probs = moe.router(x.reshape(-1, 16)).float().softmax(-1)
    f = torch.bincount(probs.topk(2, -1).indices.reshape(-1), minlength=4).float() / (18 * 2)
    expected_lb = float(4 * (f * probs.mean(0)).sum().detach())
    assert float(stats.load_balance_loss.detach()) == pytest.approx(expected_lb, rel=1e-5)
    z = torch.logsumexp(moe.router(x.reshape(-1, 16)).float(), -1).square().mean().detach()
    lb = float(stats.load_balance_loss.detach())
    assert float(stats.aux_loss.detach()) == pytest.approx(0.01 * lb + 0.001 * float(z), rel=1e-5)


def test_grouped_gemm_layout_equals_the_per_expert_loop(monkeypatch):
    """The CUDA grouped-GEMM path's padding and offsets, checked on the CPU with a reference grouped
    matmul standing in for torch._grouped_mm (which the GPU test then checks for real)."""
    from mm1.model import moe as moe_module

    def reference_grouped_mm(a_PD, b_EDH, offs):
        assert a_PD.shape[0] == int(offs[-1]) and all(int(o) % moe_module.GROUP_ALIGN == 0 for o in offs)
        starts = [0, *offs[:-1].tolist()]
        return torch.cat([a_PD[s:e] @ b_EDH[g] for g, (s, e) in enumerate(zip(starts, offs.tolist(), strict=True))])

    monkeypatch.setattr(torch, "_grouped_mm", reference_grouped_mm, raising=False)
    torch.manual_seed(0)
    moe = MoEFFN(16, 32, MoEConfig(num_experts=5, top_k=2))
    x_AD = torch.randn(37, 16)
    counts_E = torch.tensor([9, 0, 17, 1, 10])  # empty and odd-sized groups
    got = moe_module._grouped_swiglu(x_AD, counts_E, moe.w_gate_up, moe.w_down)
    torch.testing.assert_close(got, moe._experts(x_AD, counts_E), atol=1e-5, rtol=1e-5)


def test_upcycled_moe_equals_the_dense_ffn():
    torch.manual_seed(0)
    dense = SwiGLU(16, 32)
    moe = MoEFFN(16, 32, MoEConfig(num_experts=8, top_k=2))
    moe.upcycle_from(dense.gate.weight, dense.up.weight, dense.down.weight)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(moe(x)[0], dense(x), atol=1e-5, rtol=1e-5)


def test_moe_model_returns_aux_losses_every_kth_layer():
    model = tiny_model("model.moe.num_experts=4", "model.moe.every=2", "model.decoder.depth=4")
    assert [type(layer.ffn).__name__ for layer in model.decoder.layers] == ["SwiGLU", "MoEFFN"] * 2
    tokens = torch.randint(3, 64, (2, 8))
    out = model(tokens_BT=tokens, labels_BT=tokens)
    assert len(out.moe_stats) == 2 and out.aux_loss is not None and out.aux_loss > 0


class _Tok:
    """A stand-in tokenizer over raw ids for engine tests."""

    pad_id, eos_id, image_id, end_id = 0, 1, 2, 5
    chat_template = None  # mm1's own chat template

    def control_id(self, token):
        return {"<|end|>": self.end_id}[token]

    def encode(self, text):
        return [int(t) for t in text.split()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_cached_decoding_matches_full_recomputation():
    model = tiny_model()
    engine = Engine(model, _Tok())
    engine.stop_ids = set()
    prompts = [["7 8 9 10"], ["11 12"], ["13 14 15 16 17 18 19"]]
    got = engine.generate_ids(prompts, GenerationConfig(max_new_tokens=12))
    for prompt, ids in zip(prompts, got, strict=True):
        seq = [int(t) for t in prompt[0].split()]
        want = []
        for _ in range(12):
            logits = model(tokens_BT=torch.tensor([seq + want])).logits_BTV[0, -1]
            want.append(int(logits.argmax()))
        assert ids == want
    # and each row decodes as it would alone
    assert engine.generate_ids([prompts[1]], GenerationConfig(max_new_tokens=12))[0] == got[1]
    # a token that ends a reply ends it, unless the request says to ignore it (warm-ups, benchmarks)
    engine.stop_ids = {got[1][-1]}
    cut = got[1].index(got[1][-1])
    assert engine.generate_ids([prompts[1]], GenerationConfig(max_new_tokens=12))[0] == got[1][:cut]
    assert engine.generate_ids([prompts[1]], GenerationConfig(max_new_tokens=12, ignore_eos=True))[0] == got[1]


def test_text_only_model_decodes_batches_when_the_pad_token_is_outside_its_vocabulary():
    # An imported HF decoder: our tokenizer's special tokens lie beyond its vocabulary of 64 and it
    # has no image token, so padding must use an id it has and must not be taken for image slots.
    class HFTok(_Tok):
        pad_id, image_id, end_id = 100, 101, 102

    model = tiny_model("model.image_token_id=-1")
    engine = Engine(model, HFTok())
    engine.stop_ids = set()
    prompts = [["7 8 9 10"], ["0 12"], ["13 14 15 16 17 18 19"]]
    cfg = GenerationConfig(max_new_tokens=6)
    got = engine.generate_ids(prompts, cfg)
    assert got == [engine.generate_ids([p], cfg)[0] for p in prompts]


def test_sampling_is_seeded_and_top_p_restricts():
    model = tiny_model()
    engine = Engine(model, _Tok())
    engine.stop_ids = set()
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    a = engine.generate_ids([["7 8"]], cfg)
    assert a == engine.generate_ids([["7 8"]], copy.deepcopy(cfg))
    greedy = engine.generate_ids([["7 8"]], GenerationConfig(max_new_tokens=8))
    tiny_p = engine.generate_ids([["7 8"]], GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6))
    assert tiny_p == greedy


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "onednn"])
def test_compiled_decoding_matches_eager(packed):
    """Compiled decoding gives the eager engine's tokens, with plain weights and with oneDNN's packed ones
    (`mm1 serve --compile` on a CPU: packed for the graphs of many rows, plain for one)."""
    import copy

    from mm1.serve.cpu_layout import can_pack, pack_linears

    model = tiny_model()
    served = copy.deepcopy(model)
    if packed and not (can_pack(served) and pack_linears(served, keep_plain=True)):
        pytest.skip("this torch has no oneDNN")
    eager, compiled = Engine(model, _Tok()), Engine(served, _Tok(), compile=True)
    for e in (eager, compiled):
        e.stop_ids = set()
    cfg = GenerationConfig(max_new_tokens=10)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    # batch 1, then a batch of mixed lengths with an image (the compiled image encoder and prefill)
    for prompts in ([["7 8 9"]], [["7 8 9"], [image, "11 12"], ["13 14 15 16 17 18"]]):
        assert compiled.generate_ids(prompts, cfg) == eager.generate_ids(prompts, cfg)


@pytest.mark.slow
def test_a_warmed_up_batcher_compiles_nothing_for_its_clients():
    """`mm1 serve --compile` warms its batcher up before taking requests: afterwards rows of new prompt
    lengths, at new batch sizes, past a cache-size boundary, decode without a graph compiled."""
    from torch._dynamo.utils import counters

    from mm1.serve.batching import ContinuousBatcher
    from mm1.serve.generation import Encoded, Request

    torch._dynamo.reset()
    model = tiny_model()
    batcher = ContinuousBatcher(Engine(model, _Tok(), compile=True), max_batch=8, max_len=256)
    batcher.warm_up()
    assert not batcher.busy and batcher.engine.stop_ids == Engine(model, _Tok()).stop_ids
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    done = []
    for lengths in ((13,), (4, 11, 6, 17, 1), (21,)):  # one client alone, a crowd, one alone again
        for n in lengths:
            batcher.submit(Request(Encoded(list(range(7, 7 + n)), []), GenerationConfig(max_new_tokens=80),
                                   on_done=done.append))
        while batcher.busy:
            batcher.step()
    assert len(done) == 7 and all(not isinstance(d, BaseException) for d in done)
    assert counters["stats"]["unique_graphs"] == compiled


def test_the_grouped_gemm_experts_run_under_autocast_with_fp32_weights_and_equal_the_loop(monkeypatch):
    """Training under bf16 autocast keeps fp32 parameters and an fp32 residual stream: the grouped GEMM must
    still be taken (cast to bf16 and back), and equal the per-expert loop. torch runs `_grouped_mm` on a CPU
    too, so this is checked here; on CUDA, where it is used, tests/test_gpu.py checks the same."""
    import mm1.model.moe as moe_mod
    from mm1.config import MoEConfig
    from mm1.model.moe import MoEFFN

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    monkeypatch.setattr(moe_mod, "GROUPED_DEVICES", {"cuda", "cpu"})
    calls = []
    real = moe_mod._grouped_swiglu
    monkeypatch.setattr(moe_mod, "_grouped_swiglu", lambda *a: calls.append(a[0].dtype) or real(*a))
    torch.manual_seed(0)
    grouped = MoEFFN(64, 96, MoEConfig(num_experts=4, top_k=2, grouped_mm=True))
    loop = MoEFFN(64, 96, MoEConfig(num_experts=4, top_k=2, grouped_mm=False))
    loop.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 37, 64)  # fp32, as the residual stream is under autocast
    outs, grads = [], []
    for moe in (grouped, loop):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = moe(xi)
        assert out.dtype == torch.float32
        out.float().square().mean().backward()
        outs.append(out.float())
        grads.append((xi.grad, moe.w_gate_up.grad, moe.w_down.grad))
    assert calls == [torch.bfloat16]  # the grouped module took the grouped GEMM, in bf16, once
    torch.testing.assert_close(outs[0], outs[1], atol=3e-2, rtol=3e-2)
    for g, h in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(g, h, atol=3e-2, rtol=6e-2)
    assert not grouped.uses_grouped_mm(x)  # without autocast, an fp32 input keeps the loop
