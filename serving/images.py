"""Turning image files of any format, size and mode into a model's square RGB pixels (32x32 by default).

The one conversion both sides use: the trainer reads `folder:` datasets with
it and the client prepares the images it sends, so a photo becomes the same
pixels in training and in serving.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps, ImageSequence

from serving.contract import IMAGE_SIZE

SIZE = IMAGE_SIZE


def image_extensions() -> frozenset[str]:
    """File extensions Pillow can open (".png", ".jpg", ".gif", ".bmp", ".webp", ...)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any Pillow image: first frame, alpha dropped, palettes and
    16-bit or float greyscale mapped to 8-bit colour."""
    image = next(iter(ImageSequence.Iterator(image)))
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # Wide greyscale: rescale its own range to 8 bits rather than clip.
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        image = Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def to_pixels(image: Image.Image, size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3] pixels of any Pillow image, resized bilinearly."""
    rgb = to_rgb(image)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def read_pixels(path: str, size: int = SIZE) -> np.ndarray:
    """Pixels of the image file at `path`; raises OSError (or ValueError) when unreadable."""
    return read_pixels_and_size(path, size)[0]


def read_pixels_and_size(path: str, size: int = SIZE) -> tuple[np.ndarray, tuple[int, int]]:
    """read_pixels, and the (width, height) the file declares."""
    with Image.open(path) as image:
        declared = image.size
        # JPEG can decode at 1/2, 1/4 or 1/8 scale: a 12-megapixel photo
        # shrinks to 32x32 ten times faster, and no worse.
        image.draft("RGB", (4 * size, 4 * size))
        image.load()
        # Photographs are often stored sideways with an EXIF rotation tag.
        return to_pixels(ImageOps.exif_transpose(image), size), declared
