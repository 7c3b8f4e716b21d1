"""Supervised fine-tuning conversations in the LLaVA format, with an image folder.

A json file holds a list of records: `{"id": ..., "image": "a.png" | ["a.png", "b.png"],
"conversations": [{"from": "human", "value": "<image>\\nWhat colour is ...?"}, {"from": "gpt",
"value": "Red."}, ...]}`. `<image>` in a human turn marks where an image goes; images without a
marker go before the first human turn. Loss is only on the assistant's answers (and their end
token), never on user turns or images.
"""

from __future__ import annotations

import json
from pathlib import Path

from mm1.data.sample import ImageRef, RecordError, Sample, Segment, Source, Text
from mm1.data.stats import DataStats
from mm1.data.tokenizer import ASSISTANT, END, IMAGE, USER

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def write_llava(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


def parse_record(rec: dict, image_dir: Path, where: str) -> Sample:
    try:
        images = rec.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        turns = [(ROLES[t["from"]], str(t["value"])) for t in rec["conversations"]]
    except (KeyError, TypeError, AttributeError) as err:
        raise RecordError(f"{where}: malformed LLaVA record ({type(err).__name__}: {err})") from None
    if not turns or turns[0][0] != "user" or not any(r == "assistant" for r, _ in turns):
        raise RecordError(f"{where}: conversation must start with a human turn and contain an answer")
    refs = [ImageRef(where=f"{where}:{name}", path=str(image_dir / name)) for name in images]
    markers = sum(v.count(IMAGE) for r, v in turns if r == "user")
    if markers not in (0, len(refs)):
        raise RecordError(f"{where}: {markers} <image> markers for {len(refs)} images")
    segments: list[Segment] = []
    pending = list(refs)
    if markers == 0:
        segments.extend(pending)
        pending = []
    for role, value in turns:
        if role == "assistant":
            segments.append(Text(f"{value.strip()}{END}", loss=True))
            continue
        parts = value.split(IMAGE)
        segments.append(Text(USER, loss=False))
        for k, part in enumerate(parts):
            if k > 0:
                segments.append(pending.pop(0))
            if part.strip():
                segments.append(Text(part.strip("\n"), loss=False))
        segments.append(Text(f"{END}{ASSISTANT}", loss=False))
    return Sample(Source.SFT, segments, where=where)


def read_llava(path: Path, image_dir: Path | None = None, stats: DataStats | None = None) -> list[Sample]:
    stats = stats or DataStats()
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RecordError(f"{path}: cannot read LLaVA json ({err})") from None
    if not isinstance(records, list):
        raise RecordError(f"{path}: expected a json list of conversation records")
    out = []
    for i, rec in enumerate(records):
        where = f"{path}:{rec.get('id', i) if isinstance(rec, dict) else i}"
        try:
            out.append(parse_record(rec, image_dir or path.parent, where))
        except RecordError as err:
            stats.skip("sft", where, str(err).split(": ", 1)[-1])
    return out
