"""`mm1 data dedup`: planted near-duplicates and duplicate images are found, distinct records kept, and
`prepare` with data.prepare.dedup=true leaves out exactly those."""

from __future__ import annotations

import json

from PIL import Image

from mm1.cli import main
from mm1.config import SourceKind, apply_overrides
from mm1.data.dedup import DedupSettings, dedup_source

TEXTS = [
    "the red circle sat beside a blue square on the gray floor of the quiet room all afternoon while the "
    "children drew stars and kites on long sheets of paper by the window",
    "a small green star was drawn on the wall next to the word kite in large black letters",
    # a near-duplicate of the first: one word changed
    "the red circle sat beside a blue square on the gray floor of the quiet room all afternoon while the "
    "children drew stars and kites on long sheets of paper by the door",
    "yellow and blue paint mix into green when the painter stirs them slowly in a white bowl",
    # a near-duplicate of the second: one word changed, one added
    "a small green star was drawn on the wall next to the word kite in large black letters today",
    "counting shapes is easier when they do not overlap and the picture is sharp and bright",
]


def _write(tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    images = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (255, 0, 0)]):  # the third is the first's pixels
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        images.append(path)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": str(p), "caption": c}) + "\n" for p, c in zip(
        images, ["a red square filling the picture", "a green square filling the picture",
                 "a plain red picture with nothing else in it"], strict=True)))
    return text, captions


def test_dedup_finds_planted_near_duplicates_and_duplicate_images_and_keeps_the_rest(tmp_path):
    text, captions = _write(tmp_path)
    found = dedup_source("text", SourceKind.TEXT, (str(text),), "", DedupSettings(), progress=False)
    assert found.drop == {0: [2, 4]} and found.near_duplicates == 2 and found.records == 6
    again = dedup_source("text", SourceKind.TEXT, (str(text),), "", DedupSettings(), progress=False)
    assert again.drop == found.drop  # deterministic
    images = dedup_source("caption", SourceKind.CAPTION, (str(captions),), "", DedupSettings(), progress=False)
    assert images.drop == {0: [2]} and images.image_duplicates == 1 and images.near_duplicates == 0
    # the same caption on another picture is not a duplicate, unless captions are asked to count
    blue = tmp_path / "blue.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(blue)
    lines = captions.read_text().splitlines()
    same_caption = {"image": str(blue), "caption": json.loads(lines[0])["caption"]}
    captions.write_text("\n".join([*lines, json.dumps(same_caption)]) + "\n")
    again = dedup_source("caption", SourceKind.CAPTION, (str(captions),), "", DedupSettings(), progress=False)
    assert again.drop == {0: [2]}
    text_too = dedup_source("caption", SourceKind.CAPTION, (str(captions),), "",
                            DedupSettings(caption_text=True), progress=False)
    assert text_too.drop == {0: [2, 3]} and text_too.near_duplicates == 1


def test_prepare_leaves_out_what_dedup_found(tmp_path, world, capsys):
    from mm1.config import save
    from mm1.data.prepare import prepare
    from mm1.data.stream import load_tokenizer
    from mm1.recipes import get_recipe

    text, _ = _write(tmp_path)
    overrides = [f"data.root={world}", "data.sources.caption.weight=0", "data.sources.interleaved.weight=0",
                 f"data.sources.text.paths={text}", "data.prepare.workers=1", "data.packing.seq_len=64"]
    cfg = apply_overrides(get_recipe("tiny"), overrides)
    save(cfg, tmp_path / "cfg.json")
    assert main(["data", "dedup", "--config", str(tmp_path / "cfg.json"), "data.root=" + str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "text: 6 records, 2 near-duplicates, 0 duplicate images" in out and "records/s" in out
    tok = load_tokenizer(cfg)
    plain = prepare(apply_overrides(get_recipe("tiny"), [*overrides, f"data.root={tmp_path}",
                                                         f"data.tokenizer={world}/tokenizer.json"]),
                    cfg.train.stage, tok, progress=False)
    deduped = prepare(apply_overrides(get_recipe("tiny"), [*overrides, f"data.root={tmp_path}",
                                                           f"data.tokenizer={world}/tokenizer.json",
                                                           "data.prepare.dedup=true"]),
                      cfg.train.stage, tok, progress=False)
    used = lambda s: s["sources"]["text"]["records"]["used"]  # noqa: E731
    assert used(plain) == 6 and used(deduped) == 4
    assert deduped["sources"]["text"]["skipped"] == {"duplicate (mm1 data dedup)": 2}
