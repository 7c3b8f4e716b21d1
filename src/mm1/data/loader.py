"""The training stream: a pure function of (seed, step, rank, world size), served by worker processes.

Global sequence g of the run is fixed before training starts: the mixture maps stream positions
to records (`mm1.data.mixture`), and positions are packed in blocks of `BLOCK` into exactly
`seqs_per_block` sequences (`mm1.data.packing.best_fit`), so sequence g lives in block
g // seqs_per_block. Step N on rank r of w takes sequences N·B + r·(B/w) + i, i < B/w, for a global
batch of B sequences. Nothing depends on what ran before, so:
- resuming at step N sees exactly the batches an uninterrupted run would (the state is the step);
- `mm1 data batch --step N` shows step N without replaying the run;
- ranks and loader workers partition the sequences: no duplicates, no gaps.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mm1.config import Config, Stage
from mm1.data.images import ImageError, sub_images, to_tensor
from mm1.data.mixture import Mixture
from mm1.data.packing import Chunk, PackedSequence, Tokenized, best_fit, build_sequence, split_chunks, tokenize
from mm1.data.sample import RecordError
from mm1.data.sources import open_sources
from mm1.data.stats import DataStats
from mm1.data.tokenizer import Tokenizer

BLOCK = 4096  # stream positions packed together
FILL = 0.985  # sequences per block are sized for this expected fill; the rest is counted


@dataclass
class Batch:
    tokens_BT: torch.Tensor
    labels_BT: torch.Tensor
    positions_BT: torch.Tensor
    doc_ids_BT: torch.Tensor
    source_BT: torch.Tensor
    images_NCHW: torch.Tensor | None
    images_per_row: list[int]
    step: int = 0
    docs: list[list[str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # "source/reason" → count, in this batch

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        return {"tokens_BT": self.tokens_BT, "labels_BT": self.labels_BT, "positions_BT": self.positions_BT,
                "doc_ids_BT": self.doc_ids_BT, "source_BT": self.source_BT, "images_NCHW": self.images_NCHW}

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
        return Batch(move(self.tokens_BT), move(self.labels_BT), move(self.positions_BT), move(self.doc_ids_BT),
                     move(self.source_BT), move(self.images_NCHW), self.images_per_row, self.step, self.docs,
                     self.skipped)


class DataStream:
    def __init__(self, cfg: Config, tok: Tokenizer, *, stats: DataStats | None = None) -> None:
        data, model = cfg.data, cfg.model
        self.stats = stats or DataStats()
        self.stage = cfg.train.stage
        self.sources = open_sources(data, self.stage, self.stats)
        self.names = list(self.sources)
        self.tok = tok
        self.seq_len, self.max_images = data.packing.seq_len, data.packing.max_images
        self.image_size = model.vision.image_size
        self.grid = data.sub_image_grid if self.stage == Stage.SFT else 0
        self.block_tokens = model.connector.num_tokens * (1 + self.grid**2 if self.grid else 1)
        self.global_batch = cfg.train.batch_size
        weights = ([1.0] if self.stage == Stage.SFT else
                   [getattr(data.mixture, n) for n in self.names])
        self.mixture = Mixture([len(self.sources[n]) for n in self.names], weights, seed=data.seed)
        self._index()
        self._blocks: OrderedDict[int, tuple[list[list[tuple[int, int, int]]], Counter]] = OrderedDict()

    # ------------------------------------------------------------------ index
    def _tokenize(self, s: int, rec: int) -> tuple[Tokenized, list[Chunk], int]:
        """(tokens, chunks, images dropped because one image alone exceeds a sequence)."""
        sample = self.sources[self.names[s]].load(rec)
        views = 1 + self.grid**2 if self.grid else 1
        t = tokenize(sample, self.tok, image_tokens=self.block_tokens // views, views_per_image=views)
        chunks, dropped = split_chunks(t, seq_len=self.seq_len, max_images=self.max_images, block=self.block_tokens)
        return t, chunks, dropped

    def _index(self) -> None:
        """Chunk lengths and image counts of every record (text only: no image is decoded)."""
        self.chunk_len: list[list[list[int]]] = []
        self.chunk_img: list[list[list[int]]] = []
        expected = 0.0
        weights = self.mixture.counts / self.mixture.counts.sum()
        for s, name in enumerate(self.names):
            lens, imgs = [], []
            for rec in range(len(self.sources[name])):
                try:
                    _, chunks, dropped = self._tokenize(s, rec)
                except RecordError as err:
                    self.stats.skip(name, str(err).split(": ", 1)[0], str(err).split(": ", 1)[-1])
                    chunks, dropped = [], 0
                if dropped:
                    self.stats.count(f"{name}/images dropped: larger than a sequence", dropped)
                if len(chunks) > 1:
                    self.stats.count(f"{name}/samples split at text to fit seq_len")
                lens.append([c.length for c in chunks])
                imgs.append([c.num_images for c in chunks])
            self.chunk_len.append(lens)
            self.chunk_img.append(imgs)
            expected += weights[s] * float(np.mean([sum(x) for x in lens]))
        self.seqs_per_block = max(1, int(BLOCK * expected / self.seq_len * FILL))

    # ------------------------------------------------------------------ plan
    def plan_block(self, b: int) -> list[list[tuple[int, int, int]]]:
        """The (source, record, chunk) parts of each of block b's sequences."""
        return self._plan(b)[0]

    def _plan(self, b: int) -> tuple[list[list[tuple[int, int, int]]], Counter]:
        """Block b's plan and, per source, the chunks that fitted in none of its sequences."""
        if b in self._blocks:
            return self._blocks[b]
        items: list[tuple[int, int, int]] = []
        for s, rec in self.mixture.positions(b * BLOCK, (b + 1) * BLOCK):
            items += [(s, rec, c) for c in range(len(self.chunk_len[s][rec]))]
        lengths = np.asarray([self.chunk_len[s][r][c] for s, r, c in items], dtype=np.int64)
        images = np.asarray([self.chunk_img[s][r][c] for s, r, c in items], dtype=np.int64)
        bins, left = best_fit(lengths, images, bins=self.seqs_per_block, seq_len=self.seq_len,
                              max_images=self.max_images)
        plan = [[items[i] for i in content] for content in bins]
        left_over = Counter(f"{self.names[items[i][0]]}/left over by packing" for i in left)
        self._blocks[b] = (plan, left_over)
        if len(self._blocks) > 4:
            self._blocks.popitem(last=False)
        return plan, left_over

    def block_report(self, b: int) -> dict[str, float]:
        """Packing efficiency and leftovers of one block (for benchmarks and tests)."""
        plan = self.plan_block(b)
        used = sum(self.chunk_len[s][r][c] for seq in plan for s, r, c in seq)
        total_items = sum(len(self.chunk_len[s][r]) for s, r in self.mixture.positions(b * BLOCK, (b + 1) * BLOCK))
        placed = sum(len(seq) for seq in plan)
        return {"efficiency": used / (len(plan) * self.seq_len), "left_over": (total_items - placed) / total_items}

    # ------------------------------------------------------------------ materialise
    def _image_tensors(self, t: Tokenized, c: Chunk) -> list[torch.Tensor]:
        out = []
        for ref in t.images[c.first_image:c.first_image + c.num_images]:
            img = ref.load()
            views = sub_images(img, self.image_size, self.grid) if self.grid else [img]
            out += [to_tensor(v, self.image_size) for v in views]
        return out

    def sequence(self, g: int, skipped: Counter | None = None) -> tuple[PackedSequence, list[torch.Tensor]]:
        parts, tensors = [], []
        plan, left_over = self._plan(g // self.seqs_per_block)
        if skipped is not None and g % self.seqs_per_block == 0:  # a block's leftovers, counted once
            skipped.update(left_over)
        for s, rec, ci in plan[g % self.seqs_per_block]:
            name = self.names[s]
            try:
                t, chunks, _ = self._tokenize(s, rec)
                imgs = self._image_tensors(t, chunks[ci])
            except (ImageError, RecordError, OSError) as err:
                self.stats.skip(name, self._where(s, rec), str(err))
                if skipped is not None:
                    skipped[f"{name}/{type(err).__name__}"] += 1
                continue
            parts.append((t, chunks[ci], int(self.sources[name].source), self._where(s, rec)))
            tensors += imgs
        seq = build_sequence(parts, seq_len=self.seq_len, pad_id=self.tok.pad_id)
        return seq, tensors

    def _where(self, s: int, rec: int) -> str:
        entry = self.sources[self.names[s]].entries[rec]
        if hasattr(entry, "where"):  # a Sample (SFT)
            return entry.where
        if hasattr(entry, "shard"):  # WebDataset
            return f"{entry.shard}:{entry.key}"
        if hasattr(entry, "row"):  # parquet / jsonl document
            return f"{entry.path}:{entry.row}"
        if isinstance(entry, tuple):  # (where, text) or ("jsonl", CaptionedImage)
            return entry[0] if isinstance(entry[0], str) and entry[0] != "jsonl" else entry[1].image
        return f"{self.names[s]}[{rec}]"

    def rows(self, step: int, rank: int, world_size: int) -> range:
        if self.global_batch % world_size:
            raise ValueError(f"batch size {self.global_batch} does not divide over {world_size} ranks")
        per_rank = self.global_batch // world_size
        first = step * self.global_batch + rank * per_rank
        return range(first, first + per_rank)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        skipped: Counter = Counter()
        seqs, images, per_row = [], [], []
        for g in self.rows(step, rank, world_size):
            seq, imgs = self.sequence(g, skipped)
            seqs.append(seq)
            images += imgs
            per_row.append(len(imgs))
        stack = lambda f: torch.from_numpy(np.stack([getattr(s, f) for s in seqs]))  # noqa: E731
        return Batch(stack("tokens"), stack("labels"), stack("positions"), stack("doc_ids"), stack("source"),
                     torch.stack(images) if images else None, per_row, step, [s.docs for s in seqs],
                     dict(skipped))


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
    """What `mm1 data batch` prints: each sequence's documents, token counts and a text preview."""
    tok = load_tokenizer(cfg)
    stream = DataStream(cfg, tok)
    batch = stream.batch(step, rank, world_size)
    lines = [f"step {step}, rank {rank}/{world_size}: {batch.tokens_BT.shape[0]} sequences × "
             f"{batch.tokens_BT.shape[1]} tokens, {sum(batch.images_per_row)} images"]
    for i, docs in enumerate(batch.docs):
        real = int((batch.doc_ids_BT[i] >= 0).sum())
        g = stream.rows(step, rank, world_size)[i]
        lines.append(f"  sequence {g}: {real} real tokens, {batch.images_per_row[i]} images, {len(docs)} documents")
        for d in docs:
            lines.append(f"    - {d}")
        preview = tok.decode(batch.tokens_BT[i][: min(real, 60)].tolist()).replace("\n", " ")
        lines.append(f"    text: {preview[:160]!r}")
    if batch.skipped:
        lines.append(f"  skipped: {batch.skipped}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v for k, v in batch.model_inputs().items()} | {"docs": batch.docs, "step": step}, out)
        lines.append(f"saved to {out}")
    return "\n".join(lines)
