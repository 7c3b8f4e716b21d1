"""The training stream: a pure function of (seed, step, rank, world size), served by worker processes.

It reads prepared sources (`mm1 data prepare`): global sequence g of the run is sequence j of
source s, with (s, j) given by the mixture (`mm1.data.mixture`) in O(1). Step N on rank r of w takes
global sequences N·B + r·(B/w) + i, i < B/w, for a global batch of B sequences. Nothing depends on
what ran before, so:
- resuming at step N sees exactly the batches an uninterrupted run would (the state is the step);
- `mm1 data batch --step N` shows step N without replaying the run;
- ranks and loader workers partition the sequences: no duplicates, no gaps.
Start-up opens manifests only, so it takes the same time and memory for any corpus size. Images
are decoded here, in the loader's workers; prepare has already left out the ones that fail.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mm1.config import Config, Stage
from mm1.data.errors import ImageError
from mm1.data.images import mean_colour, sub_images, to_tensor
from mm1.data.mixture import Mixture
from mm1.data.packing import IGNORE, labels_from
from mm1.data.prepare import views_per_image
from mm1.data.prepared import PreparedSource, open_prepared
from mm1.data.sources import stage_sources
from mm1.data.stats import DataStats
from mm1.data.tokenizer import Tokenizer


@dataclass
class Batch:
    """One micro-batch of packed sequences, their images and what the loss needs, ready for the model."""
    tokens_BT: torch.Tensor
    labels_BT: torch.Tensor
    positions_BT: torch.Tensor
    doc_ids_BT: torch.Tensor
    source_BT: torch.Tensor  # index of the source (in the stream's `names`) of every token
    images_NCHW: torch.Tensor | None
    images_per_row: list[int]
    step: int = 0
    docs: list[list[str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # "source/reason" → count, in this batch
    num_labelled: int | None = None  # counted on the CPU by `to`, so that the loss never reads it back

    def model_inputs(self) -> dict[str, torch.Tensor | int | None]:
        return {"tokens_BT": self.tokens_BT, "labels_BT": self.labels_BT, "positions_BT": self.positions_BT,
                "doc_ids_BT": self.doc_ids_BT, "source_BT": self.source_BT, "images_NCHW": self.images_NCHW,
                "num_labelled": self.num_labelled}

    def split(self, n: int) -> list[Batch]:
        """n micro-batches of consecutive rows (images follow their rows)."""
        rows = self.tokens_BT.shape[0]
        if rows % n:
            raise ValueError(f"{rows} rows do not split into {n} micro-batches")
        size, out, img_at = rows // n, [], 0
        for i in range(n):
            sl = slice(i * size, (i + 1) * size)
            n_img = sum(self.images_per_row[sl])
            imgs = self.images_NCHW[img_at:img_at + n_img] if n_img else None
            img_at += n_img
            out.append(Batch(self.tokens_BT[sl], self.labels_BT[sl], self.positions_BT[sl], self.doc_ids_BT[sl],
                             self.source_BT[sl], imgs, self.images_per_row[sl], self.step, self.docs[sl]))
        return out

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        labelled = self.num_labelled
        if labelled is None and self.labels_BT.device.type == "cpu":
            labelled = int((self.labels_BT != IGNORE).sum())
        return Batch(move(self.tokens_BT), move(self.labels_BT), move(self.positions_BT), move(self.doc_ids_BT),
                     move(self.source_BT), move(self.images_NCHW), self.images_per_row, self.step, self.docs,
                     self.skipped, labelled)


class DataStream:
    """Batches of prepared sequences, mixed per source by the config's weights."""

    def __init__(self, cfg: Config, tok: Tokenizer, *, stage: Stage | None = None,
                 stats: DataStats | None = None) -> None:
        self.stage = stage or cfg.train.stage
        self.stats = stats or DataStats()
        self.sources: dict[str, PreparedSource] = open_prepared(cfg, self.stage, tok)
        self.names = list(self.sources)
        weights = [stage_sources(cfg, self.stage)[n].weight for n in self.names]
        self.mixture = Mixture([len(s) for s in self.sources.values()], weights, seed=cfg.data.seed)
        self.image_size, self.norm = cfg.model.vision.image_size, cfg.model.vision.norm
        self.grid = cfg.data.sub_image_grid if views_per_image(cfg, self.stage) > 1 else 0
        self.global_batch = cfg.train.batch_size
        self.seq_len = cfg.data.packing.seq_len

    def rows(self, step: int, rank: int, world_size: int) -> range:
        if self.global_batch % world_size:
            raise ValueError(f"batch size {self.global_batch} does not divide over {world_size} ranks")
        per_rank = self.global_batch // world_size
        first = step * self.global_batch + rank * per_rank
        return range(first, first + per_rank)

    def epochs(self, step: int) -> dict[str, float]:
        """Epochs of each source consumed by the end of `step` (all ranks)."""
        return dict(zip(self.names, self.mixture.epochs((step + 1) * self.global_batch), strict=True))

    def _image_views(self, img: Image.Image) -> list[torch.Tensor]:
        views = sub_images(img, self.image_size, self.grid, self.norm) if self.grid else [img]
        return [to_tensor(v, self.image_size, self.norm) for v in views]

    def _load_images(self, name: str, refs, skipped: Counter) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for ref in refs:
            try:
                img = ref.load()
            except ImageError as err:  # changed since prepare checked it: a blank stands in, counted
                self.stats.skip(name, err.where, f"image unreadable at load: {err.reason}")
                skipped[f"{name}/image unreadable at load"] += 1
                img = Image.new("RGB", (self.image_size, self.image_size), mean_colour(self.norm))
            out += self._image_views(img)
        return out

    def sequence(self, g: int, skipped: Counter | None = None) -> tuple[dict[str, np.ndarray], list[torch.Tensor],
                                                                        list[str]]:
        """Global sequence g: its arrays (tokens, labels, positions, doc ids, source), images and documents."""
        s, _, j = self.mixture.locate(g)
        name = self.names[s]
        seq = self.sources[name].sequence(j)
        arrays = {"tokens": seq.tokens.astype(np.int64), "labels": labels_from(seq.tokens, seq.loss, seq.doc_ids),
                  "positions": seq.positions.astype(np.int64), "doc_ids": seq.doc_ids.astype(np.int64),
                  "source": np.full(len(seq.tokens), s, dtype=np.int64)}
        images = self._load_images(name, seq.images, skipped if skipped is not None else Counter())
        return arrays, images, [f"{name}: {d}" for d in seq.docs]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        skipped: Counter = Counter()
        rows, images, per_row, docs = [], [], [], []
        for g in self.rows(step, rank, world_size):
            arrays, imgs, where = self.sequence(g, skipped)
            rows.append(arrays)
            images += imgs
            per_row.append(len(imgs))
            docs.append(where)
        stack = lambda f: torch.from_numpy(np.stack([r[f] for r in rows]))  # noqa: E731
        return Batch(stack("tokens"), stack("labels"), stack("positions"), stack("doc_ids"), stack("source"),
                     torch.stack(images) if images else None, per_row, step, docs, dict(skipped))

    def manifests(self) -> dict[str, dict]:
        """Each source's prepare statistics (records read, used, skipped by reason)."""
        keys = ("records", "skipped", "images_left_out", "images_too_large", "file_problems", "sequences", "fill")
        return {n: {k: s.manifest[k] for k in keys} | {"dir": str(s.folder)} for n, s in self.sources.items()}


class StepDataset(IterableDataset):
    """`make(step)` for steps start..stop-1; worker k of n serves steps start+k, start+k+n, ..."""

    def __init__(self, make: Callable[[int], Any], *, start: int, stop: int) -> None:
        self.make, self.start, self.stop = make, start, stop

    def __iter__(self):
        info = get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + k, self.stop, n):
            yield self.make(step)


def step_loader(make: Callable[[int], Any], *, start: int, stop: int, num_workers: int) -> DataLoader:
    """A DataLoader whose workers take steps round-robin, so batches arrive in step order."""
    kw = {"multiprocessing_context": "fork", "prefetch_factor": 4} if num_workers else {}
    return DataLoader(StepDataset(make, start=start, stop=stop), batch_size=None, num_workers=num_workers, **kw)


def make_loader(stream: DataStream, *, start: int, stop: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 2) -> DataLoader:
    """The training stream's batches of one rank, in step order."""
    return step_loader(partial(stream.batch, rank=rank, world_size=world_size), start=start, stop=stop,
                       num_workers=num_workers)


def load_tokenizer(cfg: Config) -> Tokenizer:
    path = Path(cfg.data.tokenizer or Path(cfg.data.root) / "tokenizer.json")
    return Tokenizer.from_file(path)


def describe_batch(cfg: Config, *, step: int, rank: int = 0, world_size: int = 1, out: Path | None = None) -> str:
    """What `mm1 data batch` prints: each sequence's source, documents, token counts and a text preview."""
    tok = load_tokenizer(cfg)
    stream = DataStream(cfg, tok)
    batch = stream.batch(step, rank, world_size)
    lines = [f"step {step}, rank {rank}/{world_size}: {batch.tokens_BT.shape[0]} sequences × "
             f"{batch.tokens_BT.shape[1]} tokens, {sum(batch.images_per_row)} images"]
    for i, docs in enumerate(batch.docs):
        g = stream.rows(step, rank, world_size)[i]
        s, epoch, j = stream.mixture.locate(g)
        real = int((batch.doc_ids_BT[i] >= 0).sum())
        lines.append(f"  sequence {g}: {stream.names[s]} #{j} (epoch {epoch}), {real} real tokens, "
                     f"{batch.images_per_row[i]} images, {len(docs)} documents")
        lines += [f"    - {d}" for d in docs]
        preview = tok.decode(batch.tokens_BT[i][: min(real, 60)].tolist()).replace("\n", " ")
        lines.append(f"    text: {preview[:160]!r}")
    epochs = ", ".join(f"{n} {e:.3f}" for n, e in stream.epochs(step).items())
    lines.append(f"  epochs after this step: {epochs}")
    if batch.skipped:
        lines.append(f"  skipped: {batch.skipped}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(batch.model_inputs()) | {"docs": batch.docs, "step": step}, out)
        lines.append(f"saved to {out}")
    return "\n".join(lines)
