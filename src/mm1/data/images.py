"""Decoding any real-world image into the encoder's input: RGB, upright, square, normalised.

Web images come in every PIL mode (RGBA, LA and P with transparency, CMYK, 16-bit, grayscale),
carry EXIF orientation, and sometimes are corrupt or decompression bombs. Every failure here is an
`ImageError` whose message names where the image came from, so readers can skip it with a warning
and count it instead of crashing a training run.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from mm1.config import ImageNorm
from mm1.data.errors import ImageError

# The pixel normalisation of the encoder's pre-training (`model.vision.norm`, read from an imported tower).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMS = {ImageNorm.CLIP: (CLIP_MEAN, CLIP_STD), ImageNorm.SIGLIP: ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def mean_colour(norm: ImageNorm = ImageNorm.CLIP) -> tuple[int, int, int]:
    """The colour that normalises to zero: what padding and a missing image are filled with."""
    r, g, b = (int(255 * m) for m in NORMS[norm][0])
    return r, g, b

MAX_PIXELS = 64_000_000  # anything larger is treated as a decompression bomb
MAX_BYTES = 50_000_000
BACKGROUND = (255, 255, 255)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any PIL mode → RGB; transparent modes are composited on `background` rather than on black."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = max(float(arr.max()), 1.0)
        img = Image.fromarray((arr / (65535.0 if top > 255 else 255.0) * 255).clip(0, 255).astype(np.uint8))
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((arr * 255 if arr.max() <= 1.0 else arr).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def decode_image(data: bytes, *, where: str, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
                 formats: tuple[str, ...] | None = None) -> Image.Image:
    """Bytes → an upright RGB image, or ImageError naming `where`.

    The size in pixels is read from the header and checked before anything is decoded; the format
    is recognised from the bytes (restricted to `formats`, PIL names such as "PNG", when given).
    """
    if not data:
        raise ImageError(where, "empty image file")
    if len(data) > max_bytes:
        raise ImageError(where, "image file too large", f"{len(data):,} bytes, limit {max_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            if img.width * img.height > max_pixels:
                raise ImageError(where, "image has too many pixels",
                                 f"{img.width}×{img.height}, limit {max_pixels:,} pixels")
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as err:
        raise ImageError(where, f"cannot decode image ({type(err).__name__})", str(err)) from None
    return to_rgb(img)


def load_image(path: str | Path) -> Image.Image:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ImageError(str(path), "cannot read image", str(err.strerror or err)) from None
    return decode_image(data, where=str(path))


def square(img: Image.Image, size: int, norm: ImageNorm = ImageNorm.CLIP) -> Image.Image:
    """Resize to size×size: pad the shorter side with the mean colour (keeps the whole picture, like
    LLaVA's 'pad')."""
    w, h = img.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), mean_colour(norm))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    return img.resize((size, size), Image.Resampling.BICUBIC) if side != size else img


def to_tensor(img: Image.Image, size: int, norm: ImageNorm = ImageNorm.CLIP) -> torch.Tensor:
    """An RGB image → a [3, size, size] float tensor normalised as the encoder's pre-training did."""
    mean, std = NORMS[norm]
    arr = np.asarray(square(img, size, norm), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def sub_images(img: Image.Image, size: int, grid: int = 2, norm: ImageNorm = ImageNorm.CLIP) -> list[Image.Image]:
    """High-resolution decomposition for SFT (SPHINX / MM1 §4): an overview plus grid×grid crops.

    The image is first made square at grid·size pixels; the result is the downsized overview
    followed by the crops in reading order, each size×size.
    """
    big = square(img, size * grid, norm)
    crops = [big.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
             for r in range(grid) for c in range(grid)]
    return [big.resize((size, size), Image.Resampling.BICUBIC), *crops]
