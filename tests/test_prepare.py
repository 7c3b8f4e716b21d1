"""`mm1 data prepare`: deterministic output, refusal of other settings, bad records counted once, O(1) start-up."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_config
from mm1.cli import main
from mm1.data.formats.interleaved import write_obelics
from mm1.data.formats.llava import write_llava
from mm1.data.formats.webdataset import write_shards
from mm1.data.prepare import prepare
from mm1.data.prepared import PreparedDataError
from mm1.data.stream import DataStream, load_tokenizer
from mm1.data.tokenizer import train_bpe


def _png(colour=(200, 30, 30), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_is_deterministic_across_runs_and_worker_counts(world, tmp_path):
    outs = []
    for k, workers in enumerate((1, 2, 2)):
        cfg = tiny_config(world, f"data.prepared={tmp_path / str(k)}", f"data.prepare.workers={workers}",
                          "data.prepare.unit_records=100", prepared=False)  # several units per source
        prepare(cfg, cfg.train.stage, load_tokenizer(cfg), progress=False)
        outs.append(_files(tmp_path / str(k)))
    assert sum(1 for name in outs[0] if "/shard_" in name and name.endswith("tokens.npy")) > 3
    assert outs[0] == outs[1] == outs[2]


def test_prepare_in_three_shards_then_merge_is_byte_for_byte_one_machines(world, tmp_path, capsys):
    """`--shard i --of 3` on three 'machines' (here one after the other, sharing the folder), then `--merge`:
    the same bytes as one `mm1 data prepare`; merging too early names the missing units; a shard run again
    redoes nothing it had finished."""
    from mm1.config import save

    def args(k: str) -> list[str]:
        return [f"data.root={world}", f"data.prepared={tmp_path / k}", "data.prepare.unit_records=100",
                "data.prepare.workers=1"]

    save(tiny_config(world, prepared=False), tmp_path / "config.json")
    base = ["data", "prepare", "--config", str(tmp_path / "config.json")]
    assert main([*base, *args("one")]) == 0
    assert main([*base, *args("three"), "--shard", "0", "--of", "3"]) == 0
    assert main([*base, *args("three"), "--shard", "2", "--of", "3"]) == 0
    capsys.readouterr()
    assert main([*base, *args("three"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "work units are not prepared yet" in err and "--shard i --of N" in err and "\n" not in err.strip()
    assert main([*base, *args("three"), "--shard", "1", "--of", "3"]) == 0
    assert main([*base, *args("three"), "--shard", "1", "--of", "3"]) == 0
    assert "0 of this shard's" in capsys.readouterr().out  # nothing redone
    assert main([*base, *args("three"), "--merge"]) == 0
    one, three = _files(tmp_path / "one"), _files(tmp_path / "three")
    assert sum(1 for name in one if name.endswith("tokens.npy")) > 3 and one == three
    assert main([*base, *args("three"), "--shard", "3", "--of", "3"]) == 2
    assert "must lie in 0..2" in capsys.readouterr().err


def test_changed_tokenizer_or_packing_is_refused_with_what_differs(world, tmp_path):
    cfg = tiny_config(world, f"data.prepared={tmp_path}")
    other = tmp_path / "other_tokenizer.json"
    train_bpe(["a small different corpus of words"] * 30, vocab_size=300).save(other)
    changed = tiny_config(world, f"data.prepared={tmp_path}", f"data.tokenizer={other}", prepared=False)
    with pytest.raises(PreparedDataError, match=r"prepared with other settings, which are never mixed: tokenizer"):
        DataStream(changed, load_tokenizer(changed))
    longer = tiny_config(world, f"data.prepared={tmp_path}", "data.packing.seq_len=256", prepared=False)
    with pytest.raises(PreparedDataError, match=r"seq_len \(128 there, 256 here\)"):
        DataStream(longer, load_tokenizer(longer))
    DataStream(cfg, load_tokenizer(cfg))  # the original settings still find their data
    empty = tiny_config(world, f"data.prepared={tmp_path / 'none'}", prepared=False)
    with pytest.raises(PreparedDataError, match=r"is not prepared in .*: run `mm1 data prepare --recipe tiny`"):
        DataStream(empty, load_tokenizer(empty))


def test_train_without_prepared_data_stops_in_one_line(world, tmp_path, capsys):
    code = main(["train", "--recipe", "tiny", f"data.root={world}", f"data.prepared={tmp_path / 'p'}",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "mm1 data prepare" in err


def _bad_world(root: Path) -> None:
    """One source of each kind, each with every kind of bad record it can have."""
    good, garbage = _png(), b"not an image at all"
    shards = write_shards([("good1", good, "png", "a red square", None), ("good2", good, "png", "another", None),
                           ("corrupt", garbage, "png", "a corrupt image", None),
                           ("cut", good[:40], "png", "a truncated image", None),
                           ("nocap", good, "png", "", None)], root / "caps")
    with tarfile.open(shards[0], "a") as tar:  # a caption without an image
        info = tarfile.TarInfo("lonely.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"text"))
    (root / "docs").mkdir()
    (root / "docs" / "ok.png").write_bytes(good)
    (root / "docs" / "bad.png").write_bytes(garbage)
    write_obelics([(["Intro.", None, "Kept with its good image."], [None, "ok.png", None]),
                   (["Bad image left out.", None], [None, "bad.png"]),
                   (["Web image dropped.", None], [None, "http://x.org/a.jpg"]),
                   (["a", "b"], [None, "ok.png"])], root / "docs" / "d.parquet")
    (root / "text").mkdir()
    (root / "text" / "t.jsonl").write_text('{"text": "fine text"}\nnot json\n{"text": ""}\n{"text": "more"}\n')
    (root / "sft" / "images").mkdir(parents=True)
    (root / "sft" / "images" / "ok.png").write_bytes(good)
    (root / "sft" / "images" / "bad.png").write_bytes(garbage)
    conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]
    write_llava([{"id": "ok", "image": "ok.png", "conversations": conv},
                 {"id": "badimg", "image": "bad.png", "conversations": conv},
                 {"id": "missing", "image": "gone.png", "conversations": conv},
                 {"id": "markers", "image": ["ok.png", "ok.png"], "conversations": conv},
                 {"id": "noanswer", "conversations": [{"from": "human", "value": "hi"}]}], root / "sft" / "c.json")


def test_bad_records_of_every_kind_are_counted_once_in_the_manifest_and_the_run(world, tmp_path):
    _bad_world(tmp_path)
    paths = [f"data.caption_shards={tmp_path}/caps/*.tar", f"data.interleaved_shards={tmp_path}/docs/*.parquet",
             f"data.text_shards={tmp_path}/text/*.jsonl", f"data.sft_json={tmp_path}/sft/c.json",
             "data.sft_sources.sft_text.weight=0", f"data.prepared={tmp_path / 'prepared'}"]
    cfg = tiny_config(world, *paths, "train.steps=2", "model.decoder.depth=1", "model.vision.depth=1")
    stream = DataStream(cfg, load_tokenizer(cfg))
    m = {n: s.manifest for n, s in stream.sources.items()}
    assert m["caption"]["records"] == {"read": 6, "used": 2, "skipped": 4, "split_across_sequences": 0}
    assert m["caption"]["skipped"] == {"empty caption": 1, "image: cannot decode image (UnidentifiedImageError)": 2,
                                       "no image file (jpg, jpeg, png, webp, bmp, gif, tif, tiff)": 1}
    assert m["interleaved"]["records"]["read"] == 4 and m["interleaved"]["records"]["used"] == 3
    assert m["interleaved"]["skipped"] == {"a position must hold exactly one of text or image": 1}
    assert m["interleaved"]["images_left_out"] == {"cannot decode image (UnidentifiedImageError)": 1,
                                                   "image slot not resolvable to a local file": 1}
    assert m["text"]["skipped"] == {"empty or non-string text": 1,
                                    "malformed jsonl line (need an object with a 'text' field)": 1}
    assert m["caption"]["examples"]["empty caption"].endswith("00000.tar:nocap")
    sft_cfg = tiny_config(world, *paths, "train.stage=sft")
    sft = DataStream(sft_cfg, load_tokenizer(sft_cfg)).sources["sft"].manifest
    assert sft["records"]["used"] == 1 and sft["skipped"] == {
        "<image> markers do not match the images": 1,
        "conversation must start with a human turn and contain an answer": 1,
        "image: cannot decode image (UnidentifiedImageError)": 1, "image: cannot read image": 1}
    # Training on it: no bad image reaches a step, and the run reports the same counts.
    from mm1.train.trainer import train

    train(cfg, out=tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["prepared"]["caption"]["skipped"] == m["caption"]["skipped"]
    assert stats["at_load"]["skipped"] == {} and stats["skipped_in_batches"] == {}


def test_start_up_reads_no_record(world, monkeypatch):
    cfg = tiny_config(world)
    import mm1.data.formats as formats
    import mm1.data.prepare as prep

    def refuse(*a, **k):
        raise AssertionError("the stream opened a data file")

    monkeypatch.setattr(formats, "open_reader", refuse)
    monkeypatch.setattr(prep, "open_reader", refuse)
    stream = DataStream(cfg, load_tokenizer(cfg))
    assert stream.batch(3).tokens_BT.shape == (4, 128)


def test_cli_prepare_prints_the_summary(world, tmp_path, capsys):
    assert main(["data", "prepare", f"data.root={world}", f"data.prepared={tmp_path}", "--stage", "sft",
                 "data.packing.seq_len=256"]) == 0
    out = capsys.readouterr().out
    assert "sft_text" in out and "fill" in out and f"prepared sft data in {tmp_path}" in out
    summary = json.loads(next(tmp_path.glob("sft-*.json")).read_text())
    assert set(summary["sources"]) == {"sft", "sft_text"}
    assert sum(s["token_share"] for s in summary["sources"].values()) == pytest.approx(1.0)
