"""Interleaved image-text documents: OBELICS-style parquet and mmc4 jsonl.

- OBELICS parquet: one document per row, columns `texts` and `images`, two lists of equal length
  in reading order; at each position exactly one of them is non-null. An image entry is a path
  relative to the parquet file's folder (or absolute).
- mmc4 jsonl: `text_list` (sentences) and `image_info` (`image_name`, `raw_url`,
  `matched_text_index`); each image is placed before the sentence it was matched to, as
  OpenFlamingo does, and looked up as `<images>/<image_name>` (`images/` beside the file).

An image slot that does not resolve to a local file (a bare URL: download the images first, e.g.
with img2dataset) is left out of its document and counted; a document with no text is a
`RecordError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mm1.data.errors import RecordError
from mm1.data.formats.base import LineFile, ParquetRows, Reader
from mm1.data.records import DocumentRecord, ImageRef, local_path

UNRESOLVED = "image slot not resolvable to a local file"


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


def _document(parts: list[str | ImageRef], dropped: list[RecordError], where: str) -> DocumentRecord:
    if not any(isinstance(p, str) and p.strip() for p in parts):
        raise RecordError(where, "document has no text")
    return DocumentRecord(tuple(parts), tuple(dropped))


class ObelicsParquet(Reader):
    """OBELICS-style interleaved documents: parquet rows of parallel `texts` and `images` lists."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.rows = ParquetRows(self.path, ["texts", "images"])

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        return f"{self.path}:row{i}"

    def read(self, i: int) -> DocumentRecord:
        row, where = self.rows.row(i), self.where(i)
        texts, images = row["texts"], row["images"]
        if texts is None or images is None or len(texts) != len(images):
            raise RecordError(where, "texts and images must be lists of equal length")
        parts: list[str | ImageRef] = []
        dropped: list[RecordError] = []
        for pos, (t, img) in enumerate(zip(texts, images, strict=True)):
            if (t is None) == (img is None):
                raise RecordError(where, "a position must hold exactly one of text or image", f"position {pos}")
            if t is not None:
                parts.append(t)
            elif img.startswith(("http://", "https://")):
                dropped.append(RecordError(f"{where}[{pos}]", UNRESOLVED))
            else:
                parts.append(ImageRef(local_path(img, self.path.parent)))
        return _document(parts, dropped, where)


class Mmc4Jsonl(Reader):
    """MMC4-style interleaved documents: one JSON object per line, images placed by sentence index."""

    def __init__(self, path: Path, images_dir: Path | None = None) -> None:
        super().__init__(path)
        self.lines = LineFile(self.path)
        self.images_dir = images_dir or self.path.parent / "images"

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, i: int) -> str:
        return self.lines.where(i)

    def read(self, i: int) -> DocumentRecord:
        where = self.where(i)
        try:
            doc = json.loads(self.lines.line(i))
            sentences = [str(s) for s in doc["text_list"]]
            infos = list(doc.get("image_info") or [])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RecordError(where, "malformed mmc4 record", f"{type(err).__name__}: {err}") from None
        before: dict[int, list[ImageRef]] = {}
        dropped: list[RecordError] = []
        for k, info in enumerate(infos):
            name = info.get("image_name") if isinstance(info, dict) else None
            idx = info.get("matched_text_index") if isinstance(info, dict) else None
            path = self.images_dir / name if name else None
            if path is None or not path.exists() or not isinstance(idx, int) or not 0 <= idx < len(sentences):
                dropped.append(RecordError(f"{where}:image{k}", UNRESOLVED))
                continue
            before.setdefault(idx, []).append(ImageRef(str(path)))
        parts: list[str | ImageRef] = []
        for i_s, sentence in enumerate(sentences):
            parts.extend(before.get(i_s, []))
            parts.append(sentence + (" " if i_s + 1 < len(sentences) else ""))
        return _document(parts, dropped, where)
