"""ROIAlign over a multi-level feature pyramid in one call, with static shapes.

Reference semantics: the Caffe2 / torchvision / mmcv kernel. Per ROI and axis (y shown):

    off   = 0.5 if aligned else 0            # aligned: pixel (i, j) has its centre at i + 0.5
    start = y1 * scale - off;  size = y2 * scale - off - start
    if not aligned: size = max(size, 1)      # legacy: ROIs are at least 1x1 feature pixels
    bin   = size / PH
    g     = sampling_ratio if > 0 else ceil(size / PH)      # samples per bin and axis
    y(p, i) = start + p * bin + (i + .5) * bin / g           # i < g
    a sample is 0 unless -1 <= y <= H and -1 <= x <= W; else y = max(y, 0),
    lo = int(y); if lo >= H - 1: lo = hi = H - 1, y = lo; else hi = lo + 1; bilinear weights
    out[p, q] = sum of the bilinear samples / max(gy * gx, 1)

Example (Detectron2's worked case): aligned=True, scale 1, ROI x in [0, 4] with PW=1 and
one sample: start = -0.5, bin = 4, x = -0.5 + 2 = 1.5, i.e. the centre between pixels 1 and 2.

Separable evaluation. The validity test and the bilinear weight factor into a y part and an
x part, and the sample grid is a tensor product, so

    out[p, q, :] = sum_a sum_b Wy[p, a] Wx[q, b] F[row[p, a], col[q, b], :] / count

with a short list of taps per output row (and column):
  * sampling_ratio > 0: 2 taps per sample (lo, hi), 2 * sr per bin. One work item per ROI.
  * sampling_ratio = 0 (adaptive): the g samples of a bin split into chunks of
    G = `max_samples` consecutive samples (chunk k: i in [kG, kG + G)), and each chunk is
    read as a band of G + 1 consecutive rows from the `lo` of its first sample. Why the band
    holds every tap: samples are bin / g <= 1 apart (g = ceil(bin) >= bin), so the chunk's
    samples span s <= G - 1; floor(y + s) - floor(y) <= ceil(s), so their `lo` rows lie
    within G - 1 rows of the first one and their `hi = lo + 1` rows within G. Clamping
    (y = max(y, 0), lo = hi = H - 1 at the far edge) only pulls rows together; a first
    sample below -1 (weight 0, lo forced to 0) leaves the others at y < G - 2, i.e. rows
    0 .. G - 2. An ROI with cy = ceil(gy / G) chunks along y and cx along x is cy * cx work
    items (ky, kx), each (G + 1) x (G + 1) taps per bin; their sum divided by gy * gx is the
    result, exact for every ROI. A square ROI on its canonical FPN level (14 to 28 feature
    px) needs one item at 7x7 with G = 4; a 1333 x 9 px box on P2 (gx = 48) needs 12; the
    item counts are capped only for ROIs tens of thousands of feature px long (int32
    bounds), which would be truncated. In float the coordinates are rounded exactly as in
    the reference (see `_div`, `_mul`); a chunk's span can exceed G - 1 only by that
    rounding, and a tap pushed out of the band then weighs at most the excess (a few ulps
    of the coordinate).

Work items run `chunk` at a time in one loop whose trip count is data (sum over levels of
ceil(items on the level / chunk)), so shapes and the program are static and nothing leaves
the device: ROIs are ordered by level, their item counts summed cumulatively, and item t
belongs to the ROI whose range holds t. Every trip holds items of one level and gathers
straight from that level's `[B * H * W, C]` view (a `lax.switch` over levels; no copy of
the pyramid), then adds its `[chunk, PH, PW, C]` blocks into the output.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmrcnn.ops._checks import check_boxes, check_choice, check_positive_int, check_rank

LEVEL_RULES = ("torchvision", "detectron2", "legacy", "mmdet")
_MAX_GRID = 2**30  # adaptive samples per bin beyond this are clipped (never reached in practice)
_CHUNK = 16  # default work items per loop trip (benchmarks/ops.py)
_UNROLL = 64  # _pool: unroll up to this many taps per bin


def assign_levels(
    rois,
    *,
    rule: str,
    min_level: int = 2,
    max_level: int = 5,
    canonical_size: float = 224.0,
    canonical_level: int = 4,
    finest_scale: float = 56.0,
):
    """FPN level index (0 = `min_level`) of each ROI `[..., 4]` -> int32 `[...]`.

    rule:
      "torchvision": floor(4 + log2(sqrt(w * h) / 224) + 1e-6)   (torchvision LevelMapper)
      "detectron2":  floor(4 + log2(sqrt(w * h) / 224 + 1e-8))   (detectron2 poolers)
      "legacy":      floor(4 + log2(sqrt((w + 1)(h + 1)) / 224 + 1e-6))   (maskrcnn-benchmark,
                     Detectron)
      "mmdet":       floor(log2(sqrt(w * h) / 56 + 1e-6)) + min_level   (SingleRoIExtractor)
    clamped to [min_level, max_level].
    """
    check_boxes("rois", rois)
    check_choice("level rule", rule, LEVEL_RULES)
    one = 1.0 if rule == "legacy" else 0.0
    area = (rois[..., 2] - rois[..., 0] + one) * (rois[..., 3] - rois[..., 1] + one)
    s = jnp.sqrt(area)
    if rule == "torchvision":
        lvl = jnp.floor(canonical_level + jnp.log2(s / canonical_size) + jnp.float32(1e-6))
    elif rule == "detectron2":
        lvl = jnp.floor(canonical_level + jnp.log2(s / canonical_size + 1e-8))
    elif rule == "legacy":
        lvl = jnp.floor(canonical_level + jnp.log2(s / canonical_size + 1e-6))
    else:
        lvl = jnp.floor(jnp.log2(s / finest_scale + 1e-6)) + min_level
    # NaN (degenerate ROIs) goes to the finest level, as the int cast of a clamped NaN.
    lvl = jnp.where(jnp.isnan(lvl), min_level, lvl)
    lvl = jnp.clip(lvl, min_level, max_level)
    return (lvl - min_level).astype(jnp.int32)


def _div(a, b):
    """`a / b`, correctly rounded like the reference kernel's float division.

    XLA rewrites a division by a broadcast value into a multiplication by its reciprocal,
    which is off by an ulp for about half of all quotients (ceil(21 / 7) becomes 4); a divisor
    materialized at the dividend's shape behind an optimization barrier keeps the division.
    """
    return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, jnp.shape(a)).astype(a.dtype))


def _mul(a, b):
    """`a * b` rounded on its own before the sum it feeds, as in the reference kernel.

    XLA's CPU backend lets LLVM fuse a product and a following sum into one fused
    multiply-add (rounded once): an ulp off in a sample coordinate, which moves a bilinear
    sample by ~1e-5 px at coordinates ~300. Multiplying by a runtime 1 (0 only for NaN, which
    stays NaN) leaves a contraction `fma(a * b, one, c)` that rounds the product first.
    """
    prod = a * b
    return prod * (prod == prod).astype(prod.dtype)


def _axis_grid(lo_edge, hi_edge, *, pooled, scale, sampling_ratio, aligned):
    """Per-ROI sample grid along one axis, as the reference kernel: `(start, bin_size, g)`.

    lo_edge, hi_edge: `[N]` ROI coordinates in image pixels; `g [N]` int32 samples per bin.
    """
    off = 0.5 if aligned else 0.0
    start = _mul(lo_edge, scale) - off  # [N]
    size = _mul(hi_edge, scale) - off - start
    if not aligned:
        size = jnp.maximum(size, 1.0)
    bin_size = _div(size, pooled)  # [N]
    if sampling_ratio > 0:
        g = jnp.full(start.shape, sampling_ratio, jnp.int32)
    else:
        g = jnp.ceil(bin_size)  # the reference's ceil(size / pooled)
        # NaN / infinite sizes (degenerate boxes) get no samples: their output is 0.
        g = jnp.where(jnp.isfinite(g), jnp.clip(g, 0, _MAX_GRID), 0).astype(jnp.int32)
    return start, bin_size, g


def _axis_taps(start, bin_size, g, extent, first, *, pooled, n_samples, band):
    """Tap rows and weights along one axis for samples `first + [0, n_samples)` of every bin.

    start, bin_size, g, extent (valid map size), first: `[N]`. Samples with index >= g or
    outside [-1, extent] weigh 0.
      band None: 2 taps (lo, hi) per sample -> idx, weights `[N, P, 2 * n_samples]`.
      band B:    B consecutive rows from the first sample's `lo` -> `[N, P, B]`; holds every
                 tap when the samples span at most B - 2 rows (see the module docstring).
    Row indices stay within [0, extent - 1] (taps past the map weigh 0).
    """
    dt = start.dtype
    extent_f = extent.astype(dt)
    p = jnp.arange(pooled, dtype=dt)  # [P]
    i_int = first[:, None] + jnp.arange(n_samples, dtype=jnp.int32)  # [N, S]
    i = i_int.astype(dt) + 0.5
    gf = jnp.maximum(g, 1).astype(dt)[:, None, None]
    # Same operations, in the same order, as the reference kernel.
    y = (start[:, None, None] + _mul(p[None, :, None], bin_size[:, None, None])) + _div(
        i[:, None, :] * bin_size[:, None, None], gf
    )  # [N, P, S]
    inside = (y >= -1.0) & (y <= extent_f[:, None, None]) & (i_int < g[:, None])[:, None, :]
    y = jnp.maximum(y, 0.0)
    last = (extent - 1)[:, None, None]
    lo = jnp.where(inside, y, 0.0).astype(jnp.int32)
    at_edge = lo >= last
    lo = jnp.where(at_edge, last, lo)
    hi = jnp.where(at_edge, last, lo + 1)
    y = jnp.where(at_edge, lo.astype(dt), y)
    ly = y - lo.astype(dt)
    hy = 1.0 - ly
    zero = jnp.zeros_like(ly)
    w_lo = jnp.where(inside, hy, zero)
    w_hi = jnp.where(inside, ly, zero)
    if band is None:
        idx = jnp.stack([lo, hi], axis=-1).reshape(lo.shape[:2] + (2 * n_samples,))
        w = jnp.stack([w_lo, w_hi], axis=-1).reshape(idx.shape)
        return jnp.maximum(idx, 0), w
    base = lo[:, :, :1]  # [N, P, 1]
    rows = base + jnp.arange(band, dtype=jnp.int32)  # [N, P, B]
    w = jnp.sum(
        (lo[..., None, :] == rows[..., :, None]) * w_lo[..., None, :]
        + (hi[..., None, :] == rows[..., :, None]) * w_hi[..., None, :],
        axis=-1,
    )  # [N, P, B]
    return jnp.clip(rows, 0, jnp.maximum(last, 0)), w


def _pool(flat, rows, wy, cols, wx):
    """`out[k, p, q] = sum_a sum_b wy[k, p, a] wx[k, q, b] flat[rows[k, p, a] + cols[k, q, b]]`.

    flat `[M, C]`; rows, wy `[k, P, Ty]`; cols, wx `[k, Q, Tx]` -> `[k, P, Q, C]`. Written as
    Ty * Tx gathers of `[k, P, Q, C]` that XLA fuses with the multiply-adds into one loop
    over the output, so the taps are never materialized (measured 2-3x faster on CPU than
    one gather of all taps followed by two contractions). Past `_UNROLL` terms the rows run
    in a loop, to bound the program size.
    """
    ty, tx = rows.shape[-1], cols.shape[-1]
    k, p, q, c = rows.shape[0], rows.shape[1], cols.shape[1], flat.shape[1]

    def row_sum(r, w_r):  # one row tap of every output row: [k, P]
        acc = 0.0
        for b in range(tx):
            idx = (r[:, :, None] + cols[:, None, :, b]).reshape(-1)  # 1-D: no index copies
            taps = jnp.take(flat, idx, axis=0, mode="clip").reshape(k, p, q, c)
            acc = acc + (w_r[:, :, None] * wx[:, None, :, b])[..., None] * taps
        return acc

    if ty * tx <= _UNROLL:
        out = 0.0
        for a in range(ty):
            out = out + row_sum(rows[..., a], wy[..., a])
        return out

    def body(a, out):
        r = jax.lax.dynamic_index_in_dim(rows, a, axis=2, keepdims=False)
        w_r = jax.lax.dynamic_index_in_dim(wy, a, axis=2, keepdims=False)
        return out + row_sum(r, w_r)

    zeros = jnp.zeros((k, p, q, c), flat.dtype)
    return jax.lax.fori_loop(0, ty, body, zeros)


def roi_align(
    features: Sequence,
    rois,
    *,
    output_size: int | tuple[int, int],
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    levels=None,
    level_rule: str | None = None,
    min_level: int = 2,
    valid_hw=None,
    max_samples: int = 4,
    chunk: int | None = None,
):
    """Multi-level ROIAlign.

    features: L arrays `[B, H_l, W_l, C]` (NHWC), finest level first.
    rois:     `[B, R, 4]` (x1, y1, x2, y2) in image pixels.
    output_size: PH or (PH, PW), positive.
    spatial_scales: L floats, e.g. (1/4, 1/8, 1/16, 1/32).
    sampling_ratio: samples per bin and axis; 0 = adaptive ceil(roi_size / output_size).
    aligned: half-pixel shift (Detectron2 ROIAlignV2, mmcv); False = legacy (torchvision).
    levels:  `[B, R]` int level index into `features`, or None to assign with `level_rule`
             ("torchvision", "detectron2", "legacy", "mmdet"; `min_level` is the first
             level's FPN index). A single level needs neither.
    valid_hw: `[B, L, 2]` per-image valid map sizes (H, W) used for the border rules, for
             images padded into a larger canvas; default: each level's full size.
    max_samples: adaptive mode's chunk G of samples per bin and axis per work item (a band
             of G + 1 taps); ROIs that need more samples take more items. A speed knob only:
             the result is exact for any value.
    chunk: work items per loop trip (a speed knob; results do not depend on it).

    Returns `(out [B, R, PH, PW, C], overflow [] int32)`; `overflow` counts the ROIs that
    took more than one work item (more than `max_samples` adaptive samples per bin along an
    axis). It is informational: the result is exact regardless. Always 0 when
    sampling_ratio > 0.
    """
    if isinstance(features, jax.Array) or not isinstance(features, (list, tuple)):
        features = [features]
    n_levels = len(features)
    if n_levels == 0:
        raise ValueError("features must hold at least one level")
    for lvl, f in enumerate(features):
        check_rank(f"features[{lvl}]", f, 4)
    b, _, _, c = features[0].shape
    for lvl, f in enumerate(features):
        if f.shape[0] != b or f.shape[3] != c:
            raise ValueError(
                f"features[{lvl}] has shape {tuple(f.shape)}; every level needs batch {b} "
                f"and {c} channels"
            )
    check_boxes("rois", rois, rank=3)
    if rois.shape[0] != b:
        raise ValueError(f"rois has batch {rois.shape[0]} but features have batch {b}")
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    if len(output_size) != 2:
        raise ValueError(f"output_size must be an int or a pair, got {output_size!r}")
    ph, pw = (check_positive_int("output_size", int(s)) for s in output_size)
    if len(spatial_scales) != n_levels:
        raise ValueError(
            f"spatial_scales has {len(spatial_scales)} entries for {n_levels} feature levels"
        )
    if not isinstance(sampling_ratio, int) or sampling_ratio < 0:
        raise ValueError(f"sampling_ratio must be an int >= 0, got {sampling_ratio!r}")
    check_positive_int("max_samples", max_samples)
    r = rois.shape[1]
    dtype = features[0].dtype

    if levels is None:
        if n_levels == 1:
            levels = jnp.zeros((b, r), jnp.int32)
        elif level_rule is None:
            raise ValueError("pass levels or a level_rule for multi-level features")
        else:
            levels = assign_levels(
                rois, rule=level_rule, min_level=min_level, max_level=min_level + n_levels - 1
            )
    levels = jnp.clip(levels.astype(jnp.int32), 0, n_levels - 1)

    shapes = [tuple(f.shape[1:3]) for f in features]
    if valid_hw is None:
        valid_hw = jnp.broadcast_to(jnp.asarray(shapes, jnp.int32), (b, n_levels, 2))
    valid_hw = jnp.asarray(valid_hw, jnp.int32)
    if valid_hw.shape != (b, n_levels, 2):
        raise ValueError(f"valid_hw must have shape {(b, n_levels, 2)}, got {valid_hw.shape}")
    if chunk is None:
        chunk = _CHUNK
    check_positive_int("chunk", chunk)

    n = b * r
    if n == 0:
        return jnp.zeros((b, r, ph, pw, c), dtype), jnp.zeros((), jnp.int32)
    lv = levels.reshape(n)
    bidx = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
    boxes = rois.reshape(n, 4).astype(dtype)
    scale = jnp.asarray(spatial_scales, dtype)[lv]  # [N]
    canvas_h = jnp.asarray([h for h, _ in shapes], jnp.int32)[lv]
    canvas_w = jnp.asarray([w for _, w in shapes], jnp.int32)[lv]
    ext = valid_hw[bidx, lv]  # [N, 2]
    ext_h = jnp.minimum(ext[:, 0], canvas_h)
    ext_w = jnp.minimum(ext[:, 1], canvas_w)

    kw = dict(scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
    grid_y = _axis_grid(boxes[:, 1], boxes[:, 3], pooled=ph, **kw)
    grid_x = _axis_grid(boxes[:, 0], boxes[:, 2], pooled=pw, **kw)
    count = jnp.maximum(grid_y[2] * grid_x[2], 1).astype(dtype)  # [N]
    if sampling_ratio > 0:  # one work item per ROI, 2 taps per sample
        g_cap, band = sampling_ratio, None
        cx = items = jnp.ones((n,), jnp.int32)
    else:  # cy * cx work items per ROI, a band of G + 1 taps per bin and axis
        g_cap, band = max_samples, max_samples + 1
        # Chunk counts capped so that item numbers stay inside int32. The caps bind only
        # for ROIs tens of thousands of feature pixels long, which they would truncate.
        cy = jnp.clip(-(-grid_y[2] // g_cap), 1, 2**15)
        cx = jnp.clip(-(-grid_x[2] // g_cap), 1, 2**15)
        items = jnp.minimum(cy * cx, 2**30 // n)  # [N]

    # Number the work items level by level: ROIs sorted by level, item t belongs to the
    # first ROI (in that order) whose cumulative item count exceeds t.
    order = jnp.argsort(lv, stable=True).astype(jnp.int32)
    ends = jnp.cumsum(items[order])  # [N]
    per_level = jnp.sum(lv[None, :] == jnp.arange(n_levels)[:, None], axis=1)
    last_roi = jnp.cumsum(per_level) - 1  # [L] sorted position of the last ROI on levels <= l
    level_end = jnp.where(last_roi >= 0, ends[jnp.maximum(last_roi, 0)], 0)
    level_start = jnp.concatenate([jnp.zeros((1,), level_end.dtype), level_end[:-1]])
    m = chunk
    # Trips: level l runs ceil(items on l / M) of them, levels one after the other.
    level_trips = -(-(level_end - level_start) // m)  # [L]
    trips_end = jnp.cumsum(level_trips)
    level_hw = jnp.asarray(shapes, jnp.int32)  # [L, 2]
    flats = [f.reshape(-1, c) for f in features]  # [B * H * W, C] views, no copy
    kw = dict(n_samples=g_cap, band=band)

    def trip(i, acc):
        lvl = jnp.minimum(jnp.searchsorted(trips_end, i, side="right"), n_levels - 1)
        t = level_start[lvl] + (i - trips_end[lvl] + level_trips[lvl]) * m
        t = t + jnp.arange(m, dtype=jnp.int32)  # [M] item numbers
        valid = t < level_end[lvl]
        pos = jnp.minimum(jnp.searchsorted(ends, t, side="right"), n - 1)
        roi = order[pos]
        local = t - (ends[pos] - items[roi])  # the item within its ROI: (ky, kx)
        ky, kx = local // cx[roi], local % cx[roi]
        gy_i, gx_i = ((v[roi] for v in grid) for grid in (grid_y, grid_x))
        ry, wy = _axis_taps(*gy_i, ext_h[roi], ky * g_cap, pooled=ph, **kw)  # [M, PH, Ty]
        rx, wx = _axis_taps(*gx_i, ext_w[roi], kx * g_cap, pooled=pw, **kw)  # [M, PW, Tx]
        wy = jnp.where(valid[:, None, None], wy, 0.0).astype(dtype)
        h, w = level_hw[lvl, 0], level_hw[lvl, 1]
        rows = (bidx[roi] * (h * w))[:, None, None] + ry * w  # row offsets in the level's view
        branches = [functools.partial(_pool, flat) for flat in flats]
        part = jax.lax.switch(lvl, branches, rows, wy, rx, wx.astype(dtype))
        part = part / count[roi][:, None, None, None]
        roi = jnp.where(valid, roi, n)  # padding items are dropped
        return acc.at[roi].add(part, mode="drop")

    out = jnp.zeros((n, ph, pw, c), dtype)
    out = jax.lax.fori_loop(0, trips_end[-1], trip, out)

    overflow = jnp.sum((items > 1).astype(jnp.int32)) if sampling_ratio == 0 else jnp.int32(0)
    return out.reshape(b, r, ph, pw, c), overflow
