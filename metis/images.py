"""Untrusted image files -> RGB PIL images, or one clear `ImageError` saying what is wrong.

Every image the app touches comes through here: chat and API uploads, the CLI, fine-tuning
data. Uploads come from anyone: empty or truncated files, other formats named `.png`,
decompression bombs, 16-bit/CMYK/palette modes, animations, EXIF rotation and extreme shapes all
have to end as either a normal RGB picture or a message a person can act on.

What a request costs is known before any pixel is decoded: `load_images` reads every header
first and refuses the request if one image or their sum is over its pixel budget. Then the
images are decoded one at a time, each shrunk to at most `MAX_KEPT_PIXELS` as it is decoded
(JPEG's draft mode decodes at 1/2, 1/4 or 1/8 scale directly; other formats are reduced right
after decoding), so memory holds one full-size image at most.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .prompting import PromptError

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # per image, as declared in its header; a 30000x30000 bomb is never decoded
MAX_REQUEST_PIXELS = 160_000_000  # all images of one request (a conversation, a dataset row)
MAX_KEPT_PIXELS = 16384 * 28 * 28  # Qwen2.5-VL's largest input: more would be resized away anyway
MAX_ASPECT = 150  # Qwen2.5-VL's resizer refuses beyond 200:1
MIN_SIDE = 28  # one merged patch


class ImageError(PromptError):
    """An upload that cannot become a picture: a bad request, reported like any other."""


@dataclass(frozen=True)
class Header:
    path: Path
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> Header:
    """Size and dimensions from the file's header, checked against the per-image limits; nothing
    is decoded."""
    path = Path(path)
    name = path.name
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ImageError(f"{name}: file not found or unreadable") from None
    if size == 0:
        raise ImageError(f"{name}: the file is empty")
    if size > max_bytes:
        raise ImageError(f"{name}: {size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB limit")
    with _opened(path) as image:
        w, h = image.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: {w}x{h} pixels is too large (at most {MAX_PIXELS:,} pixels per image)")
    if max(w, h) / max(1, min(w, h)) > MAX_ASPECT:
        raise ImageError(f"{name}: {w}x{h} is too elongated (aspect ratio over {MAX_ASPECT}:1)")
    return Header(path, w, h)


def check_budget(headers: Sequence[Header], max_pixels: int = MAX_REQUEST_PIXELS) -> None:
    total = sum(h.pixels for h in headers)
    if total > max_pixels:
        raise ImageError(f"{len(headers)} images with {total / 1e6:.0f} million pixels in all: over the "
                         f"{max_pixels / 1e6:.0f} million pixels one request may send")


def load_images(paths: Sequence[str | os.PathLike], max_pixels: int = MAX_REQUEST_PIXELS) -> list[Image.Image]:
    """Every header checked (each image, then their sum) before the first is decoded."""
    headers = [read_header(p) for p in paths]
    check_budget(headers, max_pixels)
    return [_decode(h) for h in headers]


def load_image(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> Image.Image:
    return _decode(read_header(path, max_bytes))


def _opened(path: Path):
    """The file opened lazily (header only), with PIL's failures turned into ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path.name}: too large to decode (at most {MAX_PIXELS:,} pixels per image)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path.name}: not a supported image (PNG, JPEG, GIF, WebP, BMP)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path.name}: the image is damaged or truncated ({exc})") from None


def _decode(header: Header) -> Image.Image:
    name = header.path.name
    with _opened(header.path) as image:
        try:
            image.seek(0)  # animations: the first frame
            if header.pixels > MAX_KEPT_PIXELS:  # JPEG: decode at a smaller scale, never at full size
                scale = math.sqrt(MAX_KEPT_PIXELS / header.pixels)
                image.draft("RGB", (math.ceil(header.width * scale), math.ceil(header.height * scale)))
            image.load()
            image = _shrink(image)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: the image is damaged or truncated ({exc})") from None
        return normalise(image, name)


def _shrink(image: Image.Image) -> Image.Image:
    """Over MAX_KEPT_PIXELS: `reduce` by a whole factor (a box filter, one pass, no full-size copy)."""
    factor = math.ceil(math.sqrt(image.width * image.height / MAX_KEPT_PIXELS))
    if factor <= 1:
        return image
    if image.mode in ("1", "P", "PA"):  # modes reduce cannot average
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    return image.reduce(factor)


def normalise(image: Image.Image, name: str = "image") -> Image.Image:
    image = ImageOps.exif_transpose(image)
    w, h = image.size
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit greyscale to 8-bit
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, "white")
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if min(image.size) < MIN_SIDE:  # the vision tower needs at least one 28x28 patch
        scale = MIN_SIDE / min(image.size)
        image = image.resize((max(MIN_SIDE, round(w * scale)), max(MIN_SIDE, round(h * scale))), Image.BICUBIC)
    return image
