"""Anchor grids: torchvision AnchorGenerator, the detectron2 formula and Detectron's
generate_anchors (legacy), all compared exactly (anchors are small integers or exact
float32 values; tolerances are noted where a float64 formula is cast to float32)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from jaxmrcnn.ops import cell_anchors, grid_anchors, torchvision_strides

from ._refs import detectron_generate_anchors, grid_anchors_np

SIZES = (32, 64, 128, 256, 512)
STRIDES = (4, 8, 16, 32, 64)
RATIOS = (0.5, 1.0, 2.0)


def fpn_feature_sizes(h, w):
    """P2..P5 = padded size / 4..32 (padded to 32); P6 = max_pool(k=1, s=2) of P5 = ceil(P5 / 2)."""
    p = [(h // s, w // s) for s in (4, 8, 16, 32)]
    p.append((-(-p[-1][0] // 2), -(-p[-1][1] // 2)))
    return p


_grid = jax.jit(grid_anchors, static_argnames=("grid_hw", "offset"))


@pytest.mark.parametrize("padded_hw", [(800, 1216), (800, 1088), (416, 640), (1344, 800)])
def test_torchvision_anchor_generator(padded_hw):
    h, w = padded_hw
    feats = fpn_feature_sizes(h, w)
    gen = AnchorGenerator(tuple((s,) for s in SIZES), (RATIOS,) * 5)
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    fmaps = [torch.zeros(1, 1, fh, fw) for fh, fw in feats]
    ref = gen(images, fmaps)[0].numpy()
    strides = np.asarray(torchvision_strides(np.array([h, w]), feats[-1]))
    if h % 64 or w % 64:
        assert (strides != 64).any()  # e.g. 800 // 13 = 61: the case this test is about
    got = []
    for size, fhw in zip(SIZES, feats, strict=True):
        cell = cell_anchors(size, RATIOS, flavour="torchvision")
        stride = torchvision_strides(jnp.array([h, w]), fhw)
        got.append(np.asarray(_grid(cell, grid_hw=fhw, stride=stride)))
    np.testing.assert_array_equal(np.concatenate(got), ref)


def test_torchvision_cell_anchors_values():
    # Documented rounding (CONVENTIONS.md): P2 (-23,-11,23,11), (-16,-16,16,16), (-11,-23,11,23).
    np.testing.assert_array_equal(
        cell_anchors(32, RATIOS, flavour="torchvision"),
        [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]],
    )


def test_torchvision_strides_batched():
    padded = np.array([[800, 1216], [800, 1088], [416, 640]])
    got = np.asarray(torchvision_strides(padded, (13, 19)))
    np.testing.assert_array_equal(got, padded // np.array([13, 19]))
    # Per-image strides [B, 2] give per-image anchors [B, HWA, 4].
    cell = cell_anchors(512, RATIOS, flavour="torchvision")
    out = np.asarray(_grid(cell, grid_hw=(13, 19), stride=jnp.asarray(got)))
    assert out.shape == (3, 13 * 19 * 3, 4)
    for i in range(3):
        ref = grid_anchors_np(np.asarray(cell, np.float64), (13, 19), got[i])
        np.testing.assert_array_equal(out[i], ref)


def test_detectron2_cell_anchors_formula():
    """w = sqrt(size^2 / r), h = r w, box (-w/2, -h/2, w/2, h/2), float64 then float32."""
    for size in SIZES:
        got = cell_anchors(size, RATIOS, flavour="detectron2")
        assert got.dtype == np.float32
        ref = []
        for r in RATIOS:
            w = math.sqrt(size * size / r)
            h = r * w
            ref.append([-w / 2, -h / 2, w / 2, h / 2])
        np.testing.assert_array_equal(got, np.asarray(ref).astype(np.float32))
    # Documented value for P2, ratio 0.5 (rounded to 3 decimals in CONVENTIONS.md).
    np.testing.assert_allclose(
        cell_anchors(32, RATIOS, flavour="detectron2")[0],
        [-22.627, -11.314, 22.627, 11.314],
        atol=5e-4,
    )


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_detectron2_grid_formula(offset):
    """anchors[(y W + x) A + a] = cell[a] + ((x + offset) s, (y + offset) s, ...)."""
    cell = cell_anchors(64, RATIOS, flavour="detectron2")
    got = np.asarray(_grid(cell, grid_hw=(7, 9), stride=8, offset=offset))
    ref = grid_anchors_np(cell.astype(np.float64), (7, 9), (8, 8), offset)
    # float32 sums of exact grid shifts and the float32 cell: within 1 ulp of the float64 value.
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-5)
    # Spot-check the flatten order (H, W, A): y = 2, x = 5, a = 1.
    np.testing.assert_allclose(
        got[(2 * 9 + 5) * 3 + 1], cell[1] + np.array([5, 2, 5, 2]) * 8 + offset * 8, atol=1e-5
    )


def test_legacy_known_values():
    """Detectron / maskrcnn-benchmark anchors listed in CONVENTIONS.md."""
    np.testing.assert_array_equal(
        cell_anchors(32, RATIOS, flavour="legacy", stride=4),
        [[-22, -10, 25, 13], [-14, -14, 17, 17], [-10, -22, 13, 25]],
    )
    np.testing.assert_array_equal(
        cell_anchors(64, RATIOS, flavour="legacy", stride=8),
        [[-40, -20, 47, 27], [-28, -28, 35, 35], [-20, -44, 27, 51]],
    )


@pytest.mark.parametrize("ratios", [RATIOS, (0.25, 0.5, 1.0, 2.0, 4.0)])
def test_legacy_vs_generate_anchors_port(ratios):
    for size, stride in zip(SIZES, STRIDES, strict=True):
        ref = detectron_generate_anchors(stride, (size,), ratios)
        got = cell_anchors(size, ratios, flavour="legacy", stride=stride)
        np.testing.assert_array_equal(got, ref.astype(np.float32))
    # Also sizes that are not 8 x the stride (a different scale enumeration).
    np.testing.assert_array_equal(
        cell_anchors(45, ratios, flavour="legacy", stride=16),
        detectron_generate_anchors(16, (45,), ratios).astype(np.float32),
    )


def test_legacy_grid():
    """maskrcnn-benchmark grid: shifts x * stride (no offset) added to the cell anchors."""
    cell = cell_anchors(32, RATIOS, flavour="legacy", stride=4)
    got = np.asarray(_grid(cell, grid_hw=(5, 6), stride=4))
    np.testing.assert_array_equal(got, grid_anchors_np(cell.astype(np.float64), (5, 6), (4, 4)))
