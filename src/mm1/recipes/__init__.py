"""Recipes: named functions that return a complete, validated `Config`.

`get_recipe("mm1_3b")` is what `--recipe mm1_3b` resolves to. A recipe is plain Python so that a
researcher can read every choice in one place and write a new one by copying a function.
"""

from __future__ import annotations

from collections.abc import Callable

from mm1.config import Config, ConfigError, apply_overrides, validate
from mm1.recipes.paper import (
    ablation,
    ablation_sft,
    mm1_3b,
    mm1_3b_moe,
    mm1_3b_moe_sft,
    mm1_3b_sft,
    mm1_7b,
    mm1_7b_moe,
    mm1_7b_moe_sft,
    mm1_7b_sft,
    mm1_30b,
    mm1_30b_sft,
)
from mm1.recipes.pipeline import Pipeline
from mm1.recipes.smol import smol, smol_clip, smol_pipeline, smol_sft
from mm1.recipes.tiny import tiny, tiny_clip, tiny_lm, tiny_pipeline, tiny_sft

RECIPES: dict[str, Callable[[], Config]] = {
    "tiny": tiny,
    "tiny_clip": lambda: tiny_clip(tiny()),
    "tiny_lm": lambda: tiny_lm(tiny()),
    "tiny_sft": lambda: tiny_sft(tiny()),
    "smol": smol,
    "smol_clip": smol_clip,
    "smol_sft": smol_sft,
    "ablation": ablation,
    "mm1_3b": mm1_3b,
    "mm1_7b": mm1_7b,
    "mm1_30b": mm1_30b,
    "mm1_3b_moe": mm1_3b_moe,
    "mm1_7b_moe": mm1_7b_moe,
    "ablation_sft": ablation_sft,
    "mm1_3b_sft": mm1_3b_sft,
    "mm1_7b_sft": mm1_7b_sft,
    "mm1_30b_sft": mm1_30b_sft,
    "mm1_3b_moe_sft": mm1_3b_moe_sft,
    "mm1_7b_moe_sft": mm1_7b_moe_sft,
}


def get_recipe(name: str) -> Config:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}'; choose from {', '.join(RECIPES)}")
    cfg = RECIPES[name]()
    cfg.recipe = name
    return validate(cfg)


# `mm1 pipeline NAME --out DIR [overrides]`: every stage of a recipe in MM1's order, overrides on each.
PIPELINES: dict[str, Callable[[list[str]], Pipeline]] = {
    "tiny": lambda overrides: tiny_pipeline(apply_overrides(tiny(), overrides), clip=overrides, lm=overrides,
                                            sft=overrides),
    "smol": smol_pipeline,
}


def get_pipeline(name: str, overrides: list[str] = ()) -> Pipeline:
    if name not in PIPELINES:
        raise ConfigError(f"unknown pipeline '{name}'; choose from {', '.join(PIPELINES)}")
    return PIPELINES[name](list(overrides))
