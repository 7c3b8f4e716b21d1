"""One training example, whatever format it came from: text and images in reading order.

Every reader in `mm1.data.formats` yields `Sample`s; the packer turns them into tokens. Images are
kept as lazy references (bytes or a path plus a `where` string for error messages) so that
indexing a data set never decodes a picture.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mm1.data.images import decode_image, load_image


class Source(enum.IntEnum):
    """Data sources; the value is the id the model uses for per-source losses."""

    CAPTION = 0
    INTERLEAVED = 1
    TEXT = 2
    SFT = 3


@dataclass(frozen=True)
class Text:
    text: str
    loss: bool = True  # False for prompts and user turns: never predicted


@dataclass(frozen=True)
class ImageRef:
    where: str  # "shard.tar:KEY" or a path: names the image in every warning
    data: bytes | None = None
    path: str | None = None

    def load(self) -> Image.Image:
        if self.data is not None:
            return decode_image(self.data, where=self.where)
        if self.path is None:
            raise ValueError(f"{self.where}: image reference has neither bytes nor a path")
        return load_image(Path(self.path))


Segment = Text | ImageRef


@dataclass
class Sample:
    source: Source
    segments: list[Segment]
    where: str = ""  # the record's location, for warnings
    meta: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return sum(isinstance(s, ImageRef) for s in self.segments)


class RecordError(ValueError):
    """A malformed record; the message names the file and key."""
