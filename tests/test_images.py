"""Every kind of bad or unusual upload ends as an RGB image or one clear ImageError."""

import io
import struct
import zlib

import pytest
from PIL import Image

from metis.images import ImageError, load_image


def save(tmp_path, name, image, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def png_bomb(path, width=30000, height=30000):
    """A valid PNG header claiming 30000x30000 with a tiny compressed body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\x00" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: write(p / "empty.png", b""), "empty"),
        (lambda p: write(p / "text.png", b"hello, not an image"), "not a supported image"),
        (lambda p: write(p / "x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"), "not a supported image"),
        (lambda p: png_bomb(p / "bomb.png"), "too large"),
        (lambda p: save(p, "long.png", Image.new("RGB", (10000, 10))), "elongated"),
    ],
)
def test_bad_files_are_refused_clearly(tmp_path, make, match):
    with pytest.raises(ImageError, match=match):
        load_image(make(tmp_path))


@pytest.mark.parametrize("fmt,name", [("PNG", "t.png"), ("JPEG", "t.jpg")])
def test_truncated_files(tmp_path, fmt, name):
    buf = io.BytesIO()
    Image.new("RGB", (200, 200), "red").save(buf, fmt)
    (tmp_path / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="damaged or truncated|not a supported"):
        load_image(tmp_path / name)


def test_over_size_limit(tmp_path):
    path = save(tmp_path, "big.png", Image.new("RGB", (64, 64)))
    with pytest.raises(ImageError, match="over the"):
        load_image(path, max_bytes=10)


@pytest.mark.parametrize(
    "image,kwargs",
    [
        (Image.new("I;16", (64, 64), 40000), {}),
        (Image.new("CMYK", (64, 64), (0, 255, 0, 0)), {}),
        (Image.new("P", (64, 64)), {"transparency": 0}),
        (Image.new("RGBA", (64, 64), (255, 0, 0, 0)), {}),
        (Image.new("RGB", (1, 1), "blue"), {}),
    ],
)
def test_unusual_modes_become_rgb(tmp_path, image, kwargs):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    out = load_image(save(tmp_path, f"img.{fmt.lower()}", image, format=fmt, **kwargs))
    assert out.mode == "RGB" and min(out.size) >= 28


def test_transparent_pixels_become_white(tmp_path):
    out = load_image(save(tmp_path, "a.png", Image.new("RGBA", (64, 64), (255, 0, 0, 0))))
    assert out.getpixel((5, 5)) == (255, 255, 255)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = load_image(path)
    assert out.getpixel((10, 10))[0] > 200


def test_exif_rotation_applied(tmp_path):
    image = Image.new("RGB", (80, 40), "green")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    out = load_image(save(tmp_path, "r.jpg", image, exif=exif))
    assert out.size == (40, 80)
