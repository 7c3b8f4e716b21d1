"""Reading prepared sources: sequence j of a source is a few rows of memory-mapped arrays.

Opening a prepared source reads its manifest (a few KB per thousand shards) and nothing else;
shards are memory-mapped when first touched, a bounded number at a time. So start-up time and
resident memory do not grow with the corpus, and any sequence is read in O(1).

`open_prepared` finds the sources a config trains on by their key and refuses, with what
differs, data prepared under another tokenizer or packing.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mm1.config import Config, Stage
from mm1.data.prepare import SourceSpec, prepared_root, source_specs
from mm1.data.records import ImageRef
from mm1.data.tokenizer import Tokenizer

OPEN_SHARDS = 32  # memory maps kept open per source


class PreparedDataError(FileNotFoundError):
    """Prepared data is missing or was made with other settings; the message says what to run."""


@dataclass
class PreparedSequence:
    """One packed training sequence read back from the memory-mapped arrays."""
    tokens: np.ndarray  # uint32 [L]
    loss: np.ndarray  # uint8 [L]
    positions: np.ndarray  # uint16 [L]
    doc_ids: np.ndarray  # int16 [L]
    images: list[ImageRef]
    docs: list[str]  # where each document (chunk) came from: "file#record"


class _Shard:
    ARRAYS = ("tokens", "loss", "positions", "doc_ids", "images", "image_offsets", "docs", "doc_offsets")

    def __init__(self, folder: Path) -> None:
        for name in self.ARRAYS:
            setattr(self, name, np.load(folder / f"{name}.npy", mmap_mode="r"))
        self.strings: list[str] = json.loads((folder / "strings.json").read_text())


class PreparedSource:
    """One prepared source: `len()` sequences, `sequence(j)` in O(1)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.name = self.manifest["spec"]["name"]
        self.seq_len = self.manifest["spec"]["seq_len"]
        counts = [s["sequences"] for s in self.manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        docs = [s["documents"] for s in self.manifest["shards"]]
        self.doc_starts = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)
        self._shards: OrderedDict[int, _Shard] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int) -> _Shard:
        if k not in self._shards:
            self._shards[k] = _Shard(self.folder / self.manifest["shards"][k]["name"])
            if len(self._shards) > OPEN_SHARDS:
                self._shards.popitem(last=False)
        self._shards.move_to_end(k)
        return self._shards[k]

    def sequence(self, j: int) -> PreparedSequence:
        if not 0 <= j < len(self):
            raise IndexError(f"{self.name}: sequence {j} of {len(self)}")
        k = int(np.searchsorted(self.starts, j, side="right") - 1)
        sh, r = self._shard(k), j - int(self.starts[k])
        a, b = int(sh.image_offsets[r]), int(sh.image_offsets[r + 1])
        images = [ImageRef(sh.strings[s], int(o), int(n)) for s, o, n in np.asarray(sh.images[a:b]).tolist()]
        a, b = int(sh.doc_offsets[r]), int(sh.doc_offsets[r + 1])
        docs = [f"{sh.strings[s]}#{rec}" for s, rec, _ in np.asarray(sh.docs[a:b]).tolist()]
        return PreparedSequence(np.asarray(sh.tokens[r]), np.asarray(sh.loss[r]), np.asarray(sh.positions[r]),
                                np.asarray(sh.doc_ids[r]), images, docs)


    @property
    def num_documents(self) -> int:
        return int(self.doc_starts[-1])

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray, list[ImageRef]]:
        """Document (chunk) d of the source: its tokens, loss flags and images (for the CLIP stage)."""
        k = int(np.searchsorted(self.doc_starts, d, side="right") - 1)
        sh, local = self._shard(k), d - int(self.doc_starts[k])
        r = int(np.searchsorted(sh.doc_offsets, local, side="right") - 1)
        first_doc = int(sh.doc_offsets[r])
        in_row = local - first_doc
        img_at = int(sh.image_offsets[r]) + int(np.asarray(sh.docs[first_doc:local, 2]).sum())
        refs = [ImageRef(sh.strings[s], int(o), int(n))
                for s, o, n in np.asarray(sh.images[img_at:img_at + int(sh.docs[local, 2])]).tolist()]
        mask = np.asarray(sh.doc_ids[r]) == in_row
        return np.asarray(sh.tokens[r])[mask], np.asarray(sh.loss[r])[mask], refs


def _differences(want: SourceSpec, have: dict) -> list[str]:
    out = []
    for key, value in dataclasses.asdict(want).items():
        theirs = have.get(key)
        if key == "files":
            if list(value) != list(theirs or []):
                out.append(f"files ({len(theirs or [])} there, {len(value)} here)")
        elif theirs != value:
            what = "tokenizer" if key == "tokenizer" else key
            out.append(f"{what} ({theirs} there, {value} here)")
    return out


def find_prepared(root: Path, spec: SourceSpec, recipe_hint: str) -> PreparedSource:
    folder = root / spec.dirname
    if (folder / "manifest.json").exists():
        return PreparedSource(folder)
    others = sorted(p for p in root.glob(f"{spec.name}-*") if (p / "manifest.json").exists()) if root.exists() else []
    if not others:
        raise PreparedDataError(f"data source '{spec.name}' is not prepared in {root}: run "
                                f"`mm1 data prepare {recipe_hint}` with the same settings first")
    diff = _differences(spec, json.loads((others[-1] / "manifest.json").read_text())["spec"])
    raise PreparedDataError(
        f"data source '{spec.name}' in {root} was prepared with other settings, which are never mixed: "
        f"{'; '.join(diff)}. Run `mm1 data prepare {recipe_hint}` with this run's settings")


def open_prepared(cfg: Config, stage: Stage, tok: Tokenizer) -> dict[str, PreparedSource]:
    """The prepared sources of a stage, in config order; PreparedDataError when one is missing."""
    hint = f"--recipe {cfg.recipe}" + (f" --stage {stage.value}" if stage != Stage.PRETRAIN else "")
    root = prepared_root(cfg)
    return {name: find_prepared(root, spec, hint) for name, spec in source_specs(cfg, stage, tok).items()}
