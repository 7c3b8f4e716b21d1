"""Text-only documents: jsonl (`{"text": ...}` per line), parquet (a `text` column) or plain text.

A plain `.txt` file holds one document per block of lines, blocks separated by blank lines.
A malformed line or an empty text is a `RecordError` naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from mm1.data.errors import RecordError
from mm1.data.formats.base import LineFile, ParquetRows, Reader
from mm1.data.records import TextRecord


def write_jsonl(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def _checked(text: object, where: str) -> TextRecord:
    if not isinstance(text, str) or not text.strip():
        raise RecordError(where, "empty or non-string text")
    return TextRecord(text)


class TextJsonl(Reader):
    """Text-only documents as JSON lines with a `text` field."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lines = LineFile(self.path)

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, i: int) -> str:
        return self.lines.where(i)

    def read(self, i: int) -> TextRecord:
        try:
            text = json.loads(self.lines.line(i))["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RecordError(self.where(i), "malformed jsonl line (need an object with a 'text' field)") from None
        return _checked(text, self.where(i))


class TextParquet(Reader):
    """Text-only documents as parquet rows with a `text` column."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.rows = ParquetRows(self.path, ["text"])

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        return f"{self.path}:row{i}"

    def read(self, i: int) -> TextRecord:
        return _checked(self.rows.row(i)["text"], self.where(i))


class TextBlocks(Reader):
    """Plain text: blocks of lines separated by blank lines (WikiText, books)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.lines = LineFile(self.path)
        gaps = self.lines.numbers[1:] - self.lines.numbers[:-1] > 1  # a blank line between two lines
        self.block_starts = [0, *(i + 1 for i in range(len(gaps)) if gaps[i])]
        self.block_ends = [*self.block_starts[1:], len(self.lines)]
        if not len(self.lines):
            self.block_starts, self.block_ends = [], []

    def __len__(self) -> int:
        return len(self.block_starts)

    def where(self, i: int) -> str:
        return self.lines.where(self.block_starts[i])

    def read(self, i: int) -> TextRecord:
        text = "\n".join(self.lines.line(k).rstrip("\r") for k in range(self.block_starts[i], self.block_ends[i]))
        return _checked(text, self.where(i))


def open_text(path: Path) -> Reader:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return TextParquet(path)
    if suffix in (".jsonl", ".json"):
        return TextJsonl(path)
    return TextBlocks(path)
