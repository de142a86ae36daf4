"""Box arithmetic: area, pairwise IoU, clipping, small-box masks, and delta coding.

All boxes are `[..., 4]` in (x1, y1, x2, y2) absolute pixels. Two size conventions exist:

* modern (torchvision, Detectron2, mmdet >= 2): width = x2 - x1.
* legacy (Detectron, maskrcnn-benchmark): width = x2 - x1 + 1; `legacy=True` selects it.

The delta coders reproduce each framework's floating-point operation order, so decoded boxes
match the reference to the last bit or two (XLA may still contract a*b+c into an FMA).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jaxmrcnn.ops._checks import check_boxes, check_choice

# log(1000 / 16): the dw/dh clamp shared by all frameworks. It bounds exp(dw) so that a
# box can grow at most 1000/16 = 62.5x (a 16 px anchor cannot become wider than 1000 px).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_area(boxes, *, legacy: bool = False):
    """Area of `boxes [..., 4]` -> `[...]`. Inverted boxes give negative or zero areas."""
    check_boxes("boxes", boxes)
    one = 1.0 if legacy else 0.0
    return (boxes[..., 2] - boxes[..., 0] + one) * (boxes[..., 3] - boxes[..., 1] + one)


def box_iou(boxes1, boxes2, *, legacy: bool = False):
    """Pairwise IoU: `boxes1 [..., N, 4]`, `boxes2 [..., M, 4]` -> `[..., N, M]`.

    Same float32 formula as `torchvision.ops.box_iou` (inter / (area1 + area2 - inter), no
    epsilon): two zero-area boxes give 0/0 = NaN, which compares False with any threshold.
    """
    check_boxes("boxes1", boxes1)
    check_boxes("boxes2", boxes2)
    one = 1.0 if legacy else 0.0
    area1 = box_area(boxes1, legacy=legacy)  # [..., N]
    area2 = box_area(boxes2, legacy=legacy)  # [..., M]
    lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # [..., N, M, 2]
    rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # [..., N, M, 2]
    wh = jnp.maximum(rb - lt + one, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union


def clip_boxes(boxes, height, width, *, legacy: bool = False):
    """Clamps x to [0, width] and y to [0, height] (legacy: [0, width - 1], [0, height - 1]).

    `height` and `width` may be Python numbers or arrays broadcastable to `boxes[..., 0]`
    (e.g. `[B, 1]` per-image sizes against `[B, N, 4]` boxes).
    """
    check_boxes("boxes", boxes)
    one = 1.0 if legacy else 0.0
    w = jnp.asarray(width, boxes.dtype) - one
    h = jnp.asarray(height, boxes.dtype) - one
    x1 = jnp.clip(boxes[..., 0], 0.0, w)
    y1 = jnp.clip(boxes[..., 1], 0.0, h)
    x2 = jnp.clip(boxes[..., 2], 0.0, w)
    y2 = jnp.clip(boxes[..., 3], 0.0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def small_box_mask(boxes, min_size: float, *, strict: bool = False, legacy: bool = False):
    """Keep-mask `[...]` of boxes whose width and height are >= min_size (> if `strict`).

    torchvision: `>= min_size` (1e-3 in the RPN, 1e-2 after the box head); Detectron2 and
    mmdet: `> 0` (`strict=True, min_size=0`); maskrcnn-benchmark: legacy `>= 0`.
    """
    check_boxes("boxes", boxes)
    one = 1.0 if legacy else 0.0
    ws = boxes[..., 2] - boxes[..., 0] + one
    hs = boxes[..., 3] - boxes[..., 1] + one
    if strict:
        return (ws > min_size) & (hs > min_size)
    return (ws >= min_size) & (hs >= min_size)


CODER_STYLES = ("torchvision", "legacy", "mmdet")


@dataclasses.dataclass(frozen=True)
class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas relative to reference boxes, and back.

    style:
      "torchvision": torchvision / Detectron2. Deltas are divided by `weights`; dw, dh are
          clamped from above at `clip`.
      "legacy": Detectron / maskrcnn-benchmark, the same with +1 widths (x2 = ctr + w/2 - 1).
      "mmdet": mmdet >= 2 `DeltaXYWHBBoxCoder`: deltas are multiplied by `1 / weights`
          (mmdet's `stds`), centres are (x1 + x2) / 2, and dw, dh are clamped on both sides.
    """

    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    clip: float = BBOX_XFORM_CLIP
    style: str = "torchvision"

    def __post_init__(self):
        check_choice("box coder style", self.style, CODER_STYLES)
        if len(self.weights) != 4 or any(w <= 0 for w in self.weights):
            raise ValueError(f"weights must be 4 positive numbers, got {self.weights!r}")

    def decode(self, deltas, boxes):
        """`deltas [..., 4]` relative to `boxes [..., 4]` -> decoded boxes `[..., 4]`.

        Leading dimensions broadcast, e.g. deltas `[R, C, 4]` against boxes `[R, 1, 4]`.
        """
        check_boxes("deltas", deltas)
        check_boxes("boxes", boxes)
        boxes = boxes.astype(deltas.dtype)
        if self.style == "mmdet":
            return self._decode_mmdet(deltas, boxes)
        one = 1.0 if self.style == "legacy" else 0.0
        wx, wy, ww, wh = self.weights
        widths = boxes[..., 2] - boxes[..., 0] + one
        heights = boxes[..., 3] - boxes[..., 1] + one
        ctr_x = boxes[..., 0] + 0.5 * widths
        ctr_y = boxes[..., 1] + 0.5 * heights
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = jnp.minimum(deltas[..., 2] / ww, self.clip)
        dh = jnp.minimum(deltas[..., 3] / wh, self.clip)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = jnp.exp(dw) * widths
        pred_h = jnp.exp(dh) * heights
        half_w = 0.5 * pred_w
        half_h = 0.5 * pred_h
        return jnp.stack(
            [
                pred_ctr_x - half_w,
                pred_ctr_y - half_h,
                pred_ctr_x + half_w - one,
                pred_ctr_y + half_h - one,
            ],
            axis=-1,
        )

    def _decode_mmdet(self, deltas, boxes):
        stds = [1.0 / w for w in self.weights]
        dx = deltas[..., 0] * stds[0]
        dy = deltas[..., 1] * stds[1]
        dw = jnp.clip(deltas[..., 2] * stds[2], -self.clip, self.clip)
        dh = jnp.clip(deltas[..., 3] * stds[3], -self.clip, self.clip)
        px = (boxes[..., 0] + boxes[..., 2]) * 0.5
        py = (boxes[..., 1] + boxes[..., 3]) * 0.5
        pw = boxes[..., 2] - boxes[..., 0]
        ph = boxes[..., 3] - boxes[..., 1]
        gw = pw * jnp.exp(dw)
        gh = ph * jnp.exp(dh)
        gx = px + pw * dx
        gy = py + ph * dy
        return jnp.stack(
            [gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], axis=-1
        )

    def encode(self, targets, boxes):
        """Deltas that map `boxes [..., 4]` onto `targets [..., 4]` -> `[..., 4]`."""
        check_boxes("targets", targets)
        check_boxes("boxes", boxes)
        wx, wy, ww, wh = self.weights
        if self.style == "mmdet":
            px = (boxes[..., 0] + boxes[..., 2]) * 0.5
            py = (boxes[..., 1] + boxes[..., 3]) * 0.5
            pw = boxes[..., 2] - boxes[..., 0]
            ph = boxes[..., 3] - boxes[..., 1]
            gx = (targets[..., 0] + targets[..., 2]) * 0.5
            gy = (targets[..., 1] + targets[..., 3]) * 0.5
            gw = targets[..., 2] - targets[..., 0]
            gh = targets[..., 3] - targets[..., 1]
            d = [(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)]
            return jnp.stack([d[i] * self.weights[i] for i in range(4)], axis=-1)
        one = 1.0 if self.style == "legacy" else 0.0
        ex_w = boxes[..., 2] - boxes[..., 0] + one
        ex_h = boxes[..., 3] - boxes[..., 1] + one
        ex_cx = boxes[..., 0] + 0.5 * ex_w
        ex_cy = boxes[..., 1] + 0.5 * ex_h
        gt_w = targets[..., 2] - targets[..., 0] + one
        gt_h = targets[..., 3] - targets[..., 1] + one
        gt_cx = targets[..., 0] + 0.5 * gt_w
        gt_cy = targets[..., 1] + 0.5 * gt_h
        return jnp.stack(
            [
                wx * (gt_cx - ex_cx) / ex_w,
                wy * (gt_cy - ex_cy) / ex_h,
                ww * jnp.log(gt_w / ex_w),
                wh * jnp.log(gt_h / ex_h),
            ],
            axis=-1,
        )
