"""What every `mm1` command shares: the recipe/config/override arguments and how they become a `Config`."""

from __future__ import annotations

import argparse

from mm1.config import Config, apply_overrides, load


def config_args(p: argparse.ArgumentParser, *, default_recipe: str = "tiny") -> None:
    p.add_argument("--recipe", default=default_recipe, help=f"recipe name (default: {default_recipe})")
    p.add_argument("--config", help="a saved config.json to start from instead of the recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. model.connector.kind=attention_pool train.steps=200")


def resolve_config(recipe: str, config_path: str | None, overrides: list[str], *, pretrained: bool = True) -> Config:
    """Recipe (or saved config), then overrides; `pretrained`: the shapes and tokenizer of the folders
    in `model.decoder.init` / `model.vision.init` filled in (the trainer does it itself)."""
    from mm1.recipes import get_recipe
    from mm1.store.pretrained import resolve_pretrained

    cfg = apply_overrides(load(config_path) if config_path else get_recipe(recipe), overrides)
    return resolve_pretrained(cfg) if pretrained else cfg
