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
  * sampling_ratio > 0: 2 taps per sample (lo, hi), 2 * sr per bin. Exact for any ROI.
  * sampling_ratio = 0 (adaptive): g <= ceil(bin) samples lie within one bin, so they touch
    at most G + 1 consecutive rows from the first sample's `lo`: a band of G + 1 taps, where
    G = `max_samples` is a static cap. Exact for every ROI whose g <= G; an ROI that needs
    more samples per bin is computed with its first G samples only, and counted in the
    returned `overflow` (so tests and users can see it). With FPN level assignment a square
    ROI has g <= 4 for 7x7 output and g <= 2 for 14x14; elongated ROIs (a 1333 x 9 px box)
    can need far more: raise `max_samples` (cost grows as (G + 1)^2) when `overflow` > 0.

All levels are flattened into one `[sum_l B * H_l * W_l, C]` array and read with a single
gather per chunk of ROIs (`chunk` ROIs at a time, to stay in cache on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxmrcnn.ops._checks import check_boxes, check_choice, check_positive_int, check_rank

LEVEL_RULES = ("torchvision", "detectron2", "legacy", "mmdet")


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


def _axis_taps(lo_edge, hi_edge, extent, *, pooled, scale, sampling_ratio, max_samples, aligned):
    """Tap rows and weights along one axis for every ROI.

    lo_edge, hi_edge: `[N]` ROI coordinates in image pixels; extent: `[N]` valid map size.
    Returns idx `[N, P, T]` int32, weights `[N, P, T]`, grid `[N]` (samples per bin) and
    `miss [N]` (adaptive mode: samples that fell outside the band).
    """
    off = 0.5 if aligned else 0.0
    start = lo_edge * scale - off  # [N]
    size = hi_edge * scale - off - start
    if not aligned:
        size = jnp.maximum(size, 1.0)
    bin_size = size / pooled  # [N]
    extent_f = extent.astype(start.dtype)
    if sampling_ratio > 0:
        g = jnp.full(start.shape, sampling_ratio, jnp.int32)
        n_samples = sampling_ratio
    else:
        g = jnp.ceil(size / pooled)
        g = jnp.where(jnp.isnan(g), 0, jnp.clip(g, 0, 2**30)).astype(jnp.int32)
        n_samples = max_samples
    p = jnp.arange(pooled, dtype=start.dtype)  # [P]
    i = jnp.arange(n_samples, dtype=start.dtype) + 0.5  # [S]
    gf = jnp.maximum(g, 1).astype(start.dtype)[:, None, None]
    # Same operation order as the reference kernel.
    y = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) + (
        i[None, None, :] * bin_size[:, None, None] / gf
    )  # [N, P, S]
    inside = (y >= -1.0) & (y <= extent_f[:, None, None])
    inside = inside & (jnp.arange(n_samples)[None, None, :] < g[:, None, None])
    y = jnp.maximum(y, 0.0)
    last = (extent - 1)[:, None, None]
    lo = jnp.where(inside, y, 0.0).astype(jnp.int32)
    at_edge = lo >= last
    lo = jnp.where(at_edge, last, lo)
    hi = jnp.where(at_edge, last, lo + 1)
    y = jnp.where(at_edge, lo.astype(y.dtype), y)
    ly = y - lo.astype(y.dtype)
    hy = 1.0 - ly
    zero = jnp.zeros_like(ly)
    w_lo = jnp.where(inside, hy, zero)
    w_hi = jnp.where(inside, ly, zero)
    if sampling_ratio > 0:
        idx = jnp.stack([lo, hi], axis=-1).reshape(lo.shape[:2] + (2 * n_samples,))
        w = jnp.stack([w_lo, w_hi], axis=-1).reshape(idx.shape)
        miss = jnp.zeros(start.shape, bool)
        return idx, w, g, miss
    # Band layout: B = G + 1 consecutive rows from the first sample's lo.
    band = max_samples + 1
    base = lo[:, :, :1]  # [N, P, 1]
    rows = base + jnp.arange(band, dtype=jnp.int32)  # [N, P, B]
    w = jnp.sum(
        (lo[..., None, :] == rows[..., :, None]) * w_lo[..., None, :]
        + (hi[..., None, :] == rows[..., :, None]) * w_hi[..., None, :],
        axis=-1,
    )  # [N, P, B]
    out_of_band = ((hi - base) >= band) & (w_hi > 0) | ((lo - base) >= band) & (w_lo > 0)
    miss = jnp.any(out_of_band, axis=(1, 2))
    idx = jnp.minimum(rows, last)
    return idx, w, g, miss


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
    max_samples: static cap G on adaptive samples per bin (sampling_ratio = 0 only).
    chunk: ROIs per gather (a speed knob; results do not depend on it); default: as many as
           keep one gather near 2 MB (1 for 14x14 outputs at 256 channels, 2-3 for 7x7).

    Returns `(out [B, R, PH, PW, C], overflow [] int32)`; `overflow` counts ROIs computed
    with fewer adaptive samples than they need (always 0 when sampling_ratio > 0).
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

    shapes = [f.shape[1:3] for f in features]
    sizes = [b * h * w for h, w in shapes]
    offsets = [sum(sizes[:i]) for i in range(n_levels)]
    flat = jnp.concatenate([f.reshape(-1, c) for f in features], axis=0)  # [sum B*H*W, C]

    if valid_hw is None:
        valid_hw = jnp.broadcast_to(jnp.asarray(shapes, jnp.int32), (b, n_levels, 2))
    valid_hw = jnp.asarray(valid_hw, jnp.int32)
    if valid_hw.shape != (b, n_levels, 2):
        raise ValueError(f"valid_hw must have shape {(b, n_levels, 2)}, got {valid_hw.shape}")

    n = b * r
    lv = levels.reshape(n)
    bidx = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
    boxes = rois.reshape(n, 4).astype(dtype)
    scale = jnp.asarray(spatial_scales, dtype)[lv]  # [N]
    canvas_w = jnp.asarray([w for _, w in shapes], jnp.int32)[lv]
    canvas_h = jnp.asarray([h for h, _ in shapes], jnp.int32)[lv]
    base = jnp.asarray(offsets, jnp.int32)[lv] + bidx * canvas_h * canvas_w  # [N]
    ext = valid_hw[bidx, lv]  # [N, 2]
    ext_h = jnp.minimum(ext[:, 0], canvas_h)
    ext_w = jnp.minimum(ext[:, 1], canvas_w)

    kw = dict(scale=scale, sampling_ratio=sampling_ratio, max_samples=max_samples, aligned=aligned)
    ry, wy, gy, miss_y = _axis_taps(boxes[:, 1], boxes[:, 3], ext_h, pooled=ph, **kw)
    rx, wx, gx, miss_x = _axis_taps(boxes[:, 0], boxes[:, 2], ext_w, pooled=pw, **kw)
    count = jnp.maximum(gy * gx, 1).astype(dtype)  # [N]
    if sampling_ratio > 0:
        overflow = jnp.zeros((), jnp.int32)
    else:
        over = (gy > max_samples) | (gx > max_samples) | miss_y | miss_x
        overflow = jnp.sum(over.astype(jnp.int32))

    ty, tx = ry.shape[-1], rx.shape[-1]
    if chunk is None:  # measured on CPU: larger gathers fall out of cache (benchmarks/ops.py)
        roi_bytes = ph * ty * pw * tx * c * jnp.dtype(dtype).itemsize
        chunk = int(max(1, min(10, (2 << 20) // roi_bytes)))
    check_positive_int("chunk", chunk)
    # Flat indices of every tap: [N, PH, Ty, PW, Tx].
    flat_idx = (
        base[:, None, None, None, None]
        + ry[:, :, :, None, None] * canvas_w[:, None, None, None, None]
        + rx[:, None, None, :, :]
    )
    n_pad = -(-n // chunk) * chunk
    pad = n_pad - n

    def padded(x):
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))

    def one_chunk(args):
        idx, wy_c, wx_c, cnt = args  # [k, PH, Ty, PW, Tx], [k, PH, Ty], [k, PW, Tx], [k]
        taps = jnp.take(flat, idx.reshape(-1), axis=0, mode="clip")
        taps = taps.reshape(idx.shape + (c,))  # [k, PH, Ty, PW, Tx, C]
        cols = jnp.einsum("kqb,kpaqbc->kpaqc", wx_c, taps)
        out = jnp.einsum("kpa,kpaqc->kpqc", wy_c, cols)
        return out / cnt[:, None, None, None]

    args = tuple(
        padded(x).reshape((n_pad // chunk, chunk) + x.shape[1:])
        for x in (flat_idx, wy.astype(dtype), wx.astype(dtype), count)
    )
    out = jax.lax.map(one_chunk, args)  # [N/k, k, PH, PW, C]
    out = out.reshape(n_pad, ph, pw, c)[:n]
    return out.reshape(b, r, ph, pw, c), overflow
