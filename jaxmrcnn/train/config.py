"""Training-only numbers, kept apart from the inference ModelConfig.

Defaults are torchvision's Mask R-CNN training values (torchvision/models/detection/
faster_rcnn.py and mask_rcnn.py constructor defaults).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # RPN proposals in training mode (inference uses ModelConfig.rpn's test values).
    rpn_pre_nms_top_n: int = 2000  # per level
    rpn_post_nms_top_n: int = 2000  # per image
    # Anchor matching: Matcher(0.7, 0.3, allow_low_quality_matches=True).
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_allow_low_quality: bool = True
    # BalancedPositiveNegativeSampler for anchors.
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    # Proposal matching: Matcher(0.5, 0.5, allow_low_quality_matches=False).
    roi_fg_iou_thresh: float = 0.5
    roi_bg_iou_thresh: float = 0.5
    # BalancedPositiveNegativeSampler for ROIs.
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.25
    # Smooth-L1 beta of both box losses.
    rpn_box_beta: float = 1.0 / 9
    roi_box_beta: float = 1.0 / 9
    # Differentiable ROIAlign: ROIs per lax.map step (a memory / speed knob only).
    roi_align_chunk: int = 64
    # Mask-target ROIAlign (adaptive sampling): samples per bin per work item (speed only).
    mask_target_max_samples: int = 8

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)
