"""ROIAlign (single and multi-level) against torchvision.ops.roi_align / MultiScaleRoIAlign.

Tolerance: max abs error <= 1e-4 on N(0, 1) features. The op evaluates the same bilinear
samples as torchvision's CPU kernel but sums them in a different order (separable row/column
weights), so float32 rounding differs slightly (typically ~1e-6).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops.poolers import LevelMapper

from jaxmrcnn.ops import assign_levels, roi_align

from ._refs import assign_levels_np

ATOL = 1e-4


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
    rois = np.stack([np.concatenate([special_rois(24, 32), random_rois(rng, 14, 24, 32)]) for _ in range(b)])
    out_size = (3, 4)  # non-square on purpose
    # ROIs are at most ~40 px = 20 feature px, so adaptive mode needs <= ceil(20 / 3) = 7 samples.
    out, overflow = run_roi_align([feat], rois, output_size=out_size, scales=[scale], sr=sr,
                                  aligned=aligned, max_samples=8)
    ref = tv_roi_align(feat, rois, out_size, scale, sr, aligned)
    assert overflow == 0
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)
    assert np.abs(ref).max() > 0.1  # not a trivially zero comparison
    # Degenerate ROIs: aligned mode has no 1-px minimum; with adaptive sampling a zero-size or
    # inverted ROI gets ceil(size / bins) <= 0 samples, so it pools to exactly 0.
    if aligned and sr == 0:
        assert np.abs(out[:, 5:8]).max() == 0
    # Fully outside: every sample is out of range, exactly 0 in both.
    assert np.abs(out[:, 2:4]).max() == 0 and np.abs(ref[:, 2:4]).max() == 0


def test_chunk_does_not_change_result(rng):
    feat = rng.normal(size=(1, 12, 16, 3)).astype(np.float32)
    rois = random_rois(rng, 23, 24, 32)[None]
    kw = dict(output_size=(3, 4), scales=[0.5], sr=2, aligned=False)
    out10, _ = run_roi_align([feat], rois, **kw)
    out3, _ = run_roi_align([feat], rois, chunk=3, **kw)
    np.testing.assert_array_equal(out3, out10)


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
    # Elongated ROIs (aspect ratio up to 2) need up to 7 adaptive samples per bin here.
    out, overflow = run_roi_align(feats, rois, output_size=output_size, scales=SCALES, sr=sr,
                                  aligned=False, level_rule="torchvision", max_samples=8)
    assert overflow == 0
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)


def test_multilevel_aligned_adaptive_detectron2_style(rng):
    """ROIAlignV2 (aligned, sr=0) with the detectron2 level rule vs per-level torchvision."""
    feats = pyramid(rng)
    rois = np.stack([level_spanning_rois(rng, 30) for _ in range(2)])
    levels = assign_levels_np(rois.reshape(-1, 4), "detectron2")[0].reshape(2, 30)
    out, overflow = run_roi_align(feats, rois, output_size=7, scales=SCALES, sr=0, aligned=True,
                                  level_rule="detectron2", max_samples=8)
    assert overflow == 0
    for lvl, (f, s) in enumerate(zip(feats, SCALES)):
        ref = tv_roi_align(f, rois, 7, s, 0, True)  # every ROI on this level; keep the assigned
        sel = levels == lvl
        assert sel.any()
        np.testing.assert_allclose(out[sel], ref[sel], rtol=0, atol=ATOL)


def test_explicit_levels_override_rule(rng):
    feats = pyramid(rng, b=1)
    rois = level_spanning_rois(rng, 12)[None]
    levels = np.full((1, 12), 3, np.int32)  # everything from P5
    out, _ = run_roi_align(feats, rois, output_size=7, scales=SCALES, sr=2, aligned=False,
                           levels=jnp.asarray(levels))
    ref = tv_roi_align(feats[3], rois, 7, SCALES[3], 2, False)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Adaptive sampling of huge / elongated ROIs: the overflow counter
# ---------------------------------------------------------------------------------------------
def test_adaptive_overflow_and_exactness(rng):
    h, w, scale, pooled = 10, 200, 0.25, 7  # image 40 x 800 px
    feat = rng.normal(size=(1, h, w, 2)).astype(np.float32)
    rois = np.array(
        [
            [0, 2, 800, 11],  # 800 x 9 px: 200 feature px over 7 bins -> 29 samples per bin in x
            [10, 0, 700, 40],  # 690 x 40: x needs 25
            [3, 3, 120, 30],  # 117 px: 29.25 feature px -> 5 samples (> 4)
            [5, 5, 100, 30],  # 95 px: 23.75 -> 4 samples: fits G = 4
            [1, 1, 30, 30],  # small
            [300, 5, 330, 35],  # small
        ],
        np.float32,
    )[None]
    ref = tv_roi_align(feat, rois, pooled, scale, 0, True)
    # Expected count from the documented formula: g = ceil(size * scale / pooled) per axis.
    size = (rois[0, :, 2:] - rois[0, :, :2]) * scale
    g = np.ceil(size / pooled).max(axis=1)
    assert (g > 4).sum() == 3
    out4, overflow4 = run_roi_align([feat], rois, output_size=pooled, scales=[scale], sr=0,
                                    aligned=True, max_samples=4)
    assert overflow4 == int((g > 4).sum())
    ok = g <= 4
    np.testing.assert_allclose(out4[0, ok], ref[0, ok], rtol=0, atol=ATOL)  # the rest is exact
    assert np.abs(out4[0, ~ok] - ref[0, ~ok]).max() > 1e-3  # truncated sampling is visible
    out32, overflow32 = run_roi_align([feat], rois, output_size=pooled, scales=[scale], sr=0,
                                      aligned=True, max_samples=32)
    assert overflow32 == 0
    np.testing.assert_allclose(out32, ref, rtol=0, atol=ATOL)


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
    old = np.array([[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14], [15, 15.5, 16, 16.5]])
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
    rois = [[3, 3, 5, 5], [4, 4, 6, 6], [5.5, 5.5, 7.5, 7.5], [-2, -2, 0, 0], [-2, 1, 0, 3], [2, 2, 2, 2]]
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
    kw = dict(output_size=5, scales=(0.25, 0.125), sr=sr, aligned=aligned, max_samples=16)
    out, overflow = run_roi_align([p2, p3], rois, levels=jnp.asarray(levels),
                                  valid_hw=jnp.asarray(valid_hw), **kw)
    assert overflow == 0
    for i in range(2):
        ref, _ = run_roi_align(unpadded[i], rois[i : i + 1], levels=jnp.asarray(levels[i : i + 1]), **kw)
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
    for rule in ("torchvision", "detectron2"):
        np.testing.assert_array_equal(np.asarray(assign_levels(jnp.asarray(b), rule=rule)), [2, 1, 0, 3, 3, 0])
    # legacy: (223 + 1)^2 -> level 4; mmdet: s / 56 = 2 -> floor(1) + 2 -> index 1
    np.testing.assert_array_equal(np.asarray(assign_levels(jnp.asarray(b[:1] - [0, 0, 1, 1]), rule="legacy")), [2])
    np.testing.assert_array_equal(np.asarray(assign_levels(jnp.asarray(b[1:2]), rule="mmdet")), [1])


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
        np.testing.assert_array_equal(np.asarray(assign_levels(jnp.asarray(b), rule=rule)), [0, 0, 0])
