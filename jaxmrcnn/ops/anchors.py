"""FPN anchor grids, in the three flavours the frameworks use.

A level's anchors are `cell anchors [A, 4]` (boxes centred on the origin) shifted to every
grid point: `anchors[(y * W + x) * A + a] = cell[a] + (x * sx, y * sy, x * sx, y * sy)`, i.e.
the flatten order is (H, W, A) with A fastest, as every framework lays out its RPN outputs.
Anchor index `a` follows the aspect ratios (h / w) given, for a single size per level.

Cell anchor flavours (P2, size 32, ratio 0.5):
  "torchvision": w = size / sqrt(r), h = size * sqrt(r), box (-w/2, -h/2, w/2, h/2) computed
      in float32 and rounded half-to-even: (-23, -11, 23, 11).
  "detectron2": the same geometry unrounded, in float64 then cast (Detectron2's
      DefaultAnchorGenerator): (-22.627, -11.314, 22.627, 11.314).
  "mmdet": torchvision's float32 arithmetic without the rounding (mmdet >= 2 AnchorGenerator:
      w = stride * (1 / sqrt(r)) * scale in float32); equal to "detectron2" up to the last bit.
  "legacy": Detectron / maskrcnn-benchmark `generate_anchors`: a (0, 0, stride-1, stride-1)
      reference window, widths rounded, +1 sizes: (-22, -10, 25, 13).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxmrcnn.ops._checks import check_choice

ANCHOR_FLAVOURS = ("torchvision", "detectron2", "mmdet", "legacy")


def cell_anchors(
    size: float, aspect_ratios: Sequence[float], *, flavour: str, stride: int | None = None
) -> np.ndarray:
    """Cell anchors `[A, 4]` float32 for one size and each aspect ratio (h / w).

    `stride` is needed by the "legacy" flavour only (its reference window is stride x stride).
    """
    check_choice("anchor flavour", flavour, ANCHOR_FLAVOURS)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    ratios = [float(r) for r in aspect_ratios]
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"aspect_ratios must be positive numbers, got {aspect_ratios!r}")
    if flavour in ("torchvision", "mmdet"):
        # float32 throughout, as torchvision's AnchorGenerator.generate_anchors and mmdet's
        # AnchorGenerator.gen_single_level_base_anchors (x_center - 0.5 * ws == -ws / 2).
        ar = np.asarray(ratios, np.float32)
        scale = np.float32(size)
        h_ratios = np.sqrt(ar)
        w_ratios = np.float32(1) / h_ratios
        ws = w_ratios * scale
        hs = h_ratios * scale
        base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
        return (np.round(base) if flavour == "torchvision" else base).astype(np.float32)
    if flavour == "detectron2":
        out = []
        area = float(size) ** 2.0
        for r in ratios:  # float64, cast at the end, as detectron2's DefaultAnchorGenerator
            w = math.sqrt(area / r)
            h = r * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return np.asarray(out, np.float64).astype(np.float32)
    if stride is None:
        raise ValueError("stride is required for legacy anchors")
    return _legacy_cell_anchors(stride, size, ratios)


def _legacy_cell_anchors(stride: int, size: float, ratios: Sequence[float]) -> np.ndarray:
    """Detectron's generate_anchors for one size: ratio enumeration, then scale enumeration."""
    base = float(stride)
    w = h = base  # reference window (0, 0, base - 1, base - 1)
    ctr = 0.5 * (base - 1)
    scale = float(size) / base
    out = []
    for r in ratios:
        ws = np.round(np.sqrt(w * h / r))
        hs = np.round(ws * r)
        ws, hs = ws * scale, hs * scale
        out.append(
            [ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)]
        )
    return np.asarray(out, np.float64).astype(np.float32)


def grid_anchors(cell, grid_hw: tuple[int, int], stride, *, offset: float = 0.0):
    """Anchors `[H * W * A, 4]` (or `[B, H * W * A, 4]`) for one feature level.

    cell:    `[A, 4]` cell anchors.
    grid_hw: static (H, W) of the feature map.
    stride:  a number, an (sy, sx) pair, or an array `[B, 2]` of per-image (sy, sx) strides
             (torchvision derives the stride as padded image size // feature size, which is
             not always the nominal stride: 800 // 13 = 61 on P6).
    offset:  grid points at (i + offset) * stride (Detectron2's ANCHOR_GENERATOR.OFFSET).
    """
    cell = jnp.asarray(cell, jnp.float32)
    if cell.ndim != 2 or cell.shape[-1] != 4:
        raise ValueError(f"cell must have shape [A, 4], got {tuple(cell.shape)}")
    h, w = grid_hw
    if h < 0 or w < 0:
        raise ValueError(f"grid_hw must be non-negative, got {grid_hw!r}")
    stride = jnp.asarray(stride, jnp.float32)
    if stride.ndim == 0:
        stride = jnp.stack([stride, stride])
    batched = stride.ndim == 2
    if stride.shape[-1] != 2 or stride.ndim > 2:
        raise ValueError(f"stride must be a number, a pair or [B, 2], got shape {stride.shape}")
    sy = stride[..., 0, None, None]  # [(B,) 1, 1]
    sx = stride[..., 1, None, None]
    ys = (jnp.arange(h, dtype=jnp.float32) + offset)[:, None]  # [H, 1]
    xs = (jnp.arange(w, dtype=jnp.float32) + offset)[None, :]  # [1, W]
    shift_x = jnp.broadcast_to(xs * sx, stride.shape[:-1] + (h, w))  # [(B,) H, W]
    shift_y = jnp.broadcast_to(ys * sy, stride.shape[:-1] + (h, w))
    shifts = jnp.stack([shift_x, shift_y, shift_x, shift_y], axis=-1)  # [(B,) H, W, 4]
    anchors = shifts[..., None, :] + cell  # [(B,) H, W, A, 4]
    lead = (stride.shape[0],) if batched else ()
    return anchors.reshape(lead + (h * w * cell.shape[0], 4))


def torchvision_strides(padded_hw, feature_hw: tuple[int, int]):
    """torchvision's per-level stride: padded image size // feature size, per axis.

    padded_hw: `[..., 2]` integer (or integral float) padded image sizes; returns `[..., 2]`.
    """
    padded = jnp.asarray(padded_hw)
    feat = jnp.asarray(feature_hw, padded.dtype)
    return jnp.floor_divide(padded, jnp.maximum(feat, 1))
