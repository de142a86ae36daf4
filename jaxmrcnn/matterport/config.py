"""The Matterport family's settings (multimodallearning/pytorch-mask-rcnn, the PyTorch port of
Matterport's Keras Mask R-CNN), as one frozen dataclass: every number that changes its output.

A separate family from the Detectron lineage (jaxmrcnn/config.py): TF 'SAME' padding, BN eps
1e-3, a square zero-padded canvas, normalised coordinates, TF crop_and_resize, +1 NMS
(../shared/CONVENTIONS_MATTERPORT.md has every convention with file and line in the port).
The port's `config.py` names are given beside each field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

FAMILY = "matterport"
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}  # the port's ResNet (model.py:244)


@dataclass(frozen=True)
class MatterportConfig:
    name: str
    depth: int  # BACKBONE "resnet50" / "resnet101"
    num_classes: int  # NUM_CLASSES, background (index 0) included
    # Widths. The port hard-codes 64 / 256 / 512 / 1024 / 256; smaller values serve the tests'
    # small models only (the reference in tests/ takes the same fields).
    base_channels: int  # stem and first-stage planes (64): stage i has base * 2**i (x4 out)
    fpn_channels: int  # TOP_DOWN_PYRAMID_SIZE (256)
    rpn_channels: int  # RPN conv_shared output (512)
    fc_dim: int  # classifier conv1 / conv2 width (1024)
    mask_channels: int  # mask head conv width (256)
    norm_eps: float  # every BatchNorm (1e-3), backbone and heads
    # Input: IMAGE_MIN_DIM / IMAGE_MAX_DIM; the canvas is max_dim x max_dim (IMAGE_PADDING).
    min_dim: int
    max_dim: int
    mean: tuple[float, float, float]  # MEAN_PIXEL, RGB; subtracted in float64, no std
    # Anchors: RPN_ANCHOR_SCALES (one per level P2..P6), RPN_ANCHOR_RATIOS (width / height),
    # BACKBONE_STRIDES, RPN_ANCHOR_STRIDE.
    anchor_scales: tuple[int, ...]
    anchor_ratios: tuple[float, ...]
    anchor_strides: tuple[int, ...]
    anchor_stride: int
    rpn_bbox_std: tuple[float, float, float, float]  # RPN_BBOX_STD_DEV (also the head's)
    pre_nms_limit: int  # 6000 (proposal_layer, hard-coded)
    rpn_nms_threshold: float  # RPN_NMS_THRESHOLD
    post_nms_rois: int  # POST_NMS_ROIS_INFERENCE
    pool_size: int  # POOL_SIZE
    mask_pool_size: int  # MASK_POOL_SIZE
    mask_shape: int  # MASK_SHAPE (2 * mask_pool_size: one stride-2 deconv)
    min_confidence: float  # DETECTION_MIN_CONFIDENCE (0: no filter, as the port's `if`)
    detection_nms_threshold: float  # DETECTION_NMS_THRESHOLD
    max_instances: int  # DETECTION_MAX_INSTANCES
    # The compiled NMS: CPU suppresses at IoU >= thr (nms.c), GPU at IoU > thr.
    nms_suppress_equal: bool
    # torch 0.3's round (C round(): half away from zero) of the detection boxes and pyramid
    # levels; False: half to even (modern torch.round, Keras np.rint).
    round_half_away: bool

    def replace(self, **kwargs) -> MatterportConfig:
        return dataclasses.replace(self, **kwargs)

    @property
    def family(self) -> str:
        return FAMILY

    def to_json(self) -> str:
        return json.dumps(dict(dataclasses.asdict(self), family=FAMILY), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MatterportConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a Matterport config must be a JSON object")
        data.pop("family", None)
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"Matterport config: missing fields {missing}, unknown {unknown}")
        for k, v in data.items():
            if isinstance(v, list):
                data[k] = tuple(v)
        return cls(**data)


def validate(cfg: MatterportConfig) -> None:
    """ValueError naming the first field that cannot work."""
    if cfg.depth not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {cfg.depth}")
    if cfg.num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {cfg.num_classes}")
    if cfg.max_dim % 64:
        raise ValueError(f"max_dim must be a multiple of 64 (the port's check), got {cfg.max_dim}")
    if not 0 < cfg.min_dim <= cfg.max_dim:
        raise ValueError(f"min_dim must be in (0, max_dim], got {cfg.min_dim}")
    n = len(cfg.anchor_strides)
    if n != 5 or len(cfg.anchor_scales) != n:
        raise ValueError("anchor_scales and anchor_strides need one entry per level P2..P6")
    if cfg.anchor_stride != 1:
        raise ValueError("only anchor_stride 1 is supported (the port's COCO setting)")
    if cfg.mask_shape != 2 * cfg.mask_pool_size:
        raise ValueError("mask_shape must be 2 * mask_pool_size (one stride-2 deconv)")
    for f in ("pre_nms_limit", "post_nms_rois", "max_instances", "pool_size", "mask_pool_size"):
        if getattr(cfg, f) < 1:
            raise ValueError(f"{f} must be >= 1, got {getattr(cfg, f)}")


def matterport_maskrcnn_r101_fpn(num_classes: int = 81, depth: int = 101) -> MatterportConfig:
    """The port's COCO inference config (config.py + coco.py's CocoConfig; demo.py)."""
    return MatterportConfig(
        name=f"matterport_maskrcnn_r{depth}_fpn",
        depth=depth,
        num_classes=num_classes,
        base_channels=64,
        fpn_channels=256,
        rpn_channels=512,
        fc_dim=1024,
        mask_channels=256,
        norm_eps=1e-3,
        min_dim=800,
        max_dim=1024,
        mean=(123.7, 116.8, 103.9),
        anchor_scales=(32, 64, 128, 256, 512),
        anchor_ratios=(0.5, 1.0, 2.0),
        anchor_strides=(4, 8, 16, 32, 64),
        anchor_stride=1,
        rpn_bbox_std=(0.1, 0.1, 0.2, 0.2),
        pre_nms_limit=6000,
        rpn_nms_threshold=0.7,
        post_nms_rois=1000,
        pool_size=7,
        mask_pool_size=14,
        mask_shape=28,
        min_confidence=0.7,
        detection_nms_threshold=0.3,
        max_instances=100,
        nms_suppress_equal=True,
        round_half_away=True,
    )


def matterport_maskrcnn_r50_fpn(num_classes: int = 81) -> MatterportConfig:
    return matterport_maskrcnn_r101_fpn(num_classes, depth=50)


PRESETS = {
    "matterport_maskrcnn_r101_fpn": matterport_maskrcnn_r101_fpn,
    "matterport_maskrcnn_r50_fpn": matterport_maskrcnn_r50_fpn,
}
