"""Mask paste-back against torchvision's paste_masks_in_image and a detectron2-style
grid_sample reference (detectron2 layers/mask_ops.py::_do_paste_mask, skip_empty=False).

Tolerances: soft (probability) outputs agree to max abs error 1e-5 (both are the same
bilinear resampling; only the summation order differs, ~1e-6 in practice). Thresholded
masks must agree on every pixel except where the reference value is within 1e-5 of the
threshold, where float rounding may legitimately flip it.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image

from jaxmrcnn.ops import paste_masks

SOFT_ATOL = 1e-5
EDGE = 1e-5  # pixels whose reference value is this close to the threshold may flip
M = 28


@functools.cache
def _jitted(out_hw, method, threshold, strict=False, chunk=10):
    def f(masks, boxes, image_hw):
        return paste_masks(masks, boxes, out_hw, method=method, image_hw=image_hw,
                           threshold=threshold, strict=strict, chunk=chunk)

    return jax.jit(f)


def run_paste(masks, boxes, out_hw, method, threshold, image_hw=None, **kw):
    image_hw = np.asarray(out_hw if image_hw is None else image_hw, np.int32)
    return np.asarray(_jitted(tuple(out_hw), method, threshold, **kw)(masks, boxes, image_hw))


def d2_paste_reference(masks, boxes, img_h, img_w):
    """detectron2 _do_paste_mask with skip_empty=False, on CPU -> [N, H, W] float32."""
    masks = torch.from_numpy(masks)[:, None]
    boxes = torch.from_numpy(boxes)
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)  # each is Nx1
    n = masks.shape[0]
    img_y = torch.arange(0, img_h, dtype=torch.float32) + 0.5
    img_x = torch.arange(0, img_w, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    return F.grid_sample(masks, grid, align_corners=False)[:, 0].numpy()


def tv_paste_reference(masks, boxes, img_h, img_w):
    out = paste_masks_in_image(
        torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (img_h, img_w)
    )
    return out[:, 0].numpy()


def make_problem(rng, n, img_h, img_w):
    """Smooth-ish random mask probabilities and boxes clipped to the image (as the model
    clips detections; torchvision's paste crashes on boxes fully outside the image)."""
    logits = rng.normal(0, 3, (n, 7, 7)).astype(np.float32)
    masks = torch.sigmoid(F.interpolate(torch.from_numpy(logits)[:, None], size=(M, M),
                                        mode="bilinear", align_corners=False))[:, 0].numpy()
    cx = rng.uniform(0, img_w, n)
    cy = rng.uniform(0, img_h, n)
    bw = np.exp(rng.uniform(np.log(2), np.log(img_w * 1.2), n))
    bh = np.exp(rng.uniform(np.log(2), np.log(img_h * 1.2), n))
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    special = np.array(
        [
            [0, 0, img_w, img_h],  # the whole image
            [3.3, 4.7, 3.9, 5.2],  # smaller than a pixel
            [10, 10, 10.5, 40],  # thin
            [img_w - 1, img_h - 1, img_w + 20, img_h + 20],  # corner, clipped below
            [-20, -20, 6, 6],  # other corner
        ]
    )
    boxes = np.concatenate([special, boxes])[:n]
    boxes = np.clip(boxes, 0, [img_w, img_h, img_w, img_h]).astype(np.float32)
    return masks, boxes


def assert_masks_match(got, ref_soft, thr, strict=False):
    ref = ref_soft > thr if strict else ref_soft >= thr
    diff = got != ref
    edge = np.abs(ref_soft - thr) <= EDGE
    assert not (diff & ~edge).any(), f"{int((diff & ~edge).sum())} pixels differ"
    assert ref.any() and (~ref).any()  # a non-trivial comparison


@pytest.mark.parametrize("method", ["torchvision", "detectron2"])
def test_paste_soft_and_thresholded(rng, method):
    img_h, img_w = 48, 64
    masks, boxes = make_problem(rng, 24, img_h, img_w)
    ref_fn = tv_paste_reference if method == "torchvision" else d2_paste_reference
    ref = ref_fn(masks, boxes, img_h, img_w)
    soft = run_paste(masks, boxes, (img_h, img_w), method, None)
    np.testing.assert_allclose(soft, ref, rtol=0, atol=SOFT_ATOL)
    hard = run_paste(masks, boxes, (img_h, img_w), method, 0.5)
    assert hard.dtype == bool
    assert_masks_match(hard, ref, 0.5)


def test_paste_strict_threshold(rng):
    """strict=True is `p > thr` (maskrcnn-benchmark / Detectron); masks with values exactly 0.5."""
    img_h, img_w = 48, 64
    masks, boxes = make_problem(rng, 10, img_h, img_w)
    masks[:, 10:18, 10:18] = 0.5  # a plateau of exactly 0.5 pastes to exactly 0.5 inside
    ref = tv_paste_reference(masks, boxes, img_h, img_w)
    assert (ref == 0.5).any()
    hard = run_paste(masks, boxes, (img_h, img_w), "torchvision", 0.5, strict=True)
    assert_masks_match(hard, ref, 0.5, strict=True)
    # and the plateau pixels themselves are False (ties are not above the threshold)
    assert not hard[ref == 0.5].any()


@pytest.mark.parametrize("method", ["torchvision", "detectron2"])
def test_canvas_larger_than_image(rng, method):
    """image_hw (traced) smaller than the static out_hw: the image part equals the reference
    for image_hw, and everything outside the image is False / 0."""
    out_hw = (56, 72)
    img_h, img_w = 41, 57
    masks, boxes = make_problem(rng, 12, img_h, img_w)
    boxes[3] = [img_w - 1, img_h - 1, img_w, img_h]  # touches the image corner
    ref_fn = tv_paste_reference if method == "torchvision" else d2_paste_reference
    ref = ref_fn(masks, boxes, img_h, img_w)
    soft = run_paste(masks, boxes, out_hw, method, None, image_hw=(img_h, img_w))
    hard = run_paste(masks, boxes, out_hw, method, 0.5, image_hw=(img_h, img_w))
    np.testing.assert_allclose(soft[:, :img_h, :img_w], ref, rtol=0, atol=SOFT_ATOL)
    assert_masks_match(hard[:, :img_h, :img_w], ref, 0.5)
    assert not hard[:, img_h:].any() and not hard[:, :, img_w:].any()
    assert (soft[:, img_h:] == 0).all() and (soft[:, :, img_w:] == 0).all()
    # The same compiled function with another image size (image_hw is traced, no recompile).
    img2 = (50, 70)
    ref2 = ref_fn(masks, boxes, *img2)
    hard2 = run_paste(masks, boxes, out_hw, method, 0.5, image_hw=img2)
    assert_masks_match(hard2[:, : img2[0], : img2[1]], ref2, 0.5)
    assert not hard2[:, img2[0] :].any() and not hard2[:, :, img2[1] :].any()


def test_chunk_and_count_not_multiple(rng):
    """N = 13 masks with chunk 5 (padding inside the op) equals chunk 1."""
    masks, boxes = make_problem(rng, 13, 40, 40)
    a = run_paste(masks, boxes, (40, 40), "detectron2", None, chunk=5)
    b = run_paste(masks, boxes, (40, 40), "detectron2", None, chunk=1)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a, d2_paste_reference(masks, boxes, 40, 40), rtol=0, atol=SOFT_ATOL)


def test_paste_full_size_smoke(rng):
    """A realistic 800 x 1216 canvas with 20 detections (thresholded inside the op)."""
    img_h, img_w = 800, 1216
    masks, boxes = make_problem(rng, 20, img_h, img_w)
    hard = run_paste(masks, boxes, (img_h, img_w), "torchvision", 0.5)
    ref = tv_paste_reference(masks, boxes, img_h, img_w)
    assert_masks_match(hard, ref, 0.5)
