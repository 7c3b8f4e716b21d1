"""Supervised fine-tuning conversations in the LLaVA format, with an image folder.

A json file holds a list of records: `{"id": ..., "image": "a.png" | ["a.png", "b.png"],
"conversations": [{"from": "human", "value": "<image>\\nWhat colour is ...?"}, {"from": "gpt",
"value": "Red."}, ...]}`. A record without `image` is a text-only conversation. `<image>` in a
human turn is this format's marker for where an image goes; with no marker, the images go at the
start of the first human turn (the chat template's one placement rule). A marker in an answer is
ordinary text. An optional `{"from": "system"}` first turn is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from mm1.data.errors import RecordError
from mm1.data.formats.base import Reader
from mm1.data.records import ConversationRecord, ImageRef, Role, Turn, local_path

MARKER = "<image>"
ROLES = {"human": Role.USER, "user": Role.USER, "gpt": Role.ASSISTANT, "assistant": Role.ASSISTANT,
         "system": Role.SYSTEM}


def write_llava(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


def _user_parts(value: str, pending: list[ImageRef]) -> list[str | ImageRef]:
    parts: list[str | ImageRef] = []
    for k, piece in enumerate(value.split(MARKER)):
        if k > 0:
            parts.append(pending.pop(0))
        if piece.strip():
            parts.append(piece.strip("\n"))
    return parts


def parse_record(rec: object, image_dir: Path, where: str) -> ConversationRecord:
    try:
        images = rec.get("image") or []  # type: ignore[union-attr]
        images = [images] if isinstance(images, str) else [str(x) for x in images]
        turns = [(ROLES[t["from"]], str(t["value"])) for t in rec["conversations"]]  # type: ignore[index]
    except (KeyError, TypeError, AttributeError) as err:
        raise RecordError(where, "malformed LLaVA record", f"{type(err).__name__}: {err}") from None
    body = turns[1:] if turns and turns[0][0] == Role.SYSTEM else turns
    if not body or body[0][0] != Role.USER or not any(r == Role.ASSISTANT for r, _ in body):
        raise RecordError(where, "conversation must start with a human turn and contain an answer")
    refs = [ImageRef(local_path(name, image_dir)) for name in images]
    markers = sum(v.count(MARKER) for r, v in body if r == Role.USER)
    if markers not in (0, len(refs)):
        raise RecordError(where, "<image> markers do not match the images", f"{markers} markers, {len(refs)} images")
    out: list[Turn] = []
    pending = list(refs)
    for role, value in turns:
        if role != Role.USER:
            out.append(Turn(role, (value.strip(),)))
            continue
        parts = _user_parts(value, pending) if markers else [value.strip("\n")]
        if not markers and pending:  # no markers: the images open the first user turn
            parts, pending = [*pending, *parts], []
        out.append(Turn(role, tuple(parts)))
    return ConversationRecord(tuple(out))


class LlavaJson(Reader):
    """LLaVA-style conversations: one JSON list of records with `conversations` and an optional `image`."""

    def __init__(self, path: Path, images_dir: Path | None = None) -> None:
        super().__init__(path)
        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecordError(str(path), "cannot read LLaVA json", str(err)) from None
        if not isinstance(records, list):
            raise RecordError(str(path), "expected a json list of conversation records")
        self.records = records
        self.images_dir = images_dir or self.path.parent / "images"

    def __len__(self) -> int:
        return len(self.records)

    def where(self, i: int) -> str:
        rec = self.records[i]
        return f"{self.path}:{rec.get('id', i) if isinstance(rec, dict) else i}"

    def read(self, i: int) -> ConversationRecord:
        return parse_record(self.records[i], self.images_dir, self.where(i))
