"""Small numpy references for the op tests, written from the documented formulas.

Each function states where its formula comes from (see ../shared/CONVENTIONS.md and
../shared/STATIC_SHAPES.md). They are deliberately slow and obvious: loops and float32
arithmetic in the reference kernels' operation order, no vectorised cleverness.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


# ---------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------
def clustered_boxes(rng, n, *, n_objects=20, image_hw=(400, 600), jitter=0.15):
    """`n` float32 boxes scattered around `n_objects` objects: many overlaps, like detector
    output."""
    h, w = image_hw
    cw = rng.uniform(16, w / 3, n_objects)
    ch = rng.uniform(16, h / 3, n_objects)
    cx = rng.uniform(0, w, n_objects)
    cy = rng.uniform(0, h, n_objects)
    k = rng.integers(0, n_objects, n)
    bw = cw[k] * np.exp(rng.normal(0, jitter, n))
    bh = ch[k] * np.exp(rng.normal(0, jitter, n))
    x = cx[k] + rng.normal(0, jitter, n) * cw[k]
    y = cy[k] + rng.normal(0, jitter, n) * ch[k]
    boxes = np.stack([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2], axis=1)
    return boxes.astype(F32)


def random_boxes(rng, n, *, lo=0.0, hi=100.0, min_wh=1.0, max_wh=50.0):
    xy = rng.uniform(lo, hi, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(F32)


# ---------------------------------------------------------------------------------------------
# NMS: the greedy loop of torchvision's csrc/ops/cpu/nms_kernel.cpp (and maskrcnn-benchmark /
# Detectron with +1 sizes and `>=`), including the float32 IoU vs double threshold compare.
# ---------------------------------------------------------------------------------------------
def iou_row_f32(box, boxes, *, legacy=False):
    one = F32(1.0 if legacy else 0.0)
    box = box.astype(F32)
    boxes = boxes.astype(F32)
    iarea = (box[2] - box[0] + one) * (box[3] - box[1] + one)
    areas = (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)
    xx1 = np.maximum(box[0], boxes[:, 0])
    yy1 = np.maximum(box[1], boxes[:, 1])
    xx2 = np.minimum(box[2], boxes[:, 2])
    yy2 = np.minimum(box[3], boxes[:, 3])
    w = np.maximum(F32(0), xx2 - xx1 + one)
    h = np.maximum(F32(0), yy2 - yy1 + one)
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (iarea + areas - inter)  # float32


def greedy_nms(boxes, scores, thr, *, classes=None, valid=None, legacy=False, ge=False):
    """Indices kept by greedy NMS, in visiting order (score descending, ties by lower index)."""
    n = len(boxes)
    classes = np.zeros(n, np.int64) if classes is None else np.asarray(classes)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    idx = np.flatnonzero(valid)
    order = idx[np.argsort(-scores[idx].astype(np.float64), kind="stable")]
    suppressed = np.zeros(n, bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        ovr = iou_row_f32(boxes[i], boxes, legacy=legacy).astype(np.float64)
        hit = (ovr >= thr) if ge else (ovr > thr)  # float IoU promoted to double, as the kernel
        suppressed |= hit & (classes == classes[i])
    return np.asarray(keep, np.int64)


# ---------------------------------------------------------------------------------------------
# FPN level assignment (CONVENTIONS.md, "ROI -> FPN level"), in float32 like the frameworks.
# ---------------------------------------------------------------------------------------------
def assign_levels_np(rois, rule, *, min_level=2, max_level=5):
    rois = rois.astype(F32)
    one = F32(1.0 if rule == "legacy" else 0.0)
    area = (rois[:, 2] - rois[:, 0] + one) * (rois[:, 3] - rois[:, 1] + one)
    s = np.sqrt(area)
    with np.errstate(divide="ignore", invalid="ignore"):
        if rule == "torchvision":  # floor(4 + log2(sqrt(wh) / 224) + 1e-6)
            lvl = np.floor(F32(4) + np.log2(s / F32(224)) + F32(1e-6))
        elif rule == "detectron2":  # floor(4 + log2(sqrt(wh) / 224 + 1e-8))
            lvl = np.floor(F32(4) + np.log2(s / F32(224) + F32(1e-8)))
        elif rule == "legacy":  # floor(4 + log2(sqrt((w+1)(h+1)) / 224 + 1e-6))
            lvl = np.floor(F32(4) + np.log2(s / F32(224) + F32(1e-6)))
        elif rule == "mmdet":  # floor(log2(sqrt(wh) / 56 + 1e-6)), levels 0..3
            lvl = np.floor(np.log2(s / F32(56) + F32(1e-6))) + min_level
        else:
            raise ValueError(rule)
    lvl = np.clip(lvl, min_level, max_level)
    return (lvl - min_level).astype(np.int64), s


# ---------------------------------------------------------------------------------------------
# Anchors: Detectron's detectron/modeling/generate_anchors.py (also maskrcnn-benchmark's
# modeling/rpn/anchor_generator.py::generate_anchors), ported verbatim to numpy.
# ---------------------------------------------------------------------------------------------
def detectron_generate_anchors(stride, sizes, aspect_ratios):
    scales = np.array(sizes, dtype=np.float64) / stride
    ratios = np.array(aspect_ratios, dtype=np.float64)
    anchor = np.array([1, 1, stride, stride], dtype=np.float64) - 1
    anchors = _ratio_enum(anchor, ratios)
    return np.vstack([_scale_enum(anchors[i, :], scales) for i in range(anchors.shape[0])])


def _whctrs(anchor):
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    x_ctr = anchor[0] + 0.5 * (w - 1)
    y_ctr = anchor[1] + 0.5 * (h - 1)
    return w, h, x_ctr, y_ctr


def _mkanchors(ws, hs, x_ctr, y_ctr):
    ws = ws[:, np.newaxis]
    hs = hs[:, np.newaxis]
    return np.hstack(
        (
            x_ctr - 0.5 * (ws - 1),
            y_ctr - 0.5 * (hs - 1),
            x_ctr + 0.5 * (ws - 1),
            y_ctr + 0.5 * (hs - 1),
        )
    )


def _ratio_enum(anchor, ratios):
    w, h, x_ctr, y_ctr = _whctrs(anchor)
    size = w * h
    size_ratios = size / ratios
    ws = np.round(np.sqrt(size_ratios))
    hs = np.round(ws * ratios)
    return _mkanchors(ws, hs, x_ctr, y_ctr)


def _scale_enum(anchor, scales):
    w, h, x_ctr, y_ctr = _whctrs(anchor)
    return _mkanchors(w * scales, h * scales, x_ctr, y_ctr)


def grid_anchors_np(cell, grid_hw, stride_hw, offset=0.0):
    """anchors[(y * W + x) * A + a] = cell[a] + (x sx, y sy, x sx, y sy), grid at
    (i + offset) * s."""
    h, w = grid_hw
    sy, sx = stride_hw
    out = np.zeros((h, w, len(cell), 4), np.float64)
    for y in range(h):
        for x in range(w):
            shift = np.array([(x + offset) * sx, (y + offset) * sy] * 2, np.float64)
            out[y, x] = cell + shift
    return out.reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# Box coders. maskrcnn-benchmark modeling/box_coder.py (legacy +1) and mmdet
# core/bbox/coder/delta_xywh_bbox_coder.py (delta2bbox / bbox2delta), float32 numpy ports.
# ---------------------------------------------------------------------------------------------
def mb_decode(rel_codes, boxes, weights, clip=None):
    if clip is None:
        clip = np.log(1000.0 / 16)
    rel_codes = rel_codes.astype(F32)
    boxes = boxes.astype(F32)
    widths = boxes[:, 2] - boxes[:, 0] + F32(1)
    heights = boxes[:, 3] - boxes[:, 1] + F32(1)
    ctr_x = boxes[:, 0] + F32(0.5) * widths
    ctr_y = boxes[:, 1] + F32(0.5) * heights
    wx, wy, ww, wh = (F32(w) for w in weights)
    dx = rel_codes[:, 0::4] / wx
    dy = rel_codes[:, 1::4] / wy
    dw = np.minimum(rel_codes[:, 2::4] / ww, F32(clip))
    dh = np.minimum(rel_codes[:, 3::4] / wh, F32(clip))
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = np.exp(dw) * widths[:, None]
    pred_h = np.exp(dh) * heights[:, None]
    out = np.zeros_like(rel_codes)
    out[:, 0::4] = pred_ctr_x - F32(0.5) * pred_w
    out[:, 1::4] = pred_ctr_y - F32(0.5) * pred_h
    out[:, 2::4] = pred_ctr_x + F32(0.5) * pred_w - F32(1)
    out[:, 3::4] = pred_ctr_y + F32(0.5) * pred_h - F32(1)
    return out


def mb_encode(reference_boxes, proposals, weights):
    r = reference_boxes.astype(F32)
    p = proposals.astype(F32)
    one = F32(1)
    ex_w = p[:, 2] - p[:, 0] + one
    ex_h = p[:, 3] - p[:, 1] + one
    ex_cx = p[:, 0] + F32(0.5) * ex_w
    ex_cy = p[:, 1] + F32(0.5) * ex_h
    gt_w = r[:, 2] - r[:, 0] + one
    gt_h = r[:, 3] - r[:, 1] + one
    gt_cx = r[:, 0] + F32(0.5) * gt_w
    gt_cy = r[:, 1] + F32(0.5) * gt_h
    wx, wy, ww, wh = (F32(w) for w in weights)
    return np.stack(
        [
            wx * (gt_cx - ex_cx) / ex_w,
            wy * (gt_cy - ex_cy) / ex_h,
            ww * np.log(gt_w / ex_w),
            wh * np.log(gt_h / ex_h),
        ],
        axis=1,
    )


def mmdet_delta2bbox(rois, deltas, stds, wh_ratio_clip=16 / 1000):
    """mmdet delta2bbox with means 0, no max_shape (no clipping), deltas [N, 4]."""
    deltas = deltas.astype(F32)
    rois = rois.astype(F32)
    denorm = deltas * np.asarray(stds, F32)[None, :] + F32(0)
    dx, dy, dw, dh = (denorm[:, i] for i in range(4))
    x1, y1, x2, y2 = (rois[:, i] for i in range(4))
    px = (x1 + x2) * F32(0.5)
    py = (y1 + y2) * F32(0.5)
    pw = x2 - x1
    ph = y2 - y1
    dx_width = pw * dx
    dy_height = ph * dy
    max_ratio = F32(np.abs(np.log(wh_ratio_clip)))
    dw = np.clip(dw, -max_ratio, max_ratio)
    dh = np.clip(dh, -max_ratio, max_ratio)
    gw = pw * np.exp(dw)
    gh = ph * np.exp(dh)
    gx = px + dx_width
    gy = py + dy_height
    return np.stack(
        [gx - gw * F32(0.5), gy - gh * F32(0.5), gx + gw * F32(0.5), gy + gh * F32(0.5)], axis=1
    )


def mmdet_bbox2delta(proposals, gt, stds):
    p = proposals.astype(F32)
    g = gt.astype(F32)
    px = (p[:, 0] + p[:, 2]) * F32(0.5)
    py = (p[:, 1] + p[:, 3]) * F32(0.5)
    pw = p[:, 2] - p[:, 0]
    ph = p[:, 3] - p[:, 1]
    gx = (g[:, 0] + g[:, 2]) * F32(0.5)
    gy = (g[:, 1] + g[:, 3]) * F32(0.5)
    gw = g[:, 2] - g[:, 0]
    gh = g[:, 3] - g[:, 1]
    deltas = np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)
    return (deltas - F32(0)) / np.asarray(stds, F32)[None, :]
