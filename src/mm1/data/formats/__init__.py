"""Readers of the data formats mm1 trains on, one class per format behind `formats.base.Reader`.

`open_reader(kind, path)` picks the reader by source kind and file suffix.
"""

from __future__ import annotations

from pathlib import Path

from mm1.config import SourceKind
from mm1.data.errors import RecordError
from mm1.data.formats.base import Reader
from mm1.data.formats.coco import CaptionJsonl, CocoCaptionsJson
from mm1.data.formats.interleaved import Mmc4Jsonl, ObelicsParquet
from mm1.data.formats.llava import LlavaJson
from mm1.data.formats.text import open_text
from mm1.data.formats.webdataset import WebDatasetShard


def open_reader(kind: SourceKind, path: Path, images_dir: Path | None = None) -> Reader:
    """The reader for one file of a source of `kind`; RecordError for a suffix the kind cannot read."""
    suffix = path.suffix.lower()
    if kind == SourceKind.CAPTION:
        if suffix == ".tar":
            return WebDatasetShard(path)
        if suffix == ".jsonl":
            return CaptionJsonl(path)
        if suffix == ".json":
            return CocoCaptionsJson(path, images_dir)
    elif kind == SourceKind.INTERLEAVED:
        if suffix == ".parquet":
            return ObelicsParquet(path)
        if suffix == ".jsonl":
            return Mmc4Jsonl(path, images_dir)
    elif kind == SourceKind.TEXT:
        return open_text(path)
    elif kind == SourceKind.CONVERSATION and suffix == ".json":
        return LlavaJson(path, images_dir)
    expected = {SourceKind.CAPTION: ".tar, .jsonl or COCO .json", SourceKind.INTERLEAVED: ".parquet or .jsonl",
                SourceKind.CONVERSATION: ".json"}[kind]
    raise RecordError(str(path), f"a {kind.value} source reads {expected} files", f"got '{suffix}'")


__all__ = ["Reader", "open_reader"]
