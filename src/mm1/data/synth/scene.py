"""Scenes of the embedded synthetic world: shapes, colours, sizes, positions and printed words.

A scene lives in continuous coordinates on the unit square and is rendered with Pillow at any
resolution, so resolution really matters here as it does in MM1: big shapes and their colours
are clear at 64 px, while counts of small shapes and the small printed words need more pixels.
Some shapes are striped: rows one 128th of the side apart, in two tints of the shape's colour whose
mean is that colour, so that at 128 px the stripes are plain and at 64 px (where each pixel averages
two rows) the shape is indistinguishable from a plain one: detail that only resolution shows, as
TextVQA's small text is.
Everything is a pure function of the random generator handed in.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
BACKGROUNDS = {"gray": (150, 150, 150), "white": (245, 245, 245), "black": (25, 25, 25)}
WORDS = ("sun", "cat", "map", "box", "sky", "car", "tree", "fish", "bird", "moon", "star", "door",
         "lamp", "ship", "book", "cake", "rain", "wolf", "frog", "kite")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")


@dataclass(frozen=True)
class Shape:
    """One shape of a synthetic image: kind, colour, centre and size."""
    kind: str
    colour: str
    x: float  # centre, in [0, 1]
    y: float
    r: float  # radius as a fraction of the image side
    striped: bool = False

    @property
    def size(self) -> str:
        return "large" if self.r >= 0.13 else "small"

    @property
    def region(self) -> str:
        row, col = ROWS[min(2, int(self.y * 3))], COLS[min(2, int(self.x * 3))]
        return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


@dataclass(frozen=True)
class Scene:
    """A synthetic image's content: shapes on a background, maybe a written word."""
    shapes: tuple[Shape, ...]
    background: str
    word: str | None = None
    word_xy: tuple[float, float] = (0.5, 0.9)

    def signature(self) -> tuple:
        """Exact identity of a scene (coordinates to 0.01): train and eval share none."""
        return (self.background, self.word, tuple((s.kind, s.colour, round(s.x, 2), round(s.y, 2),
                                                   round(s.r, 2), s.striped) for s in self.shapes))


def _overlaps(x: float, y: float, r: float, shapes: list[Shape]) -> bool:
    return any(math.hypot(x - s.x, y - s.y) < (r + s.r) * 1.05 for s in shapes)


STRIPED_SHARE = 0.25  # of shapes


def sample_scene(rng: random.Random, *, max_shapes: int = 6, word_prob: float = 0.35) -> Scene:
    """A random scene with 1..max_shapes non-overlapping shapes (some striped) and maybe a printed word."""
    n = rng.choice([1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 6][: 2 * max_shapes])
    n = min(n, max_shapes)
    shapes: list[Shape] = []
    word = rng.choice(WORDS) if rng.random() < word_prob else None
    top = 0.78 if word else 0.98  # keep the bottom strip free for the word
    for _ in range(200):
        if len(shapes) == n:
            break
        r = rng.choice([rng.uniform(0.07, 0.11), rng.uniform(0.14, 0.2)])
        x, y = rng.uniform(r, 1 - r), rng.uniform(r, top - r)
        if not _overlaps(x, y, r, shapes):
            kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            shapes.append(Shape(kind, colour, x, y, r, striped=rng.random() < STRIPED_SHARE))
    bg = rng.choice(list(BACKGROUNDS))
    return Scene(tuple(shapes), bg, word, (rng.uniform(0.3, 0.7), 0.9))


@lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(4, px))


def _polygon(s: Shape, side: int) -> list[tuple[float, float]]:
    cx, cy, r = s.x * side, s.y * side, s.r * side
    if s.kind == "square":
        k = r / math.sqrt(2) * 1.25
        return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    if s.kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if s.kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if s.kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(s.kind)


STRIPE = 1 / 128  # a stripe's height as a share of the image side: one pixel at 128 px, half a pixel at 64
STRIPE_TINT = 70  # how far each tint is from the colour (per channel, less where 0 or 255 is nearer)


def _tints(colour: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A lighter and a darker tint of `colour`, symmetric about it: their mean is the colour itself."""
    d = [min(STRIPE_TINT, c, 255 - c) for c in colour]
    return tuple(c + k for c, k in zip(colour, d, strict=True)), tuple(c - k for c, k in zip(colour, d, strict=True))


def _stripes(colour: tuple[int, int, int], side: int, band: int) -> Image.Image:
    """A side×side picture of horizontal stripes `band` pixels high, in the two tints of `colour`."""
    light, dark = _tints(colour)
    column = Image.new("RGB", (1, side))
    column.putdata([light if (y // band) % 2 == 0 else dark for y in range(side)])
    return column.resize((side, side), Image.Resampling.NEAREST)


WORD_SIZE = 0.085  # a printed word's font size as a share of the image side: ~11 px tall at 128 px, ~5 at 64


def render(scene: Scene, size: int, word_size: float = WORD_SIZE) -> Image.Image:
    """Draw the scene at size×size pixels (supersampled 2× for smooth edges)."""
    big = size * 2
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    band = max(1, round(STRIPE * big))
    for s in scene.shapes:
        # a striped shape is drawn as a mask through which a picture of stripes is pasted
        mask = Image.new("L", (big, big)) if s.striped else None
        pen, fill = (ImageDraw.Draw(mask), 255) if mask else (draw, COLOURS[s.colour])
        if s.kind == "circle":
            cx, cy, r = s.x * big, s.y * big, s.r * big
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            pen.polygon(_polygon(s, big), fill=fill)
        if mask:
            img.paste(_stripes(COLOURS[s.colour], big, band), mask=mask)
    if scene.word:
        ink = (255, 255, 255) if scene.background == "black" else (0, 0, 0)
        x, y = scene.word_xy
        draw.text((x * big, y * big), scene.word, fill=ink, font=_font(int(word_size * big)), anchor="mm")
    return img.resize((size, size), Image.Resampling.BOX)  # 2×2 box average: fast anti-aliasing


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
