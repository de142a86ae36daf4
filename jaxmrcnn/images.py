"""Reading image files as `[H, W, 3]` uint8 RGB, as detection tooling does."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """An image file that cannot be read; the message names the file and the reason."""


def read_image(path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The image at `path` as `[H, W, 3]` uint8 RGB.

    Grayscale, palette, CMYK, 16-bit and RGBA files are converted to RGB (alpha dropped).
    The EXIF orientation is applied, as Detectron2's `read_image` does. When `expected_hw`
    (the height and width an annotation file lists) is given and only the stored,
    un-rotated pixels have that size, the file is returned as stored: the annotations were
    made on those pixels. A size matching neither is an error.
    """
    try:
        with Image.open(path) as im:
            im.load()
            rotated = ImageOps.exif_transpose(im)
            stored_hw = (im.height, im.width)
            if expected_hw is not None and (rotated.height, rotated.width) != tuple(expected_hw):
                if stored_hw == tuple(expected_hw):
                    warnings.warn(
                        f"{path}: its EXIF orientation would rotate it to "
                        f"{rotated.width}x{rotated.height}, but the annotations list "
                        f"{expected_hw[1]}x{expected_hw[0]}; using the stored orientation",
                        stacklevel=2,
                    )
                    rotated = im
                else:
                    raise ImageReadError(
                        f"{path}: image is {im.width}x{im.height} but the annotations list "
                        f"{expected_hw[1]}x{expected_hw[0]} (width x height); is it the right file?"
                    )
            if rotated.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale
                a = np.asarray(rotated, np.float64)
                a = (a / max(a.max(), 1.0) * 255.0).round().astype(np.uint8)
                return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
            return np.ascontiguousarray(np.asarray(rotated.convert("RGB")))
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageReadError(f"{path}: not a readable image ({e})") from None
