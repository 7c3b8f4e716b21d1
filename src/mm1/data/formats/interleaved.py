"""Interleaved image-text documents: OBELICS-style parquet and mmc4 jsonl.

- OBELICS parquet: one document per row, columns `texts` and `images`, two lists of equal length
  in reading order; at each position exactly one of them is non-null. An image entry is a path
  relative to the parquet file's folder (or absolute), or a URL resolved through `url_map`.
- mmc4 jsonl: `text_list` (sentences) and `image_info` (`image_name`, `raw_url`,
  `matched_text_index`); each image is placed before the sentence it was matched to, as
  OpenFlamingo does. Images are looked up as `images_dir/image_name`, then through `url_map`.

An image slot that cannot be resolved to a local file is dropped from its document and counted
(mmc4's public shards carry URLs only); a document with no text left is skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mm1.data.sample import ImageRef, RecordError, Sample, Segment, Source, Text
from mm1.data.stats import DataStats


@dataclass(frozen=True)
class DocEntry:
    path: str
    row: int  # row for parquet, line number for jsonl


def write_obelics(docs: Iterable[tuple[list[str | None], list[str | None]]], path: Path) -> Path:
    """Write documents given as (texts, images) list pairs to one parquet file."""
    texts, images = [], []
    for t, i in docs:
        if len(t) != len(i):
            raise ValueError("texts and images must have the same length")
        texts.append(t)
        images.append(i)
    table = pa.table({"texts": pa.array(texts, pa.list_(pa.string())),
                      "images": pa.array(images, pa.list_(pa.string()))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@lru_cache(maxsize=4)
def _parquet_rows(path: str) -> tuple[list, list]:
    try:
        table = pq.read_table(path, columns=["texts", "images"])
    except (pa.ArrowException, OSError, KeyError) as err:
        raise RecordError(f"{path}: not an OBELICS-style parquet with texts/images columns ({err})") from None
    return table.column("texts").to_pylist(), table.column("images").to_pylist()


def index_obelics(path: Path) -> list[DocEntry]:
    texts, _ = _parquet_rows(str(path))
    return [DocEntry(str(path), i) for i in range(len(texts))]


def _resolve(ref: str, base: Path, url_map: dict[str, str] | None) -> str | None:
    if ref.startswith(("http://", "https://")):
        return url_map.get(ref) if url_map else None
    p = Path(ref) if Path(ref).is_absolute() else base / ref
    return str(p)


def load_obelics(entry: DocEntry, stats: DataStats | None = None, url_map: dict[str, str] | None = None) -> Sample:
    texts, images = _parquet_rows(entry.path)
    t_row, i_row = texts[entry.row], images[entry.row]
    where = f"{entry.path}:row{entry.row}"
    if t_row is None or i_row is None or len(t_row) != len(i_row):
        raise RecordError(f"{where}: texts and images must be lists of equal length")
    base = Path(entry.path).parent
    segments: list[Segment] = []
    for pos, (t, img) in enumerate(zip(t_row, i_row, strict=True)):
        if (t is None) == (img is None):
            raise RecordError(f"{where}: position {pos} must hold exactly one of text or image")
        if t is not None:
            segments.append(Text(t))
            continue
        local = _resolve(img, base, url_map)
        if local is None:
            if stats is not None:
                stats.skip("interleaved", f"{where}[{pos}]", "image slot not resolvable to a local file")
            continue
        segments.append(ImageRef(where=f"{where}[{pos}]", path=local))
    return _finish(segments, where)


def _finish(segments: list[Segment], where: str) -> Sample:
    if not any(isinstance(s, Text) and s.text.strip() for s in segments):
        raise RecordError(f"{where}: document has no text")
    return Sample(Source.INTERLEAVED, segments, where=where)


@lru_cache(maxsize=4)
def _jsonl_lines(path: str) -> list[str]:
    return Path(path).read_text(encoding="utf-8", errors="replace").splitlines()


def index_mmc4(path: Path) -> list[DocEntry]:
    return [DocEntry(str(path), i) for i, line in enumerate(_jsonl_lines(str(path))) if line.strip()]


def load_mmc4(entry: DocEntry, *, images_dir: Path | None = None, url_map: dict[str, str] | None = None,
              stats: DataStats | None = None) -> Sample:
    where = f"{entry.path}:line{entry.row + 1}"
    try:
        doc = json.loads(_jsonl_lines(entry.path)[entry.row])
        sentences = list(doc["text_list"])
        infos = list(doc.get("image_info", []))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RecordError(f"{where}: malformed mmc4 record ({type(err).__name__}: {err})") from None
    before: dict[int, list[ImageRef]] = {}
    for k, info in enumerate(infos):
        name, url = info.get("image_name"), info.get("raw_url")
        local = None
        if images_dir is not None and name and (images_dir / name).exists():
            local = str(images_dir / name)
        elif url_map and url in url_map:
            local = url_map[url]
        idx = info.get("matched_text_index")
        if local is None or not isinstance(idx, int) or not 0 <= idx < len(sentences):
            if stats is not None:
                stats.skip("interleaved", f"{where}:image{k}", "image slot not resolvable to a local file")
            continue
        before.setdefault(idx, []).append(ImageRef(where=f"{where}:image{k}", path=local))
    segments: list[Segment] = []
    for i, sentence in enumerate(sentences):
        segments.extend(before.get(i, []))
        segments.append(Text(str(sentence) + (" " if i + 1 < len(sentences) else "")))
    return _finish(segments, where)


def iter_mmc4(path: Path, **kw) -> Iterator[Sample]:
    stats = kw.get("stats") or DataStats()
    kw["stats"] = stats
    for entry in index_mmc4(path):
        try:
            yield load_mmc4(entry, **kw)
        except RecordError as err:
            stats.skip("interleaved", f"{entry.path}:line{entry.row + 1}", str(err).split(": ", 1)[-1])
