"""The Matterport family's ops: pixel-space anchors, its box decoding, pyramid level rule and
TF's crop_and_resize (one bilinear sample per output cell, align-corners, 0 outside).

Boxes are (y1, x1, y2, x2) throughout, as in the port.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def anchors(cfg) -> np.ndarray:
    """`[A, 4]` float32 pixel anchors of the canvas (the port's generate_pyramid_anchors,
    utils.py:400-456): centres at k * stride (no half-cell offset), h = s / sqrt(r),
    w = s * sqrt(r) (r = width / height), computed in float64; order (level, y, x, ratio)."""
    out = []
    ratios = np.asarray(cfg.anchor_ratios, np.float64)
    for scale, stride in zip(cfg.anchor_scales, cfg.anchor_strides, strict=True):
        n = math.ceil(cfg.max_dim / stride)
        heights = scale / np.sqrt(ratios)  # [R]
        widths = scale * np.sqrt(ratios)
        shifts = np.arange(0, n, cfg.anchor_stride) * stride
        sx, sy = np.meshgrid(shifts, shifts)  # [n, n]: y outer, x inner
        cy, cx = sy.reshape(-1, 1), sx.reshape(-1, 1)  # [P, 1]
        hh, ww = heights[None, :], widths[None, :]  # [1, R]
        boxes = np.stack([cy - 0.5 * hh, cx - 0.5 * ww, cy + 0.5 * hh, cx + 0.5 * ww], -1)
        out.append(boxes.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def apply_box_deltas(boxes, deltas):
    """boxes `[..., 4]` (y1, x1, y2, x2), deltas `[..., 4]` (dy, dx, log dh, log dw) -> boxes;
    no +1, no clamp of dh / dw, y2 = y1 + h (model.py:297-318)."""
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    cy = boxes[..., 0] + 0.5 * h
    cx = boxes[..., 1] + 0.5 * w
    cy = cy + deltas[..., 0] * h
    cx = cx + deltas[..., 1] * w
    h = h * jnp.exp(deltas[..., 2])
    w = w * jnp.exp(deltas[..., 3])
    y1 = cy - 0.5 * h
    x1 = cx - 0.5 * w
    return jnp.stack([y1, x1, y1 + h, x1 + w], axis=-1)


def round_half(x, away: bool):
    """C round() (torch 0.3: half away from zero) when `away`, else half to even."""
    r = jnp.round(x)
    if not away:
        return r
    t = jnp.trunc(x)
    return jnp.where(jnp.abs(x - t) == 0.5, t + jnp.sign(x), r)


def roi_levels(boxes, canvas: int, away: bool = True):
    """Pyramid level 2..5 of normalised boxes `[..., 4]` (model.py:434-446):
    round(4 + log(sqrt(h w) / (224 / canvas)) / log 2), clamped in float (a zero-area box,
    log 0 = -inf, goes to 2) -> int32."""
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    ref = np.float32(224.0) / np.sqrt(np.float32(canvas * canvas))  # float32, as the port
    level = 4.0 + jnp.log(jnp.sqrt(h * w) / ref) / jnp.log(jnp.float32(2.0))
    level = jnp.clip(round_half(level, away), 2.0, 5.0)
    return jnp.nan_to_num(level, nan=2.0).astype(jnp.int32)


def _sample_coords(lo, hi, size, out):
    """TF crop_and_resize's sample positions along one axis: `lo`, `hi` `[R]` normalised,
    `size` `[R]` int feature size -> in `[R, out]` (float32, the C code's expression order)."""
    sm1 = (size - 1).astype(jnp.float32)[:, None]
    if out > 1:
        step = (hi - lo)[:, None] * sm1 / jnp.float32(out - 1)
        return lo[:, None] * sm1 + jnp.arange(out, dtype=jnp.float32)[None, :] * step
    return jnp.float32(0.5) * (lo + hi)[:, None] * sm1


def crop_and_resize(table, boxes, offsets, sizes, out: int):
    """Multi-level `tf.image.crop_and_resize(method='bilinear', extrapolation_value=0)` (the
    port's CropAndResizeFunction, roialign/roi_align/src/crop_and_resize.c:44-106).

    table:   `[T, C]`, every level's `[H_l, W_l, C]` map flattened and concatenated.
    boxes:   `[R, 4]` normalised (y1, x1, y2, x2); 0 and 1 are the centres of the first and
             last pixel of the box's level (align-corners, (H - 1) scaled).
    offsets: `[R]` int32 row of `table` where the box's level starts; sizes `[R, 2]` its
             (H, W).
    Returns `[R, out, out, C]`: one bilinear sample per cell; a sample row / column outside
    [0, H - 1] is 0.
    """
    h, w = sizes[:, 0], sizes[:, 1]
    ys = _sample_coords(boxes[:, 0], boxes[:, 2], h, out)  # [R, P]
    xs = _sample_coords(boxes[:, 1], boxes[:, 3], w, out)
    hm1 = (h - 1).astype(jnp.float32)[:, None]
    wm1 = (w - 1).astype(jnp.float32)[:, None]
    ok_y = (ys >= 0) & (ys <= hm1)
    ok_x = (xs >= 0) & (xs <= wm1)
    top, bot = jnp.floor(ys), jnp.ceil(ys)
    left, right = jnp.floor(xs), jnp.ceil(xs)
    yl = (ys - top)[:, :, None, None]  # [R, P, 1, 1]
    xl = (xs - left)[:, None, :, None]  # [R, 1, P, 1]

    def idx(a, n):  # clamped to the level (rows outside are zeroed below)
        return jnp.clip(a, 0, (n - 1)[:, None]).astype(jnp.int32)

    top, bot = idx(top, h), idx(bot, h)
    left, right = idx(left, w), idx(right, w)
    base = offsets[:, None, None]
    ww = w[:, None, None]

    def gather(r, c):  # r [R, P], c [R, P] -> [R, P, P, C]
        return table[base + r[:, :, None] * ww + c[:, None, :]]

    tl, tr = gather(top, left), gather(top, right)
    bl, br = gather(bot, left), gather(bot, right)
    t = tl + (tr - tl) * xl
    b = bl + (br - bl) * xl
    crops = t + (b - t) * yl
    ok = (ok_y[:, :, None] & ok_x[:, None, :])[..., None]
    return jnp.where(ok, crops, jnp.zeros((), crops.dtype))


def pyramid_crop_and_resize(levels, boxes, canvas: int, out: int, away: bool = True):
    """The port's pyramid_roi_align: levels [P2..P5] each `[H_l, W_l, C]`, normalised boxes
    `[R, 4]` -> `[R, out, out, C]`, each box cropped from its level (roi_levels)."""
    table = jnp.concatenate([lv.reshape(-1, lv.shape[-1]) for lv in levels])
    starts = np.cumsum([0] + [lv.shape[0] * lv.shape[1] for lv in levels])[:-1]
    hw = np.array([lv.shape[:2] for lv in levels], np.int32)  # [4, 2]
    li = roi_levels(boxes, canvas, away) - 2  # [R] in 0..3
    offsets = jnp.asarray(starts, jnp.int32)[li]
    sizes = jnp.asarray(hw)[li]
    return crop_and_resize(table, boxes, offsets, sizes, out)


