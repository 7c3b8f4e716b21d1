"""Recipes: parameter counts match the names (meta device, no memory) and the paper's LR rule."""

from __future__ import annotations

import pytest
import torch

from mm1.config import ScheduleConfig
from mm1.model.mllm import count_parameters, lr_rule_parameters
from mm1.recipes import get_recipe
from mm1.train.optim import build_optimizer, describe, lr_at, mm1_learning_rate, param_groups, resolve_lr

EXPECTED_TOTAL = {"mm1_3b": 3e9, "mm1_7b": 7e9, "mm1_30b": 30e9, "mm1_3b_moe": 64e9, "mm1_7b_moe": 47e9}


@pytest.mark.parametrize(("name", "target"), EXPECTED_TOTAL.items())
def test_parameter_counts_match_names_within_15_percent(name, target):
    total, active = count_parameters(get_recipe(name).model)
    assert abs(total - target) / target <= 0.15, f"{name}: {total / 1e9:.2f}B vs {target / 1e9:.0f}B"
    assert active <= total


def test_moe_active_counts_only_top2_experts():
    dense_total, _ = count_parameters(get_recipe("mm1_3b").model)
    total, active = count_parameters(get_recipe("mm1_3b_moe").model)
    cfg = get_recipe("mm1_3b_moe").model
    per_expert = 3 * cfg.decoder.width * cfg.decoder.ffn_hidden
    moe_layers = cfg.decoder.depth // cfg.moe.every
    router = cfg.decoder.width * cfg.moe.num_experts
    assert total - dense_total == moe_layers * ((cfg.moe.num_experts - 1) * per_expert + router)
    assert active == total - moe_layers * (cfg.moe.num_experts - cfg.moe.top_k) * per_expert


def test_ablation_recipe_is_the_paper_base():
    cfg = get_recipe("ablation").model
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.depth) == (336, 14, 1024, 24)
    assert cfg.connector.kind.value == "c_abstractor" and cfg.connector.num_tokens == 144
    decoder_no_embed = cfg.decoder.depth * (4 * cfg.decoder.width**2 + 3 * cfg.decoder.width * cfg.decoder.ffn_hidden)
    assert abs(decoder_no_embed - 1.2e9) / 1.2e9 < 0.05


def test_moe_recipes_follow_the_paper():
    assert (get_recipe("mm1_3b_moe").model.moe.num_experts, get_recipe("mm1_3b_moe").model.moe.every) == (64, 2)
    assert (get_recipe("mm1_7b_moe").model.moe.num_experts, get_recipe("mm1_7b_moe").model.moe.every) == (32, 4)
    for name in ("mm1_3b_moe", "mm1_7b_moe"):
        moe = get_recipe(name).model.moe
        assert (moe.top_k, moe.load_balance_coef, moe.z_loss_coef) == (2, 0.01, 0.001)


@pytest.mark.parametrize(("n", "expected"), [(3e9, 6e-5), (7e9, 4e-5), (30e9, 2e-5)])
def test_paper_learning_rate_rule(n, expected):
    assert mm1_learning_rate(n) == pytest.approx(expected, rel=0.12)


# MM1's final learning rates are 6e-5 / 4e-5 / 2e-5 for 3B / 7B / 30B; N counts the LLM only, and
# the MoE models take their dense backbones' learning rates.
SIX = {"mm1_3b": 6.11e-5, "mm1_7b": 4.08e-5, "mm1_30b": 2.32e-5, "mm1_3b_moe": 6.11e-5, "mm1_7b_moe": 4.08e-5,
       "ablation": 7.52e-5}


@pytest.mark.parametrize(("name", "lr"), SIX.items())
def test_the_six_recipes_learning_rates(name, lr):
    cfg = get_recipe(name)
    assert resolve_lr(cfg.train.optimizer, lr_rule_parameters(cfg.model)) == pytest.approx(lr, rel=2e-3)
    paper = {"mm1_3b": 6e-5, "mm1_7b": 4e-5, "mm1_30b": 2e-5}.get(name.removesuffix("_moe"))
    assert paper is None or abs(lr - paper) / paper < 0.17  # the paper rounds to one digit


def test_rule_n_is_the_dense_decoder():
    dense, moe = get_recipe("mm1_3b").model, get_recipe("mm1_3b_moe").model
    assert lr_rule_parameters(moe) == lr_rule_parameters(dense)
    d = dense.decoder
    per_layer = d.width * (2 * d.width + 2 * d.kv_heads * d.width // d.heads) + 3 * d.width * d.ffn_hidden + 2 * d.width
    assert lr_rule_parameters(dense) == d.depth * per_layer + 2 * d.vocab_size * d.width + d.width  # untied head
    cfg = get_recipe("mm1_7b")
    cfg.train.optimizer.lr = 1e-3
    assert resolve_lr(cfg.train.optimizer, lr_rule_parameters(cfg.model)) == 1e-3


def test_weight_decay_is_decoupled_lambda_equals_a_tenth_of_eta():
    """One AdamW step with a zero gradient: the weight shrinks by exactly λ = 0.1·η, not 0.1·η²."""
    cfg = get_recipe("mm1_3b")
    eta = resolve_lr(cfg.train.optimizer, lr_rule_parameters(cfg.model))
    w = torch.nn.Linear(4, 4, bias=False)
    before = w.weight.detach().clone()
    groups = param_groups(torch.nn.ModuleDict({"decoder": w}), lr=eta, weight_decay=cfg.train.optimizer.weight_decay,
                          components=cfg.train.components)
    opt = build_optimizer(groups, cfg.train.optimizer, eta)
    w.weight.grad = torch.zeros_like(w.weight)
    opt.step()
    torch.testing.assert_close(w.weight.detach(), before * (1 - 0.1 * eta), rtol=0, atol=1e-12)
    lines = describe(cfg.train.optimizer, cfg.train.schedule, lr_rule_parameters(cfg.model))
    assert lines[0].startswith("learning rate: 6.11e-05 peak") and "2,684,480,000" in lines[0]
    assert lines[1].startswith("weight decay: 0.1 x learning rate = 6.11e-06 per step") and "decoupled" in lines[1]


def test_adafactor_takes_absolute_steps():
    """One step against Shazeer & Stern's formula with the learning rate itself (no relative step,
    no parameter-scale factor): at t = 1, β2 = 0 so v = g² (factored for matrices)."""
    from mm1.train.adafactor import Adafactor

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 5) * 0.02)
    b = torch.nn.Parameter(torch.randn(5) * 0.02)
    g_w, g_b = torch.randn(3, 5), torch.randn(5) * 1e-3
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = Adafactor([w, b], lr=1e-5)
    w.grad, b.grad = g_w.clone(), g_b.clone()
    opt.step()
    sq = g_w**2 + 1e-30
    row, col = sq.mean(1), sq.mean(0)
    u = g_w / (row[:, None] * col[None, :] / row.mean()).sqrt()
    u = u / max(1.0, float(u.square().mean().sqrt()))
    torch.testing.assert_close(w.detach(), w0 - 1e-5 * u)
    torch.testing.assert_close(b.detach(), b0 - 1e-5 * torch.sign(g_b))  # vector: |U| = 1 everywhere
    # torch's Adafactor scales by the parameter's RMS (~0.02 here): ~50x smaller steps at the same lr
    ref = torch.nn.Parameter(w0.clone())
    ref.grad = g_w.clone()
    torch.optim.Adafactor([ref], lr=1e-5).step()
    assert (w0 - ref.detach()).abs().mean() < (w0 - w.detach()).abs().mean() / 20


def test_adafactor_leaves_a_weight_with_no_gradient_finite():
    """A matrix whose gradient is zero (a dead unit) has moments of eps = 1e-30; formed naively,
    row·col underflows to 0 and the update is 0/0 (seen in SFT of the smol recipe)."""
    from mm1.train.adafactor import Adafactor

    w = torch.nn.Parameter(torch.ones(4, 6))
    opt = Adafactor([w], lr=1e-4, beta1=0.9)
    for _ in range(3):
        w.grad = torch.zeros(4, 6)
        opt.step()
    assert torch.equal(w.detach(), torch.ones(4, 6))


@pytest.mark.parametrize("name", ["mm1_3b_sft", "mm1_7b_sft", "mm1_30b_sft", "mm1_3b_moe_sft", "mm1_7b_moe_sft",
                                  "ablation_sft"])
def test_sft_recipes_follow_the_paper(name):
    cfg = get_recipe(name)
    t, o = cfg.train, cfg.train.optimizer
    assert (t.stage.value, t.steps, t.batch_size, cfg.data.packing.seq_len) == ("sft", 10_000, 256, 2048)
    assert (o.kind.value, o.lr) == ("adafactor", 1e-5) and t.schedule.final_lr_fraction == 0.0
    assert not t.components.vision_frozen
    assert cfg.data.sft_sources["sft_text"].weight > 0  # text-only conversations mixed in
    views = 1 + cfg.data.sub_image_grid**2
    side = cfg.model.vision.image_size * cfg.data.sub_image_grid
    assert (side, views * cfg.model.connector.num_tokens) == (1344, 720)


def test_schedule_warmup_then_cosine_to_ten_percent():
    sched = ScheduleConfig(warmup_steps=2000, final_lr_fraction=0.1)
    peak, total = 6e-5, 200_000
    assert lr_at(0, peak=peak, total_steps=total, schedule=sched) == pytest.approx(peak / 2000)
    assert lr_at(1999, peak=peak, total_steps=total, schedule=sched) == pytest.approx(peak)
    mid = lr_at(2000 + 99_000, peak=peak, total_steps=total, schedule=sched)
    assert mid == pytest.approx(0.1 * peak + 0.45 * peak, rel=1e-3)
    assert lr_at(total, peak=peak, total_steps=total, schedule=sched) == pytest.approx(0.1 * peak)
    assert get_recipe("mm1_3b").train.schedule.warmup_steps == 2000


def test_a_pipeline_hands_each_stage_what_the_earlier_ones_wrote(tmp_path):
    from mm1.config import ConfigError, Stage
    from mm1.recipes import get_pipeline
    from mm1.recipes.pipeline import Handoff, Pipeline, PipelineStage

    stages = {s.name: s for s in get_pipeline("tiny").resolve(tmp_path)}
    assert list(stages) == ["clip", "lm", "pretrain", "sft"]  # MM1's order
    assert [s.config.train.stage for s in stages.values()] == [Stage.CLIP, Stage.LM, Stage.PRETRAIN, Stage.SFT]
    assert (stages["clip"].config.model.vision.init, stages["lm"].config.model.decoder.init) == ("", "")
    for name in ("pretrain", "sft"):
        cfg = stages[name].config
        assert (cfg.model.vision.init, cfg.model.decoder.init) == (str(tmp_path / "clip"), str(tmp_path / "lm"))
    assert stages["sft"].init_from == tmp_path / "pretrain" and stages["pretrain"].init_from is None
    # what may run side by side: stages that take nothing from each other
    assert get_pipeline("tiny").waves() == [["clip", "lm"], ["pretrain"], ["sft"]]
    assert get_pipeline("smol").waves() == [["clip"], ["pretrain", "pretrain_no_text"], ["sft"]]
    smol = {s.name: s for s in get_pipeline("smol", ["train.steps=3"]).resolve(tmp_path)}
    assert smol["pretrain_no_text"].config.data.sources["text"].weight == 0
    assert smol["sft"].init_from == tmp_path / "pretrain" and smol["clip"].config.train.steps == 3
    base = get_recipe("tiny")
    with pytest.raises(ConfigError, match="takes its decoder from 'lm', which is not an earlier stage"):
        Pipeline((PipelineStage("pretrain", base, ((Handoff.DECODER, "lm"),)), PipelineStage("lm", base)))
    with pytest.raises(ConfigError, match="unknown pipeline 'big'"):
        get_pipeline("big")


def test_mm1_pipeline_runs_every_stage_in_order_and_skips_finished_ones(world, tmp_path, capsys):
    import json

    from mm1.cli import main

    small = [f"data.root={world}", "train.steps=2", "train.batch_size=4", "data.packing.seq_len=128",
             "data.packing.max_images=4", "data.num_workers=0", "data.prepare.workers=1",
             "train.logging.progress=false", "train.logging.tensorboard=false", "model.decoder.depth=2",
             "model.vision.depth=1"]
    out = tmp_path / "p"
    assert main(["pipeline", "tiny", "--out", str(out), *small]) == 0
    for stage in ("clip", "lm", "pretrain", "sft"):
        assert json.loads((out / stage / "config.json").read_text())["train"]["steps"] == 2, stage
    assert (out / "lm" / "decoder" / "config.json").exists()
    capsys.readouterr()
    assert main(["pipeline", "tiny", "--out", str(out), *small]) == 0
    assert capsys.readouterr().out.count("(finished: skipped)") == 4
