"""COCO caption annotations (`captions_*.json`): images with several reference captions each.

Also reads the one-record-per-line caption jsonl used by `../shared/data` and by our own custom
tasks: `{"image": "path", "caption": "..."}` or `{"image": "path", "captions": [...]}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mm1.data.sample import RecordError


@dataclass(frozen=True)
class CaptionedImage:
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
        raise RecordError(f"{annotations}: not a COCO captions file ({type(err).__name__}: {err})") from None
    present = {p.name for p in image_dir.iterdir()} if only_present and image_dir.exists() else None
    return [CaptionedImage(str(image_dir / files[i]), tuple(c), str(i)) for i, c in sorted(caps.items())
            if i in files and (present is None or files[i] in present)]


def read_caption_jsonl(path: Path, base: Path | None = None) -> list[CaptionedImage]:
    base = base or path.parent
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            caps = rec.get("captions") or [rec["caption"]]
            out.append(CaptionedImage(str(base / rec["image"]), tuple(str(c).strip() for c in caps),
                                      str(rec.get("key", rec.get("image_id", n)))))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise RecordError(f"{path}:line{n}: malformed caption record ({type(err).__name__})") from None
    return out
