"""Static-shape, jit-compatible detection ops (no Flax, no torch)."""

from jaxmrcnn.ops.anchors import cell_anchors, grid_anchors, torchvision_strides
from jaxmrcnn.ops.boxes import (
    BBOX_XFORM_CLIP,
    BoxCoder,
    box_area,
    box_iou,
    clip_boxes,
    small_box_mask,
)
from jaxmrcnn.ops.masks import paste_masks
from jaxmrcnn.ops.nms import batched_nms, nms, torchvision_offset_boxes
from jaxmrcnn.ops.roi_align import assign_levels, roi_align

__all__ = [
    "BBOX_XFORM_CLIP",
    "BoxCoder",
    "assign_levels",
    "batched_nms",
    "box_area",
    "box_iou",
    "cell_anchors",
    "clip_boxes",
    "grid_anchors",
    "nms",
    "paste_masks",
    "roi_align",
    "small_box_mask",
    "torchvision_offset_boxes",
    "torchvision_strides",
]
