"""Every number that changes the output, as frozen dataclasses, and per-framework presets.

A converted checkpoint stores its `ModelConfig` (as JSON), so the model it loads into
reproduces the source framework's inference. Read a preset top to bottom to see the whole
graph's settings on one screen.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InputConfig:
    """Host-side preprocessing (jaxmrcnn/preprocess.py)."""

    channel_order: str = "RGB"  # order the network expects: "RGB" or "BGR"
    pixel_scale: float = 255.0  # uint8 values are divided by this first (255: [0, 1] input)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    min_size: int = 800  # shortest side after resizing ...
    max_size: int = 1333  # ... unless the longest side would exceed this
    resize_rule: str = "torchvision"  # floor(dim * scale), float bilinear after normalizing
    size_divisible: int = 32  # padded canvas is a multiple of this


@dataclass(frozen=True)
class BackboneConfig:
    depth: int = 50  # 50, 101 or 152
    groups: int = 1  # ResNeXt cardinality
    width_per_group: int = 64
    stride_in_1x1: bool = False  # True for MSRA/caffe weights; torchvision puts it on the 3x3
    norm: str = "frozen_bn"  # "frozen_bn" (x - mean) / sqrt(var + eps) * w + b, or "affine"
    norm_eps: float = 0.0  # torchvision COCO v1 weights: 0.0; BatchNorm2d: 1e-5


@dataclass(frozen=True)
class FPNConfig:
    out_channels: int = 256
    norm: str | None = None  # None: convs with bias; "bn": conv + BatchNorm (torchvision v2)
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class AnchorConfig:
    sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # one per level P2..P6
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # h / w
    flavour: str = "torchvision"  # "torchvision" | "detectron2" | "legacy"
    offset: float = 0.0
    # "torchvision": stride = padded image size // feature size (e.g. 61 on P6 of 800 px);
    # "nominal": 4, 8, 16, 32, 64.
    stride_rule: str = "torchvision"


@dataclass(frozen=True)
class RPNConfig:
    num_convs: int = 1  # shared 3x3 convs before the two 1x1 predictors
    pre_nms_top_n: int = 1000  # per level, at test time
    post_nms_top_n: int = 1000  # per image
    nms_thresh: float = 0.7
    min_size: float = 1e-3  # keep w, h >= min_size
    score_thresh: float = 0.0  # keep sigmoid(logit) >= score_thresh
    box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    coder_style: str = "torchvision"
    # Emulate torchvision's CPU batched_nms, which offsets boxes by class when it gets at most
    # 1000 boxes (changes IoUs in the last bits); None disables.
    nms_offset_trick_max_boxes: int | None = 1000


@dataclass(frozen=True)
class PoolerConfig:
    box_output_size: int = 7
    mask_output_size: int = 14
    sampling_ratio: int = 2
    aligned: bool = False
    level_rule: str = "torchvision"
    max_samples: int = 4  # static cap for sampling_ratio = 0 (see ops/roi_align.py)


@dataclass(frozen=True)
class ROIHeadsConfig:
    num_classes: int = 91  # including background
    background_index: int = 0  # torchvision / maskrcnn-benchmark: 0; detectron2 / mmdet: last
    box_head: str = "2fc"  # "2fc" | "4conv1fc"
    box_head_norm: str | None = None  # "bn" for torchvision v2
    fc_dim: int = 1024
    conv_dim: int = 256
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    coder_style: str = "torchvision"
    score_thresh: float = 0.05  # strict >
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_box_size: float = 1e-2  # torchvision drops w or h < 1e-2 before NMS
    nms_offset_trick_max_boxes: int | None = 1000
    mask_head_convs: int = 4
    mask_head_norm: str | None = None
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class PasteConfig:
    method: str = "torchvision"  # "torchvision" | "detectron2"
    threshold: float = 0.5
    strict: bool = True  # mask = p > threshold (torchvision's COCO evaluation); False: >=
    padding: int = 1


@dataclass(frozen=True)
class ModelConfig:
    name: str = "torchvision_maskrcnn_r50_fpn"
    input: InputConfig = field(default_factory=InputConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    pooler: PoolerConfig = field(default_factory=PoolerConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    paste: PasteConfig = field(default_factory=PasteConfig)

    def replace(self, **parts) -> ModelConfig:
        """`cfg.replace(input=dict(min_size=512))` or with whole sub-configs."""
        new = {}
        for k, v in parts.items():
            cur = getattr(self, k)
            new[k] = dataclasses.replace(cur, **v) if isinstance(v, dict) else v
        return dataclasses.replace(self, **new)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ModelConfig:
        return _from_dict(ModelConfig, json.loads(text))


def _from_dict(cls, data: dict):
    if not isinstance(data, dict):
        raise ValueError(f"config for {cls.__name__} must be a JSON object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value)
        elif _is_tuple(hint) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _is_tuple(hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(hint))
    return False


# ----------------------------------------------------------------------------- presets


def torchvision_maskrcnn_r50_fpn(num_classes: int = 91, *, bn_eps: float = 0.0) -> ModelConfig:
    """torchvision `maskrcnn_resnet50_fpn` (v1). The COCO_V1 weights use FrozenBatchNorm2d
    with eps = 0 (the builder calls overwrite_eps(model, 0.0))."""
    return ModelConfig(
        name="torchvision_maskrcnn_r50_fpn",
        backbone=BackboneConfig(depth=50, norm="frozen_bn", norm_eps=bn_eps),
        roi_heads=ROIHeadsConfig(num_classes=num_classes),
    )


def torchvision_maskrcnn_r50_fpn_v2(num_classes: int = 91) -> ModelConfig:
    """torchvision `maskrcnn_resnet50_fpn_v2`: BatchNorm (eps 1e-5) in the backbone, FPN,
    box head (4conv1fc) and mask head; a two-conv RPN head."""
    return ModelConfig(
        name="torchvision_maskrcnn_r50_fpn_v2",
        backbone=BackboneConfig(depth=50, norm="frozen_bn", norm_eps=1e-5),
        fpn=FPNConfig(norm="bn", norm_eps=1e-5),
        rpn=RPNConfig(num_convs=2),
        roi_heads=ROIHeadsConfig(
            num_classes=num_classes,
            box_head="4conv1fc",
            box_head_norm="bn",
            mask_head_norm="bn",
        ),
    )


PRESETS = {
    "torchvision_maskrcnn_r50_fpn": torchvision_maskrcnn_r50_fpn,
    "torchvision_maskrcnn_r50_fpn_v2": torchvision_maskrcnn_r50_fpn_v2,
}
