"""A differentiable multi-level ROIAlign for training (fixed sampling_ratio > 0).

`jaxmrcnn.ops.roi_align` runs its work items in a loop whose trip count is data, which
reverse-mode autodiff cannot go through. With a fixed sampling ratio every ROI is one work
item of 2 * sr taps per bin and axis, so here all ROIs run in a `lax.map` over fixed-size
chunks: static trip count, differentiable w.r.t. the features (the gather's transpose is a
scatter-add). The ROIs themselves are treated as constants (stop_gradient), as in
torchvision, where proposals are detached.

Same sample positions, weights and border rules as `ops.roi_align` (it reuses its per-axis
helpers), so forward values agree with it to float rounding. Positions, weights and sums
are float32 whatever the features' dtype (bfloat16 features: the output is cast back).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmrcnn import ops
from jaxmrcnn.ops.roi_align import _axis_grid, _axis_taps, _pool


def roi_align_train(
    features: Sequence,
    rois,
    *,
    output_size: int,
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    level_rule: str,
    valid_hw=None,
    min_level: int = 2,
    chunk: int = 64,
):
    """features: L arrays `[B, H_l, W_l, C]`; rois `[B, R, 4]` image pixels; valid_hw
    `[B, L, 2]` per-image valid map sizes (default: full maps) -> `[B, R, PH, PW, C]`."""
    if sampling_ratio <= 0:
        raise NotImplementedError(
            "training ROIAlign needs a fixed sampling_ratio > 0 (adaptive sampling has a "
            "data-dependent number of taps); this config has sampling_ratio="
            f"{sampling_ratio}"
        )
    n_levels = len(features)
    b, _, _, c = features[0].shape
    r = rois.shape[1]
    ph = pw = int(output_size)
    dtype = features[0].dtype  # of the output; sampling and sums run in float32
    f32 = jnp.float32
    rois = jax.lax.stop_gradient(rois).astype(f32)
    levels = ops.assign_levels(rois, rule=level_rule, min_level=min_level,
                               max_level=min_level + n_levels - 1) if n_levels > 1 else \
        jnp.zeros((b, r), jnp.int32)
    shapes = [tuple(f.shape[1:3]) for f in features]
    if valid_hw is None:
        valid_hw = jnp.broadcast_to(jnp.asarray(shapes, jnp.int32), (b, n_levels, 2))
    # One flat [sum_l B * H_l * W_l, C] array; level l starts at base[l].
    flat = jnp.concatenate([f.reshape(-1, c).astype(f32) for f in features], axis=0)
    sizes = [b * h * w for h, w in shapes]
    base = jnp.asarray([sum(sizes[:i]) for i in range(n_levels)], jnp.int32)

    n = b * r
    lv = levels.reshape(n)
    bidx = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
    boxes = rois.reshape(n, 4)
    scale = jnp.asarray(spatial_scales, f32)[lv]
    canvas = jnp.asarray(shapes, jnp.int32)[lv]  # [N, 2]
    ext = jnp.minimum(jnp.asarray(valid_hw, jnp.int32)[bidx, lv], canvas)  # [N, 2]
    kw = dict(scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
    gy = _axis_grid(boxes[:, 1], boxes[:, 3], pooled=ph, **kw)
    gx = _axis_grid(boxes[:, 0], boxes[:, 2], pooled=pw, **kw)
    first = jnp.zeros((n,), jnp.int32)
    ry, wy = _axis_taps(*gy, ext[:, 0], first, pooled=ph, n_samples=sampling_ratio, band=None)
    rx, wx = _axis_taps(*gx, ext[:, 1], first, pooled=pw, n_samples=sampling_ratio, band=None)
    count = jnp.maximum(gy[2] * gx[2], 1).astype(f32)  # [N]
    # Rows of the flat array: level base + image offset + row * W_l (columns add rx).
    level_w = canvas[:, 1]
    rows = (base[lv] + bidx * canvas[:, 0] * level_w)[:, None, None] + ry * level_w[:, None, None]
    wy, wx = wy.astype(f32), wx.astype(f32)

    m = max(1, min(chunk, n))
    pad = -n % m
    args = [jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in (rows, wy, rx, wx)]
    args = [a.reshape((-1, m) + a.shape[1:]) for a in args]  # [n_chunks, M, ...]
    out = jax.lax.map(lambda t: _pool(flat, *t), tuple(args))  # [n_chunks, M, PH, PW, C]
    out = out.reshape(-1, ph, pw, c)[:n] / count[:, None, None, None]
    return out.reshape(b, r, ph, pw, c).astype(dtype)
