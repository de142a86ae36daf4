"""The differentiable detector: batch predictions and gradients w.r.t. input pixels.

For adversarial-robustness toolkits (foolbox / ART style): images in given pixel bounds and
layout in, per-image detections out, and the gradient of a detection criterion w.r.t. the
input pixels, in the input's own pixel space and layout.

    rd = DifferentiableDetector(jaxmrcnn.load(path), bounds=(0, 1), channel_axis=1)
    preds = rd.batch_predictions(images)              # images [B, 3, H, W] in [0, 1]
    preds[0]["boxes"], preds[0]["scores"], preds[0]["classes"]
    g = rd.gradient(images, TargetClassMissed("person"))  # [B, 3, H, W], d criterion / d x

One static-shape program per (batch, image size), everything differentiable:

    x in bounds -> [0, 255] -> the checkpoint's normalization (or the toolkit's `preprocessing`)
      -> its resize rule (bilinear, in JAX) -> zero pad -> backbone -> FPN
      -> RPN: proposals = clip(decode(deltas[i], anchors[i])) for the selected anchors i
      -> ROIAlign (w.r.t. features and, with `box_gradients`, the ROI boxes) -> box head
      -> detections: softmax(logits[r])[c], clip(decode(box_deltas[r, c], proposals[r]))
         for the selected (proposal r, class c) pairs -> mask head on the detection boxes

The discrete choices are computed from stop_gradient copies of the values and then held
fixed: the RPN's per-level top-k, NMS and final top-n (as anchor indices), the box head's
score threshold, class-aware NMS and top-k (as (proposal, class) pairs), each ROI's FPN level,
and a criterion's matching. They are exactly the inference model's (model.py); the values
computed from them (proposal boxes, pooled features, logits, scores, boxes, mask logits) carry
the gradient. So the gradient is that of the piecewise-smooth function which the model is for
a fixed selection, the one a finite difference measures where the selection does not change.

`box_gradients=False` stops the gradient at the ROI boxes (the proposals into the box head's
ROIAlign, the detection boxes into the mask head's), as torchvision's autograd does
(`rpn.py` decodes detached deltas; `torchvision.ops.roi_align` has no gradient w.r.t. boxes).

The resize: torchvision's rule (normalize, then bilinear without antialias) is reproduced
exactly; the frameworks that resize the uint8 image with Pillow (Detectron2,
maskrcnn-benchmark) or OpenCV (mmdet) are approximated by the same float bilinear resize, so
their predictions here differ slightly from `Detector`'s when the image is resized at all.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmrcnn import ops
from jaxmrcnn.box_postprocess import box_detections
from jaxmrcnn.checkpoint import Checkpoint
from jaxmrcnn.config import ModelConfig, RPNConfig
from jaxmrcnn.layers.box_head import box_reg_rows
from jaxmrcnn.model import PRECISIONS, MaskRCNN, mask_num_classes, matmul_precision
from jaxmrcnn.ops.roi_align import _axis_grid, _axis_taps, _pool
from jaxmrcnn.preprocess import _linear_taps, resized_size
from jaxmrcnn.proposals import anchors_for_canvas, level_strides
from jaxmrcnn.train.forward import box_rows_for

__all__ = [
    "DetectionLoss",
    "DifferentiableDetector",
    "TargetClassMissed",
    "proposal_indices",
    "roi_align_differentiable",
]


# ----------------------------------------------------------------------------- selections
def proposal_indices(cfg: RPNConfig, logits, deltas, anchors, anchor_valid, image_hw):
    """The RPN's proposal selection as anchor indices: proposals.select_proposals step by step
    (per-level top-k, decode, clip, size and score filter, per-level NMS, top post_nms_top_n),
    keeping track of which anchor each proposal came from.

    logits: list of `[B, n_l]`; deltas, anchors: lists of `[B, n_l, 4]`; anchor_valid: list
    of `[B, n_l]`; image_hw `[B, 2]`. Returns index `[B, P]` into the levels' concatenation,
    valid `[B, P]`, in select_proposals' order (by probability, descending)."""
    coder = ops.BoxCoder(cfg.box_weights, style=cfg.coder_style)
    legacy = cfg.box_plus_one
    k = max(min(cfg.pre_nms_top_n, lg.shape[1]) for lg in logits)
    lvl_boxes, lvl_probs, lvl_valid, lvl_index = [], [], [], []
    offset = 0
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
        lvl_index.append(jnp.pad(idx + offset, ((0, 0), (0, pad))))
        offset += lg.shape[1]
    boxes = jnp.stack(lvl_boxes, axis=1)  # [B, L, k, 4]
    probs = jnp.stack(lvl_probs, axis=1)  # [B, L, k]
    valid = jnp.stack(lvl_valid, axis=1)  # [B, L, k]
    index = jnp.stack(lvl_index, axis=1)  # [B, L, k]
    b, n_levels = boxes.shape[:2]
    nms_boxes = boxes
    if cfg.nms_offset_trick_max_boxes is not None:
        level_ids = jnp.broadcast_to(jnp.arange(n_levels)[None, :, None], (b, n_levels, k))
        nms_boxes = ops.torchvision_offset_boxes(
            boxes.reshape(b, n_levels * k, 4), level_ids.reshape(b, -1), valid.reshape(b, -1),
            max_boxes=cfg.nms_offset_trick_max_boxes,
        ).reshape(boxes.shape)
    keep_idx, keep_valid = ops.nms(
        nms_boxes, probs, cfg.nms_thresh, k, valid=valid, legacy=legacy,
        suppress_equal=cfg.nms_suppress_equal,
    )  # [B, L, k]
    kept_index = jnp.take_along_axis(index, keep_idx, axis=2)
    kept_probs = jnp.take_along_axis(probs, keep_idx, axis=2)
    flat_probs = jnp.where(keep_valid, kept_probs, -jnp.inf).reshape(b, n_levels * k)
    n_out = min(cfg.post_nms_top_n, n_levels * k)
    _, idx = jax.lax.top_k(flat_probs, n_out)  # [B, P]
    out_index = jnp.take_along_axis(kept_index.reshape(b, -1), idx, axis=1)
    out_valid = jnp.take_along_axis(keep_valid.reshape(b, -1), idx, axis=1)
    return jnp.where(out_valid, out_index, 0), out_valid


# ----------------------------------------------------------------------------- ROIAlign
def roi_align_differentiable(
    features: Sequence,
    rois,
    levels,
    *,
    output_size: int,
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    valid_hw,
    adaptive_samples: int = 8,
    chunk: int = 64,
):
    """ROIAlign differentiable w.r.t. `features` and `rois` (ops.roi_align's sample positions,
    weights and border rules, which it reuses; the per-ROI work runs in a `lax.map` of static
    trip count, which reverse-mode autodiff goes through, like train/roi_align.py).

    features: L arrays `[B, H_l, W_l, C]`; rois `[B, R, 4]` image pixels; levels `[B, R]`
    int level index (fixed); valid_hw `[B, L, 2]`. The gradient w.r.t. a box coordinate is
    that of the bilinear weights of its samples (the reference kernel's formulas; sample
    counts and integer tap positions are fixed). Adaptive sampling (sampling_ratio 0) takes
    ceil(bin) samples per bin and axis: up to `adaptive_samples` of them are evaluated, and
    the second result counts the ROIs that needed more (their pooled values are then
    truncated). Returns (`[B, R, PH, PW, C]`, overflow [] int32)."""
    n_levels = len(features)
    b, _, _, c = features[0].shape
    r = rois.shape[1]
    ph = pw = int(output_size)
    dtype = features[0].dtype
    shapes = [tuple(f.shape[1:3]) for f in features]
    flat = jnp.concatenate([f.reshape(-1, c) for f in features], axis=0)  # [sum B H W, C]
    sizes = [b * h * w for h, w in shapes]
    base = jnp.asarray([sum(sizes[:i]) for i in range(n_levels)], jnp.int32)

    n = b * r
    lv = jnp.clip(levels.reshape(n).astype(jnp.int32), 0, n_levels - 1)
    bidx = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
    boxes = rois.reshape(n, 4).astype(dtype)
    scale = jnp.asarray(spatial_scales, dtype)[lv]
    canvas = jnp.asarray(shapes, jnp.int32)[lv]  # [N, 2]
    ext = jnp.minimum(jnp.asarray(valid_hw, jnp.int32)[bidx, lv], canvas)  # [N, 2]
    kw = dict(scale=scale, sampling_ratio=sampling_ratio, aligned=aligned)
    gy = _axis_grid(boxes[:, 1], boxes[:, 3], pooled=ph, **kw)
    gx = _axis_grid(boxes[:, 0], boxes[:, 2], pooled=pw, **kw)
    n_samples = sampling_ratio if sampling_ratio > 0 else adaptive_samples
    first = jnp.zeros((n,), jnp.int32)
    ry, wy = _axis_taps(*gy, ext[:, 0], first, pooled=ph, n_samples=n_samples, band=None)
    rx, wx = _axis_taps(*gx, ext[:, 1], first, pooled=pw, n_samples=n_samples, band=None)
    count = jnp.maximum(gy[2] * gx[2], 1).astype(dtype)  # [N]
    overflow = jnp.sum(((gy[2] > n_samples) | (gx[2] > n_samples)).astype(jnp.int32))
    level_w = canvas[:, 1]
    rows = (base[lv] + bidx * canvas[:, 0] * level_w)[:, None, None] + ry * level_w[:, None, None]
    wy, wx = wy.astype(dtype), wx.astype(dtype)

    m = max(1, min(chunk, n))
    pad = -n % m
    args = [jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in (rows, wy, rx, wx)]
    args = [a.reshape((-1, m) + a.shape[1:]) for a in args]  # [n_chunks, M, ...]
    out = jax.lax.map(lambda t: _pool(flat, *t), tuple(args))  # [n_chunks, M, PH, PW, C]
    out = out.reshape(-1, ph, pw, c)[:n] / count[:, None, None, None]
    return out.reshape(b, r, ph, pw, c), overflow


# ----------------------------------------------------------------------------- the network
def _gather(x, idx):
    """x `[B, N, ...]`, idx `[B, M]` -> `[B, M, ...]`."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def differentiable_forward(module, images, info, fixed=None, *, box_gradients: bool = True,
                           with_masks: bool = True, adaptive_samples: int = 8):
    """`module`: a bound MaskRCNN (`MaskRCNN(cfg).apply(..., method=differentiable_forward)`).
    images `[B, H, W, 3]` normalized and padded; info: image_hw, padded_hw `[B, 2]`.
    fixed: the selections of an earlier call (else computed here from this input).

    Returns (out, selections). out, in resized-image pixels: proposals `[B, P, 4]`,
    proposal_scores `[B, P]`, class_logits `[B, P, K]`, box_deltas `[B, P, G, 4]`, boxes
    `[B, D, 4]`, scores `[B, D]`, mask_logits `[B, D, M, M]` (the detection's class, when
    `with_masks`). selections (int / bool, no gradient): proposal_index
    `[B, P]` (anchor index into the levels' concatenation), proposal_valid, box_levels
    `[B, P]`, det_roi, det_class, det_valid `[B, D]`, mask_levels `[B, D]`."""
    with matmul_precision(module.precision):
        return _forward(module, images, info, fixed, box_gradients, with_masks, adaptive_samples)


def _forward(module, images, info, fixed, box_gradients, with_masks, adaptive_samples):
    cfg = module.cfg
    rh, pc = cfg.roi_heads, cfg.pooler
    sg = jax.lax.stop_gradient
    image_hw, padded_hw = info["image_hw"], info["padded_hw"]
    b = images.shape[0]
    sel = {} if fixed is None else dict(fixed)

    _, pyr = module.pyramid(images, padded_hw)
    levels = [pyr[f"p{i}"] for i in range(2, 7)]
    strides = level_strides(len(levels))

    # RPN: selected anchors, then their boxes from the (differentiable) deltas.
    logits, deltas = module.rpn_head(levels, strides, padded_hw)
    anchors, anchor_valid = anchors_for_canvas(
        cfg.anchors, [lv.shape[1:3] for lv in levels], padded_hw
    )
    if fixed is None:
        sel["proposal_index"], sel["proposal_valid"] = proposal_indices(
            cfg.rpn, [sg(x) for x in logits], [sg(x) for x in deltas], anchors, anchor_valid,
            image_hw,
        )
    p_idx, p_valid = sel["proposal_index"], sel["proposal_valid"]
    coder = ops.BoxCoder(cfg.rpn.box_weights, style=cfg.rpn.coder_style)
    proposals = coder.decode(_gather(jnp.concatenate(deltas, axis=1), p_idx),
                             _gather(jnp.concatenate(anchors, axis=1), p_idx))
    proposals = ops.clip_boxes(proposals, image_hw[:, None, 0], image_hw[:, None, 1],
                               legacy=cfg.rpn.box_plus_one)
    proposals = jnp.where(p_valid[..., None], proposals, 0.0)  # [B, P, 4]
    # Without box gradients the proposals are constants, as torchvision's (decoded from
    # detached deltas): the box head's ROIs, the detections' reference boxes, regression
    # targets.
    proposals = _box_path(proposals, box_gradients)
    prop_scores = jnp.where(p_valid,
                            jax.nn.sigmoid(_gather(jnp.concatenate(logits, axis=1), p_idx)), 0.0)

    # Box head on the proposals.
    pool_levels = levels[:4]  # P2..P5
    level_hw = jnp.stack([-(-padded_hw // s) for s in strides[:4]], axis=1)  # [B, 4, 2]
    pool = dict(spatial_scales=[1.0 / s for s in strides[:4]], sampling_ratio=pc.sampling_ratio,
                aligned=pc.aligned, valid_hw=level_hw, adaptive_samples=adaptive_samples)

    def level_of(boxes):
        return ops.assign_levels(sg(boxes), rule=pc.level_rule, min_level=2, max_level=5)

    rois = proposals
    if fixed is None:
        sel["box_levels"] = level_of(proposals)
    box_feats, overflow = roi_align_differentiable(
        pool_levels, rois, sel["box_levels"], output_size=pc.box_output_size, **pool
    )  # [B, P, 7, 7, C]
    r = proposals.shape[1]
    x = module.box_head(box_feats.reshape((b * r,) + box_feats.shape[2:]))
    class_logits, box_deltas = module.box_predictor(x)
    class_logits = class_logits.reshape(b, r, -1)  # [B, P, K]
    box_deltas = box_deltas.reshape(b, r, -1, 4)  # [B, P, G, 4]

    # Detections: the selected (proposal, class) pairs.
    if fixed is None:
        _, _, sel["det_class"], sel["det_valid"], sel["det_roi"] = box_detections(
            rh, sg(class_logits), sg(box_deltas), sg(proposals), p_valid, image_hw
        )
    d_roi, d_cls, d_valid = sel["det_roi"], sel["det_class"], sel["det_valid"]
    rows = box_rows_for(d_cls, rh.box_reg, rh.num_classes, rh.background_index)  # [B, D]
    d_deltas = jnp.take_along_axis(_gather(box_deltas, d_roi), rows[:, :, None, None],
                                   axis=2)[:, :, 0]  # [B, D, 4]
    box_coder = ops.BoxCoder(rh.box_weights, style=rh.coder_style)
    d_boxes = box_coder.decode(d_deltas, _gather(proposals, d_roi))
    d_boxes = ops.clip_boxes(d_boxes, image_hw[:, None, 0], image_hw[:, None, 1],
                             legacy=rh.box_plus_one)
    d_boxes = jnp.where(d_valid[..., None], d_boxes, 0.0)
    probs = jax.nn.softmax(_gather(class_logits, d_roi), axis=-1)  # [B, D, K]
    d_scores = jnp.where(d_valid, jnp.take_along_axis(probs, d_cls[..., None], axis=2)[..., 0],
                         0.0)
    out = dict(proposals=proposals, proposal_scores=prop_scores, class_logits=class_logits,
               box_deltas=box_deltas, boxes=d_boxes, scores=d_scores)

    # Mask head on the detection boxes.
    if with_masks:
        if fixed is None:
            sel["mask_levels"] = level_of(d_boxes)
        mask_rois = _box_path(d_boxes, box_gradients)
        mask_feats, mask_overflow = roi_align_differentiable(
            pool_levels, mask_rois, sel["mask_levels"], output_size=pc.mask_output_size, **pool
        )
        overflow = overflow + mask_overflow
        d = d_boxes.shape[1]
        mask_labels = d_cls
        if mask_num_classes(cfg) != rh.num_classes:  # no background channel
            mask_labels = jnp.where(d_cls > rh.background_index, d_cls - 1, d_cls)
        mask_logits = module.mask_head(mask_feats.reshape((b * d,) + mask_feats.shape[2:]),
                                       mask_labels.reshape(-1))
        out["mask_logits"] = mask_logits.reshape((b, d) + mask_logits.shape[1:])
    sel["roi_overflow"] = overflow
    return out, sel


def _box_path(boxes, box_gradients):
    """The ROI boxes into ROIAlign: with their gradient (True), without it (False), or, for a
    traced 0/1 `box_gradients`, either one by value: the same program serves both."""
    if box_gradients is True:
        return boxes
    sg = jax.lax.stop_gradient(boxes)
    if box_gradients is False:
        return sg
    return sg + jnp.asarray(box_gradients, boxes.dtype) * (boxes - sg)  # forward value exact


def to_original(cfg: ModelConfig, boxes, valid, info):
    """Detection boxes `[B, D, 4]` in resized-image pixels -> original-image pixels and their
    validity, as model.py (the preset's rescale rule, Detectron2's clip and empty-box drop)."""
    rh = cfg.roi_heads
    orig_f, image_f = info["orig_hw"].astype(boxes.dtype), info["image_hw"].astype(boxes.dtype)
    ratio = orig_f / image_f if rh.rescale == "multiply" else image_f / orig_f  # [B, 2]
    scale = jnp.stack([ratio[:, 1], ratio[:, 0], ratio[:, 1], ratio[:, 0]], axis=-1)[:, None]
    out = boxes * scale if rh.rescale == "multiply" else boxes / scale
    if rh.clip_to_original:
        oh, ow = info["orig_hw"][:, None, 0], info["orig_hw"][:, None, 1]
        out = ops.clip_boxes(out, oh, ow)
        valid = valid & ops.small_box_mask(out, 0.0, strict=True)
    return out, valid


# ----------------------------------------------------------------------------- criteria
@dataclasses.dataclass(frozen=True)
class TargetClassMissed:
    """"Target class missed": the sum of the target class's detection scores per image, to be
    driven down (an attack succeeds when no detection of the class passes the threshold).

    target: class index or name. scope "detections": the model's final detections of the
    class (after class-aware NMS and top-k); "candidates": every (proposal, class) pair of the
    class with a score above the model's score threshold, before NMS (attacks on it also
    suppress the duplicates that NMS would bring back)."""

    target: int | str = dataclasses.field(compare=False)
    scope: str = "detections"

    def __post_init__(self):
        if self.scope not in ("detections", "candidates"):
            raise ValueError(f"scope must be 'detections' or 'candidates', got {self.scope!r}")

    def data(self, det: DifferentiableDetector, info: dict) -> dict:
        return dict(target=np.int32(det.class_index(self.target)))

    def select(self, cfg: ModelConfig, out, sel, data) -> dict:
        """"candidates": which (proposal, target class) pairs pass the score threshold."""
        if self.scope == "detections":
            return {}
        probs = jax.nn.softmax(out["class_logits"], axis=-1)  # [B, P, K]
        p = jnp.take(probs, data["target"], axis=2)  # [B, P]
        return dict(candidates=sel["proposal_valid"] & (p > cfg.roi_heads.score_thresh))

    def value(self, cfg: ModelConfig, out, sel, data):
        """-> `[B]`."""
        t = data["target"]
        if self.scope == "detections":
            hit = sel["det_valid"] & (sel["det_class"] == t)
            return jnp.sum(jnp.where(hit, out["scores"], 0.0), axis=1)
        p = jnp.take(jax.nn.softmax(out["class_logits"], axis=-1), t, axis=2)  # [B, P]
        return jnp.sum(jnp.where(sel["candidates"], p, 0.0), axis=1)


@dataclasses.dataclass(frozen=True)
class DetectionLoss:
    """A detection loss against given boxes: torchvision's fastrcnn_loss (cross-entropy
    + smooth-L1 of the matched class's box deltas, beta 1/9, both over the proposals) with
    every proposal as a sample (no random sampling) and the matching held fixed.

    targets: one dict per image, boxes `[N, 4]` (x1, y1, x2, y2 in input pixels) and classes
    `[N]` (class indices or names). A proposal whose best IoU with a target box is >=
    `iou_threshold` gets that box's class and regression target, the others the background
    (torchvision's Matcher(0.5, 0.5)). Ascend it for an untargeted attack; descend it with
    chosen boxes for a targeted one."""

    targets: Sequence[dict] = dataclasses.field(compare=False)
    iou_threshold: float = 0.5
    beta: float = 1.0 / 9

    def data(self, det: DifferentiableDetector, info: dict) -> dict:
        n_img = info["orig_hw"].shape[0]
        if len(self.targets) != n_img:
            raise ValueError(f"DetectionLoss has targets for {len(self.targets)} images, the "
                             f"batch has {n_img}: pass one dict (boxes, classes) per image")
        rows = []
        for i, t in enumerate(self.targets):
            if not isinstance(t, dict) or "boxes" not in t or "classes" not in t:
                raise ValueError(f"DetectionLoss target {i} must be a dict with 'boxes' [N, 4] "
                                 f"and 'classes' [N] (class indices or names)")
            boxes = np.asarray(t["boxes"], np.float32).reshape(-1, 4)
            classes = [det.class_index(c) for c in np.asarray(t["classes"]).reshape(-1)]
            if len(classes) != len(boxes):
                raise ValueError(f"DetectionLoss target {i}: {len(boxes)} boxes but "
                                 f"{len(classes)} classes")
            rows.append((boxes, classes))
        g = max(8, -(-max(len(bx) for bx, _ in rows) // 8) * 8)  # padded: few programs
        boxes = np.zeros((n_img, g, 4), np.float32)
        classes = np.zeros((n_img, g), np.int32)
        valid = np.zeros((n_img, g), bool)
        sy = info["image_hw"][:, 0] / info["orig_hw"][:, 0]  # torchvision's resize_boxes
        sx = info["image_hw"][:, 1] / info["orig_hw"][:, 1]
        for i, (bx, cl) in enumerate(rows):
            n = len(bx)
            boxes[i, :n] = bx * np.array([sx[i], sy[i], sx[i], sy[i]], np.float32)
            classes[i, :n], valid[i, :n] = cl, True
        return dict(boxes=boxes, classes=classes, valid=valid)

    def select(self, cfg: ModelConfig, out, sel, data) -> dict:
        """The matching: best target per proposal and whether it is a positive."""
        props = jax.lax.stop_gradient(out["proposals"])
        iou = jax.vmap(lambda p, g: ops.box_iou(p, g, legacy=cfg.roi_heads.box_plus_one))(
            props, data["boxes"])  # [B, P, G]
        iou = jnp.where(data["valid"][:, None, :], iou, -1.0)
        best = jnp.argmax(iou, axis=2).astype(jnp.int32)  # [B, P]
        positive = (jnp.max(iou, axis=2) >= self.iou_threshold) & sel["proposal_valid"]
        return dict(match=best, positive=positive)

    def value(self, cfg: ModelConfig, out, sel, data):
        """-> `[B]`: loss_classifier + loss_box_reg per image."""
        rh = cfg.roi_heads
        valid, pos = sel["proposal_valid"], sel["positive"]
        labels = jnp.where(pos, _gather(data["classes"], sel["match"]), rh.background_index)
        logp = jax.nn.log_softmax(out["class_logits"], axis=-1)
        ce = -jnp.take_along_axis(logp, labels[..., None], axis=2)[..., 0]  # [B, P]
        rows = box_rows_for(labels, rh.box_reg, rh.num_classes, rh.background_index)
        pred = jnp.take_along_axis(out["box_deltas"], rows[:, :, None, None], axis=2)[:, :, 0]
        gt = _gather(data["boxes"], sel["match"])  # [B, P, 4]
        target = ops.BoxCoder(rh.box_weights, style=rh.coder_style).encode(gt, out["proposals"])
        diff = jnp.where(pos[..., None], pred - target, 0.0)
        ad = jnp.abs(diff)
        sl1 = jnp.sum(jnp.where(ad < self.beta, 0.5 * diff * diff / self.beta,
                                ad - 0.5 * self.beta), axis=-1)
        n = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(ce.dtype)
        return (jnp.sum(jnp.where(valid, ce, 0.0), axis=1)
                + jnp.sum(jnp.where(pos, sl1, 0.0), axis=1)) / n


# ----------------------------------------------------------------------------- programs
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about a program except shapes (hashable: the jit cache key). The
    programs take NHWC RGB pixels on the 0-255 scale: the input's layout and bounds are a
    linear map applied (and transposed for the gradient) outside them, so every layout and
    bound shares one compiled program."""

    cfg: ModelConfig
    precision: str
    preprocessing: tuple | None  # ((mean per channel), (std per channel)) in 0-255 units
    adaptive_samples: int


def _resize(x, out_hw):
    """`[B, H, W, C]` -> `[B, h, w, C]`, bilinear (align_corners=False, no antialias), in the
    arithmetic order of preprocess.resize_bilinear (torch's CPU kernel)."""
    h, w = out_hw
    if (h, w) == x.shape[1:3]:
        return x
    y0, y1, wy0, wy1 = _linear_taps(x.shape[1], h)
    x0, x1, wx0, wx1 = _linear_taps(x.shape[2], w)
    cols = x[:, :, x0] * wx0[None, None, :, None] + x[:, :, x1] * wx1[None, None, :, None]
    return cols[:, y0] * wy0[None, :, None, None] + cols[:, y1] * wy1[None, :, None, None]


def _network_input(spec: _Spec, x):
    """RGB pixels `[B, H, W, 3]` (0-255 scale, float) -> (normalized padded batch, info)."""
    inp = spec.cfg.input
    b, h, w, _ = x.shape
    if spec.preprocessing is None:  # x / pixel_scale * pixel_rescale, as one division
        v = x / np.float32(inp.pixel_scale / inp.pixel_rescale)
        if inp.channel_order == "BGR":
            v = v[..., ::-1]
        mean, std = np.asarray(inp.mean, np.float32), np.asarray(inp.std, np.float32)
    else:  # the toolkit's (mean, std), in RGB order, mapped to 0-255 units
        v = x
        mean, std = (np.asarray(a, np.float32) for a in spec.preprocessing)
    rh, rw = resized_size(h, w, inp)

    def normalize(t):
        t = (t - mean) / std
        if spec.preprocessing is not None and inp.channel_order == "BGR":
            t = t[..., ::-1]
        return t

    if inp.resize_impl == "torch_bilinear":  # normalize, then resize the float image
        v = _resize(normalize(v), (rh, rw))
    else:  # resize (float bilinear: Pillow's / OpenCV's uint8 resize approximated), normalize
        v = normalize(_resize(v, (rh, rw)))
    div = inp.size_divisible
    ph, pw = -(-rh // div) * div, -(-rw // div) * div
    v = jnp.pad(v, ((0, 0), (0, ph - rh), (0, pw - rw), (0, 0)))

    def hw(a, c):
        return jnp.tile(jnp.array([[a, c]], jnp.int32), (b, 1))

    return v, dict(image_hw=hw(rh, rw), padded_hw=hw(ph, pw), orig_hw=hw(h, w))




# The model's selections (criteria add their own); roi_overflow is a count, not a choice.
MODEL_SELECTIONS = ("proposal_index", "proposal_valid", "box_levels", "det_roi", "det_class",
                    "det_valid", "mask_levels")


def _run(spec: _Spec, params, x, fixed, box_gradients, with_masks):
    images, info = _network_input(spec, x)
    model = MaskRCNN(spec.cfg, precision=spec.precision)
    out, sel = model.apply(
        {"params": params}, images, info, fixed, box_gradients=box_gradients,
        with_masks=with_masks, adaptive_samples=spec.adaptive_samples,
        method=differentiable_forward,
    )
    return out, sel, info


# Three programs, so that the big ones are shared by every criterion, layout and bound:
#   _select    the model at x: values, selections, detections (batch_predictions);
#   _criterion a criterion's values and its gradient w.r.t. the model's values (small);
#   _pullback  the model with the selections fixed, pulled back from a cotangent of its
#              values to the pixels (the gradient); box_gradients is an argument, not a
#              constant, so one program serves both settings.
@functools.partial(jax.jit, static_argnames=("spec", "with_masks"))
def _select(spec: _Spec, params, x, with_masks: bool = False):
    out, sel, info = _run(spec, params, x, None, False, with_masks)
    boxes, valid = to_original(spec.cfg, out["boxes"], sel["det_valid"], info)
    return out, sel, dict(boxes=boxes, valid=valid)


@functools.partial(jax.jit, static_argnames=("cfg", "criterion"))
def _criterion(cfg: ModelConfig, criterion, out, sel, data, criterion_sel=None):
    if criterion_sel is None:
        criterion_sel = criterion.select(cfg, jax.lax.stop_gradient(out), sel, data)
    full = {**sel, **criterion_sel}

    def total(o):
        values = criterion.value(cfg, o, full, data)  # [B]
        return jnp.sum(values), values

    (_, values), cotangent = jax.value_and_grad(total, has_aux=True)(out)
    return values, cotangent, criterion_sel


@functools.partial(jax.jit, static_argnames=("spec", "with_masks"))
def _pullback(spec: _Spec, params, x, sel, cotangent, box_gradients, with_masks: bool = False):
    def values(x_):
        return _run(spec, params, x_, sel, box_gradients, with_masks)[0]

    out, vjp = jax.vjp(values, x)
    (grad,) = vjp(cotangent)
    return out, grad


def _zero_cotangent(cfg: ModelConfig, sel: dict, with_masks: bool) -> dict:
    """Zeros shaped as differentiable_forward's values for these selections."""
    rh = cfg.roi_heads
    b, p = sel["proposal_index"].shape
    d = sel["det_roi"].shape[1]
    g = box_reg_rows(rh.box_reg, rh.num_classes)
    shapes = dict(proposals=(b, p, 4), proposal_scores=(b, p), class_logits=(b, p, rh.num_classes),
                  box_deltas=(b, p, g, 4), boxes=(b, d, 4), scores=(b, d))
    if with_masks:
        m = 2 * cfg.pooler.mask_output_size
        shapes["mask_logits"] = (b, d, m, m)
    return {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- the wrapper
class DifferentiableDetector:
    """A Mask R-CNN as robustness toolkits take a model: batch predictions and input
    gradients. See the module docstring.

    model: a Detector, a Checkpoint, or anything `jaxmrcnn.load` takes (a path, a zoo name).
    bounds: the pixel range of the inputs, (0, 1) or (0, 255) (any (lo, hi)); it is mapped
        linearly onto the 0-255 pixels the checkpoint's normalization expects.
    channel_axis: 1 (`[B, C, H, W]`, torch / foolbox / ART layout) or 3 / -1 (`[B, H, W, C]`).
        Channels are RGB.
    preprocessing: None (the checkpoint's own normalization) or foolbox's / ART's
        `dict(mean=..., std=..., axis=...)` (or a `(mean, std)` pair): `(x - mean) / std` on the
        input in its bounds, per channel (`axis` must name the channel axis), replacing the
        checkpoint's normalization.
    score_threshold: `batch_predictions` keeps detections scoring above it.
    box_gradients: gradients through the ROI boxes into ROIAlign (see the module docstring);
        False gives torchvision autograd's gradient.
    precision: of matmuls and convolutions (model.PRECISIONS).
    adaptive_samples: presets with adaptive ROIAlign sampling (Detectron2, mmdet) evaluate
        up to this many samples per bin and axis (ROIs on their canonical FPN level need 2-4);
        a warning says when a ROI needed more.
    """

    def __init__(self, model, *, bounds=(0.0, 255.0), channel_axis: int = -1,
                 preprocessing=None, score_threshold: float = 0.5, box_gradients: bool = True,
                 precision: str = "float32", adaptive_samples: int = 8):
        from jaxmrcnn.detector import Detector, load

        if isinstance(model, Detector):
            ckpt = model.checkpoint
        elif isinstance(model, Checkpoint):
            ckpt = model
        elif isinstance(model, (str, Path)):
            ckpt = load(model, compilation_cache=False).checkpoint
        else:
            raise ValueError(f"model must be a Detector, a Checkpoint or a path, got "
                             f"{type(model).__name__}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        lo, hi = (float(v) for v in bounds)
        if not hi > lo:
            raise ValueError(f"bounds must be (lo, hi) with lo < hi, e.g. (0, 1) or (0, 255); "
                             f"got {bounds!r}")
        if channel_axis not in (1, 3, -1, -3):
            raise ValueError(f"channel_axis must be 1 ([B, C, H, W]) or -1 ([B, H, W, C]), got "
                             f"{channel_axis!r}")
        self.bounds = (lo, hi)
        self.channel_axis = 1 if channel_axis in (1, -3) else 3
        self.config = ckpt.config
        self.classes = list(ckpt.classes)
        self.params = jax.device_put(ckpt.params)
        self.score_threshold = float(score_threshold)
        self.box_gradients = bool(box_gradients)
        self._spec = _Spec(ckpt.config, precision, self._preprocessing(preprocessing),
                           int(adaptive_samples))

    def _preprocessing(self, pre):
        """The toolkit's (mean, std) in the input's bounds -> the same map on 0-255 pixels."""
        if pre is None:
            return None
        if isinstance(pre, dict):
            unknown = set(pre) - {"mean", "std", "axis"}
            if unknown:
                raise ValueError(f"preprocessing takes mean, std and axis; got {sorted(unknown)}")
            axis = pre.get("axis")
            if axis is not None and axis not in ((1, -3) if self.channel_axis == 1 else (3, -1)):
                raise ValueError(f"preprocessing axis {axis} is not the channel axis of this "
                                 f"layout (channel_axis={self.channel_axis})")
            mean, std = pre.get("mean", 0.0), pre.get("std", 1.0)
        else:
            mean, std = pre
        mean = np.broadcast_to(np.asarray(mean, np.float64).reshape(-1), (3,))
        std = np.broadcast_to(np.asarray(std, np.float64).reshape(-1), (3,))
        if not (std > 0).all():
            raise ValueError(f"preprocessing std must be positive, got {std.tolist()}")
        lo, hi = self.bounds
        k = 255.0 / (hi - lo)  # input units -> 0-255 pixels
        return tuple(float(v) for v in (mean - lo) * k), tuple(float(v) for v in std * k)

    # ------------------------------------------------------------------ inputs
    def class_index(self, c) -> int:
        """A class index from an index or a name (as in `classes`)."""
        bg = self.config.roi_heads.background_index
        if isinstance(c, (str, np.str_)):
            if str(c) not in self.classes or self.classes.index(str(c)) == bg:
                fg = [n for i, n in enumerate(self.classes) if i != bg]
                raise ValueError(f"unknown class {c!r}; this model's classes: {fg}")
            return self.classes.index(str(c))
        i = int(c)
        if not 0 <= i < len(self.classes) or i == bg:
            raise ValueError(f"class index {i} is not a foreground class of this model "
                             f"(0..{len(self.classes) - 1}, background {bg})")
        return i

    def _pixels(self, images, *, single: bool = False):
        """The input (validated) -> RGB pixels `[B, H, W, 3]` on the 0-255 scale (a linear
        map, transposed by `_to_input` for the gradient)."""
        x = images if isinstance(images, jax.Array) else np.asarray(images)
        what = "image" if single else "images"
        layout = "[C, H, W]" if self.channel_axis == 1 else "[H, W, C]"
        if single:
            if x.ndim != 3:
                raise ValueError(f"image must be {layout} (one image), got shape {x.shape}")
            x = x[None]
        if x.ndim != 4 or x.shape[self.channel_axis] != 3:
            raise ValueError(f"{what} must be {'' if single else '[B] + '}{layout} with 3 (RGB) "
                             f"channels (channel_axis={self.channel_axis}), got shape "
                             f"{tuple(np.shape(images))}")
        if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(f"{what} must be a float array in bounds {self.bounds}, got "
                             f"dtype {x.dtype}")
        lo, hi = self.bounds
        xmin, xmax = float(jnp.min(x)), float(jnp.max(x))
        if xmin < lo - 1e-4 * (hi - lo) or xmax > hi + 1e-4 * (hi - lo):
            raise ValueError(f"{what} values span [{xmin:g}, {xmax:g}], outside the bounds "
                             f"{self.bounds}: clip them, or construct the detector with the "
                             f"bounds they use")
        x = jnp.asarray(x, jnp.float32)
        if self.channel_axis == 1:
            x = jnp.moveaxis(x, 1, -1)
        if (lo, hi) != (0.0, 255.0):
            x = (x - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        return x

    def _to_input(self, grad, shape) -> np.ndarray:
        """A gradient w.r.t. `_pixels`' output -> w.r.t. the input (its layout and units)."""
        lo, hi = self.bounds
        g = np.asarray(grad)
        if (lo, hi) != (0.0, 255.0):
            g = g * np.float32(255.0 / (hi - lo))
        if self.channel_axis == 1:
            g = np.moveaxis(g, -1, 1)
        return np.ascontiguousarray(g).reshape(shape)

    def _data(self, criterion, x) -> dict:
        for name in ("data", "select", "value"):
            if not callable(getattr(criterion, name, None)):
                raise ValueError(f"criterion must be a TargetClassMissed, a DetectionLoss or "
                                 f"an object with data/select/value methods, got "
                                 f"{type(criterion).__name__}")
        b, h, w = x.shape[:3]
        rh, rw = resized_size(h, w, self.config.input)
        info = dict(image_hw=np.tile([[rh, rw]], (b, 1)), orig_hw=np.tile([[h, w]], (b, 1)))
        return criterion.data(self, info)

    # ------------------------------------------------------------------ outputs
    def _to_dicts(self, out, sel, det) -> list[dict]:
        scores, classes, boxes, valid, overflow = jax.device_get(
            (out["scores"], sel["det_class"], det["boxes"], det["valid"], sel["roi_overflow"]))
        if int(overflow) > 0:
            warnings.warn(f"{int(overflow)} ROIs needed more than "
                          f"{self._spec.adaptive_samples} ROIAlign samples per bin: raise "
                          f"adaptive_samples for exact values", stacklevel=3)
        result = []
        for i in range(scores.shape[0]):
            keep = valid[i] & (scores[i] > self.score_threshold)
            cls = classes[i][keep].astype(np.int64)
            result.append(dict(boxes=boxes[i][keep], scores=scores[i][keep], classes=cls,
                               names=[self.classes[c] for c in cls]))
        return result

    def batch_predictions(self, images) -> list[dict]:
        """images `[B, H, W, 3]` (or `[B, 3, H, W]`) in bounds -> per image a dict: boxes
        `[N, 4]` (x1, y1, x2, y2, input pixels), scores `[N]`, classes `[N]` (class index),
        names; the detections scoring above `score_threshold`, by score."""
        return self._to_dicts(*_select(self._spec, self.params, self._pixels(images)))

    def _evaluate(self, x, criterion):
        """(predictions' arrays, values [B], gradient w.r.t. x, all selections)."""
        data = self._data(criterion, x)
        with_masks = bool(getattr(criterion, "needs_masks", False))
        out, sel, det = _select(self._spec, self.params, x, with_masks)
        values, cotangent, crit_sel = _criterion(self.config, criterion, out, sel, data)
        fixed = {k: v for k, v in sel.items() if k in MODEL_SELECTIONS}
        _, grad = _pullback(self._spec, self.params, x, fixed, cotangent,
                            np.float32(self.box_gradients), with_masks)
        return (out, sel, det), values, grad, {**sel, **crit_sel}

    def values_and_gradient(self, images, criterion):
        """(the criterion per image `[B]`, its gradient w.r.t. `images`, in their shape, layout
        and units; each image's gradient is that of its own value)."""
        x = self._pixels(images)
        _, values, grad, _ = self._evaluate(x, criterion)
        return np.asarray(values), self._to_input(grad, np.shape(images))

    def gradient(self, images, criterion) -> np.ndarray:
        """d criterion / d images, in the images' shape, layout and units."""
        return self.values_and_gradient(images, criterion)[1]

    def predictions_and_gradient(self, image, criterion) -> tuple[dict, np.ndarray]:
        """One image (`[H, W, 3]` or `[3, H, W]`) -> (its predictions as `batch_predictions`
        gives them, d criterion / d image in the image's shape)."""
        x = self._pixels(image, single=True)
        preds, _, grad, _ = self._evaluate(x, criterion)
        return self._to_dicts(*preds)[0], self._to_input(grad, np.shape(image))

    def selections(self, images, criterion) -> dict:
        """The discrete choices (anchor indices, (proposal, class) pairs, ROI levels, the
        criterion's matching) the model and `criterion` make at `images`, as numpy arrays."""
        x = self._pixels(images)
        data = self._data(criterion, x)
        with_masks = bool(getattr(criterion, "needs_masks", False))
        out, sel, _ = _select(self._spec, self.params, x, with_masks)
        _, _, crit_sel = _criterion(self.config, criterion, out, sel, data)
        return jax.device_get({**sel, **crit_sel})

    def criterion_values(self, images, criterion, selections: dict | None = None) -> np.ndarray:
        """The criterion per image `[B]`. With `selections` (`selections()` at another input)
        those choices are held fixed: this is the function whose gradient `gradient` gives,
        which finite differences can check."""
        if selections is None:
            return self.values_and_gradient(images, criterion)[0]
        x = self._pixels(images)
        data = self._data(criterion, x)
        with_masks = bool(getattr(criterion, "needs_masks", False))
        fixed = {k: jnp.asarray(v) for k, v in selections.items() if k in MODEL_SELECTIONS}
        zeros = _zero_cotangent(self.config, fixed, with_masks)
        out, _ = _pullback(self._spec, self.params, x, fixed, zeros,
                           np.float32(self.box_gradients), with_masks)
        crit_sel = {k: jnp.asarray(v) for k, v in selections.items()
                    if k not in MODEL_SELECTIONS and k != "roi_overflow"}
        values, _, _ = _criterion(self.config, criterion, out, fixed, data, crit_sel)
        return np.asarray(values)
