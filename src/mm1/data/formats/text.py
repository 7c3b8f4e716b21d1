"""Text-only documents: jsonl (`{"text": ...}` per line), parquet (a `text` column) or plain text.

A plain `.txt` file holds one document per block of lines, blocks separated by blank lines.
Malformed lines are skipped and counted, with the file and line number in the warning.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from mm1.data.sample import RecordError, Sample, Source, Text
from mm1.data.stats import DataStats


def write_jsonl(texts: list[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def read_texts(path: Path, stats: DataStats | None = None) -> list[tuple[str, str]]:
    """All documents of a file as (where, text) pairs."""
    stats = stats or DataStats()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        except Exception as err:  # pyarrow raises several unrelated types for a bad file
            raise RecordError(f"{path}: not a parquet file with a 'text' column ({err})") from None
        return [(f"{path}:row{i}", t) for i, t in enumerate(column) if _ok(t, f"{path}:row{i}", stats)]
    if suffix in (".jsonl", ".json"):
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:line{n}"
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                stats.skip("text", where, "malformed jsonl line (need an object with a 'text' field)")
                continue
            if _ok(text, where, stats):
                out.append((where, text))
        return out
    blocks, current, start = [], [], 1
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            if not current:
                start = n
            current.append(line)
        elif current:
            blocks.append((f"{path}:line{start}", "\n".join(current)))
            current = []
    if current:
        blocks.append((f"{path}:line{start}", "\n".join(current)))
    return blocks


def _ok(text, where: str, stats: DataStats) -> bool:
    if not isinstance(text, str) or not text.strip():
        stats.skip("text", where, "empty or non-string text")
        return False
    return True


def iter_samples(path: Path, stats: DataStats | None = None) -> Iterator[Sample]:
    for where, text in read_texts(path, stats):
        yield Sample(Source.TEXT, [Text(text)], where=where)
