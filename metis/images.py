"""Untrusted image files -> RGB PIL images, or one clear `ImageError` saying what is wrong.

Uploads come from anyone: empty or truncated files, other formats named `.png`, decompression
bombs, 16-bit/CMYK/palette modes, animations, EXIF rotation and extreme shapes all have to end as
either a normal RGB picture or a message a person can act on.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .prompting import PromptError

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # a 30000x30000 bomb is refused before it is decoded
MAX_ASPECT = 150  # Qwen2.5-VL's resizer refuses beyond 200:1
MIN_SIDE = 28  # one merged patch


class ImageError(PromptError):
    """An upload that cannot become a picture: a bad request, reported like any other."""


def load_image(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> Image.Image:
    name = Path(path).name
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ImageError(f"{name}: file not found or unreadable") from None
    if size == 0:
        raise ImageError(f"{name}: the file is empty")
    if size > max_bytes:
        raise ImageError(f"{name}: {size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{name}: {image.width}x{image.height} pixels is too large (at most {MAX_PIXELS:,})")
            image.seek(0)  # animations: the first frame
            image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: not a supported image (PNG, JPEG, GIF, WebP, BMP) or too large to decode") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: the image is damaged or truncated ({exc})") from None
    return normalise(image, name)


def normalise(image: Image.Image, name: str = "image") -> Image.Image:
    image = ImageOps.exif_transpose(image)
    w, h = image.size
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ImageError(f"{name}: {w}x{h} is too elongated (aspect ratio over {MAX_ASPECT}:1)")
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
