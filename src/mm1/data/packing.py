"""From samples to packed sequences: tokenize, split what is too long, bin-pack, build tensors.

MM1 packs pre-training data into 4096-token sequences with at most 16 images. Here:
- `tokenize` turns a Sample into token ids with `num_image_tokens` `<image>` slots per image and a
  per-token loss flag (never on images, never on prompts / user turns, always ends with EOS);
- `split_chunks` cuts a sample longer than `seq_len` (or with more than `max_images` images) at
  text positions only, never through an image; an image that alone exceeds a sequence is
  dropped with a count;
- `best_fit` packs chunk lengths into a fixed number of sequences (best-fit, in stream order);
- `build_sequence` lays the chunks of one sequence out as tokens, shifted labels, per-document
  positions and document ids, so attention stays inside each document.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mm1.data.sample import ImageRef, Sample, Text
from mm1.data.tokenizer import Tokenizer

IGNORE = -100


@dataclass
class Tokenized:
    tokens: np.ndarray  # int64 [L]
    loss: np.ndarray  # bool [L]: token t is a prediction target
    images: list[ImageRef]
    image_starts: list[int]  # first slot of each image block


def tokenize(sample: Sample, tok: Tokenizer, *, image_tokens: int, views_per_image: int = 1) -> Tokenized:
    """`views_per_image` > 1 reserves slots for sub-image decomposition (overview + crops)."""
    texts = [s.text for s in sample.segments if isinstance(s, Text)]
    encoded = iter(tok.encode_batch(texts)) if texts else iter(())
    ids: list[int] = []
    loss: list[bool] = []
    images: list[ImageRef] = []
    starts: list[int] = []
    block = image_tokens * views_per_image
    for seg in sample.segments:
        if isinstance(seg, Text):
            piece = next(encoded)
            ids += piece
            loss += [seg.loss] * len(piece)
        else:
            images.append(seg)
            starts.append(len(ids))
            ids += [tok.image_id] * block
            loss += [False] * block
    ids.append(tok.eos_id)
    # The end of a sample is predicted unless the sample is a conversation whose last turn was
    # a prompt (cannot happen with well-formed data); captions and documents always end in EOS.
    loss.append(bool(loss[-2]) if len(loss) > 1 else True)
    return Tokenized(np.asarray(ids, dtype=np.int64), np.asarray(loss, dtype=bool), images, starts)


@dataclass(frozen=True)
class Chunk:
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


def best_fit(lengths: np.ndarray, images: np.ndarray, *, bins: int, seq_len: int, max_images: int
             ) -> tuple[list[list[int]], list[int]]:
    """Place items in stream order into `bins` sequences, each into the fullest one it fits.

    Returns the item indices per bin and the items that fitted nowhere (counted by the caller).
    """
    room = np.full(bins, seq_len, dtype=np.int64)
    img_room = np.full(bins, max_images, dtype=np.int64)
    content: list[list[int]] = [[] for _ in range(bins)]
    left: list[int] = []
    big = np.iinfo(np.int64).max
    for i, (n, m) in enumerate(zip(lengths.tolist(), images.tolist(), strict=True)):
        fits = (room >= n) & (img_room >= m)
        if not fits.any():
            left.append(i)
            continue
        b = int(np.where(fits, room, big).argmin())
        room[b] -= n
        img_room[b] -= m
        content[b].append(i)
    return content, left


@dataclass
class PackedSequence:
    tokens: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    doc_ids: np.ndarray
    source: np.ndarray
    images: list[ImageRef] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)  # where each document came from

    @property
    def real_tokens(self) -> int:
        return int((self.doc_ids >= 0).sum())


def build_sequence(parts: list[tuple[Tokenized, Chunk, int, str]], *, seq_len: int, pad_id: int) -> PackedSequence:
    """Lay out (tokenized sample, chunk, source id, where) parts one after another, then pad."""
    seq = PackedSequence(
        tokens=np.full(seq_len, pad_id, dtype=np.int64), labels=np.full(seq_len, IGNORE, dtype=np.int64),
        positions=np.zeros(seq_len, dtype=np.int64), doc_ids=np.full(seq_len, -1, dtype=np.int64),
        source=np.zeros(seq_len, dtype=np.int64),
    )
    at = 0
    for doc, (t, c, source, where) in enumerate(parts):
        n = c.length
        toks = t.tokens[c.start:c.end]
        seq.tokens[at:at + n] = toks
        # labels[j] is the token after j, if that token is a prediction target of this chunk.
        lab = np.where(t.loss[c.start + 1:c.end], toks[1:], IGNORE)
        seq.labels[at:at + n - 1] = lab
        seq.positions[at:at + n] = np.arange(n)
        seq.doc_ids[at:at + n] = doc
        seq.source[at:at + n] = source
        seq.images += t.images[c.first_image:c.first_image + c.num_images]
        seq.docs.append(where)
        at += n
    return seq
