"""Images: every PIL mode to RGB, EXIF orientation, resizing and normalisation, bad files rejected clearly."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mm1.data.images import ImageError, decode_image, sub_images, to_rgb, to_tensor


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_transparent_modes_composite_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert to_rgb(la).getpixel((0, 0)) == (0, 0, 0)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    assert to_rgb(p).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_other_modes_become_rgb(mode):
    img = Image.new(mode, (5, 3))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 3)


def test_sixteen_bit_grayscale_keeps_its_range():
    img = Image.new("I;16", (2, 2))
    img.putpixel((0, 0), 65535)
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = decode_image(_bytes(img, "JPEG", exif=exif), where="x.jpg")
    assert out.size == (20, 40)


def test_bad_files_raise_image_error_naming_where():
    with pytest.raises(ImageError, match=r"shard.tar:k1: empty image file"):
        decode_image(b"", where="shard.tar:k1")
    with pytest.raises(ImageError, match=r"a.png: cannot decode image"):
        decode_image(b"not an image at all", where="a.png")
    good = _bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    with pytest.raises(ImageError, match=r"t.png: cannot decode image"):
        decode_image(good[: len(good) // 2], where="t.png")


def test_decompression_bomb_guard():
    with pytest.raises(ImageError, match=r"image has too many pixels \(20×20, limit 100 pixels\)"):
        decode_image(_bytes(Image.new("RGB", (20, 20))), where="big.png", max_pixels=100)
    with pytest.raises(ImageError, match=r"image file too large"):
        decode_image(_bytes(Image.new("RGB", (20, 20))), where="big.png", max_bytes=10)
    with pytest.raises(ImageError, match=r"cannot decode image"):  # a PNG where only JPEG is accepted
        decode_image(_bytes(Image.new("RGB", (20, 20))), where="x.png", formats=("JPEG",))


def test_to_tensor_pads_to_square_and_normalises():
    img = Image.new("RGB", (80, 40), (255, 255, 255))
    x = to_tensor(img, 32)
    assert x.shape == (3, 32, 32)
    assert x[:, 16, 16].min() > 1.5  # white after CLIP normalisation
    assert abs(float(x[:, 0, 16].mean())) < 0.05  # padding is the mean colour → ≈0


def test_sub_images_give_overview_plus_crops():
    img = Image.new("RGB", (100, 100))
    views = sub_images(img, 32, 2)
    assert len(views) == 5 and all(v.size == (32, 32) for v in views)
