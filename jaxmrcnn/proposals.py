"""RPN inference: anchors for a canvas, and proposal selection with static shapes.

Per image, as torchvision's RegionProposalNetwork.filter_proposals (and Detectron2's
find_top_rpn_proposals):

    per level: top-k (pre_nms_top_n) anchors by objectness logit -> decode -> clip to the
    resized image -> drop boxes smaller than min_size and probabilities below score_thresh
    -> NMS (levels never suppress each other) -> merge levels, top post_nms_top_n by
    probability.

Levels are padded to the same k and NMS runs on all of them at once (vmapped), which is
exactly batched NMS with the level as class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmrcnn import ops
from jaxmrcnn.config import AnchorConfig, RPNConfig


def level_strides(n_levels: int = 5, first: int = 2) -> list[int]:
    return [2 ** (first + i) for i in range(n_levels)]


def anchors_for_canvas(cfg: AnchorConfig, feat_shapes, padded_hw):
    """Anchors and their validity for every level.

    feat_shapes: static [(H_l, W_l)] of the canvas' feature maps (P2..P6).
    padded_hw:   `[B, 2]` int32, each image's own padded size (<= canvas).
    Returns lists of `[B, H_l * W_l * A, 4]` anchors and `[B, H_l * W_l * A]` validity.
    """
    if len(cfg.sizes) != len(feat_shapes):
        raise ValueError(f"{len(cfg.sizes)} anchor sizes for {len(feat_shapes)} feature levels")
    anchors, valid = [], []
    a = len(cfg.aspect_ratios)
    strides = level_strides(len(feat_shapes))
    for s_nom, size, (h, w) in zip(strides, cfg.sizes, feat_shapes, strict=True):
        feat_valid = -(-padded_hw // s_nom)  # [B, 2] the image's own feature size
        if cfg.stride_rule == "torchvision":
            stride = ops.torchvision_strides(padded_hw, feat_valid)
        elif cfg.stride_rule == "nominal":
            stride = jnp.full(padded_hw.shape, s_nom, padded_hw.dtype)
        else:
            raise ValueError(f"unknown anchor stride_rule {cfg.stride_rule!r}")
        cell = ops.cell_anchors(size, cfg.aspect_ratios, flavour=cfg.flavour, stride=s_nom)
        anchors.append(ops.grid_anchors(cell, (h, w), stride, offset=cfg.offset))
        inside = (jnp.arange(h)[None, :, None] < feat_valid[:, None, None, 0]) & (
            jnp.arange(w)[None, None, :] < feat_valid[:, None, None, 1]
        )  # [B, H, W]
        valid.append(jnp.repeat(inside.reshape(-1, h * w), a, axis=1))
    return anchors, valid


def select_proposals(cfg: RPNConfig, logits, deltas, anchors, anchor_valid, image_hw):
    """Proposals per image.

    logits: list of `[B, n_l]`; deltas, anchors: lists of `[B, n_l, 4]`; anchor_valid:
    list of `[B, n_l]`; image_hw: `[B, 2]` resized (unpadded) image sizes for clipping.
    Returns proposals `[B, P, 4]`, probabilities `[B, P]`, valid `[B, P]` (P = post_nms_top_n),
    sorted by probability, descending.
    """
    coder = ops.BoxCoder(cfg.box_weights, style=cfg.coder_style)
    legacy = cfg.box_plus_one
    k = max(min(cfg.pre_nms_top_n, lg.shape[1]) for lg in logits)
    lvl_boxes, lvl_probs, lvl_valid = [], [], []
    for lg, dl, an, av in zip(logits, deltas, anchors, anchor_valid, strict=True):
        kl = min(cfg.pre_nms_top_n, lg.shape[1])
        top, idx = jax.lax.top_k(jnp.where(av, lg, -jnp.inf), kl)  # [B, kl]
        sel_valid = jnp.take_along_axis(av, idx, axis=1)
        sel_anchors = jnp.take_along_axis(an, idx[..., None], axis=1)
        sel_deltas = jnp.take_along_axis(dl, idx[..., None], axis=1)
        boxes = coder.decode(sel_deltas, sel_anchors)
        boxes = ops.clip_boxes(boxes, image_hw[:, None, 0], image_hw[:, None, 1], legacy=legacy)
        prob = jax.nn.sigmoid(top)
        big = ops.small_box_mask(boxes, cfg.min_size, strict=cfg.min_size_strict, legacy=legacy)
        keep = sel_valid & big & (prob >= cfg.score_thresh)
        pad = k - kl
        lvl_boxes.append(jnp.pad(boxes, ((0, 0), (0, pad), (0, 0))))
        lvl_probs.append(jnp.pad(prob, ((0, 0), (0, pad))))
        lvl_valid.append(jnp.pad(keep, ((0, 0), (0, pad))))
    boxes = jnp.stack(lvl_boxes, axis=1)  # [B, L, k, 4]
    probs = jnp.stack(lvl_probs, axis=1)  # [B, L, k]
    valid = jnp.stack(lvl_valid, axis=1)  # [B, L, k]
    b, n_levels = boxes.shape[:2]

    nms_boxes = boxes
    if cfg.nms_offset_trick_max_boxes is not None:
        level_ids = jnp.broadcast_to(jnp.arange(n_levels)[None, :, None], (b, n_levels, k))
        nms_boxes = ops.torchvision_offset_boxes(
            boxes.reshape(b, n_levels * k, 4),
            level_ids.reshape(b, -1),
            valid.reshape(b, -1),
            max_boxes=cfg.nms_offset_trick_max_boxes,
        ).reshape(boxes.shape)
    keep_idx, keep_valid = ops.nms(
        nms_boxes, probs, cfg.nms_thresh, k, valid=valid, legacy=legacy,
        suppress_equal=cfg.nms_suppress_equal,
    )  # [B, L, k]
    kept_boxes = jnp.take_along_axis(boxes, keep_idx[..., None], axis=2)
    kept_probs = jnp.take_along_axis(probs, keep_idx, axis=2)
    flat_probs = jnp.where(keep_valid, kept_probs, -jnp.inf).reshape(b, n_levels * k)
    n_out = min(cfg.post_nms_top_n, n_levels * k)
    top, idx = jax.lax.top_k(flat_probs, n_out)  # [B, P]
    out_boxes = jnp.take_along_axis(kept_boxes.reshape(b, -1, 4), idx[..., None], axis=1)
    out_valid = jnp.take_along_axis(keep_valid.reshape(b, -1), idx, axis=1)
    out_boxes = jnp.where(out_valid[..., None], out_boxes, 0.0)
    return out_boxes, jnp.where(out_valid, top, 0.0), out_valid
