"""The protocol every data format implements: open a file, its length, read record i.

`mm1 data prepare` and the tokenizer trainer only ever see `Reader`s: `len(reader)` records, and
`reader.read(i)` returning a typed record (`mm1.data.records`) or raising `RecordError` with where
and why. Problems with the file as a whole that still leave part of it readable (a tar shard
truncated in the middle) are listed in `reader.problems` and counted once.
"""

from __future__ import annotations

import abc
import mmap
import os
from pathlib import Path

import numpy as np

from mm1.data.errors import RecordError
from mm1.data.records import Record


class Reader(abc.ABC):
    """One data file of one format."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.problems: list[RecordError] = []

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, i: int) -> Record:
        """Record i as a typed record; RecordError if it cannot be used."""

    def where(self, i: int) -> str:
        """Where record i comes from, for messages and `mm1 data batch`."""
        return f"{self.path}:{i}"


class LineFile:
    """Random access to the non-blank lines of a text file: byte offsets over a memory map.

    Memory is two offsets per line; the text stays in the OS page cache, so a multi-GB jsonl costs
    a worker little more than its line count.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as err:
            raise RecordError(str(path), "cannot read file", str(err.strerror or err)) from None
        newlines = np.flatnonzero(np.frombuffer(self._map, dtype=np.uint8) == 10) if size else np.zeros(0, int)
        starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
        ends = np.concatenate([newlines, [size]]).astype(np.int64)
        short = np.flatnonzero(ends - starts < 8)  # only short lines can be blank but for long runs of spaces
        blank = [i for i in short.tolist() if not self._map[starts[i]:ends[i]].strip()]
        keep = np.setdiff1d(np.arange(len(starts)), np.asarray(blank, dtype=np.int64))
        self.starts, self.ends = starts[keep], ends[keep]
        self.numbers = keep.astype(np.int64) + 1  # 1-based line numbers, for messages

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, i: int) -> str:
        return bytes(self._map[self.starts[i]:self.ends[i]]).decode("utf-8", errors="replace")

    def where(self, i: int) -> str:
        return f"{self.path}:line{self.numbers[i]}"


class ParquetRows:
    """Random access to rows of a parquet file, one row group in memory at a time."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.columns = path, columns
        try:
            self.file = pq.ParquetFile(path)
            missing = [c for c in columns if c not in self.file.schema_arrow.names]
        except (pa.ArrowException, OSError) as err:
            raise RecordError(str(path), "not a readable parquet file", str(err)) from None
        if missing:
            raise RecordError(str(path), "parquet file lacks a needed column", ", ".join(missing))
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._group, self._rows = -1, {}

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def row(self, i: int) -> dict:
        g = int(np.searchsorted(self.group_starts, i, side="right") - 1)
        if g != self._group:
            table = self.file.read_row_group(g, columns=self.columns)
            self._group, self._rows = g, {c: table.column(c).to_pylist() for c in self.columns}
        return {c: v[i - self.group_starts[g]] for c, v in self._rows.items()}
