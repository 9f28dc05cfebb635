"""Images as the chat API takes them: ``H x W x 3`` uint8 arrays, PIL images or image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from flmm.errors import FlmmUserError

MAX_PIXELS = 4096 * 4096
# what the chat API takes as an image (:func:`as_image`)
ImageLike = np.ndarray | Image.Image | str | Path


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """``H x W x 3`` uint8 RGB from an image file; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise FlmmUserError(
                    f"image {path} has {img.width} x {img.height} pixels, more than the limit of "
                    f"{max_pixels:,}; resize it first"
                )
            return np.array(img.convert("RGB"))
    except Image.DecompressionBombError as err:
        raise FlmmUserError(
            f"image {path} is too large to open safely ({err}); resize it to at most "
            f"{max_pixels:,} pixels"
        ) from None
    except (UnidentifiedImageError, OSError) as err:
        raise FlmmUserError(
            f"cannot read {path} as an image ({err}); pass a PNG, JPEG or other PIL-readable file"
        ) from err


def as_image(image) -> np.ndarray:
    """``image`` (an ``H x W x 3`` uint8 array, a PIL image, or the path of an image file) as an
    ``H x W x 3`` uint8 RGB array; a :class:`FlmmUserError` (``FileNotFoundError`` for a missing
    file) in one line for anything else."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    elif isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise FlmmUserError(
            f"expected an H x W x 3 RGB image array, a PIL image or an image path, got {shape}"
        )
    if image.dtype != np.uint8 or min(image.shape[:2]) < 2:
        raise FlmmUserError(
            f"expected a uint8 RGB image of at least 2 x 2 pixels, got {image.dtype} {image.shape}"
        )
    return image
