"""The Matterport family's input: the square canvas (mold_inputs -> utils.resize_image ->
mold_image, utils.py:270-318, model.py:2115-2120), in NumPy + Pillow on the host.

    scale = max(1, min_dim / min(h, w)); if round(max(h, w) * scale) > max_dim:
    scale = max_dim / max(h, w)       (upscale-only to min_dim, capped; Python round)
    resize the uint8 RGB image to (round(h * scale), round(w * scale)) with Pillow BILINEAR
    (scipy.misc.imresize on uint8: no bytescale), zero-pad centred into max_dim x max_dim,
    subtract the RGB mean in float64 (padding included), cast to float32. No std.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from jaxmrcnn.matterport.config import MatterportConfig


def resize_scale(h: int, w: int, cfg: MatterportConfig) -> float:
    scale = max(1, cfg.min_dim / min(h, w))
    if round(max(h, w) * scale) > cfg.max_dim:
        scale = cfg.max_dim / max(h, w)
    return scale


def mold_image(image: np.ndarray, cfg: MatterportConfig) -> tuple[np.ndarray, np.ndarray]:
    """HxWx3 uint8 RGB -> (canvas `[S, S, 3]` float32, window `[4]` float32 (y1, x1, y2, x2),
    y2 / x2 exclusive)."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
            and image.dtype == np.uint8):
        raise ValueError(f"images must be HxWx3 uint8 RGB arrays, got "
                         f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image))}")
    h, w = image.shape[:2]
    scale = resize_scale(h, w, cfg)
    if scale != 1:
        size = (round(w * scale), round(h * scale))  # PIL: (width, height)
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    h, w = image.shape[:2]
    s = cfg.max_dim
    top, left = (s - h) // 2, (s - w) // 2
    canvas = np.zeros((s, s, 3), np.uint8)
    canvas[top:top + h, left:left + w] = image
    molded = (canvas - np.asarray(cfg.mean, np.float64)).astype(np.float32)
    return molded, np.array([top, left, top + h, left + w], np.float32)
