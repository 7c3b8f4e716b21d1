"""What mm1 is handed by others: weights load without unpickling, and loading a run folder runs no code."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from mm1.train import checkpoint as ckpt
from mm1.train.trainer import train

SMALL = ["model.decoder.depth=2", "model.vision.depth=1", "train.steps=2", "train.checkpoint.every=2",
         "train.schedule.warmup_steps=1"]


class Payload:
    """Unpickling this writes a marker file: the proof that loading ran code it was handed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant(run: Path, marker: Path) -> None:
    """Every pickle a checkpoint may hold replaced by the payload (as a run folder from a stranger could be)."""
    last = ckpt.latest(run)
    for target in (last / "dcp" / ".metadata", last / "rng_rank00000.pt"):
        target.write_bytes(pickle.dumps(Payload(marker)))
    assert not marker.exists()


@pytest.fixture(scope="module")
def run(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "run"
    train(tiny_config(world, *SMALL), out=out)
    return out


def test_weight_reading_commands_never_unpickle_what_a_run_folder_holds(run, tmp_path, world):
    """serve/eval/generate/chat (load_model), export and --init-from read model.safetensors only."""
    from mm1.cli import main
    from mm1.store.loading import load_model

    copy = tmp_path / "handed_over"
    shutil.copytree(run, copy)
    marker = tmp_path / "payload_ran"
    plant(copy, marker)
    model, _, _ = load_model(copy)  # what serve, eval, generate and chat call
    reference, _, _ = load_model(run)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert main(["export", "--checkpoint", str(copy), "--out", str(tmp_path / "export")]) == 0
    train(tiny_config(world, *SMALL, "train.steps=1"), out=tmp_path / "sft", init_from=str(ckpt.latest(copy)))
    assert not marker.exists()
    # --resume is the one path that reads the distributed checkpoint; it says so (and the docs say why)


def test_checkpoint_rng_states_are_not_pickles(run):
    last = ckpt.latest(run)
    assert not list(last.glob("*.pt"))
    state = ckpt.load_rng(last / "rng_rank00000")
    assert isinstance(state["torch"], torch.Tensor) and len(state["python"][1]) == 625


def test_a_checkpoint_without_safetensors_or_with_a_truncated_one_is_one_line(run, tmp_path):
    from mm1.store.loading import load_model

    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    weights = ckpt.latest(copy) / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(copy)
    weights.unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"has no model.safetensors .* `mm1 checkpoint-weights"):
        load_model(copy)
    from mm1.cli import main

    assert main(["checkpoint-weights", str(copy)]) == 0  # on the user's word: written from the DCP once
    assert weights.exists() and load_model(copy)[0] is not None


def test_a_config_too_big_for_the_machine_is_refused_before_allocation(world, tmp_path):
    """A handed-over config with 100,000 decoder layers: one line naming the keys, in well under a second."""
    import time

    from mm1.config import ConfigError

    cfg = tiny_config(world, *SMALL, "model.decoder.depth=100000")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"model.decoder.depth=100000, .*B parameters needs about .* GiB to train"):
        train(cfg, out=tmp_path / "big")
    assert time.perf_counter() - t0 < 30  # the old code allocated for minutes (and gigabytes) before failing


@pytest.mark.parametrize(("change", "message"), [
    ({"num_hidden_layers": -1}, r"num_hidden_layers=-1 must be a positive integer"),
    ({"hidden_size": 0}, r"hidden_size=0 must be a positive integer"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads=3 does not divide num_attention_heads=4"),
    ({"num_hidden_layers": 10**7}, r"model.decoder.depth=10000000, .* for its weights"),
])
def test_an_hf_config_used_as_an_init_is_checked_before_anything_is_built(tmp_path, change, message):
    import json

    from mm1.config import ConfigError
    from mm1.model.weights import WeightsError
    from mm1.store.loading import load_model

    hf = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
          "max_position_embeddings": 256, "tie_word_embeddings": True} | change
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    _write_tokenizer(folder)
    with pytest.raises((WeightsError, ConfigError), match=message):
        load_model(folder)


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["a red circle on a gray background"] * 20,
                           trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(folder / "tokenizer.json"))


def test_a_read_only_or_impossible_out_is_one_line_before_any_work(run, tmp_path, capsys):
    from mm1.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for argv in (["eval", "--checkpoint", str(run), "--out", str(blocker / "eval")],
                 ["train", "--recipe", "tiny", "--out", str(blocker / "run")],
                 ["export", "--checkpoint", str(run), "--out", str(blocker / "x" / "export")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write there" in err[0] and str(blocker) in err[0], err


def test_a_full_disk_during_a_run_is_one_line_naming_the_path_and_leaves_no_empty_files(world, tmp_path, capsys,
                                                                                       monkeypatch):
    import errno

    import mm1.files
    from mm1.cli import main
    from mm1.config import save

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints"))

    replace = mm1.files.os.replace

    def full_after_start(src, dst):  # the run's config and tokenizer are written; later writes find the disk full
        if Path(dst).name in ("config.json", "tokenizer.json"):
            return replace(src, dst)
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    cfg = tiny_config(world, *SMALL)
    save(cfg, tmp_path / "cfg.json")
    monkeypatch.setattr(ckpt, "save", full)
    monkeypatch.setattr("mm1.files.os.replace", full_after_start)  # data_stats.json fails as well
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run")]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("mm1:")]
    assert err == [f"mm1: error: {tmp_path / 'run' / 'checkpoints'}: No space left on device"]  # the first error
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.stat().st_size == 0]


def test_results_name_what_they_scored_and_a_cut_export_never_passes_for_a_whole_one(run, tmp_path, monkeypatch):
    import json

    from mm1.cli import main
    from mm1.files import FileFormatError
    from mm1.store.loading import load_model

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run), "--out", str(out), "--tasks", "synth_vqa", "--shots", "0",
                 "eval.limit=2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"]["step"] == 2 and results["checkpoint"]["checkpoint"] == str(ckpt.latest(run))
    assert (out / "config.json").exists()
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run), "--out", str(export)]) == 0
    config = export / "mm1_config.json"
    config.write_text(config.read_text()[:100])
    with pytest.raises(FileFormatError, match=r"mm1_config.json: not valid JSON"):
        load_model(export)
    tok = export / "tokenizer.json"
    tok.write_text(tok.read_text()[:100])
    with pytest.raises(FileFormatError, match=r"tokenizer.json: not a readable tokenizer.json"):
        from mm1.data.tokenizer import Tokenizer

        Tokenizer.from_file(tok)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mm1.store.hf.export_hf_decoder", killed)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "second")]) == 130
    assert not (tmp_path / "second").exists()  # nothing half-written in its place
