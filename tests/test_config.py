"""Configs: dotted overrides, validation before compute, save/load, and the CLI's one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mm1.cli import main
from mm1.config import Config, ConfigError, ConnectorKind, apply_overrides, from_dict, load, save, to_dict
from mm1.recipes import RECIPES, get_recipe


def test_overrides_set_nested_values_with_types():
    cfg = apply_overrides(get_recipe("tiny"), [
        "model.connector.kind=attention_pool", "train.steps=200", "train.checkpoint.every=10",
        "train.optimizer.lr=3e-4", "model.decoder.tie_embeddings=false"])
    assert cfg.model.connector.kind is ConnectorKind.ATTENTION_POOL
    assert cfg.train.steps == 200 and cfg.train.checkpoint.every == 10
    assert cfg.train.optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.decoder.tie_embeddings is False


BAD = [
    ("model.conector.kind=avg_pool", "unknown config key 'model.conector.kind' (did you mean 'model.connector'?)"),
    ("train.stepz=5", "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.optimizer.lr=fast", "train.optimizer.lr: expected a number, got 'fast'"),
    ("model.connector.kind=mlp", "model.connector.kind: 'mlp' is not one of avg_pool, attention_pool, c_abstractor"),
    ("model.decoder.tie_embeddings=maybe", "model.decoder.tie_embeddings: expected true or false, got 'maybe'"),
    ("model.decoder.heads=5", "model.decoder.heads: 5 heads do not divide the width 192"),
    ("model.vision.heads=3", "model.vision.heads: 3 heads do not divide the width 128"),
    ("model.decoder.kv_heads=4", "model.decoder.kv_heads: 4 key/value heads do not divide the 6 query heads"),
    ("model.connector.num_tokens=15", "model.connector.num_tokens: 15 is not a square number"),
    ("model.vision.image_size=60", "model.vision.image_size: 60 is not a multiple of the patch size 8"),
    ("data.mixture.caption=-1", "data.sources.caption.weight: weight must be >= 0, got -1.0"),
    ("data.sources.vecap.weight=3", "data.sources.vecap.weight: 'vecap' is not a source here (caption, interleaved, "
                                    "text); a new source starts with its kind, e.g. data.sources.vecap.kind=caption"),
    ("data.sources.vecap.kind=video", "data.sources.vecap.kind: 'video' is not one of caption, interleaved, text, "
                                      "conversation"),
    ("data.sources.caption=3", "data.sources.caption: is a source; set one of its keys"),
    ("data.packing.seq_len=70000", "data.packing.seq_len: must lie in 16..65535, got 70000"),
    ("data.synth.word_size=0", "data.synth.word_size: must lie in (0, 0.5] (a share of the image side)"),
    ("train.steps=0", "train.steps: must be positive, got 0"),
    ("train.checkpoint.every=-3", "train.checkpoint.every: must be positive, got -3"),
    ("train.schedule.final_lr_fraction=2", "train.schedule.final_lr_fraction: must lie in [0, 1]"),
    ("train.micro_batch_size=5", "train.micro_batch_size: 5 does not divide batch_size 8"),
    ("model.moe.num_experts=4", None),  # valid: top_k=2 of 4
    ("model.image_token_id=-1", None),  # valid: a text-only model (an imported HF decoder)
    ("model.image_token_id=-2", "model.image_token_id: -2 is outside the vocabulary of 2048 (-1 for a text-only"),
    ("model.image_token_id=2048", "model.image_token_id: 2048 is outside the vocabulary of 2048"),
    ("train=3", "train: is a section; set one of its keys"),
    ("noequals", "override 'noequals' is not of the form key=value"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_bad_overrides_fail_with_one_clear_line(override, message):
    if message is None:
        apply_overrides(get_recipe("tiny"), [override])
        return
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_recipe("tiny"), [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_all_zero_mixture_is_rejected():
    with pytest.raises(ConfigError, match=r"data.sources: all source weights are zero"):
        apply_overrides(get_recipe("tiny"), ["data.mixture.caption=0", "data.mixture.interleaved=0",
                                              "data.mixture.text=0"])


def test_sources_are_configuration_and_the_familiar_keys_still_work(tmp_path):
    cfg = apply_overrides(get_recipe("tiny"), [
        "data.mixture.text=5", "data.caption_shards=/data/cc12m/*.tar", "data.sft_json=/data/llava.json",
        "data.sources.vecap.kind=caption", "data.sources.vecap.paths=/data/vecap/*.tar",
        "data.sources.vecap.weight=7"])
    assert cfg.data.sources["text"].weight == 5
    assert cfg.data.sources["caption"].paths == "/data/cc12m/*.tar"
    assert cfg.data.sft_sources["sft"].paths == "/data/llava.json"
    assert cfg.data.sources["vecap"].kind.value == "caption" and cfg.data.sources["vecap"].weight == 7
    save(cfg, tmp_path / "c.json")  # a new source survives the saved config
    assert to_dict(load(tmp_path / "c.json")) == to_dict(cfg)
    with pytest.raises(ConfigError, match=r"data.sources.vecap.paths: a source with a weight needs its files"):
        apply_overrides(get_recipe("tiny"), ["data.sources.vecap.kind=caption"])


def test_moe_top_k_must_not_exceed_experts():
    with pytest.raises(ConfigError, match=r"model.moe.top_k: must be between 1 and num_experts=1"):
        apply_overrides(get_recipe("tiny"), ["model.moe.num_experts=1"])


def test_cli_reports_bad_override_in_one_line_and_nonzero_exit(capsys, tmp_path):
    code = main(["train", "--recipe", "tiny", "model.connector.num_tokens=10", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("mm1: error: model.connector.num_tokens: 10 is not a square number "
                   "(the connector pools to a √N×√N grid)")
    assert not (tmp_path / "x").exists()  # validated before any work


def test_cli_subprocess_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mm1", "config", "show", "--recipe", "tiny", "train.steps=-1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["mm1: error: train.steps: must be positive, got -1"]


def test_unknown_recipe():
    with pytest.raises(ConfigError, match=r"unknown recipe 'huge'"):
        get_recipe("huge")


def test_save_load_roundtrip(tmp_path):
    cfg = apply_overrides(get_recipe("mm1_3b_moe"), ["train.steps=7"])
    save(cfg, tmp_path / "config.json")
    again = load(tmp_path / "config.json")
    assert to_dict(again) == to_dict(cfg)
    assert isinstance(again, Config)


def test_from_dict_rejects_unknown_keys():
    data = to_dict(get_recipe("tiny"))
    data["model"]["decoder"]["widht"] = 3
    with pytest.raises(ConfigError, match=r"unknown config key 'model.decoder.widht'"):
        from_dict(Config, data)


def test_every_recipe_validates_and_config_show_prints_counts(capsys, tmp_path):
    from test_pretrained import hf_decoder_folder

    hf_decoder_folder(tmp_path / "llm")
    for name in RECIPES:
        init = get_recipe(name).model.decoder.init
        # a recipe that starts from a pre-trained folder is shown with a small one in its place (a fresh
        # clone has no SmolLM2 folder); without it, one line says what is missing and what writes it
        overrides = [f"model.decoder.init={tmp_path / 'llm'}"] if init else []
        if init and not Path(init).exists():
            assert main(["config", "show", "--recipe", name]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"mm1: error: model.decoder.init: {init} does not exist") and "\n" not in err
            assert "mm1 weights from-gguf" in err
        assert main(["config", "show", "--recipe", name, *overrides]) == 0
        out = capsys.readouterr().out
        cfg = json.loads(out[: out.rindex("}") + 1])
        assert cfg["recipe"] == name
        assert "parameters: total" in out and "active per token" in out


def test_cli_reports_missing_paths_in_one_line(capsys, tmp_path):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip() == f"mm1: error: checkpoint {tmp_path / 'nope'} does not exist"
    assert main(["data", "batch", "--step", "0", f"data.root={tmp_path}"]) == 2
    assert "no tokenizer at" in capsys.readouterr().err
