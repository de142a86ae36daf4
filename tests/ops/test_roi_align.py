"""ROIAlign (single and multi-level) against torchvision.ops.roi_align / MultiScaleRoIAlign.

Tolerance (`assert_matches`): max abs error <= 1e-5 * (1 + max |ref|). The op evaluates the
same bilinear sample coordinates as torchvision's CPU kernel, rounded the same way, but sums
the samples in a different order (separable row/column band weights, several partial sums
for ROIs with many adaptive samples), so the float32 rounding of the sums differs (typically
~1e-7 relative).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torchvision.ops.poolers import LevelMapper

from jaxmrcnn.ops import assign_levels, roi_align

from ._refs import assign_levels_np


def assert_matches(out, ref):
    """Max abs error <= 1e-5 * (1 + max |ref|): same sample coordinates as the reference,
    float32 sums in a different order."""
    assert out.shape == ref.shape
    tol = 1e-5 * (1.0 + float(np.abs(ref).max(initial=0.0)))
    err = float(np.abs(out - ref).max(initial=0.0))
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


@functools.cache
def _jitted(output_size, scales, sr, aligned, max_samples=4, level_rule=None, chunk=10):
    def f(features, rois, levels=None, valid_hw=None):
        return roi_align(
            features, rois, output_size=output_size, spatial_scales=scales, sampling_ratio=sr,
            aligned=aligned, levels=levels, level_rule=level_rule, valid_hw=valid_hw,
            max_samples=max_samples, chunk=chunk,
        )

    return jax.jit(f)


def run_roi_align(features, rois, *, output_size, scales, sr, aligned, levels=None,
                  valid_hw=None, **kw):
    fn = _jitted(output_size, tuple(scales), sr, aligned, **kw)
    out, overflow = fn([jnp.asarray(f) for f in features], jnp.asarray(rois), levels, valid_hw)
    return np.asarray(out), int(overflow)


def tv_roi_align(feature, rois, output_size, scale, sr, aligned):
    """torchvision.ops.roi_align on NHWC numpy features and [B, R, 4] ROIs -> [B, R, PH, PW, C]."""
    b, r = rois.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(feature.transpose(0, 3, 1, 2)))
    boxes = [torch.from_numpy(rois[i]) for i in range(b)]
    out = torchvision.ops.roi_align(x, boxes, output_size, scale, sr, aligned).numpy()
    return out.reshape(b, r, out.shape[1], *out.shape[2:]).transpose(0, 1, 3, 4, 2)


def special_rois(h_img, w_img):
    """ROIs in image pixels that hit the kernel's border rules, for an image h_img x w_img."""
    return np.array(
        [
            [-8, -6, 10, 9],  # partly outside (top-left)
            [w_img - 10, h_img - 7, w_img + 12, h_img + 9],  # partly outside (bottom-right)
            [w_img + 5, 2, w_img + 20, 12],  # fully outside, right
            [-30, -30, -4, -3],  # fully outside, top-left (samples < -1 are 0)
            [-1.5, -1.5, 1.0, 1.0],  # samples between -1 and 0 clamp to row 0
            [5, 5, 5, 5],  # zero size
            [4, 3, 4, 11],  # zero width
            [12, 9, 3, 2],  # inverted
            [6.3, 2.2, 6.9, 2.7],  # sub-pixel
            [0, 0, w_img, h_img],  # the whole image
        ],
        np.float32,
    )


def random_rois(rng, n, h_img, w_img, max_frac=1.2):
    xy = rng.uniform(-0.2, 1.0, (n, 2)) * [w_img, h_img]
    wh = rng.uniform(0.02, max_frac, (n, 2)) * [w_img, h_img]
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Single level vs torchvision.ops.roi_align
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sr", [0, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_single_level_matches_torchvision(rng, aligned, sr):
    b, h, w, c, scale = 2, 12, 16, 3, 0.5  # image 24 x 32 px
    feat = rng.normal(size=(b, h, w, c)).astype(np.float32)
    rois = np.stack([np.concatenate([special_rois(24, 32), random_rois(rng, 14, 24, 32)])
                     for _ in range(b)])
    out_size = (3, 4)  # non-square on purpose
    # ROIs up to ~40 px = 20 feature px need up to ceil(20 / 3) = 7 adaptive samples per bin:
    # with G = 2 many take several work items.
    out, overflow = run_roi_align([feat], rois, output_size=out_size, scales=[scale], sr=sr,
                                  aligned=aligned, max_samples=2)
    ref = tv_roi_align(feat, rois, out_size, scale, sr, aligned)
    want = multi_item_rois(rois.reshape(-1, 4), scale, out_size, 2, aligned) if sr == 0 else 0
    assert overflow == want and (sr > 0 or want > 0)
    assert_matches(out, ref)
    assert np.abs(ref).max() > 0.1  # not a trivially zero comparison
    # Degenerate ROIs: aligned mode has no 1-px minimum; with adaptive sampling a zero-size or
    # inverted ROI gets ceil(size / bins) <= 0 samples, so it pools to exactly 0.
    if aligned and sr == 0:
        assert np.abs(out[:, 5:8]).max() == 0
    # Fully outside: every sample is out of range, exactly 0 in both.
    assert np.abs(out[:, 2:4]).max() == 0 and np.abs(ref[:, 2:4]).max() == 0


# ---------------------------------------------------------------------------------------------
# Multi-level vs torchvision MultiScaleRoIAlign (which infers scales from the image size)
# ---------------------------------------------------------------------------------------------
IMG_HW = (128, 160)
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def pyramid(rng, b=2, c=4):
    h, w = IMG_HW
    return [rng.normal(size=(b, h // s, w // s, c)).astype(np.float32) for s in (4, 8, 16, 32)]


def level_spanning_rois(rng, n):
    """ROIs whose sqrt(area) is log-uniform in [16, 700] px: every FPN level P2..P5 is used."""
    s = np.exp(rng.uniform(np.log(16), np.log(700), n))
    ar = np.exp(rng.uniform(-0.7, 0.7, n))
    w, h = s * ar, s / ar
    cx = rng.uniform(0, IMG_HW[1], n)
    cy = rng.uniform(0, IMG_HW[0], n)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)


@pytest.mark.parametrize("output_size,sr", [(7, 2), (14, 2), (7, 0)])
def test_multilevel_matches_multiscale_roi_align(rng, output_size, sr):
    feats = pyramid(rng)
    rois = np.stack([level_spanning_rois(rng, 30) for _ in range(2)])
    lv = assign_levels_np(rois.reshape(-1, 4), "torchvision")[0]
    assert set(lv.tolist()) == {0, 1, 2, 3}
    pooler = torchvision.ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size, sr)
    x = {
        f"p{i + 2}": torch.from_numpy(np.ascontiguousarray(f.transpose(0, 3, 1, 2)))
        for i, f in enumerate(feats)
    }
    ref = pooler(x, [torch.from_numpy(r) for r in rois], [IMG_HW, IMG_HW]).numpy()
    assert pooler.scales == list(SCALES)
    ref = ref.reshape(2, 30, *ref.shape[1:]).transpose(0, 1, 3, 4, 2)
    # ROIs of aspect ratio up to 4 need up to 7 adaptive samples per bin here: more than one
    # work item at G = 4.
    out, overflow = run_roi_align(feats, rois, output_size=output_size, scales=SCALES, sr=sr,
                                  aligned=False, level_rule="torchvision", max_samples=4)
    assert (overflow > 0) == (sr == 0)
    assert_matches(out, ref)


def test_multilevel_aligned_adaptive_detectron2_style(rng):
    """ROIAlignV2 (aligned, sr=0) with the detectron2 level rule vs per-level torchvision."""
    feats = pyramid(rng)
    rois = np.stack([level_spanning_rois(rng, 30) for _ in range(2)])
    levels = assign_levels_np(rois.reshape(-1, 4), "detectron2")[0].reshape(2, 30)
    out, _ = run_roi_align(feats, rois, output_size=7, scales=SCALES, sr=0, aligned=True,
                           level_rule="detectron2", max_samples=4)
    for lvl, (f, s) in enumerate(zip(feats, SCALES, strict=True)):
        ref = tv_roi_align(f, rois, 7, s, 0, True)  # every ROI on this level; keep the assigned
        sel = levels == lvl
        assert sel.any()
        assert_matches(out[sel], ref[sel])


def test_explicit_levels_override_rule(rng):
    feats = pyramid(rng, b=1)
    rois = level_spanning_rois(rng, 12)[None]
    levels = np.full((1, 12), 3, np.int32)  # everything from P5
    out, _ = run_roi_align(feats, rois, output_size=7, scales=SCALES, sr=2, aligned=False,
                           levels=jnp.asarray(levels))
    ref = tv_roi_align(feats[3], rois, 7, SCALES[3], 2, False)
    assert_matches(out, ref)


# ---------------------------------------------------------------------------------------------
# Adaptive sampling (sampling_ratio=0) of long, huge and elongated ROIs: exact for every ROI
# ---------------------------------------------------------------------------------------------
def adaptive_grid_np(rois, scale, output_size, aligned):
    """Adaptive samples per bin (gy, gx) of `[N, 4]` ROIs, the reference's float32 formula."""
    f32 = np.float32
    off = f32(0.5 if aligned else 0.0)
    rois = rois.astype(f32)
    g = []
    for lo, hi, pooled in ((1, 3, output_size[0]), (0, 2, output_size[1])):
        start = rois[:, lo] * f32(scale) - off
        size = rois[:, hi] * f32(scale) - off - start
        if not aligned:
            size = np.maximum(size, f32(1))
        g.append(np.clip(np.ceil(size / f32(pooled)), 0, None).astype(np.int64))
    return g


def multi_item_rois(rois, scale, output_size, g_cap, aligned):
    """ROIs that need more than `g_cap` adaptive samples per bin along an axis."""
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    gy, gx = adaptive_grid_np(rois, scale, output_size, aligned)
    return int(((gy > g_cap) | (gx > g_cap)).sum())


STRIDE4 = 0.25
LONG_IMG = 1344  # a 1344 x 1344 px image: P2 is 336 x 336


def long_rois():
    """ROIs in image pixels on a 1344 x 1344 image, for 7 x 7 output on P2 (stride 4)."""
    rois = [
        [5, 200, 1338, 209],  # 1333 x 9 px: 333 feature px over 7 bins -> gx = 48
        [200, 5, 209, 1338],  # 9 x 1333 px: gy = 48
        [0, 0, LONG_IMG, LONG_IMG],  # the whole map: g = 48 on both axes
        [-600, 50, 800, 62],  # partly outside (left), elongated
        [1000, 1300, 2600, 1310],  # partly outside (bottom right), elongated
        [1400, 10, 3000, 20],  # fully outside (right), elongated: 0
        [50, 10, 50, 1300],  # zero width, long: 0 when aligned (g = 0 along x)
        [60, 60, 60, 60],  # zero size
    ]
    # 28 * g px at stride 4 is exactly 7 * g feature px: g = G, G + 1, 2G, 2G + 1 for G = 4
    # on one axis or both, and g = 3, 6, 7, whose quotients 21 / 7, 42 / 7, 49 / 7 a
    # reciprocal multiplication would round up to the next integer (ceil -> g + 1).
    for gx, gy in [(4, 9), (5, 8), (8, 5), (9, 4), (4, 4), (5, 5), (3, 6), (7, 3), (6, 7)]:
        rois.append([10 + gx, 20 + gy, 10 + gx + 28 * gx, 20 + gy + 28 * gy])
    rois.append([30, 40, 30 + 112.4, 40 + 112])  # just over 4 samples along x
    return np.asarray(rois, np.float32)


@pytest.mark.parametrize("aligned,g_cap", [(True, 4), (False, 4), (True, 1), (True, 3)])
def test_adaptive_long_rois_match_torchvision(rng, aligned, g_cap):
    feat = rng.normal(size=(1, LONG_IMG // 4, LONG_IMG // 4, 2)).astype(np.float32)
    rois = np.concatenate([long_rois(), random_rois(rng, 12, LONG_IMG, LONG_IMG, max_frac=0.1)])
    rois = rng.permutation(rois)[None]  # normal and long ROIs mixed
    out, overflow = run_roi_align([feat], rois, output_size=7, scales=[STRIDE4], sr=0,
                                  aligned=aligned, max_samples=g_cap)
    ref = tv_roi_align(feat, rois, 7, STRIDE4, 0, aligned)
    assert_matches(out, ref)
    assert overflow == multi_item_rois(rois[0], STRIDE4, 7, g_cap, aligned) >= 12
    gy, gx = adaptive_grid_np(rois[0], STRIDE4, (7, 7), aligned)
    assert min(gx.max(), gy.max()) >= 48
    assert np.abs(ref).max() > 0.5  # not a trivially zero comparison


def test_adaptive_exact_multiple_sizes_get_exact_grid():
    """ceil(size / 7) for sizes 21, 42, 49 feature px is 3, 6, 7: on f(y, x) = x a
    one-axis-constant ROI averages its sample x positions, which shift if g is off by one."""
    w = 64
    feat = np.broadcast_to(np.arange(w, dtype=np.float32)[None, None, :, None], (1, 4, w, 1))
    feat = np.ascontiguousarray(feat)
    rois = np.array([[1, 1, 1 + s, 2] for s in (21, 42, 49, 28, 35)], np.float32)[None]
    for aligned in (False, True):
        out, _ = run_roi_align([feat], rois, output_size=(1, 7), scales=[1.0], sr=0,
                               aligned=aligned)
        ref = tv_roi_align(feat, rois, (1, 7), 1.0, 0, aligned)
        assert_matches(out, ref)


def test_sample_coordinates_rounded_like_the_reference(rng):
    """Sample coordinates are bit-identical to the reference kernel's. It rounds
    start + p * bin twice (product, then sum); a fused multiply-add (which LLVM forms on CPU
    unless prevented) moves some samples by an ulp, 3e-5 px at x ~ 300, i.e. up to 6e-5 on
    +-1 checkerboard features, 1e-5 here. With identical coordinates only the summation
    order differs: a few float32 ulps of values <= 1, far below the 2e-6 bound."""
    h, w = 200, 304  # P2 of an 800 x 1216 image
    feat = ((-1.0) ** (np.arange(h)[:, None] + np.arange(w)[None, :])).astype(np.float32)
    feat = feat[None, :, :, None]
    n = 300
    s = np.exp(rng.uniform(np.log(16), np.log(100), n))
    ar = np.exp(rng.uniform(-1, 1, n))
    cx, cy = rng.uniform(608, 1216, n), rng.uniform(400, 800, n)  # coordinates 100 .. 304 px
    rois = np.stack([cx - s * ar / 2, cy - s / ar / 2, cx + s * ar / 2, cy + s / ar / 2], 1)
    rois = rois.astype(np.float32)[None]
    out, _ = run_roi_align([feat], rois, output_size=7, scales=[STRIDE4], sr=0, aligned=True)
    ref = tv_roi_align(feat, rois, 7, STRIDE4, 0, True)
    assert np.abs(out - ref).max() <= 2e-6


@pytest.mark.parametrize("rule,aligned", [("detectron2", True), ("mmdet", False)])
def test_adaptive_multilevel_with_elongated_rois(rng, rule, aligned):
    """Level-assigned pyramid pooling with ~1/3 elongated ROIs (aspect 20:1 to 150:1, up to
    1333 px long) against torchvision per level on the ROIs assigned to it."""
    img = (448, LONG_IMG)
    feats = [rng.normal(size=(2, img[0] // s, img[1] // s, 3)).astype(np.float32)
             for s in (4, 8, 16, 32)]
    rois = []
    for _ in range(2):
        normal = level_spanning_rois(rng, 16) * np.float32(img[1] / IMG_HW[1])
        n = 8
        long_side = np.exp(rng.uniform(np.log(200), np.log(1333), n))
        short = long_side / np.exp(rng.uniform(np.log(20), np.log(150), n))
        vertical = rng.random(n) < 0.3
        w, h = np.where(vertical, short, long_side), np.where(vertical, long_side, short)
        cx, cy = rng.uniform(0, img[1], n), rng.uniform(0, img[0], n)
        long_ = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        rois.append(rng.permutation(np.concatenate([normal, long_])).astype(np.float32))
    rois = np.stack(rois)
    levels = assign_levels_np(rois.reshape(-1, 4), rule)[0].reshape(rois.shape[:2])
    assert len(set(levels.ravel().tolist())) >= 3
    out, overflow = run_roi_align(feats, rois, output_size=7, scales=SCALES, sr=0,
                                  aligned=aligned, level_rule=rule)
    want = 0
    for lvl, (f, s) in enumerate(zip(feats, SCALES, strict=True)):
        sel = levels == lvl
        if not sel.any():
            continue
        ref = tv_roi_align(f, rois, 7, s, 0, aligned)  # every ROI on this level; keep assigned
        assert_matches(out[sel], ref[sel])
        want += multi_item_rois(rois[sel], s, 7, 4, aligned)
    assert overflow == want > 0


def test_adaptive_one_trace_for_any_data(rng):
    """Under jit the program is traced once: the number of extra work items is data, not a
    shape. Results stay exact whether no ROI or many ROIs need extra items."""
    traces = []

    @jax.jit
    def pool(feat, rois):
        traces.append(1)
        return roi_align(feat, rois, output_size=7, spatial_scales=[STRIDE4], sampling_ratio=0,
                         aligned=True)

    feat = rng.normal(size=(1, LONG_IMG // 4, LONG_IMG // 4, 2)).astype(np.float32)
    small = random_rois(rng, 8, 100, 100, max_frac=0.5)[None]  # <= 50 px: g <= 2
    long_ = long_rois()[:8][None]
    for rois in (small, long_):
        out, overflow = pool(jnp.asarray(feat), jnp.asarray(rois))
        assert int(overflow) == multi_item_rois(rois[0], STRIDE4, 7, 4, True)
        assert (int(overflow) > 0) == (rois is long_)
        assert_matches(np.asarray(out), tv_roi_align(feat, rois, 7, STRIDE4, 0, True))
    assert len(traces) == 1
    assert pool._cache_size() == 1


@pytest.mark.parametrize("sr", [2, 0])
def test_chunk_does_not_change_result_with_long_rois(rng, sr):
    feat = rng.normal(size=(1, LONG_IMG // 4, LONG_IMG // 4, 2)).astype(np.float32)
    rois = np.concatenate([long_rois(), random_rois(rng, 9, LONG_IMG, LONG_IMG, 0.2)])[None]
    kw = dict(output_size=7, scales=[STRIDE4], sr=sr, aligned=True)
    out16, _ = run_roi_align([feat], rois, chunk=16, **kw)
    out3, _ = run_roi_align([feat], rois, chunk=3, **kw)
    if sr:  # one work item per ROI: the same sums
        np.testing.assert_array_equal(out3, out16)
    else:  # an ROI's items may be summed in another grouping
        assert_matches(out3, out16)


@st.composite
def adaptive_problems(draw):
    """Up to 6 ROIs on a 10 x 30 map (scale 1/2): long, thin, partly or fully outside,
    empty or inverted; coordinates on a 1/4 px grid so that sizes hit exact multiples."""
    n = 6
    xy = draw(hnp.arrays(np.int32, (n, 2), elements=st.integers(-80, 120))) / 4
    wh = draw(hnp.arrays(np.int32, (n, 2), elements=st.integers(-8, 600))) / 4
    rois = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    return rois


_PROPERTY_FEAT = np.random.default_rng(7).normal(size=(1, 10, 30, 2)).astype(np.float32)


@pytest.mark.parametrize("aligned", [True, False])
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(rois=adaptive_problems())
def test_adaptive_property_matches_torchvision(aligned, rois):
    out, overflow = run_roi_align([_PROPERTY_FEAT], rois[None], output_size=(2, 3), scales=[0.5],
                                  sr=0, aligned=aligned, max_samples=2, chunk=4)
    ref = tv_roi_align(_PROPERTY_FEAT, rois[None], (2, 3), 0.5, 0, aligned)
    assert_matches(out, ref)
    assert overflow == multi_item_rois(rois, 0.5, (2, 3), 2, aligned)


# ---------------------------------------------------------------------------------------------
# Hand-computed values (detectron2 tests/layers/test_roi_align.py style)
# ---------------------------------------------------------------------------------------------
GRID = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)  # f(y, x) = 5 y + x


def _hand(rois, output_size, sr, aligned):
    out, _ = run_roi_align([GRID], np.asarray(rois, np.float32)[None], output_size=output_size,
                           scales=[1.0], sr=sr, aligned=aligned, max_samples=4)
    return out[0, ..., 0]


def test_hand_computed_5x5_grid():
    """On the 5 x 5 grid f = 5y + x, bilinear sampling is exact: a sample at (y, x) in the
    interior is 5y + x. ROI (1, 1, 3, 3), 4 x 4 bins, adaptive: 2 px / 4 bins = 0.5 px bins,
    g = ceil(0.5) = 1 sample at each bin centre.
      aligned=False: y = 1 + 0.5 p + 0.25 = 1.25, 1.75, 2.25, 2.75 (x likewise), so bin
                     (0, 0) is 5 * 1.25 + 1.25 = 7.5; each step right +0.5, down +2.5.
      aligned=True:  the ROI shifts by -0.5 px: y = 0.75, 1.25, ... -> (0.75, 0.75) -> 4.5.
    """
    old = np.array([[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14],
                    [15, 15.5, 16, 16.5]])
    new = np.array([[4.5, 5, 5.5, 6], [7, 7.5, 8, 8.5], [9.5, 10, 10.5, 11], [12, 12.5, 13, 13.5]])
    np.testing.assert_allclose(_hand([[1, 1, 3, 3]], 4, 0, False)[0], old, atol=1e-6)
    np.testing.assert_allclose(_hand([[1, 1, 3, 3]], 4, 0, True)[0], new, atol=1e-6)


def test_hand_computed_borders():
    """Border rules on the same grid (aligned=False, 1 x 1 output, 2 x 2 samples):
      ROI (3, 3, 5, 5): samples at 3.5 and 4.5; 4.5 >= H - 1 = 4 clamps to row/col 4, so
          out = mean over (y, x) in {3.5, 4}^2 of 5y + x = 6 * 3.75 = 22.5.
      ROI (4, 4, 6, 6): samples 4.5 (clamped to 4) and 5.5 (> H = 5: zero). Only the
          (4.5, 4.5) sample counts: f(4, 4) = 24, divided by the 4 samples -> 6.
      ROI (5.5, 5.5, 7.5, 7.5): every sample > 5: 0.
      ROI (-2, -2, 0, 0): samples -1.5 (< -1: zero) and -0.5 (clamped to 0); only (-.5, -.5)
          counts: f(0, 0) = 0 -> 0. ROI (-2, 1, 0, 3) (x from -2 to 0, y from 1 to 3) keeps
          x = -0.5 -> column 0 and y = 1.5, 2.5: (7.5 + 12.5) / 4 = 5.
      aligned=False legacy minimum: ROI (2, 2, 2, 2) is treated as 1 x 1 px: samples at
          2.25, 2.75 -> mean 5 * 2.5 + 2.5 = 15; aligned=True gives 0 samples -> 0.
    """
    rois = [[3, 3, 5, 5], [4, 4, 6, 6], [5.5, 5.5, 7.5, 7.5], [-2, -2, 0, 0], [-2, 1, 0, 3],
            [2, 2, 2, 2]]
    out = _hand(rois, 1, 2, False)[:, 0, 0]
    np.testing.assert_allclose(out, [22.5, 6, 0, 0, 5, 15], atol=1e-6)
    # aligned: ROI (2, 2, 2, 2) is empty (size 0); g = 2 still but bin size 0: all samples at
    # (1.5, 1.5) -> f = 9; with sr=0 it would be ceil(0) = 0 samples -> 0.
    np.testing.assert_allclose(_hand([[2, 2, 2, 2]], 1, 2, True)[0, 0, 0], 9.0, atol=1e-6)
    np.testing.assert_allclose(_hand([[2, 2, 2, 2]], 1, 0, True)[0, 0, 0], 0.0, atol=0)


# ---------------------------------------------------------------------------------------------
# valid_hw: images padded into a larger canvas behave like the unpadded features
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sr,aligned", [(2, False), (0, True)])
def test_valid_hw_equals_unpadded(rng, sr, aligned):
    sizes = [(24, 32), (20, 28)]  # two images' P2 sizes (P3 is half)
    canvas = (28, 36)
    c = 3
    unpadded, levels_all, rois_all = [], [], []
    p2 = np.zeros((2, canvas[0], canvas[1], c), np.float32)
    p3 = np.zeros((2, canvas[0] // 2, canvas[1] // 2, c), np.float32)
    for i, (h, w) in enumerate(sizes):
        f2 = rng.normal(size=(1, h, w, c)).astype(np.float32)
        f3 = rng.normal(size=(1, h // 2, w // 2, c)).astype(np.float32)
        p2[i, :h, :w] = f2[0]
        p3[i, : h // 2, : w // 2] = f3[0]
        unpadded.append([f2, f3])
        img_h, img_w = h * 4, w * 4
        rois = np.concatenate([special_rois(img_h, img_w), random_rois(rng, 10, img_h, img_w)])
        rois_all.append(rois)
        levels_all.append(rng.integers(0, 2, len(rois)).astype(np.int32))
    rois = np.stack(rois_all)
    levels = np.stack(levels_all)
    valid_hw = np.array([[[h, w], [h // 2, w // 2]] for h, w in sizes], np.int32)
    kw = dict(output_size=5, scales=(0.25, 0.125), sr=sr, aligned=aligned, max_samples=8)
    out, overflow = run_roi_align([p2, p3], rois, levels=jnp.asarray(levels),
                                  valid_hw=jnp.asarray(valid_hw), **kw)
    assert overflow == 0
    for i in range(2):
        ref, _ = run_roi_align(unpadded[i], rois[i : i + 1],
                               levels=jnp.asarray(levels[i : i + 1]), **kw)
        np.testing.assert_allclose(out[i], ref[0], rtol=0, atol=1e-6)
    # Without valid_hw the padded canvas gives different values at the borders.
    out_nv, _ = run_roi_align([p2, p3], rois, levels=jnp.asarray(levels), **kw)
    assert np.abs(out_nv - out).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# FPN level assignment
# ---------------------------------------------------------------------------------------------
def _boundary_boxes():
    """Squares whose sqrt(area) is exactly on a level boundary (and just below / above), for
    each rule: s = 56, 112, 224, 448, 896 (torchvision, detectron2, mmdet: s/56 = 1, 2, 4, 8,
    16) and side + 1 = those values for the legacy (w + 1)(h + 1) rule."""
    sides = []
    for s in (28, 56, 112, 224, 448, 896, 1792):
        sides += [s, s - 1, s + 1, s - 0.01, s + 0.01, s - 1 - 0.01, s - 1 + 0.01]
    sides = np.asarray(sides, np.float32)
    boxes = np.stack([np.full_like(sides, 10), np.full_like(sides, 20), 10 + sides, 20 + sides], 1)
    rect = np.array([[0, 0, 112, 448], [0, 0, 448, 112], [0, 0, 56, 224], [0, 0, 0, 0],
                     [5, 5, 5, 40]], np.float32)  # sqrt(area) = 224, 224, 112; zero areas
    return np.concatenate([boxes, rect]).astype(np.float32)


@pytest.mark.parametrize("rule", ["torchvision", "detectron2", "legacy", "mmdet"])
def test_assign_levels_vs_formula(rng, rule):
    boxes = np.concatenate([_boundary_boxes(), level_spanning_rois(rng, 200)])
    got = np.asarray(jax.jit(lambda b: assign_levels(b, rule=rule))(jnp.asarray(boxes)))
    ref, _ = assign_levels_np(boxes, rule)
    np.testing.assert_array_equal(got, ref)
    assert set(got.tolist()) == {0, 1, 2, 3}


def test_assign_levels_boundary_values():
    """Documented values: exactly at a boundary the box goes to the coarser level
    (floor(4 + log2(224/224)) = 4); torchvision's eps 1e-6 is added after log2."""
    b = np.array([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111.9, 112], [0, 0, 448, 448],
                  [0, 0, 1e4, 1e4], [0, 0, 1, 1]], np.float32)
    def levels(boxes, rule):
        return np.asarray(assign_levels(jnp.asarray(boxes), rule=rule))

    for rule in ("torchvision", "detectron2"):
        np.testing.assert_array_equal(levels(b, rule), [2, 1, 0, 3, 3, 0])
    # legacy: (223 + 1)^2 -> level 4; mmdet: s / 56 = 2 -> floor(1) + 2 -> index 1
    np.testing.assert_array_equal(levels(b[:1] - [0, 0, 1, 1], "legacy"), [2])
    np.testing.assert_array_equal(levels(b[1:2], "mmdet"), [1])


def test_assign_levels_torchvision_level_mapper(rng):
    boxes = np.concatenate([_boundary_boxes(), level_spanning_rois(rng, 200)])
    mapper = LevelMapper(2, 5)
    ref = mapper([torch.from_numpy(boxes)]).numpy()
    got = np.asarray(assign_levels(jnp.asarray(boxes), rule="torchvision"))
    np.testing.assert_array_equal(got, ref)


def test_assign_levels_degenerate_boxes_go_to_finest():
    # Negative area -> sqrt is NaN; documented to map to the finest level.
    b = np.array([[10, 10, 5, 50], [0, 0, 0, 0], [3, 3, 3, 3]], np.float32)
    for rule in ("torchvision", "detectron2", "legacy", "mmdet"):
        got = np.asarray(assign_levels(jnp.asarray(b), rule=rule))
        np.testing.assert_array_equal(got, [0, 0, 0])
