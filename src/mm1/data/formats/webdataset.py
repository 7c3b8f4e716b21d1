"""Image-text pairs as WebDataset tar shards in img2dataset's layout.

A shard `00000.tar` holds, per sample `KEY`: `KEY.jpg` (or `.png`, `.webp`), `KEY.txt` (the
caption) and optionally `KEY.json` (metadata). Files of one sample are grouped by the part of the
basename before the first dot, as WebDataset does. Opening a shard indexes its member offsets
(headers only), so a record is read by random access and its image stays a byte range in the
shard until the loader decodes it.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mm1.data.errors import RecordError
from mm1.data.formats.base import Reader
from mm1.data.records import CaptionRecord, ImageRef

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class Member:
    """Where one member's bytes lie inside a tar shard."""
    offset: int
    size: int


def write_shards(
    records: Iterable[tuple[str, bytes, str, str, dict | None]], out_dir: Path, *, per_shard: int = 1000
) -> list[Path]:
    """Write (key, image bytes, image extension, caption, metadata) records into numbered shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    it = iter(records)
    while shard := list(itertools.islice(it, per_shard)):
        paths.append(out_dir / f"{len(paths):05d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for key, image, ext, caption, meta in shard:
                files = {ext: image, "txt": caption.encode()}
                if meta is not None:
                    files["json"] = json.dumps(meta).encode()
                for suffix, payload in files.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return paths


def _tail(path: Path, at: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(at)
        return f.read(1024)


class WebDatasetShard(Reader):
    """One tar shard; a shard damaged in the middle keeps the samples before the damage."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        groups: dict[str, dict[str, Member]] = {}
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with tarfile.open(path, "r") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    prefix = m.name[: len(m.name) - len(base)]
                    if m.offset_data + m.size > size:  # cut off: tarfile lists it, its bytes are gone
                        groups.pop(prefix + key, None)  # the sample it belongs to is incomplete
                        self.problems.append(RecordError(str(path), "shard truncated",
                                                         f"after {len(groups)} samples"))
                        break
                    groups.setdefault(prefix + key, {})[ext.lower()] = Member(m.offset_data, m.size)
                end = tar.offset  # a whole archive ends in two zero blocks; tarfile stops quietly without them
            if not self.problems and _tail(self.path, end) != bytes(1024) and groups:
                groups.popitem()  # the sample at the cut may have lost some of its files
                self.problems.append(RecordError(str(path), "shard truncated", f"after {len(groups)} samples"))
        except (tarfile.TarError, OSError, EOFError) as err:
            self.problems.append(RecordError(str(path), "shard damaged",
                                             f"{type(err).__name__} after {len(groups)} samples"))
        self.keys = list(groups)
        self.members = list(groups.values())

    def __len__(self) -> int:
        return len(self.keys)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.keys[i]}"

    def _read(self, where: str, member: Member) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
        if len(data) != member.size:
            raise RecordError(where, "member truncated", f"{len(data)} of {member.size} bytes")
        return data

    def read(self, i: int) -> CaptionRecord:
        files, where = self.members[i], self.where(i)
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        if image_ext is None:
            raise RecordError(where, f"no image file ({', '.join(IMAGE_EXTS)})")
        if "txt" not in files:
            raise RecordError(where, "no .txt caption")
        caption = self._read(where, files["txt"]).decode("utf-8", errors="replace").strip()
        if not caption:
            raise RecordError(where, "empty caption")
        m = files[image_ext]
        return CaptionRecord(ImageRef(str(self.path), m.offset, m.size), caption)
