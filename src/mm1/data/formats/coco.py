"""COCO caption annotations (`captions_*.json`) and caption jsonl files.

`read_coco_captions` gives images with their reference captions (for evaluation). Two training
sources of image-text pairs:
- `CocoCaptionsJson`, a COCO `captions_*.json`: one record per caption (COCO has five per image),
  images read from the source's `images` folder (default: `../<split>/` beside the annotations,
  COCO's own layout); annotations whose image file is absent are left out. The file is read
  whole, as COCO's tools do (train2017's is 91 MB).
- `CaptionJsonl`, one record per line, as used by `../shared/data` and by our custom tasks:
  `{"image": "path", "caption": "..."}` or `{"image": "path", "captions": [...]}` (the first caption
  is trained on). Image paths are relative to the file's folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mm1.data.errors import RecordError
from mm1.data.formats.base import LineFile, Reader
from mm1.data.records import CaptionRecord, ImageRef, local_path


@dataclass(frozen=True)
class CaptionedImage:
    """One COCO image (a local path) with its reference captions."""
    image: str  # a local path
    captions: tuple[str, ...]
    key: str


def read_coco_captions(annotations: Path, image_dir: Path, *, only_present: bool = True) -> list[CaptionedImage]:
    """Images with their captions; `only_present` keeps images whose file is in `image_dir`."""
    try:
        data = json.loads(annotations.read_text())
        files = {img["id"]: img["file_name"] for img in data["images"]}
        caps: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            caps.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise RecordError(str(annotations), "not a COCO captions file", f"{type(err).__name__}: {err}") from None
    present = {p.name for p in image_dir.iterdir()} if only_present and image_dir.exists() else None
    return [CaptionedImage(str(image_dir / files[i]), tuple(c), str(i)) for i, c in sorted(caps.items())
            if i in files and (present is None or files[i] in present)]


def parse_caption_line(line: str, base: Path, where: str) -> CaptionedImage:
    try:
        rec = json.loads(line)
        caps = rec.get("captions") or [rec["caption"]]
        captions = tuple(str(c).strip() for c in caps)
        return CaptionedImage(local_path(str(rec["image"]), base), captions, str(rec.get("key", where)))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise RecordError(where, "malformed caption record", f"{type(err).__name__}: {err}") from None


def read_caption_jsonl(path: Path, base: Path | None = None) -> list[CaptionedImage]:
    """Every row of a caption jsonl file (evaluation); a malformed row raises RecordError."""
    lines = LineFile(path)
    return [parse_caption_line(lines.line(i), base or path.parent, lines.where(i)) for i in range(len(lines))]


class CaptionJsonl(Reader):
    """A caption jsonl file as a training source of image-text pairs."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lines = LineFile(self.path)

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, i: int) -> str:
        return self.lines.where(i)

    def read(self, i: int) -> CaptionRecord:
        item = parse_caption_line(self.lines.line(i), self.path.parent, self.where(i))
        if not item.captions or not item.captions[0]:
            raise RecordError(self.where(i), "empty caption")
        return CaptionRecord(ImageRef(item.image), item.captions[0])


class CocoCaptionsJson(Reader):
    """A COCO captions json as a training source: record i is the i-th (image, caption) pair."""

    def __init__(self, path: Path, images_dir: Path | None = None) -> None:
        super().__init__(path)
        split = self.path.stem.removeprefix("captions_")
        self.images_dir = images_dir or self.path.parent.parent / split
        self.pairs = [(item.image, c) for item in read_coco_captions(self.path, self.images_dir) for c in item.captions]

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, i: int) -> CaptionRecord:
        image, caption = self.pairs[i]
        if not caption:
            raise RecordError(self.where(i), "empty caption")
        return CaptionRecord(ImageRef(image), caption)
