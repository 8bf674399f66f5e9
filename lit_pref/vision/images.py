"""Images as dataset rows carry them: PIL images, file paths, raw bytes, ``datasets`` ``Image``
values, or a list of them per row; normalised to RGB PIL images and fingerprinted by content."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGES_COLUMN = "images"


def load_image(value: Any) -> Image.Image:
    """One image as an RGB PIL image.

    Args:
        value: a PIL image, a file path, raw encoded bytes, a ``datasets`` ``Image`` value left
            undecoded (``{"bytes": …, "path": …}``), or an ``[H, W(, C)]`` array of pixel values.
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, np.ndarray):
        image = Image.fromarray(value.astype(np.uint8))
    elif isinstance(value, bytes | bytearray):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str | Path):
        if not Path(value).is_file():
            raise FileNotFoundError(f"image file {str(value)!r} does not exist")
        image = Image.open(value)
    elif isinstance(value, Mapping) and (value.get("bytes") is not None or value.get("path") is not None):
        return load_image(value["bytes"] if value.get("bytes") is not None else value["path"])
    else:
        raise TypeError(
            f"an image must be a PIL image, a file path, raw bytes, a datasets Image value or an array, got {type(value).__name__}"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


def load_images(value: Any) -> list[Image.Image]:
    """The images of one row (``None``: none; one image; or a list of them), in order."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [load_image(v) for v in value]
    return [load_image(value)]


def images_fingerprint(rows: Iterable[Any]) -> str:
    """A hash of the pixels (and sizes) of every row's images, in row order.

    A path names a file whose content can change while the path stays the same, so a cache keyed
    by the dataset (which holds the path) alone would serve values computed on the old image.
    """
    digest = hashlib.sha256()
    for value in rows:
        for image in load_images(value):
            digest.update(f"{image.size}\0".encode())
            digest.update(image.tobytes())
        digest.update(b"\1")  # row boundary: [a, b], [] differs from [a], [b]
    return digest.hexdigest()[:20]
