"""Opening the training sources named in a `DataConfig`, with random access to every record.

A source is a list of opaque entries plus a function that turns one entry into a `Sample`.
Readers are picked by file type: `.tar` (WebDataset captions), caption `.jsonl` (`image` +
`caption`), `.parquet` (OBELICS documents or a `text` column), mmc4 `.jsonl`, text `.jsonl` /
`.txt`, and LLaVA `.json`. Empty paths in the config mean the synthetic world under `data.root`.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm1.config import DataConfig, Stage
from mm1.data.formats import coco, interleaved, llava, text, webdataset
from mm1.data.sample import ImageRef, RecordError, Sample, Source
from mm1.data.sample import Text as TextSeg
from mm1.data.stats import DataStats


@dataclass
class SourceData:
    name: str
    source: Source
    entries: list[Any]
    loader: Callable[[Any], Sample]

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, i: int) -> Sample:
        return self.loader(self.entries[i])


def _paths(spec: str, default: str) -> list[Path]:
    patterns = [p.strip() for p in (spec or default).split(",") if p.strip()]
    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"no data files match '{pattern}' (run `mm1 data synth` or fix the path)")
        out += [Path(m) for m in matches]
    return out


def _caption_source(paths: list[Path], stats: DataStats) -> SourceData:
    entries: list[Any] = []
    for p in paths:
        if p.suffix == ".tar":
            entries += webdataset.index_shard(p, stats)
        else:
            entries += [("jsonl", c) for c in coco.read_caption_jsonl(p)]

    def load(e: Any) -> Sample:
        if isinstance(e, tuple):
            c = e[1]
            return Sample(Source.CAPTION, [ImageRef(where=c.image, path=c.image), TextSeg(c.captions[0])],
                          where=c.image)
        return webdataset.load_entry(e)

    return SourceData("caption", Source.CAPTION, entries, load)


def _interleaved_source(paths: list[Path], stats: DataStats) -> SourceData:
    entries: list[Any] = []
    for p in paths:
        entries += interleaved.index_mmc4(p) if p.suffix == ".jsonl" else interleaved.index_obelics(p)

    def load(e: interleaved.DocEntry) -> Sample:
        if e.path.endswith(".jsonl"):
            return interleaved.load_mmc4(e, images_dir=Path(e.path).parent / "images", stats=stats)
        return interleaved.load_obelics(e, stats)

    return SourceData("interleaved", Source.INTERLEAVED, entries, load)


def _text_source(paths: list[Path], stats: DataStats) -> SourceData:
    docs = [d for p in paths for d in text.read_texts(p, stats)]
    return SourceData("text", Source.TEXT, docs, lambda d: Sample(Source.TEXT, [TextSeg(d[1])], where=d[0]))


def _sft_source(paths: list[Path], stats: DataStats) -> SourceData:
    samples = [s for p in paths for s in llava.read_llava(p, p.parent / "images", stats)]
    return SourceData("sft", Source.SFT, samples, lambda s: s)


def open_sources(data: DataConfig, stage: Stage, stats: DataStats | None = None) -> dict[str, SourceData]:
    """The sources a stage trains on: the weighted pre-training mixture, or the SFT conversations."""
    stats = stats or DataStats()
    root = data.root
    if stage == Stage.SFT:
        return {"sft": _sft_source(_paths(data.sft_json, f"{root}/sft/*.json"), stats)}
    out = {}
    weights = {"caption": data.mixture.caption, "interleaved": data.mixture.interleaved, "text": data.mixture.text}
    openers = {
        "caption": (_caption_source, data.caption_shards, f"{root}/captions/*.tar"),
        "interleaved": (_interleaved_source, data.interleaved_shards, f"{root}/interleaved/*.parquet"),
        "text": (_text_source, data.text_shards, f"{root}/text/*.jsonl"),
    }
    for name, (opener, spec, default) in openers.items():
        if weights[name] > 0:
            src = opener(_paths(spec, default), stats)
            if len(src) == 0:
                raise RecordError(f"data source '{name}' has no usable records")
            out[name] = src
    return out


def iter_world_texts(root: Path) -> Iterator[str]:
    """Every text of a synthetic world, for training its tokenizer."""
    data = DataConfig(root=str(root))
    for stage in (Stage.PRETRAIN, Stage.SFT):
        for src in open_sources(data, stage).values():
            for i in range(len(src)):
                try:
                    sample = src.load(i)
                except RecordError:
                    continue
                for seg in sample.segments:
                    if isinstance(seg, TextSeg):
                        yield seg.text
