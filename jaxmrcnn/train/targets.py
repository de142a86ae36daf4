"""Training targets with static shapes: padded ground truth, matching, balanced sampling, box
and mask targets.

Semantics are torchvision's (torchvision/models/detection/_utils.py Matcher,
BalancedPositiveNegativeSampler, BoxCoder; rpn.py assign_targets_to_anchors; roi_heads.py
assign_targets_to_proposals, add_gt_proposals, project_masks_on_boxes). Every function is
pure, jit-able and shape-static: ground truth is padded to G slots per image with a `valid`
mask, predictions (anchors, proposals) carry a `valid` mask, and sampling returns a fixed
number of slots with a `valid` mask instead of a variable-length index list.

Ground truth batch (see `pad_ground_truth`):
    boxes   [B, G, 4] float32 xyxy in resized-image pixels
    classes [B, G]    int32 model class index (never the background index)
    masks   [B, G, H, W] uint8/bool/float on the canvas (already rasterised)
    valid   [B, G]    bool
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmrcnn import ops

BELOW_LOW_THRESHOLD = -1  # Matcher.BELOW_LOW_THRESHOLD: a negative
BETWEEN_THRESHOLDS = -2  # Matcher.BETWEEN_THRESHOLDS: ignored (also invalid predictions)


def pad_ground_truth(instances: Sequence[dict], max_gt: int, canvas_hw: tuple[int, int]) -> dict:
    """Host side: per-image dicts {"boxes" [n, 4], "classes" [n], "masks" [n, h, w]} ->
    padded numpy arrays (module docstring). Masks are placed at the canvas' top-left corner
    (where preprocessing puts the image). Raises if an image has more than `max_gt`."""
    b = len(instances)
    ch, cw = canvas_hw
    boxes = np.zeros((b, max_gt, 4), np.float32)
    classes = np.zeros((b, max_gt), np.int32)
    masks = np.zeros((b, max_gt, ch, cw), np.uint8)
    valid = np.zeros((b, max_gt), bool)
    for i, inst in enumerate(instances):
        n = len(inst["boxes"])
        if n > max_gt:
            raise ValueError(f"image {i} has {n} instances, more than max_gt={max_gt}")
        boxes[i, :n] = np.asarray(inst["boxes"], np.float32).reshape(n, 4)
        classes[i, :n] = np.asarray(inst["classes"]).reshape(n)
        if n and "masks" in inst:
            m = np.asarray(inst["masks"])
            masks[i, :n, : m.shape[1], : m.shape[2]] = m
        valid[i, :n] = True
    return dict(boxes=boxes, classes=classes, masks=masks, valid=valid)


def match(
    quality,
    *,
    high: float,
    low: float,
    allow_low_quality: bool,
    gt_valid=None,
    pred_valid=None,
):
    """torchvision's Matcher on a batch: quality `[B, G, N]` (IoU of gt g with prediction n)
    -> matches `[B, N]` int32: the matched gt index, BELOW_LOW_THRESHOLD (< low) or
    BETWEEN_THRESHOLDS (in [low, high)).

    Padded gt rows (`gt_valid [B, G]` False) never match and never create low-quality
    matches; invalid predictions (`pred_valid [B, N]` False) get BETWEEN_THRESHOLDS
    (ignored) and take no part in a gt's "highest quality" either. An image without valid gt
    gets BELOW_LOW_THRESHOLD everywhere, as torchvision's background-image branch.

    Low-quality matches (allow_low_quality): for each valid gt, every valid prediction whose
    quality equals that gt's maximum (ties included) is set back to its argmax-over-gt
    match, as Matcher.set_low_quality_matches_.
    """
    b, g, n = quality.shape
    if gt_valid is None:
        gt_valid = jnp.ones((b, g), bool)
    if pred_valid is None:
        pred_valid = jnp.ones((b, n), bool)
    pair_valid = gt_valid[:, :, None] & pred_valid[:, None, :]  # [B, G, N]
    q = jnp.where(pair_valid, quality, -1.0)
    if g == 0:
        return jnp.where(pred_valid, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS).astype(jnp.int32)
    vals = jnp.max(q, axis=1)  # [B, N]
    best_gt = jnp.argmax(q, axis=1).astype(jnp.int32)  # first maximum, as torch.max(dim=0)
    matches = jnp.where(
        vals < low, BELOW_LOW_THRESHOLD, jnp.where(vals < high, BETWEEN_THRESHOLDS, best_gt)
    )
    if allow_low_quality:
        highest = jnp.max(q, axis=2)  # [B, G] best prediction quality per gt
        tie = (q == highest[:, :, None]) & pair_valid  # [B, G, N]
        matches = jnp.where(jnp.any(tie, axis=1), best_gt, matches)
    return jnp.where(pred_valid, matches, BETWEEN_THRESHOLDS).astype(jnp.int32)


def sample_labels(matches):
    """Sampler labels from matches `[B, N]`: 1 positive (matched), 0 negative (below the low
    threshold), -1 ignored."""
    return jnp.where(matches >= 0, 1, jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1)).astype(
        jnp.int32
    )


def sample_balanced(key, labels, batch_size_per_image: int, positive_fraction: float):
    """BalancedPositiveNegativeSampler with static shapes.

    labels `[B, N]` int (1 positive, 0 negative, -1 ignore) -> (idx, is_pos, valid), each
    `[B, S]` with S = min(batch_size_per_image, min(pos cap, N) + min(batch_size_per_image, N)):
      num_pos = min(#positives, int(batch_size_per_image * positive_fraction))
      num_neg = min(#negatives, batch_size_per_image - num_pos)
    Slots [0, num_pos) hold positives, [num_pos, num_pos + num_neg) negatives, the rest are
    padding (valid False, idx 0). A uniformly random subset is drawn by giving every element
    a uniform priority and taking the top_k of the eligible ones (uniform priorities make
    every subset of a size equally likely, as torch.randperm does).
    """
    b, n = labels.shape
    pos_cap = int(batch_size_per_image * positive_fraction)
    kp = min(pos_cap, n)
    kn = min(batch_size_per_image, n)
    s = min(batch_size_per_image, kp + kn)
    k_pos, k_neg = jax.random.split(key)
    pos = labels == 1
    neg = labels == 0
    # Priorities in [0, 1) for eligible elements, -1 for the others (never chosen while an
    # eligible one is left; the counts below cut them off).
    _, pos_idx = jax.lax.top_k(jnp.where(pos, jax.random.uniform(k_pos, (b, n)), -1.0), kp)
    _, neg_idx = jax.lax.top_k(jnp.where(neg, jax.random.uniform(k_neg, (b, n)), -1.0), kn)
    num_pos = jnp.minimum(jnp.sum(pos, axis=1), pos_cap)  # [B]
    num_neg = jnp.minimum(jnp.sum(neg, axis=1), batch_size_per_image - num_pos)  # [B]
    slot = jnp.arange(s)[None, :]  # [1, S]
    is_pos = slot < num_pos[:, None]  # [B, S]
    valid = slot < (num_pos + num_neg)[:, None]
    p_slot = jnp.broadcast_to(jnp.clip(slot, 0, max(kp - 1, 0)), (b, s))
    p_idx = jnp.take_along_axis(pos_idx, p_slot, axis=1) if kp else jnp.zeros((b, s), jnp.int32)
    n_slot = jnp.clip(slot - num_pos[:, None], 0, max(kn - 1, 0))
    n_idx = jnp.take_along_axis(neg_idx, n_slot, axis=1) if kn else jnp.zeros((b, s), jnp.int32)
    idx = jnp.where(is_pos, p_idx, jnp.where(valid, n_idx, 0)).astype(jnp.int32)
    return idx, is_pos, valid


def gather(x, idx):
    """x `[B, N, ...]`, idx `[B, S]` -> `[B, S, ...]`."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def anchor_targets(anchors, anchor_valid, gt, *, high: float, low: float, allow_low_quality: bool):
    """RPN assignment (torchvision assign_targets_to_anchors).

    anchors `[B, A, 4]`, anchor_valid `[B, A]` -> (labels `[B, A]` int32 1/0/-1, matched gt
    index `[B, A]` int32 clamped to >= 0).
    """
    iou = ops.box_iou(gt["boxes"], anchors)  # [B, G, A]
    matches = match(iou, high=high, low=low, allow_low_quality=allow_low_quality,
                    gt_valid=gt["valid"], pred_valid=anchor_valid)
    return sample_labels(matches), jnp.maximum(matches, 0)


def add_gt_proposals(proposals, proposal_valid, gt):
    """torchvision add_gt_proposals: `[B, P, 4]` + gt `[B, G, 4]` -> `[B, P + G, 4]` and its
    validity `[B, P + G]` (padded gt slots stay invalid)."""
    boxes = jnp.concatenate([proposals, gt["boxes"].astype(proposals.dtype)], axis=1)
    valid = jnp.concatenate([proposal_valid, gt["valid"]], axis=1)
    return boxes, valid


def proposal_targets(proposals, proposal_valid, gt, *, high: float, low: float,
                     background_index: int = 0):
    """ROI assignment (torchvision assign_targets_to_proposals, no low-quality matches).

    proposals `[B, R, 4]` (gt already appended), proposal_valid `[B, R]` -> (sampler labels
    `[B, R]` 1/0/-1, class targets `[B, R]` int32 (background_index for negatives), matched
    gt index `[B, R]` clamped to >= 0).
    """
    iou = ops.box_iou(gt["boxes"], proposals)  # [B, G, R]
    matches = match(iou, high=high, low=low, allow_low_quality=False,
                    gt_valid=gt["valid"], pred_valid=proposal_valid)
    matched = jnp.maximum(matches, 0)
    classes = jnp.take_along_axis(gt["classes"].astype(jnp.int32), matched, axis=1) \
        if gt["classes"].shape[1] else jnp.zeros_like(matched)
    classes = jnp.where(matches >= 0, classes, background_index)
    return sample_labels(matches), classes, matched


def encode_targets(matched_boxes, reference_boxes, weights, *, style: str = "torchvision"):
    """Regression targets (torchvision BoxCoder.encode_single): deltas mapping
    `reference_boxes [..., 4]` (anchors / proposals) onto `matched_boxes [..., 4]`."""
    return ops.BoxCoder(tuple(weights), style=style).encode(matched_boxes, reference_boxes)


def mask_targets(gt_masks, rois, matched, image_hw, size: int, *, max_samples: int = 8):
    """torchvision project_masks_on_boxes: ROIAlign of each ROI's matched gt mask.

    gt_masks `[B, G, H, W]`, rois `[B, K, 4]`, matched `[B, K]` gt index, image_hw `[B, 2]`
    (the mask's extent: torchvision's masks are image-sized) -> `[B, K, size, size]` float32.
    As `roi_align(masks[:, None], rois, (M, M), spatial_scale=1.0)`: sampling_ratio -1
    (adaptive, our 0), aligned=False. The G masks go in as channels of one feature map, so
    every ROI is pooled from all of them and its own is picked afterwards.
    """
    feats = jnp.moveaxis(jax.lax.stop_gradient(gt_masks.astype(jnp.float32)), 1, -1)  # [B, H, W, G]
    out, _ = ops.roi_align(
        [feats], jax.lax.stop_gradient(rois.astype(jnp.float32)), output_size=size,
        spatial_scales=[1.0], sampling_ratio=0, aligned=False,
        valid_hw=image_hw.astype(jnp.int32)[:, None, :], max_samples=max_samples,
    )  # [B, K, M, M, G]
    return jnp.take_along_axis(out, matched[:, :, None, None, None], axis=-1)[..., 0]
