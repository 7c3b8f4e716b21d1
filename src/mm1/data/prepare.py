"""`mm1 data prepare`: every source turned into packed sequences once, offline, in worker processes.

Training never reads or tokenizes a corpus: it reads rows of memory-mapped arrays written here.
For each source of a stage, the records are streamed from their files in work units (a file, or
a slice of a file whose format allows it), checked (every image is decoded once; a bad one is left
out and counted once per record, by reason), rendered through the templates, tokenized, split
and packed by best fit decreasing — each source on its own, as MM1 draws whole sequences per
source. Each unit becomes one shard; images stay where they are, as references.

Layout (`<prepared>` is `data.prepared`, by default `<data.root>/prepared`):

    <prepared>/<source>-<key>/manifest.json     spec, counts, fill, skipped records by reason
    <prepared>/<source>-<key>/shard_00000/      tokens.npy uint32 [n, L], loss.npy uint8 [n, L],
                                                positions.npy uint16 [n, L], doc_ids.npy int16 [n, L],
                                                images.npy int64 [m, 3] (string, offset, size),
                                                image_offsets.npy int64 [n+1], docs.npy int64 [d, 3]
                                                (string, record, images), doc_offsets.npy int64 [n+1],
                                                strings.json (the files named above)
    <prepared>/<stage>-<key>.json               the stage's sources, weights and token shares

`<key>` hashes everything that decides the bytes (files, tokenizer, packing, image tokens, chat
template), so data prepared under another tokenizer or packing is never picked up: training looks
for its own key and, when it is missing, says what differs from what is there. The output is a
pure function of the spec: running prepare twice, with any number of workers, gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mm1.config import Config, ConfigError, SourceKind, Stage
from mm1.data.dedup import dedup_file, drops_fingerprint, read_drops
from mm1.data.errors import ImageError, RecordError
from mm1.data.formats import Reader, open_reader
from mm1.data.packing import Chunk, Tokenized, layout, pack, split_chunks, tokenize
from mm1.data.quality import quality_file
from mm1.data.records import CaptionRecord, DocumentRecord, ImageRef, Record, record_images
from mm1.data.sources import expand, resolve_files, stage_sources
from mm1.data.template import render_record, template_for
from mm1.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
log = logging.getLogger("mm1.data")


@dataclass(frozen=True)
class SourceSpec:
    """Everything that decides the bytes of one prepared source: its identity."""

    name: str
    kind: str
    files: tuple[str, ...]
    images: str
    seq_len: int
    max_images: int
    image_tokens: int  # slots per image view
    views: int  # views per image (1 + grid² with sub-image decomposition)
    chat: bool  # SFT: caption pairs rendered as captioning conversations
    template: str
    tokenizer: str
    check_images: bool
    unit_records: int
    version: int = FORMAT_VERSION
    dedup: str = ""  # the dedup list whose records are left out ("" none) ...
    dedup_hash: str = ""  # ... and its content's fingerprint (a new list is a new spec)
    quality: str = ""  # the quality filter's drop list (`mm1 data filter`) ...
    quality_hash: str = ""  # ... and its fingerprint

    @property
    def key(self) -> str:
        fields = dataclasses.asdict(self)
        # specs from before deduplication (or filtering) existed keep their key (and their prepared data)
        for name in ("dedup", "quality"):
            if not fields[name]:
                del fields[name], fields[f"{name}_hash"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.key}"


def views_per_image(cfg: Config, stage: Stage) -> int:
    grid = cfg.data.sub_image_grid if stage == Stage.SFT else 0
    return 1 + grid * grid if grid else 1


def source_specs(cfg: Config, stage: Stage, tok: Tokenizer) -> dict[str, SourceSpec]:
    views = views_per_image(cfg, stage)
    out = {}
    for name, src in stage_sources(cfg, stage).items():
        dedup = str(dedup_file(cfg, name)) if cfg.data.prepare.dedup else ""
        quality = str(quality_file(cfg, name)) if cfg.data.prepare.quality or src.quality else ""
        out[name] = SourceSpec(
            name=name, kind=src.kind.value, files=resolve_files(src, cfg.data.root, name),
            images=expand(src.images, cfg.data.root), seq_len=cfg.data.packing.seq_len,
            max_images=cfg.data.packing.max_images, image_tokens=cfg.model.connector.num_tokens, views=views,
            chat=stage == Stage.SFT, template=template_for(tok).name, tokenizer=tok.fingerprint,
            check_images=cfg.data.prepare.check_images, unit_records=cfg.data.prepare.unit_records,
            dedup=dedup, dedup_hash=drops_fingerprint(Path(dedup)) if dedup else "",
            quality=quality, quality_hash=drops_fingerprint(Path(quality)) if quality else "")
    return out


def prepared_root(cfg: Config) -> Path:
    return Path(cfg.data.prepared or Path(cfg.data.root) / "prepared")


# ----------------------------------------------------------------------------- one work unit


@dataclass
class UnitStats:
    """What one work unit read, kept and left out (summed into the manifest)."""

    records: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)  # records left out, by reason
    images_left_out: Counter = field(default_factory=Counter)  # images left out of kept documents
    examples: dict = field(default_factory=dict)  # reason → where it first happened
    split: int = 0  # records cut into several chunks
    too_large_images: int = 0  # images bigger than a whole sequence, dropped
    problems: list = field(default_factory=list)  # whole-file problems (a damaged shard)

    def note(self, counter: Counter, err: RecordError | ImageError, prefix: str = "") -> None:
        reason = prefix + err.reason
        counter[reason] += 1
        self.examples.setdefault(reason, err.where)

    def merge(self, other: UnitStats) -> None:
        self.records += other.records
        self.used += other.used
        self.skipped.update(other.skipped)
        self.images_left_out.update(other.images_left_out)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        self.split += other.split
        self.too_large_images += other.too_large_images
        self.problems += other.problems


@dataclass(frozen=True)
class Unit:
    """A slice of one source file that one prepare worker tokenizes and packs."""
    index: int
    file: int  # index into spec.files
    start: int
    stop: int | None  # None: to the end of the file


@dataclass(frozen=True)
class Part:
    """One machine's share of the work: every unit whose index is `index` modulo `count`
    (`mm1 data prepare --shard INDEX --of COUNT`; round-robin, so that large and small files spread)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ConfigError(f"--shard {self.index} --of {self.count}: the shard must lie in 0..{self.count - 1}")

    def owns(self, unit: Unit) -> bool:
        return unit.index % self.count == self.index


_WORKER: dict = {}


def _init_worker(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    _WORKER["tok"] = Tokenizer(HFTokenizer.from_str(tokenizer_json))


@lru_cache(maxsize=4)
def _reader(kind: str, path: str, images: str) -> Reader:
    return open_reader(SourceKind(kind), Path(path), Path(images) if images else None)


@lru_cache(maxsize=8)
def _drops(path: str, files: tuple[str, ...], made_by: str = "dedup") -> dict[int, frozenset[int]]:
    return read_drops(Path(path), files, made_by=made_by)


def _checked(record: Record, stats: UnitStats) -> Record | None:
    """The record with its unusable images left out, or None when the record cannot do without them."""
    bad: dict[ImageRef, ImageError] = {}
    for ref in record_images(record):
        try:
            ref.load()
        except ImageError as err:
            bad[ref] = err
    if not bad:
        return record
    if isinstance(record, DocumentRecord):
        for err in bad.values():
            stats.note(stats.images_left_out, err)
        kept = tuple(p for p in record.parts if not (isinstance(p, ImageRef) and p in bad))
        return DocumentRecord(kept, record.dropped)
    stats.note(stats.skipped, next(iter(bad.values())), prefix="image: ")  # captions, conversations
    return None


def _records(spec: SourceSpec, unit: Unit, stats: UnitStats):
    """(record index, usable record) for the unit's records; everything left out is counted."""
    reader = _reader(spec.kind, spec.files[unit.file], spec.images)
    if unit.start == 0:
        for err in reader.problems:
            stats.problems.append(str(err))
            stats.note(stats.skipped, err)
    stop = len(reader) if unit.stop is None else unit.stop
    drop = _drops(spec.dedup, spec.files).get(unit.file, frozenset()) if spec.dedup else frozenset()
    low = _drops(spec.quality, spec.files, "filter").get(unit.file, frozenset()) if spec.quality else frozenset()
    for i in range(unit.start, stop):
        stats.records += 1
        if i in drop:
            stats.note(stats.skipped, RecordError(reader.where(i), "duplicate (mm1 data dedup)"))
            continue
        if i in low:
            stats.note(stats.skipped, RecordError(reader.where(i), "low quality (mm1 data filter)"))
            continue
        try:
            record = reader.read(i)
        except RecordError as err:
            stats.note(stats.skipped, err)
            continue
        if isinstance(record, DocumentRecord):
            for err in record.dropped:
                stats.note(stats.images_left_out, err)
        if spec.check_images:
            record = _checked(record, stats)
        if record is not None:
            yield i, record


def _items(spec: SourceSpec, unit: Unit, stats: UnitStats, tok: Tokenizer):
    template = template_for(tok)
    block = spec.image_tokens * spec.views
    for i, record in _records(spec, unit, stats):
        if isinstance(record, DocumentRecord) and not any(isinstance(p, str) and p.strip() for p in record.parts):
            stats.note(stats.skipped, RecordError(f"{spec.files[unit.file]}:{i}", "document has no text"))
            continue
        t = tokenize(render_record(record, template, chat=spec.chat), tok, image_tokens=spec.image_tokens,
                     views_per_image=spec.views)
        chunks, dropped = split_chunks(t, seq_len=spec.seq_len, max_images=spec.max_images, block=block)
        stats.too_large_images += dropped
        stats.split += len(chunks) > 1
        if isinstance(record, CaptionRecord) and not any(c.num_images for c in chunks):
            stats.note(stats.skipped, RecordError(f"{spec.files[unit.file]}:{i}", "image larger than a sequence"))
            continue
        stats.used += 1
        for c in chunks:
            yield i, t, c


def prepare_unit(spec: SourceSpec, unit: Unit, out: Path, tok: Tokenizer | None = None) -> tuple[UnitStats, dict]:
    """Prepare one work unit into `out/shard_<index>`; returns its statistics and its shard entry."""
    tok = tok or _WORKER["tok"]
    stats = UnitStats()
    items: list[tuple[int, Tokenized, Chunk]] = list(_items(spec, unit, stats, tok))
    lengths = np.asarray([c.length for _, _, c in items], dtype=np.int64)
    n_images = np.asarray([c.num_images for _, _, c in items], dtype=np.int64)
    bins = pack(lengths, n_images, seq_len=spec.seq_len, max_images=spec.max_images)
    shard = _write_shard(spec, unit, out / f"shard_{unit.index:05d}", items, bins, tok.pad_id)
    return stats, shard


def _write_shard(spec: SourceSpec, unit: Unit, folder: Path, items, bins, pad_id: int) -> dict:
    n, L = len(bins), spec.seq_len
    arrays = {"tokens": np.empty((n, L), np.uint32), "loss": np.empty((n, L), np.uint8),
              "positions": np.empty((n, L), np.uint16), "doc_ids": np.empty((n, L), np.int16)}
    strings: dict[str, int] = {}
    images: list[tuple[int, int, int]] = []
    docs: list[tuple[int, int, int]] = []
    image_offsets, doc_offsets = [0], [0]
    data_file = strings.setdefault(spec.files[unit.file], 0)
    for row_i, content in enumerate(bins):
        parts = [(items[k][1], items[k][2]) for k in content]
        row = layout(parts, seq_len=L, pad_id=pad_id)
        for name in arrays:
            arrays[name][row_i] = getattr(row, name)
        for k in content:
            rec, t, c = items[k]
            docs.append((data_file, rec, c.num_images))
            for ref in t.images[c.first_image:c.first_image + c.num_images]:
                images.append((strings.setdefault(ref.path, len(strings)), ref.offset, ref.size))
        image_offsets.append(len(images))
        doc_offsets.append(len(docs))
    folder.mkdir(parents=True, exist_ok=True)
    arrays |= {"images": np.asarray(images, np.int64).reshape(-1, 3),
               "image_offsets": np.asarray(image_offsets, np.int64),
               "docs": np.asarray(docs, np.int64).reshape(-1, 3), "doc_offsets": np.asarray(doc_offsets, np.int64)}
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr)
    (folder / "strings.json").write_text(json.dumps(list(strings)))
    real = int((arrays["doc_ids"] >= 0).sum())
    return {"name": folder.name, "sequences": n, "documents": len(docs), "images": len(images), "tokens": real}


def _run_unit(args: tuple[SourceSpec, Unit, Path]) -> tuple[UnitStats, dict]:
    return prepare_unit(*args)


# ----------------------------------------------------------------------------- a whole source


def plan_units(spec: SourceSpec) -> list[Unit]:
    """Work units: files whose length is cheap to know (parquet, jsonl, txt) are cut into slices."""
    units: list[Unit] = []
    for f, path in enumerate(spec.files):
        cheap = Path(path).suffix.lower() in (".parquet", ".jsonl", ".txt")
        n = len(_reader(spec.kind, path, spec.images)) if cheap else None
        if n is None or n <= spec.unit_records:
            units.append(Unit(len(units), f, 0, None))
            continue
        for start in range(0, n, spec.unit_records):
            units.append(Unit(len(units), f, start, min(n, start + spec.unit_records)))
    return units


def _manifest(spec: SourceSpec, stats: UnitStats, shards: list[dict]) -> dict:
    sequences = sum(s["sequences"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)
    return {
        "version": FORMAT_VERSION, "key": spec.key, "spec": dataclasses.asdict(spec), "shards": shards,
        "sequences": sequences, "documents": sum(s["documents"] for s in shards),
        "images": sum(s["images"] for s in shards), "tokens": tokens,
        "fill": tokens / max(1, sequences * spec.seq_len),
        "records": {"read": stats.records, "used": stats.used, "skipped": sum(stats.skipped.values()),
                    "split_across_sequences": stats.split},
        "skipped": dict(sorted(stats.skipped.items())),
        "images_left_out": dict(sorted(stats.images_left_out.items())),
        "images_too_large": stats.too_large_images,
        "examples": dict(sorted(stats.examples.items())),
        "file_problems": stats.problems,
    }


def _run_units(spec: SourceSpec, units: list[Unit], folder: Path, tok: Tokenizer, *, workers: int,
               progress: bool):
    """Each unit's (stats, shard entry), in unit order, prepared into `folder` by `workers` processes."""
    bar = tqdm(total=len(units), desc=f"prepare {spec.name}", unit="unit", disable=not progress, dynamic_ncols=True)
    pool = None
    if workers <= 1 or len(units) <= 1:
        results = (prepare_unit(spec, u, folder, tok) for u in units)
    else:
        pool = mp.get_context("fork").Pool(min(workers, len(units)), initializer=_init_worker,
                                           initargs=(tok.hf.to_str(),))
        results = pool.imap(_run_unit, [(spec, u, folder) for u in units])
    seen = UnitStats()
    try:
        for unit_stats, shard in results:
            yield unit_stats, shard
            seen.merge(unit_stats)
            bar.update()
            bar.set_postfix(records=seen.records, skipped=sum(seen.skipped.values()), refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def _finish(spec: SourceSpec, stats: UnitStats, shards: list[dict], folder: Path, final: Path) -> dict:
    """Write the manifest into `folder` and put it in the place of `final` (atomic rename)."""
    manifest = _manifest(spec, stats, shards)
    if manifest["sequences"] == 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RecordError(spec.name, "data source has no usable records",
                          f"{stats.records} read; skipped: {dict(stats.skipped) or 'none'}")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(folder, final)
    return manifest


def prepare_source(spec: SourceSpec, root: Path, tok: Tokenizer, *, workers: int, progress: bool = True,
                   force: bool = False) -> dict:
    """Prepare one source into `root/<name>-<key>` (atomic: written as `.tmp`, then renamed)."""
    final = root / spec.dirname
    if (final / "manifest.json").exists() and not force:
        return json.loads((final / "manifest.json").read_text())
    tmp = root / f"{spec.dirname}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats, shards = UnitStats(), []
    for unit_stats, shard in _run_units(spec, plan_units(spec), tmp, tok, workers=workers, progress=progress):
        stats.merge(unit_stats)
        shards.append(shard)
    return _finish(spec, stats, shards, tmp, final)


# ----------------------------------------------------------------------------- across machines


def _parts_folder(root: Path, spec: SourceSpec) -> Path:
    return root / f"{spec.dirname}.parts"


def prepare_source_part(spec: SourceSpec, root: Path, tok: Tokenizer, part: Part, *, workers: int,
                        progress: bool = True) -> tuple[int, int]:
    """This machine's units of the source, into `root/<name>-<key>.parts/` (shared by every machine):
    each unit's shard, and beside it `unit_<index>.json` (its statistics and shard entry) once the
    shard is whole, so that a part run again redoes only what it had not finished. Returns (units
    done by this call, units of this part)."""
    if (root / spec.dirname / "manifest.json").exists():
        return 0, 0
    folder = _parts_folder(root, spec)
    folder.mkdir(parents=True, exist_ok=True)
    mine = [u for u in plan_units(spec) if part.owns(u)]
    todo = [u for u in mine if not (folder / f"unit_{u.index:05d}.json").exists()]
    for u, (unit_stats, shard) in zip(todo, _run_units(spec, todo, folder, tok, workers=workers,
                                                       progress=progress), strict=True):
        done = folder / f"unit_{u.index:05d}.json"
        partial = done.with_suffix(".json.tmp")
        partial.write_text(json.dumps({"stats": dataclasses.asdict(unit_stats), "shard": shard}))
        os.replace(partial, done)
    return len(todo), len(mine)


def merge_source(spec: SourceSpec, root: Path) -> dict:
    """The manifest of a source prepared in parts: every unit's statistics summed in unit order, as one
    machine sums them, so the folder is byte for byte what `prepare_source` writes."""
    final = root / spec.dirname
    if (final / "manifest.json").exists():
        return json.loads((final / "manifest.json").read_text())
    folder = _parts_folder(root, spec)
    units = plan_units(spec)
    missing = [u.index for u in units if not (folder / f"unit_{u.index:05d}.json").exists()]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise RecordError(spec.name, f"{len(missing)} of {len(units)} work units are not prepared yet",
                          f"{folder}: units {shown}; run every --shard i --of N first")
    stats, shards = UnitStats(), []
    for u in units:
        done = json.loads((folder / f"unit_{u.index:05d}.json").read_text())
        st = done["stats"]
        stats.merge(UnitStats(**(st | {"skipped": Counter(st["skipped"]),
                                       "images_left_out": Counter(st["images_left_out"])})))
        shards.append(done["shard"])
    for leftover in [*folder.glob("unit_*.json"), *folder.glob("unit_*.json.tmp")]:
        leftover.unlink()  # the folder becomes what one machine writes: shards and the manifest
    return _finish(spec, stats, shards, folder, final)


def stage_key(specs: dict[str, SourceSpec], weights: dict[str, float]) -> str:
    blob = json.dumps({n: [s.key, weights[n]] for n, s in sorted(specs.items())})
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare_part(cfg: Config, stage: Stage, tok: Tokenizer, part: Part, *, progress: bool = True) -> dict:
    """This machine's share of every source of `stage` (`--shard i --of N`); `prepare(..., merge=True)`
    then writes the manifests. Returns, per source, (units done now, units of this part)."""
    root = prepared_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    return {n: prepare_source_part(s, root, tok, part, workers=cfg.data.prepare.workers, progress=progress)
            for n, s in source_specs(cfg, stage, tok).items()}


def prepare(cfg: Config, stage: Stage, tok: Tokenizer, *, progress: bool = True, force: bool = False,
            merge: bool = False) -> dict:
    """Prepare every source of `stage` (or, with `merge`, gather what `prepare_part` wrote on every
    machine); returns (and writes) the stage manifest."""
    root = prepared_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    sources = stage_sources(cfg, stage)
    specs = source_specs(cfg, stage, tok)
    manifests = {n: merge_source(s, root) if merge else
                 prepare_source(s, root, tok, workers=cfg.data.prepare.workers, progress=progress, force=force)
                 for n, s in specs.items()}
    weights = {n: sources[n].weight for n in specs}
    total_w = sum(weights.values())
    # MM1's weights are shares of sequences; a source's share of tokens follows from its fill.
    per_seq = {n: m["tokens"] / m["sequences"] for n, m in manifests.items()}
    norm = sum(weights[n] / total_w * per_seq[n] for n in specs)
    summary = {
        "stage": stage.value, "key": stage_key(specs, weights), "tokenizer": tok.fingerprint,
        "sources": {n: {"dir": specs[n].dirname, "key": specs[n].key, "kind": specs[n].kind,
                        "weight": weights[n], "sequence_share": weights[n] / total_w,
                        "token_share": weights[n] / total_w * per_seq[n] / norm,
                        "sequences": manifests[n]["sequences"], "tokens": manifests[n]["tokens"],
                        "fill": manifests[n]["fill"], "records": manifests[n]["records"],
                        "skipped": manifests[n]["skipped"], "images_left_out": manifests[n]["images_left_out"]}
                    for n in specs},
    }
    (root / f"{stage.value}-{summary['key']}.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def summary_table(summary: dict) -> str:
    """What `mm1 data prepare` prints: one line per source."""
    lines = [f"{'source':<14}{'records':>10}{'skipped':>9}{'sequences':>11}{'fill':>8}{'weight':>8}{'tokens':>8}"]
    for n, s in summary["sources"].items():
        lines.append(f"{n:<14}{s['records']['read']:>10,}{s['records']['skipped']:>9,}{s['sequences']:>11,}"
                     f"{s['fill']:>8.1%}{s['sequence_share']:>8.1%}{s['token_share']:>8.1%}")
        for reason, count in list(s["skipped"].items())[:6]:
            lines.append(f"    skipped {count:,}: {reason}")
        for reason, count in list(s["images_left_out"].items())[:4]:
            lines.append(f"    images left out {count:,}: {reason}")
    return "\n".join(lines)
