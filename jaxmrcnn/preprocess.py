"""Host-side preprocessing: image checks, each framework's resize rule, normalization, and
padding into canvas buckets. numpy only; results feed the jitted model.

Each framework resizes with its own rounding rule and its own library, and the pixels only
match when both are reproduced (host-side code may use the framework's library, which is
the faithful way to get its rounding):

torchvision (GeneralizedRCNNTransform): uint8 / 255 -> (x - mean) / std -> resize the float
    image by scale = min(min_size / short, max_size / long) to floor(dim * scale) with
    bilinear interpolation (align_corners=False, no antialias) -> zero-pad to a multiple of 32.
Detectron2 (DefaultPredictor + ResizeShortestEdge, data/transforms/augmentation_impl.py):
    scale the short side to min_size, then cap the long side at max_size, each side
    int(x + 0.5); Pillow bilinear on the uint8 image (ResizeTransform.apply_image) -> BGR
    float -> (x - mean) / std -> zero-pad to a multiple of 32.
maskrcnn-benchmark (COCO evaluation: PIL image -> Resize.get_size): short side min_size,
    or round(max_size * short / long) when the long side would pass max_size; the long side
    int(size * long / short) (floor); Pillow bilinear on uint8 -> ToTensor (/ 255) -> BGR x 255
    -> (x - mean) / std -> zero-pad to a multiple of 32.
mmdet (Resize keep_ratio, mmcv.imrescale): scale = min(max_size / long, min_size / short),
    each side int(x * scale + 0.5); OpenCV INTER_LINEAR on the uint8 image -> normalize ->
    zero-pad.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxmrcnn.config import InputConfig

RESIZE_RULES = ("torchvision", "detectron2", "maskrcnn_benchmark", "mmdet")
RESIZE_IMPLS = ("torch_bilinear", "pillow_bilinear", "opencv_linear")


def as_rgb_uint8(image, name: str = "image") -> np.ndarray:
    """Validates an image and returns it as `[H, W, 3]` uint8 RGB.

    Accepts `[H, W]` grayscale, `[H, W, 1]`, `[H, W, 3]` RGB and `[H, W, 4]` RGBA (alpha
    dropped) arrays of uint8 (or bool). Anything else is a ValueError saying what is wrong.
    """
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        raise ValueError(
            f"{name} must be a numpy array [H, W, 3] of uint8 RGB, got {type(image).__name__}"
        )
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise ValueError(
            f"{name} must have dtype uint8 (0-255 RGB), got {a.dtype}; convert floats in [0, 1] "
            f"with (x * 255).round().astype(np.uint8)"
        )
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name} must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {a.shape}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def resized_size(h: int, w: int, cfg: InputConfig) -> tuple[int, int]:
    """Output (h, w) of the framework's resize rule."""
    if cfg.resize_rule == "torchvision":
        scale = min(cfg.min_size / min(h, w), cfg.max_size / max(h, w))
        return math.floor(h * scale), math.floor(w * scale)
    if cfg.resize_rule == "detectron2":  # ResizeShortestEdge.get_output_shape
        size = cfg.min_size * 1.0
        scale = size / min(h, w)
        newh, neww = (size, scale * w) if h < w else (scale * h, size)
        if max(newh, neww) > cfg.max_size:
            scale = cfg.max_size * 1.0 / max(newh, neww)
            newh, neww = newh * scale, neww * scale
        return int(newh + 0.5), int(neww + 0.5)
    if cfg.resize_rule == "maskrcnn_benchmark":  # data/transforms/transforms.py Resize.get_size
        size = cfg.min_size
        short, long_ = float(min(h, w)), float(max(h, w))
        if long_ / short * size > cfg.max_size:
            size = int(round(cfg.max_size * short / long_))
        if (w <= h and w == size) or (h <= w and h == size):
            return h, w
        return (int(size * h / w), size) if w < h else (size, int(size * w / h))
    if cfg.resize_rule == "mmdet":  # mmcv.rescale_size with a (max_size, min_size) scale
        scale = min(cfg.max_size / max(h, w), cfg.min_size / min(h, w))
        return int(h * float(scale) + 0.5), int(w * float(scale) + 0.5)
    raise ValueError(f"unknown resize_rule {cfg.resize_rule!r}; expected one of {RESIZE_RULES}")


def _linear_taps(n_in: int, n_out: int):
    """PyTorch bilinear (align_corners=False) source indices and weights along one axis.

    src = max(scale * (dst + 0.5) - 0.5, 0) with scale = float32(n_in / n_out). torch's CPU
    kernel evaluates it as one fused multiply-add (a single rounding), which we reproduce by
    computing in float64 and rounding once: the float32 product of two float32 numbers is
    exact in float64. Without this the weights differ by up to 3e-5 at 1333 px.
    """
    if n_in == n_out:
        idx = np.arange(n_out)
        return idx, idx, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = i0 + (i0 < n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - l1).astype(np.float32), l1


def resize_bilinear(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """`[H, W, C]` float32 -> `[h, w, C]`, same arithmetic order as torch's CPU kernel:
    out = (x00 * wx0 + x01 * wx1) * wy0 + (x10 * wx0 + x11 * wx1) * wy1."""
    h, w = out_hw
    y0, y1, wy0, wy1 = _linear_taps(x.shape[0], h)
    x0, x1, wx0, wx1 = _linear_taps(x.shape[1], w)
    rows = np.union1d(y0, y1)
    src = x[rows]
    cols = src[:, x0] * wx0[None, :, None] + src[:, x1] * wx1[None, :, None]  # [rows, w, C]
    pos = np.searchsorted(rows, np.arange(x.shape[0]))
    r0, r1 = cols[pos[y0]], cols[pos[y1]]
    return (r0 * wy0[:, None, None] + r1 * wy1[:, None, None]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One preprocessed image: `data [h, w, 3]` float32, sizes as (h, w)."""

    data: np.ndarray
    image_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    orig_hw: tuple[int, int]


def resize_uint8(rgb: np.ndarray, out_hw: tuple[int, int], impl: str) -> np.ndarray:
    """`[H, W, 3]` uint8 -> `[h, w, 3]` uint8 with the framework's library."""
    h, w = out_hw
    if (h, w) == rgb.shape[:2]:
        return rgb
    if impl == "pillow_bilinear":
        from PIL import Image

        return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    if impl == "opencv_linear":
        try:
            import cv2
        except ImportError:
            raise ImportError(
                "this model resizes images with OpenCV, as its framework does: "
                "pip install opencv-python-headless"
            ) from None
        return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    raise ValueError(f"unknown resize_impl {impl!r}; expected one of {RESIZE_IMPLS}")


def normalize(x: np.ndarray, cfg: InputConfig) -> np.ndarray:
    """uint8 RGB `[H, W, 3]` -> float32 in the network's channel order, (x / s - mean) / std."""
    x = x if cfg.channel_order == "RGB" else x[:, :, ::-1]
    x = x.astype(np.float32) / np.float32(cfg.pixel_scale)
    if cfg.pixel_rescale != 1.0:
        x = x * np.float32(cfg.pixel_rescale)
    return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def prepare(image, cfg: InputConfig) -> Prepared:
    """Checks, normalizes and resizes one image following `cfg`'s framework rules."""
    rgb = as_rgb_uint8(image)
    h, w = rgb.shape[:2]
    rh, rw = resized_size(h, w, cfg)
    if rh <= 0 or rw <= 0:
        raise ValueError(f"image of size {h}x{w} resizes to nothing ({rh}x{rw})")
    if cfg.resize_impl == "torch_bilinear":  # normalize, then resize the float image
        x = resize_bilinear(normalize(rgb, cfg), (rh, rw))
    else:  # resize the uint8 image, then normalize
        x = normalize(resize_uint8(rgb, (rh, rw), cfg.resize_impl), cfg)
    d = cfg.size_divisible
    padded = (-(-rh // d) * d, -(-rw // d) * d)
    return Prepared(x, (rh, rw), padded, (h, w))


def batch(prepared: list[Prepared], canvas_hw: tuple[int, int], batch_size: int | None = None):
    """Pads images into a `[B, H, W, 3]` canvas (zeros) and stacks their info arrays.

    Dummy images fill the batch up to `batch_size`; `info["valid"]` marks the real ones.
    """
    n = len(prepared)
    bsz = batch_size or n
    if n > bsz:
        raise ValueError(f"{n} images for a batch of {bsz}")
    ch, cw = canvas_hw
    out = np.zeros((bsz, ch, cw, 3), np.float32)
    image_hw = np.full((bsz, 2), 32, np.int32)
    padded_hw = np.full((bsz, 2), 32, np.int32)
    orig_hw = np.full((bsz, 2), 32, np.int32)
    for i, p in enumerate(prepared):
        if p.padded_hw[0] > ch or p.padded_hw[1] > cw:
            raise ValueError(f"image padded to {p.padded_hw} does not fit canvas {canvas_hw}")
        h, w = p.image_hw
        out[i, :h, :w] = p.data
        image_hw[i], padded_hw[i], orig_hw[i] = p.image_hw, p.padded_hw, p.orig_hw
    info = dict(image_hw=image_hw, padded_hw=padded_hw, orig_hw=orig_hw)
    valid = np.arange(bsz) < n
    return out, info, valid
