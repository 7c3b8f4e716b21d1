"""Real data formats: written and read back, bad records counted with shard and key, shared files read."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mm1.data.formats import coco, interleaved, llava, text, webdataset
from mm1.data.images import ImageError
from mm1.data.sample import ImageRef, RecordError, Source, Text
from mm1.data.stats import DataStats


def _png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_roundtrip(tmp_path):
    recs = [(f"{i:04d}", _png(), "png", f"caption {i}", {"i": i}) for i in range(5)]
    paths = webdataset.write_shards(recs, tmp_path, per_shard=2)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    samples = list(webdataset.iter_samples(paths))
    assert [s.segments[1].text for s in samples] == [f"caption {i}" for i in range(5)]
    assert samples[0].source is Source.CAPTION and samples[0].segments[0].load().size == (8, 8)


def test_webdataset_bad_records_are_counted_not_fatal(tmp_path):
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in [("a.png", _png()), ("a.txt", b"fine"), ("b.txt", b"no image"),
                              ("c.png", _png()), ("c.txt", b""), ("d.jpg", b""), ("d.txt", b"zero-byte image"),
                              ("e.png", b"garbage"), ("e.txt", b"corrupt image")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    stats = DataStats()
    samples = list(webdataset.iter_samples([shard], stats))
    assert [s.where.split(":")[-1] for s in samples] == ["a", "d", "e"]
    assert stats.skipped_by_source() == {"caption": 2}
    reasons = " ".join(r for (_, r) in stats.skipped)
    assert "no image file" in reasons and "empty caption" in reasons
    for s in samples[1:]:  # images are decoded lazily; both fail with where they came from
        with pytest.raises(ImageError, match=str(shard)):
            s.segments[0].load()


def test_truncated_shard_keeps_samples_before_the_damage(tmp_path):
    paths = webdataset.write_shards([(f"{i}", _png(), "png", "c", None) for i in range(20)], tmp_path)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2 + 100])
    stats = DataStats()
    samples = list(webdataset.iter_samples(paths, stats))
    assert 0 < len(samples) < 20
    assert sum(stats.skipped.values()) >= 1


def test_obelics_parquet_roundtrip_and_url_slots(tmp_path):
    (tmp_path / "img.png").write_bytes(_png())
    docs = [(["Hello.", None, "World."], [None, "img.png", None]),
            ([None, "Only text after a web image."], ["http://example.com/x.jpg", None])]
    path = interleaved.write_obelics(docs, tmp_path / "docs.parquet")
    stats = DataStats()
    entries = interleaved.index_obelics(path)
    first = interleaved.load_obelics(entries[0], stats)
    assert [type(s).__name__ for s in first.segments] == ["Text", "ImageRef", "Text"]
    second = interleaved.load_obelics(entries[1], stats, url_map=None)
    assert [type(s).__name__ for s in second.segments] == ["Text"]
    assert stats.skipped_by_source() == {"interleaved": 1}
    mapped = interleaved.load_obelics(entries[1], url_map={"http://example.com/x.jpg": str(tmp_path / "img.png")})
    assert isinstance(mapped.segments[0], ImageRef)


def test_obelics_malformed_row(tmp_path):
    path = interleaved.write_obelics([(["a", "b"], [None, "x.png"])], tmp_path / "d.parquet")
    with pytest.raises(RecordError, match=r"position 1 must hold exactly one of text or image"):
        interleaved.load_obelics(interleaved.index_obelics(path)[0])


def test_mmc4_shared_sample_maps_or_drops_every_slot(shared, tmp_path):
    path = next((shared / "mmc4_shard151_partial").glob("*.jsonl"))
    stats = DataStats()
    docs = list(interleaved.iter_mmc4(path, stats=stats))
    assert len(docs) == 107
    assert stats.skipped_by_source()["interleaved"] == 417  # every slot is a URL with no local file
    # Map the first document's URLs to a local image: its slots come back, before their sentences.
    first = json.loads(path.read_text().splitlines()[0])
    (tmp_path / "local.png").write_bytes(_png())
    url_map = {info["raw_url"]: str(tmp_path / "local.png") for info in first["image_info"]}
    doc = interleaved.load_mmc4(interleaved.index_mmc4(path)[0], url_map=url_map)
    assert doc.num_images == len(first["image_info"])


def test_text_formats(tmp_path):
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "one"}\nnot json\n{"txt": "wrong key"}\n{"text": "two"}\n')
    stats = DataStats()
    assert [t for _, t in text.read_texts(j, stats)] == ["one", "two"]
    assert stats.skipped_by_source() == {"text": 2}
    plain = tmp_path / "t.txt"
    plain.write_text("para one\nline two\n\n\npara two\n")
    assert [t for _, t in text.read_texts(plain)] == ["para one\nline two", "para two"]


def test_wikitext_reads_as_documents(shared):
    docs = text.read_texts(shared / "wikitext2_tokenized" / "valid.txt")
    assert len(docs) > 100 and "Homarus gammarus" in docs[1][1] + docs[0][1]


def test_llava_conversations_put_loss_on_answers_only(tmp_path):
    recs = [{"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "Circle."}]},
        {"id": "bad", "conversations": [{"from": "gpt", "value": "answer first"}]},
        {"id": "mismatch", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> one marker"}, {"from": "gpt", "value": "x"}]}]
    stats = DataStats()
    samples = llava.read_llava(llava.write_llava(recs, tmp_path / "c.json"), tmp_path, stats)
    assert len(samples) == 1 and stats.skipped_by_source() == {"sft": 2}
    segs = samples[0].segments
    assert [s.text for s in segs if isinstance(s, Text) and s.loss] == ["Red.<|end|>", "Circle.<|end|>"]
    assert isinstance(segs[1], ImageRef)
    assert all(not s.loss for s in segs if isinstance(s, Text) and "colour" in s.text)


def test_coco_captions_from_shared(shared):
    root = shared / "coco_mini"
    items = coco.read_coco_captions(root / "annotations" / "captions_val2017_full5000.json", root / "val2017")
    assert len(items) == 159 and all(len(i.captions) >= 5 for i in items)
    assert all(Path(i.image).exists() for i in items)
    joined = coco.read_caption_jsonl(root / "captions_all.jsonl")
    assert len(joined) == 239


def test_tuxpaint_captions_decode_every_mode(shared):
    from mm1.data.images import load_image

    items = coco.read_caption_jsonl(shared / "tuxpaint_stamps" / "captions.jsonl")
    assert len(items) == 785
    modes = set()
    for item in items[::5]:
        with Image.open(item.image) as raw:
            modes.add(raw.mode)
        assert load_image(item.image).mode == "RGB"
    assert {"RGBA", "LA", "P"} <= modes
