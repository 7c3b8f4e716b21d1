"""Real data formats: written and read back as typed records; bad records raise with where and why."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mm1.config import SourceKind
from mm1.data.errors import ImageError, RecordError
from mm1.data.formats import coco, interleaved, llava, open_reader, text, webdataset
from mm1.data.records import CaptionRecord, DocumentRecord, ImageRef, Role, TextRecord


def _png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _read_all(reader):
    """(records, errors) of every record of a reader."""
    records, errors = [], []
    for i in range(len(reader)):
        try:
            records.append(reader.read(i))
        except RecordError as err:
            errors.append(err)
    return records, errors


def test_webdataset_roundtrip_keeps_images_as_byte_ranges(tmp_path):
    recs = [(f"{i:04d}", _png(), "png", f"caption {i}", {"i": i}) for i in range(5)]
    paths = webdataset.write_shards(recs, tmp_path, per_shard=2)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    records = [r for p in paths for r in _read_all(open_reader(SourceKind.CAPTION, p))[0]]
    assert [r.caption for r in records] == [f"caption {i}" for i in range(5)]
    assert isinstance(records[0], CaptionRecord) and records[0].image.size > 0
    assert records[0].image.load().size == (8, 8)


def test_webdataset_bad_records_carry_where_and_reason(tmp_path):
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in [("a.png", _png()), ("a.txt", b"fine"), ("b.txt", b"no image"),
                              ("c.png", _png()), ("c.txt", b""), ("d.jpg", b""), ("d.txt", b"zero-byte image"),
                              ("e.png", b"garbage"), ("e.txt", b"corrupt image")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    records, errors = _read_all(webdataset.WebDatasetShard(shard))
    assert [r.caption for r in records] == ["fine", "zero-byte image", "corrupt image"]
    no_image = "no image file (jpg, jpeg, png, webp, bmp, gif, tif, tiff)"
    assert [(e.where, e.reason) for e in errors] == [(f"{shard}:b", no_image), (f"{shard}:c", "empty caption")]
    for r in records[1:]:  # images are decoded lazily; both fail with where they came from
        with pytest.raises(ImageError, match=str(shard)):
            r.image.load()


def test_truncated_shard_keeps_samples_before_the_damage(tmp_path):
    paths = webdataset.write_shards([(f"{i}", _png(), "png", "c", None) for i in range(20)], tmp_path)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2 + 100])
    reader = webdataset.WebDatasetShard(paths[0])
    assert 0 < len(reader) < 20
    assert [p.reason for p in reader.problems] in (["shard truncated"], ["shard damaged"])
    records, errors = _read_all(reader)
    assert not errors and all(r.image.load().size == (8, 8) for r in records)  # what is kept is whole


def test_obelics_parquet_roundtrip_and_url_slots(tmp_path):
    (tmp_path / "img.png").write_bytes(_png())
    docs = [(["Hello.", None, "World."], [None, "img.png", None]),
            ([None, "Only text after a web image."], ["http://example.com/x.jpg", None])]
    reader = open_reader(SourceKind.INTERLEAVED, interleaved.write_obelics(docs, tmp_path / "docs.parquet"))
    first, second = reader.read(0), reader.read(1)
    assert isinstance(first, DocumentRecord)
    assert [type(p).__name__ for p in first.parts] == ["str", "ImageRef", "str"]
    assert first.parts[1].load().size == (8, 8)
    assert second.parts == ("Only text after a web image.",)
    assert [(e.where, e.reason) for e in second.dropped] == [(f"{reader.path}:row1[0]", interleaved.UNRESOLVED)]


def test_obelics_malformed_row(tmp_path):
    path = interleaved.write_obelics([(["a", "b"], [None, "x.png"])], tmp_path / "d.parquet")
    with pytest.raises(RecordError, match=r"a position must hold exactly one of text or image \(position 1\)"):
        interleaved.ObelicsParquet(path).read(0)


def test_parquet_without_the_columns_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(RecordError, match=r"parquet file lacks a needed column \(texts, images\)"):
        interleaved.ObelicsParquet(tmp_path / "t.parquet")


def test_mmc4_shared_sample_drops_every_unresolvable_slot(shared, tmp_path):
    path = next((shared / "mmc4_shard151_partial").glob("*.jsonl"))
    records, errors = _read_all(interleaved.Mmc4Jsonl(path))
    assert len(records) == 107 and not errors
    assert sum(len(r.dropped) for r in records) == 417  # every slot is a URL with no local file
    # With the first document's images downloaded beside it, its slots come back before their sentences.
    first = json.loads(path.read_text().splitlines()[0])
    (tmp_path / "images").mkdir()
    for info in first["image_info"]:
        (tmp_path / "images" / info["image_name"]).write_bytes(_png())
    local = tmp_path / "doc.jsonl"
    local.write_text(path.read_text().splitlines()[0] + "\n")
    doc = interleaved.Mmc4Jsonl(local).read(0)
    assert sum(isinstance(p, ImageRef) for p in doc.parts) == len(first["image_info"]) and not doc.dropped
    k = doc.parts.index(next(p for p in doc.parts if isinstance(p, ImageRef)))
    first_matched = min(info["matched_text_index"] for info in first["image_info"])
    following = next(p for p in doc.parts[k:] if isinstance(p, str))
    assert following.startswith(first["text_list"][first_matched][:20])


def test_text_formats(tmp_path):
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "one"}\nnot json\n\n{"txt": "wrong key"}\n{"text": "two"}\n')
    records, errors = _read_all(text.TextJsonl(j))
    assert [r.text for r in records] == ["one", "two"]
    assert [(e.where, e.reason.split(" (")[0]) for e in errors] == [(f"{j}:line2", "malformed jsonl line"),
                                                                    (f"{j}:line4", "malformed jsonl line")]
    plain = tmp_path / "t.txt"
    plain.write_text("para one\nline two\n\n\npara two\n")
    assert [r.text for r in _read_all(text.TextBlocks(plain))[0]] == ["para one\nline two", "para two"]


def test_wikitext_reads_as_documents(shared):
    reader = text.open_text(shared / "wikitext2_tokenized" / "valid.txt")
    first = [reader.read(i) for i in range(2)]
    assert len(reader) > 100 and all(isinstance(r, TextRecord) for r in first)
    assert "Homarus gammarus" in first[0].text + first[1].text


def test_llava_conversations_turns_and_image_placement(tmp_path):
    recs = [{"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "A <image> tag is text here."}]},
        {"id": "nomarker", "image": ["p.png", "q.png"], "conversations": [
            {"from": "human", "value": "Compare them."}, {"from": "gpt", "value": "Same."}]},
        {"id": "textonly", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "bad", "conversations": [{"from": "gpt", "value": "answer first"}]},
        {"id": "mismatch", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> one marker"}, {"from": "gpt", "value": "x"}]}]
    reader = llava.LlavaJson(llava.write_llava(recs, tmp_path / "c.json"))
    records, errors = _read_all(reader)
    assert [e.where.rsplit(":", 1)[-1] for e in errors] == ["bad", "mismatch"]
    assert errors[1].reason == "<image> markers do not match the images" and errors[1].detail == "1 markers, 2 images"
    first, nomarker, textonly = records
    assert [t.role for t in first.turns] == [Role.USER, Role.ASSISTANT, Role.USER, Role.ASSISTANT]
    assert isinstance(first.turns[0].parts[0], ImageRef) and first.turns[0].parts[1] == "What colour?"
    assert first.turns[3].parts == ("A <image> tag is text here.",)  # a marker in an answer is text
    assert [type(p).__name__ for p in nomarker.turns[0].parts] == ["ImageRef", "ImageRef", "str"]  # images first
    assert textonly.turns[0].parts == ("Hi",)


def test_coco_captions_from_shared(shared):
    root = shared / "coco_mini"
    items = coco.read_coco_captions(root / "annotations" / "captions_val2017_full5000.json", root / "val2017")
    assert len(items) == 159 and all(len(i.captions) >= 5 for i in items)
    assert all(Path(i.image).exists() for i in items)
    joined = coco.read_caption_jsonl(root / "captions_all.jsonl")
    assert len(joined) == 239
    records, errors = _read_all(open_reader(SourceKind.CAPTION, root / "captions_all.jsonl"))
    assert len(records) == 239 and not errors and records[0].image.load().mode == "RGB"


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


def test_a_kind_refuses_files_it_cannot_read(tmp_path):
    with pytest.raises(RecordError, match=r"a caption source reads .tar, .jsonl or COCO .json files \(got '.txt'\)"):
        open_reader(SourceKind.CAPTION, tmp_path / "x.txt")


def test_coco_captions_json_is_a_caption_source(shared, tmp_path):
    reader = open_reader(SourceKind.CAPTION, shared / "coco_mini" / "annotations" / "captions_train2017.json")
    assert len(reader) == 400  # 80 photos × 5 captions, images from ../train2017 beside the annotations
    first = reader.read(0)
    assert first.caption and first.image.load().mode == "RGB"
    # an annotation whose image file is absent is left out; an images folder can be named
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(Path(first.image.path).read_bytes())
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "missing.jpg"}],
           "annotations": [{"image_id": 1, "caption": " A cat. "}, {"image_id": 2, "caption": "A dog."}]}
    (tmp_path / "captions_x.json").write_text(json.dumps(ann))
    reader = open_reader(SourceKind.CAPTION, tmp_path / "captions_x.json", tmp_path / "imgs")
    assert len(reader) == 1 and reader.read(0).caption == "A cat."
    (tmp_path / "captions_bad.json").write_text("{")
    with pytest.raises(RecordError, match="not a COCO captions file"):
        open_reader(SourceKind.CAPTION, tmp_path / "captions_bad.json", tmp_path / "imgs")
