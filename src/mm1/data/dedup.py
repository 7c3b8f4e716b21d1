"""`mm1 data dedup`: near-duplicate texts and exact duplicate images found before preparation.

Web corpora repeat themselves (boilerplate pages, the same photo under many captions); Pythia's data
were deduplicated, and MM1's were filtered hard. For each source of a stage, every record's text
(a caption, a document's text parts, a text document) is reduced to a MinHash of its word 5-grams
(`datasketch`, a fixed seed) and looked up in a MinHash-LSH index of the records kept so far: a
record whose estimated Jaccard similarity to a kept one reaches the threshold is a near-duplicate
and is dropped. A caption record whose image bytes equal a kept record's image is dropped too; its
caption alone does not make it a duplicate unless `caption_text` is set, because short captions
repeat across distinct images ("a red star" on 12,000 synthetic pictures is 2,489 near-duplicates).
Records are visited in file order, so the result is deterministic and the first of a group is kept.

The result, `DATA_ROOT/dedup/<source>.json`, lists the dropped records by file; `mm1 data prepare`
with `data.prepare.dedup=true` leaves them out (and counts them as skipped: "near duplicate",
"duplicate image").
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from mm1.config import Config, SourceKind, Stage
from mm1.data.errors import RecordError
from mm1.data.formats import open_reader
from mm1.data.records import CaptionRecord, ImageRef, record_texts
from mm1.data.sources import expand, resolve_files, stage_sources

WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class DedupSettings:
    """What decides a near-duplicate: MinHash permutations, word n-gram length, Jaccard threshold."""
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    caption_text: bool = False  # caption pairs are near-duplicates by their text too (boilerplate alt-text)


@dataclass
class DedupResult:
    """One source's duplicates: dropped record indices per file, and the counts."""
    source: str
    files: list[str]
    settings: DedupSettings
    drop: dict[int, list[int]] = field(default_factory=dict)
    records: int = 0
    near_duplicates: int = 0
    image_duplicates: int = 0
    unreadable: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"drop": {str(k): v for k, v in self.drop.items()}}


def shingles(text: str, n: int) -> set[bytes]:
    words = WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


def _image_key(ref: ImageRef) -> str | None:
    try:
        return hashlib.blake2b(ref.read_bytes(), digest_size=16).hexdigest()
    except Exception:  # an unreadable image is prepare's to report, not a duplicate
        return None


def dedup_source(name: str, kind: SourceKind, files: tuple[str, ...], images: str, settings: DedupSettings, *,
                 progress: bool = True) -> DedupResult:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    result = DedupResult(name, list(files), settings)
    lsh = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm)
    seen_images: set[str] = set()
    bar = tqdm(desc=f"dedup {name}", unit="rec", disable=not progress, dynamic_ncols=True)
    for f, path in enumerate(files):
        reader = open_reader(kind, Path(path), Path(images) if images else None)
        for i in range(len(reader)):
            bar.update()
            result.records += 1
            try:
                record = reader.read(i)
            except RecordError:
                result.unreadable += 1  # prepare skips and reports it
                continue
            if isinstance(record, CaptionRecord):
                key = _image_key(record.image)
                if key is not None and key in seen_images:
                    result.drop.setdefault(f, []).append(i)
                    result.image_duplicates += 1
                    continue
            if isinstance(record, CaptionRecord) and not settings.caption_text:
                if key is not None:
                    seen_images.add(key)
                continue
            grams = shingles(" ".join(record_texts(record)), settings.ngram)
            if not grams:
                continue
            mh = MinHash(num_perm=settings.num_perm, seed=settings.seed)
            mh.update_batch(list(grams))
            if lsh.query(mh):
                result.drop.setdefault(f, []).append(i)
                result.near_duplicates += 1
                continue
            lsh.insert(f"{f}:{i}", mh)
            if isinstance(record, CaptionRecord) and key is not None:
                seen_images.add(key)
    bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def dedup_folder(cfg: Config) -> Path:
    return Path(cfg.data.root) / "dedup"


def dedup_file(cfg: Config, source: str) -> Path:
    return dedup_folder(cfg) / f"{source}.json"


def run_dedup(cfg: Config, stage: Stage, settings: DedupSettings, *, progress: bool = True) -> list[DedupResult]:
    """Every source of the stage; writes DATA_ROOT/dedup/<source>.json (atomically) for each."""
    from mm1.files import write_json

    results = []
    for name, src in stage_sources(cfg, stage).items():
        files = resolve_files(src, cfg.data.root, name)
        result = dedup_source(name, src.kind, files, expand(src.images, cfg.data.root), settings, progress=progress)
        write_json(dedup_file(cfg, name), result.to_dict())
        results.append(result)
    return results


def read_drops(path: Path, files: tuple[str, ...], *, made_by: str = "dedup") -> dict[int, frozenset[int]]:
    """The dropped records of a drop list (`mm1 data dedup`'s, or `mm1 data filter`'s in its format), which
    must be for these files (else it is stale: one line)."""
    from mm1.files import read_json

    flag = "quality" if made_by == "filter" else made_by
    if not path.exists():
        raise RecordError(str(path), f"no {made_by} list",
                          f"run `mm1 data {made_by}` first, or set data.prepare.{flag}=false")
    data = read_json(path)
    if list(data.get("files", [])) != list(files):
        raise RecordError(str(path), f"{made_by} list is for other files", f"run `mm1 data {made_by}` again")
    return {int(k): frozenset(v) for k, v in data["drop"].items()}


def drops_fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else ""


def summary_lines(results: list[DedupResult]) -> list[str]:
    lines = []
    for r in results:
        rate = r.records / r.seconds if r.seconds else 0.0
        lines.append(f"{r.source}: {r.records} records, {r.near_duplicates} near-duplicates, "
                     f"{r.image_duplicates} duplicate images ({r.seconds:.1f} s, {rate:,.0f} records/s)")
    return lines

