"""Recipes: parameter counts match the names (meta device, no memory) and the paper's LR rule."""

from __future__ import annotations

import pytest

from mm1.config import ScheduleConfig
from mm1.model.mllm import count_parameters
from mm1.recipes import get_recipe
from mm1.train.optim import lr_at, mm1_learning_rate, mm1_weight_decay, resolve_lr

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
    assert mm1_weight_decay(mm1_learning_rate(n)) == pytest.approx(0.1 * mm1_learning_rate(n))


def test_rule_is_the_default_and_explicit_lr_wins():
    cfg = get_recipe("mm1_7b")
    total, _ = count_parameters(cfg.model)
    lr, wd = resolve_lr(cfg.train.optimizer, total)
    assert lr == pytest.approx(mm1_learning_rate(total)) and wd == pytest.approx(0.1 * lr)
    cfg.train.optimizer.lr = 1e-3
    assert resolve_lr(cfg.train.optimizer, total)[0] == 1e-3


def test_schedule_warmup_then_cosine_to_ten_percent():
    sched = ScheduleConfig(warmup_steps=2000, final_lr_fraction=0.1)
    peak, total = 6e-5, 200_000
    assert lr_at(0, peak=peak, total_steps=total, schedule=sched) == pytest.approx(peak / 2000)
    assert lr_at(1999, peak=peak, total_steps=total, schedule=sched) == pytest.approx(peak)
    mid = lr_at(2000 + 99_000, peak=peak, total_steps=total, schedule=sched)
    assert mid == pytest.approx(0.1 * peak + 0.45 * peak, rel=1e-3)
    assert lr_at(total, peak=peak, total_steps=total, schedule=sched) == pytest.approx(0.1 * peak)
    assert get_recipe("mm1_3b").train.schedule.warmup_steps == 2000
