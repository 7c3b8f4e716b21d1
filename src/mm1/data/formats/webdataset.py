"""Image-text pairs as WebDataset tar shards in img2dataset's layout.

A shard `00000.tar` holds, per sample `KEY`: `KEY.jpg` (or `.png`, `.webp`), `KEY.txt` (the
caption) and optionally `KEY.json` (metadata). Files of one sample are grouped by the part of the
basename before the first dot, as WebDataset does. We read shards with the standard library's
`tarfile` and index member offsets once, so a sample can be fetched by random access (which the
exactly-reproducible stream needs) without unpacking the shard.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mm1.data.sample import ImageRef, RecordError, Sample, Source, Text
from mm1.data.stats import DataStats

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


@dataclass(frozen=True)
class WdsEntry:
    shard: str
    key: str
    files: dict[str, Member]  # extension → location in the shard


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


def index_shard(path: Path, stats: DataStats | None = None) -> list[WdsEntry]:
    """Member offsets grouped by sample key; a truncated shard keeps the samples before the damage."""
    groups: dict[str, dict[str, Member]] = {}
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
                groups.setdefault(prefix + key, {})[ext.lower()] = Member(m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as err:
        if stats is None:
            raise RecordError(f"{path}: unreadable tar shard ({err})") from None
        stats.skip("caption", str(path), f"shard damaged after {len(groups)} samples ({type(err).__name__})")
    return [WdsEntry(str(path), key, files) for key, files in groups.items()]


def _read(shard: str, member: Member) -> bytes:
    with open(shard, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise RecordError(f"{shard}: member truncated ({len(data)} of {member.size} bytes)")
    return data


def load_entry(entry: WdsEntry) -> Sample:
    """Entry → caption sample [image, caption]; RecordError for a sample without image or caption."""
    where = f"{entry.shard}:{entry.key}"
    image_ext = next((e for e in IMAGE_EXTS if e in entry.files), None)
    if image_ext is None:
        raise RecordError(f"{where}: no image file ({', '.join(IMAGE_EXTS)})")
    if "txt" not in entry.files:
        raise RecordError(f"{where}: no .txt caption")
    caption = _read(entry.shard, entry.files["txt"]).decode("utf-8", errors="replace").strip()
    if not caption:
        raise RecordError(f"{where}: empty caption")
    image = ImageRef(where=f"{where}.{image_ext}", data=_read(entry.shard, entry.files[image_ext]))
    return Sample(Source.CAPTION, [image, Text(caption)], where=where)


def iter_samples(shards: Iterable[Path], stats: DataStats | None = None) -> Iterator[Sample]:
    stats = stats or DataStats()
    for shard in shards:
        for entry in index_shard(Path(shard), stats):
            try:
                yield load_entry(entry)
            except RecordError as err:
                stats.skip("caption", f"{entry.shard}:{entry.key}", str(err).split(": ", 1)[-1])
