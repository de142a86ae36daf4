"""Box-head post-processing with static shapes (torchvision RoIHeads.postprocess_detections,
Detectron2 fast_rcnn_inference_single_image).

    softmax over classes -> decode every class's box -> clip to the resized image -> drop the
    background column -> candidates (roi, class) in row-major order with score > thresh (and
    w, h >= min_box_size) -> class-aware NMS -> the first `detections_per_img` by score.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmrcnn import ops
from jaxmrcnn.config import ROIHeadsConfig


def box_detections(cfg: ROIHeadsConfig, class_logits, box_deltas, proposals, prop_valid, image_hw):
    """class_logits `[B, R, K]`, box_deltas `[B, R, G, 4]` (G per cfg.box_reg), proposals
    `[B, R, 4]`, prop_valid `[B, R]`, image_hw `[B, 2]` ->
    boxes `[B, D, 4]`, scores `[B, D]`, labels `[B, D]` (class index in the checkpoint's
    numbering), valid `[B, D]`, rois `[B, D]` (the proposal each came from), with
    D = detections_per_img, sorted by score."""
    b, r, k = class_logits.shape
    legacy = cfg.box_plus_one
    coder = ops.BoxCoder(cfg.box_weights, style=cfg.coder_style)
    fg = [c for c in range(k) if c != cfg.background_index]
    if cfg.box_reg == "per_class":  # rows for every class: drop the background's
        box_deltas = box_deltas[:, :, fg]
    elif cfg.box_reg == "agnostic":
        box_deltas = jnp.broadcast_to(box_deltas, (b, r, k - 1, 4))
    boxes = coder.decode(box_deltas, proposals[:, :, None, :])  # [B, R, K-1, 4]
    boxes = ops.clip_boxes(
        boxes, image_hw[:, None, None, 0], image_hw[:, None, None, 1], legacy=legacy
    )
    scores = jax.nn.softmax(class_logits, axis=-1)  # [B, R, K]
    scores = scores[:, :, fg]
    labels = jnp.broadcast_to(jnp.asarray(fg, jnp.int32), scores.shape)
    boxes = boxes.reshape(b, r * (k - 1), 4)
    scores = scores.reshape(b, r * (k - 1))
    labels = labels.reshape(b, r * (k - 1))
    valid = jnp.repeat(prop_valid, k - 1, axis=1) & (scores > cfg.score_thresh)
    if cfg.min_box_size is not None:
        valid = valid & ops.small_box_mask(boxes, cfg.min_box_size, legacy=legacy)
    nms_boxes = boxes
    if cfg.nms_offset_trick_max_boxes is not None:
        nms_boxes = ops.torchvision_offset_boxes(
            boxes, labels, valid, max_boxes=cfg.nms_offset_trick_max_boxes
        )
    idx, det_valid = ops.batched_nms(
        nms_boxes, scores, labels, cfg.nms_thresh, cfg.detections_per_img, valid=valid,
        legacy=legacy, suppress_equal=cfg.nms_suppress_equal,
    )  # [B, D]
    det_boxes = jnp.take_along_axis(boxes, idx[..., None], axis=1)
    det_scores = jnp.take_along_axis(scores, idx, axis=1)
    det_labels = jnp.take_along_axis(labels, idx, axis=1)
    return (
        jnp.where(det_valid[..., None], det_boxes, 0.0),
        jnp.where(det_valid, det_scores, 0.0),
        jnp.where(det_valid, det_labels, 0),
        det_valid,
        jnp.where(det_valid, idx // (k - 1), 0),
    )
