"""Shared fixtures: a small synthetic world (built once per session) and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mm1.config import SynthConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED = Path(os.environ.get("MM1_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

SMALL_WORLD = SynthConfig(captions=600, interleaved=150, text=150, sft=200, sft_text=50, eval_scenes=30,
                          image_size=64)


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.skip(f"needs ../shared/data beside the checkout (looked in {SHARED})")
    return SHARED


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A small synthetic world with a trained tokenizer."""
    from mm1.config import DataConfig, apply_overrides
    from mm1.data.sources import iter_texts
    from mm1.data.synth.writer import write_world
    from mm1.data.tokenizer import train_tokenizer
    from mm1.recipes import get_recipe

    root = tmp_path_factory.mktemp("world")
    write_world(root, seed=0, sizes=SMALL_WORLD)
    cfg = apply_overrides(get_recipe("tiny"), [f"data.root={root}"])
    assert isinstance(cfg.data, DataConfig)
    train_tokenizer(iter_texts(cfg), vocab_size=2048, out=root / "tokenizer.json")
    return root


def prepare_for(cfg):
    """Prepare the data `cfg` trains on (a no-op when this spec is prepared already)."""
    from mm1.data.prepare import prepare
    from mm1.data.stream import load_tokenizer

    prepare(cfg, cfg.train.stage, load_tokenizer(cfg), progress=False)
    return cfg


def tiny_config(world: Path, *extra: str, prepared: bool = True):
    """The tiny recipe pointed at `world`, shrunk for fast tests, with its data prepared."""
    from mm1.config import apply_overrides
    from mm1.recipes import get_recipe

    cfg = apply_overrides(get_recipe("tiny"), [
        f"data.root={world}", "data.num_workers=0", "train.batch_size=4", "data.packing.seq_len=128",
        "data.packing.max_images=4", "data.prepare.workers=1", "train.logging.progress=false",
        "train.logging.tensorboard=false", "train.logging.every=1", *extra])
    return prepare_for(cfg) if prepared else cfg
