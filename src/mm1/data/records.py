"""Typed records: what each data format yields, before tokenization.

Every reader in `mm1.data.formats` turns record i of its file into one of four record types (a
caption pair, an interleaved document, a text, a conversation) or raises `RecordError`, which
carries *where* (file and key) and *why* as fields. Images are lazy references (a byte range in a
file, or a whole file), so reading a record never decodes a picture; `mm1 data prepare` checks
each image once and the training loader decodes it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mm1.data.errors import ImageError, RecordError
from mm1.data.images import decode_image


@dataclass(frozen=True)
class ImageRef:
    """An image inside a file (`offset`, `size` of a tar member) or a whole file (`size` = -1)."""

    path: str
    offset: int = 0
    size: int = -1

    @property
    def where(self) -> str:
        return self.path if self.size < 0 else f"{self.path}@{self.offset}"

    def read_bytes(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                if self.size < 0:
                    return f.read()
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as err:
            raise ImageError(self.where, "cannot read image", str(err.strerror or err)) from None
        if self.size >= 0 and len(data) != self.size:
            raise ImageError(self.where, "image truncated", f"{len(data)} of {self.size} bytes")
        return data

    def load(self) -> Image.Image:
        return decode_image(self.read_bytes(), where=self.where)


@dataclass(frozen=True)
class CaptionRecord:
    """An image-text pair: the image, then its caption (the loss is on the caption)."""

    image: ImageRef
    caption: str


@dataclass(frozen=True)
class DocumentRecord:
    """An interleaved document: text pieces and images in reading order.

    `dropped` lists image slots the reader left out (a URL with no local copy), counted by prepare.
    """

    parts: tuple[str | ImageRef, ...]
    dropped: tuple[RecordError, ...] = ()


@dataclass(frozen=True)
class TextRecord:
    """A text-only document (MM1's 10% text data)."""
    text: str


class Role(str, enum.Enum):
    """Who speaks a conversation turn."""
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: text and images in order (images only in user turns).

    Images are references in training data and decoded PIL images at inference.
    """

    role: Role
    parts: tuple[str | ImageRef | Image.Image, ...]


@dataclass(frozen=True)
class ConversationRecord:
    """An SFT conversation: turns of system, user and assistant, images inside the user turns."""
    turns: tuple[Turn, ...]


Record = CaptionRecord | DocumentRecord | TextRecord | ConversationRecord


def record_images(record: Record) -> list[ImageRef]:
    """The images of a record in reading order."""
    if isinstance(record, CaptionRecord):
        return [record.image]
    if isinstance(record, DocumentRecord):
        return [p for p in record.parts if isinstance(p, ImageRef)]
    if isinstance(record, ConversationRecord):
        return [p for t in record.turns for p in t.parts if isinstance(p, ImageRef)]
    return []


def record_texts(record: Record) -> list[str]:
    """The texts of a record (for training a tokenizer)."""
    if isinstance(record, CaptionRecord):
        return [record.caption]
    if isinstance(record, TextRecord):
        return [record.text]
    parts = record.parts if isinstance(record, DocumentRecord) else [p for t in record.turns for p in t.parts]
    return [p for p in parts if isinstance(p, str)]


def local_path(ref: str, base: Path) -> str:
    """A path relative to a data file's folder, or an absolute one."""
    p = Path(ref)
    return str(p if p.is_absolute() else base / p)
