"""From segments to packed sequences: tokenize, split what is too long, best-fit pack, lay out.

MM1 packs pre-training data into 4096-token sequences with at most 16 images. Here:
- `tokenize` turns segments (`mm1.data.template`) into token ids with `image_tokens` `<image>`
  slots per image view and a per-token loss flag (never on images or user turns); a training
  sample ends with end-of-text, predicted when the token before it is;
- `split_chunks` cuts a sample longer than `seq_len` (or with more than `max_images` images) at
  text positions only, never through an image; an image that alone exceeds a sequence is
  dropped with a count;
- `pack` places chunks into sequences by best fit decreasing (the longest chunk first, each into
  the fullest sequence it fits), which fills sequences to ~99% when chunks are small next to them;
- `layout` writes one sequence's chunks as fixed-length rows: tokens, loss flags, per-document
  positions and document ids (attention stays inside a document; -1 marks padding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mm1.data.template import Control, Markup, Segment, Text
from mm1.data.tokenizer import Tokenizer


@dataclass
class Tokenized:
    """One record as tokens, loss mask and image placeholders, before it is cut into chunks."""
    tokens: np.ndarray  # int64 [L]
    loss: np.ndarray  # bool [L]: token t is a prediction target
    images: list  # the image segments, in order
    image_starts: list[int] = field(default_factory=list)  # first slot of each image's block


def tokenize(segments: Sequence[Segment], tok: Tokenizer, *, image_tokens: int,
             views_per_image: int | Callable[[object], int] = 1, end_of_text: bool = True) -> Tokenized:
    """`views_per_image` > 1 reserves slots for sub-image decomposition (overview + crops); a function
    gives each image its own count (mixed-resolution few-shot prompts)."""
    texts = [s.text for s in segments if isinstance(s, Text)]
    encoded = iter(tok.encode_batch(texts)) if texts else iter(())
    ids: list[int] = []
    loss: list[bool] = []
    images: list = []
    starts: list[int] = []
    for seg in segments:
        if isinstance(seg, Text):
            piece = next(encoded)
            ids += piece
            loss += [seg.loss] * len(piece)
        elif isinstance(seg, Control):
            ids.append(tok.control_id(seg.token))
            loss.append(seg.loss)
        elif isinstance(seg, Markup):
            piece = tok.encode_markup(seg.text)
            ids += piece
            loss += [seg.loss] * len(piece)
        else:
            images.append(seg)
            starts.append(len(ids))
            block = image_tokens * (views_per_image(seg) if callable(views_per_image) else views_per_image)
            ids += [tok.image_id] * block
            loss += [False] * block
    if end_of_text:
        # Predicted after the text it closes (a caption, a document, an answer), not after a prompt.
        loss.append(loss[-1] if loss else True)
        ids.append(tok.eos_id)
    return Tokenized(np.asarray(ids, dtype=np.int64), np.asarray(loss, dtype=bool), images, starts)


@dataclass(frozen=True)
class Chunk:
    """A slice of a tokenized record that fits a sequence, with the images it holds."""
    start: int
    end: int
    first_image: int  # index into Tokenized.images
    num_images: int

    @property
    def length(self) -> int:
        return self.end - self.start


def split_chunks(t: Tokenized, *, seq_len: int, max_images: int, block: int) -> tuple[list[Chunk], int]:
    """Cut at text positions into chunks that fit; returns (chunks, images dropped as too large)."""
    chunks: list[Chunk] = []
    dropped = 0
    start, img, n_img = 0, 0, 0
    L = len(t.tokens)
    bounds = [(s, s + block) for s in t.image_starts]
    k = 0
    pos = 0
    while pos < L:
        if k < len(bounds) and bounds[k][0] == pos:
            b = bounds[k][1]
            if block > seq_len:  # this image can never fit: leave it out of every chunk
                if pos > start:
                    chunks.append(Chunk(start, pos, img, n_img))
                dropped += 1
                k += 1
                start, img, n_img, pos = b, k, 0, b
                continue
            if b - start > seq_len or n_img + 1 > max_images:
                if pos > start:
                    chunks.append(Chunk(start, pos, img, n_img))
                start, img, n_img = pos, k, 0
            n_img += 1
            k += 1
            pos = b
            continue
        nxt = bounds[k][0] if k < len(bounds) else L
        room = start + seq_len - pos
        if nxt - pos <= room:
            pos = nxt
            continue
        pos += room  # text runs past the end: cut inside the text
        chunks.append(Chunk(start, pos, img, n_img))
        start, img, n_img = pos, k, 0
    if pos > start:
        chunks.append(Chunk(start, pos, img, n_img))
    return chunks, dropped


def pack(lengths: np.ndarray, images: np.ndarray, *, seq_len: int, max_images: int) -> list[list[int]]:
    """Best fit decreasing: item indices per sequence. Every item fits alone (split_chunks sees to it).

    Deterministic: items are taken longest first, ties in input order; each goes into the open
    sequence with the least room left that still holds it (tokens and images), else a new one.
    """
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    smallest = int(lengths.min()) if len(lengths) else 0
    # Sequences that can still take the smallest item: their index, tokens and images left.
    open_b = np.zeros(0, dtype=np.int64)
    room = np.zeros(0, dtype=np.int64)
    img_room = np.zeros(0, dtype=np.int64)
    bins: list[list[int]] = []
    for i in order.tolist():
        n, m = int(lengths[i]), int(images[i])
        fits = np.flatnonzero((room >= n) & (img_room >= m))
        if len(fits):
            k = int(fits[np.argmin(room[fits])])
        else:
            bins.append([])
            open_b, room, img_room = (np.append(open_b, len(bins) - 1), np.append(room, seq_len),
                                      np.append(img_room, max_images))
            k = len(open_b) - 1
        room[k] -= n
        img_room[k] -= m
        bins[int(open_b[k])].append(i)
        if room[k] < smallest or img_room[k] < 0:
            open_b, room, img_room = np.delete(open_b, k), np.delete(room, k), np.delete(img_room, k)
    return bins


@dataclass
class Row:
    """One packed sequence as fixed-length arrays (what prepared data stores per sequence)."""

    tokens: np.ndarray  # uint32 [seq_len]
    loss: np.ndarray  # uint8 [seq_len]: 1 where the token is a prediction target
    positions: np.ndarray  # uint16 [seq_len]: position inside its document (chunk)
    doc_ids: np.ndarray  # int16 [seq_len]: document index in the sequence, -1 for padding


def layout(parts: Sequence[tuple[Tokenized, Chunk]], *, seq_len: int, pad_id: int) -> Row:
    """Lay chunks out one after another, then pad."""
    row = Row(np.full(seq_len, pad_id, dtype=np.uint32), np.zeros(seq_len, dtype=np.uint8),
              np.zeros(seq_len, dtype=np.uint16), np.full(seq_len, -1, dtype=np.int16))
    at = 0
    for doc, (t, c) in enumerate(parts):
        n = c.length
        row.tokens[at:at + n] = t.tokens[c.start:c.end]
        row.loss[at:at + n] = t.loss[c.start:c.end]
        row.positions[at:at + n] = np.arange(n)
        row.doc_ids[at:at + n] = doc
        at += n
    return row


IGNORE = -100  # label of positions that carry no loss (images, prompts, padding, document ends)


def labels_from(tokens: np.ndarray, loss: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
    """labels[j] = tokens[j+1] where token j+1 is a target of the same document, else IGNORE."""
    labels = np.full(tokens.shape, IGNORE, dtype=np.int64)
    same = (doc_ids[..., 1:] == doc_ids[..., :-1]) & (doc_ids[..., 1:] >= 0) & (loss[..., 1:] > 0)
    labels[..., :-1] = np.where(same, tokens[..., 1:].astype(np.int64), IGNORE)
    return labels
