"""Box coders and box utilities against torchvision and numpy ports of maskrcnn-benchmark's
and mmdet's coders.

Tolerances. The JAX code follows the reference operation order, but XLA:CPU may contract
a * b + c into one FMA, and its exp / log differ from torch's and numpy's by an ulp or two.
Decoding computes `ctr = d * w + anchor_ctr` and `x1 = ctr - half_width`: sums whose terms
can be far larger than the result (a 1500 px wide box whose x1 is 49 px), so decoded boxes are
compared with an error bound proportional to the size of those terms, per axis:
    |err| <= 1e-6 * (|x1| + |x2| + |anchor x1| + |anchor x2|) + 1e-5
(every intermediate is bounded by that sum; 1e-6 is ~8 float32 ulps). Encoded deltas:
rtol 1e-6, atol 1e-5.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from jaxmrcnn.ops import BBOX_XFORM_CLIP, BoxCoder, box_area, box_iou, clip_boxes, small_box_mask

from ._refs import mb_decode, mb_encode, mmdet_bbox2delta, mmdet_delta2bbox, random_boxes

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]
RTOL, ATOL = 1e-6, 1e-5


def assert_boxes_close(got, ref, anchors):
    """Decoded boxes [..., 4] from `anchors` (broadcastable): the bound above, per axis."""
    mag = (
        np.abs(ref[..., :2]) + np.abs(ref[..., 2:])
        + np.abs(anchors[..., :2]) + np.abs(anchors[..., 2:])
    )
    tol = 1e-6 * np.concatenate([mag, mag], axis=-1) + 1e-5
    err = np.abs(got.astype(np.float64) - ref)
    assert (err <= tol).all(), f"max err / tol = {(err / tol).max():.2f}"


def deltas_with_extremes(rng, n, c=1):
    """Normal deltas, plus rows with dw, dh far beyond the clamp (both signs)."""
    d = rng.normal(0, 1.0, (n, c, 4)).astype(np.float32)
    d[:8, :, 2:] = np.array([[30, 30], [-30, -30], [8, -8], [100, 0.5], [4.2, 4.2], [-9, 12],
                             [50, 50], [-50, -50]], np.float32)[:, None, :]
    return d


def _decode(coder):
    return jax.jit(lambda d, b: coder.decode(d, b))


def _encode(coder):
    return jax.jit(lambda t, b: coder.encode(t, b))


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_matches_torchvision(rng, weights):
    n, c = 64, 3  # per-class deltas [N, C, 4] against boxes [N, 1, 4] (box head layout)
    boxes = random_boxes(rng, n, hi=600.0, max_wh=300.0)
    deltas = deltas_with_extremes(rng, n, c) * np.float32(weights[0] if weights[0] > 1 else 1)
    ref = TVBoxCoder(weights).decode_single(torch.from_numpy(deltas.reshape(n, c * 4)),
                                            torch.from_numpy(boxes)).numpy().reshape(n, c, 4)
    got = np.asarray(_decode(BoxCoder(weights))(deltas, boxes[:, None, :]))
    assert_boxes_close(got, ref, boxes[:, None, :])
    # The clamp is from above only: dw = 30 / ww is clamped to log(1000/16), so the box is at
    # most 62.5x wider than its reference; dw = -30 is not clamped (the box collapses).
    w_ref = boxes[:8, 2] - boxes[:8, 0]
    w_got = got[:8, 0, 2] - got[:8, 0, 0]
    big = deltas[:8, 0, 2] / weights[2] > BBOX_XFORM_CLIP
    np.testing.assert_allclose(w_got[big], w_ref[big] * 1000 / 16, rtol=1e-5)
    assert big.sum() >= 3 and np.isfinite(got).all()


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_torchvision(rng, weights):
    anchors = random_boxes(rng, 64, hi=600.0, max_wh=300.0)
    gt = random_boxes(rng, 64, hi=600.0, max_wh=300.0)
    ref = TVBoxCoder(weights).encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
    got = np.asarray(_encode(BoxCoder(weights))(gt, anchors))
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("style", ["torchvision", "legacy", "mmdet"])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_decode_round_trip(rng, style, weights):
    # Sizes in [10, 300]: target / anchor size ratios stay below 1000 / 16 = 62.5, so the
    # dw, dh clamp does not apply and decode inverts encode.
    anchors = random_boxes(rng, 64, hi=600.0, min_wh=10.0, max_wh=300.0)
    targets = random_boxes(rng, 64, hi=600.0, min_wh=10.0, max_wh=300.0)
    coder = BoxCoder(weights, style=style)
    back = np.asarray(_decode(coder)(_encode(coder)(targets, anchors), anchors))
    # Coordinates up to ~900 px: float32 ulp 6e-5, and encode/decode round several times.
    np.testing.assert_allclose(back, targets, rtol=0, atol=1e-3)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_legacy_coder_vs_maskrcnn_benchmark(rng, weights):
    boxes = np.round(random_boxes(rng, 64, hi=600.0, max_wh=300.0))
    deltas = deltas_with_extremes(rng, 64, 2)
    coder = BoxCoder(weights, style="legacy")
    got = np.asarray(_decode(coder)(deltas, boxes[:, None, :]))
    ref = mb_decode(deltas.reshape(64, 8), boxes, weights).reshape(64, 2, 4)
    assert_boxes_close(got, ref, boxes[:, None, :])
    gt = np.round(random_boxes(rng, 64, hi=600.0, max_wh=300.0))
    np.testing.assert_allclose(np.asarray(_encode(coder)(gt, boxes)), mb_encode(gt, boxes, weights),
                               rtol=RTOL, atol=ATOL)
    # The +1 convention: a zero delta maps a box onto itself, (x2 = ctr + w/2 - 1).
    same = np.asarray(_decode(coder)(np.zeros((64, 4), np.float32), boxes))
    np.testing.assert_allclose(same, boxes, atol=1e-4)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_mmdet_coder_vs_delta2bbox(rng, weights):
    stds = [1.0 / w for w in weights]
    boxes = random_boxes(rng, 64, hi=600.0, max_wh=300.0)
    deltas = deltas_with_extremes(rng, 64)[:, 0] * np.float32(weights[0])
    coder = BoxCoder(weights, style="mmdet")
    got = np.asarray(_decode(coder)(deltas, boxes))
    assert_boxes_close(got, mmdet_delta2bbox(boxes, deltas, stds), boxes)
    # mmdet clamps dw, dh on both sides: dw = -50 shrinks the box by exactly 1000/16. (The
    # width is a difference of two ~600 px float32 coordinates: atol 1e-4 px, not rtol.)
    w = got[7, 2] - got[7, 0]
    np.testing.assert_allclose(w, (boxes[7, 2] - boxes[7, 0]) * 16 / 1000, rtol=0, atol=1e-4)
    gt = random_boxes(rng, 64, hi=600.0, max_wh=300.0)
    # bbox2delta divides by float32 stds, we multiply by weights: equal up to rounding.
    np.testing.assert_allclose(
        np.asarray(_encode(coder)(gt, boxes)), mmdet_bbox2delta(boxes, gt, stds),
        rtol=1e-5, atol=1e-5,
    )


def test_box_iou_matches_torchvision(rng):
    a = random_boxes(rng, 40, hi=100.0)
    b = random_boxes(rng, 30, hi=100.0)
    b[:3] = [[5, 5, 5, 5], [10, 10, 20, 10], [50, 50, 40, 40]]  # zero-area and inverted
    a[:2] = [[5, 5, 5, 5], [0, 0, 0, 0]]
    ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = np.asarray(jax.jit(box_iou)(a, b))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert np.isnan(got[0, 0])  # 0 / 0 for two zero-area boxes, as torchvision
    # Batched leading dims [2, N, 4] x [2, M, 4].
    got_b = np.asarray(box_iou(jnp.stack([a, a]), jnp.stack([b, b])))
    np.testing.assert_allclose(got_b[1], ref, rtol=1e-6, atol=1e-7, equal_nan=True)


def test_box_iou_legacy_and_area():
    a = np.array([[0, 0, 9, 9]], np.float32)
    b = np.array([[0, 0, 9, 4], [10, 10, 19, 19]], np.float32)
    np.testing.assert_allclose(np.asarray(box_iou(a, b, legacy=True)), [[0.5, 0.0]])
    np.testing.assert_allclose(np.asarray(box_iou(a, b)), [[36 / 81, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(box_area(b, legacy=True)), [50, 100])
    np.testing.assert_allclose(
        np.asarray(box_area(b)), torchvision.ops.box_area(torch.from_numpy(b)).numpy()
    )


def test_clip_boxes_matches_torchvision(rng):
    boxes = random_boxes(rng, 50, lo=-100.0, hi=700.0, max_wh=400.0)
    ref = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), (480, 640)).numpy()
    got = np.asarray(jax.jit(clip_boxes)(boxes, 480, 640))
    np.testing.assert_array_equal(got, ref)
    # Per-image sizes [B, 1] against [B, N, 4] boxes (traced sizes).
    sizes = np.array([[480, 640], [300, 200]])
    got_b = np.asarray(jax.jit(clip_boxes)(np.stack([boxes, boxes]), sizes[:, :1], sizes[:, 1:]))
    for i, (h, w) in enumerate(sizes):
        ref_i = torchvision.ops.clip_boxes_to_image(
            torch.from_numpy(boxes), (int(h), int(w))
        ).numpy()
        np.testing.assert_array_equal(got_b[i], ref_i)
    # Legacy: [0, W - 1] x [0, H - 1] (maskrcnn-benchmark clip_to_image).
    got_l = np.asarray(clip_boxes(boxes, 480, 640, legacy=True))
    np.testing.assert_array_equal(got_l, np.clip(boxes, 0, [639, 479, 639, 479]))


def test_small_box_mask_matches_remove_small_boxes(rng):
    boxes = random_boxes(rng, 200, min_wh=0.0, max_wh=0.05)
    boxes[:4] = [[0, 0, 1e-2, 1e-2], [0, 0, 1e-3, 5], [3, 3, 2, 5], [1, 1, 1, 1]]  # edges, inverted
    for min_size in (1e-3, 1e-2):
        keep = torchvision.ops.remove_small_boxes(torch.from_numpy(boxes), min_size).numpy()
        ref = np.zeros(200, bool)
        ref[keep] = True
        got = np.asarray(jax.jit(functools.partial(small_box_mask, min_size=min_size))(boxes))
        np.testing.assert_array_equal(got, ref)
        assert ref.any() and not ref.all()
    # strict (detectron2 / mmdet: w > 0 and h > 0) and legacy (+1) variants vs the formula.
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    np.testing.assert_array_equal(
        np.asarray(small_box_mask(boxes, 0.0, strict=True)), (ws > 0) & (hs > 0)
    )
    np.testing.assert_array_equal(
        np.asarray(small_box_mask(boxes, 0.0, legacy=True)), (ws + 1 >= 0) & (hs + 1 >= 0)
    )


def test_bbox_xform_clip_value():
    assert BBOX_XFORM_CLIP == pytest.approx(math.log(1000.0 / 16))
