"""Every number that changes the output, as frozen dataclasses, and per-framework presets.

A converted checkpoint stores its `ModelConfig` (as JSON), so the model it loads into
reproduces the source framework's inference. Read a preset top to bottom to see the whole
graph's settings on one screen.

No field has a default: every preset states every convention it relies on (a test checks
that each preset is complete and that the presets differ only where the frameworks do).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class InputConfig:
    """Host-side preprocessing (jaxmrcnn/preprocess.py)."""

    channel_order: str  # order the network expects: "RGB" or "BGR"
    pixel_scale: float  # uint8 values are divided by this first (255: [0, 1] input)
    # ... then multiplied by this, in float32 (maskrcnn-benchmark's ToTensor then to_bgr255:
    # x / 255 * 255, which is not always x exactly); 1.0 elsewhere
    pixel_rescale: float
    mean: tuple[float, float, float]  # in the network's channel order, after the above
    std: tuple[float, float, float]
    min_size: int  # shortest side after resizing ...
    max_size: int  # ... unless the longest side would exceed this
    # How the output size is computed (see preprocess.resized_size): "torchvision" (floor),
    # "detectron2" (int(x + 0.5) after capping), "maskrcnn_benchmark" (round, then floor),
    # "mmdet" (int(x * scale + 0.5)).
    resize_rule: str
    # Which library's interpolation resizes the pixels, and when: "torch_bilinear" (float
    # image after normalizing, torchvision), "pillow_bilinear" (uint8 before normalizing,
    # Detectron2 / maskrcnn-benchmark), "opencv_linear" (uint8 before normalizing, mmdet).
    resize_impl: str
    size_divisible: int  # padded canvas is a multiple of this


@dataclass(frozen=True)
class BackboneConfig:
    depth: int  # 50, 101 or 152 (26: two blocks per stage, for small trained-here models)
    # Stem output channels; stage i has base_channels * 2**i planes (x4 out). 64 in every
    # framework's ResNet; the shipped shapes model (jaxmrcnn/weights) uses 16.
    base_channels: int
    groups: int  # ResNeXt cardinality
    width_per_group: int
    stride_in_1x1: bool  # True for MSRA/caffe weights; torchvision puts it on the 3x3
    norm: str  # "frozen_bn" (x - mean) / sqrt(var + eps) * w + b, or "affine"
    norm_eps: float  # torchvision COCO v1 weights: 0.0; BatchNorm2d / Detectron2: 1e-5


@dataclass(frozen=True)
class FPNConfig:
    out_channels: int
    norm: str | None  # None: convs with bias; "bn": conv + BatchNorm (torchvision v2)
    norm_eps: float


@dataclass(frozen=True)
class AnchorConfig:
    sizes: tuple[int, ...]  # one per level P2..P6
    aspect_ratios: tuple[float, ...]  # h / w
    flavour: str  # "torchvision" (rounded) | "detectron2" (unrounded) | "legacy" (+1)
    offset: float  # grid points at (i + offset) * stride
    # "torchvision": stride = padded image size // feature size (e.g. 61 on P6 of 800 px);
    # "nominal": 4, 8, 16, 32, 64.
    stride_rule: str


@dataclass(frozen=True)
class RPNConfig:
    num_convs: int  # shared 3x3 convs before the two 1x1 predictors
    pre_nms_top_n: int  # per level, at test time
    post_nms_top_n: int  # per image
    nms_thresh: float
    min_size: float  # keep w, h >= min_size (> if min_size_strict)
    min_size_strict: bool  # Detectron2 / mmdet: w > 0 and h > 0
    score_thresh: float  # keep sigmoid(logit) >= score_thresh
    box_weights: tuple[float, float, float, float]
    coder_style: str  # ops.BoxCoder style: "torchvision" | "legacy" (+1) | "mmdet"
    box_plus_one: bool  # legacy +1 sizes in clipping, size filter and NMS IoU
    nms_suppress_equal: bool  # suppress at IoU >= thr (Detectron, maskrcnn-benchmark CPU)
    # Emulate a batched NMS that offsets boxes by class when it gets at most this many boxes
    # (torchvision CPU: 1000; mmcv: 9999), which changes IoUs in the last bits; None: never.
    nms_offset_trick_max_boxes: int | None


@dataclass(frozen=True)
class PoolerConfig:
    box_output_size: int
    mask_output_size: int
    sampling_ratio: int  # 0: adaptive ceil(roi_size / output_size)
    aligned: bool  # half-pixel shift (Detectron2 ROIAlignV2, mmcv)
    level_rule: str  # ops.assign_levels rule
    max_samples: int  # adaptive samples per bin in the main pass (a speed knob, exact anyway)


@dataclass(frozen=True)
class ROIHeadsConfig:
    num_classes: int  # including background
    background_index: int  # torchvision / maskrcnn-benchmark: 0; detectron2 / mmdet: last
    box_head: str  # "2fc" | "4conv1fc"
    box_head_norm: str | None  # "bn" for torchvision v2
    fc_dim: int
    conv_dim: int
    # Box regressor rows: "per_class" (4 per class, background included: torchvision,
    # maskrcnn-benchmark), "per_foreground_class" (Detectron2, mmdet), "agnostic" (4 rows).
    box_reg: str
    box_weights: tuple[float, float, float, float]
    coder_style: str
    box_plus_one: bool  # legacy +1 sizes in clipping, size filter and NMS IoU
    score_thresh: float  # strict >
    nms_thresh: float
    nms_suppress_equal: bool
    detections_per_img: int
    min_box_size: float | None  # torchvision drops w or h < 1e-2 before NMS; None: no filter
    nms_offset_trick_max_boxes: int | None
    # Detectron2's detector_postprocess: after scaling boxes to the original image, clip
    # them to it and drop those with w or h <= 0.
    clip_to_original: bool
    # Boxes back to original pixels: "multiply" by original / resized size (torchvision,
    # Detectron2, maskrcnn-benchmark) or "divide" by the float32 resized / original ratio
    # (mmdet's bboxes /= scale_factor); the last bit can differ.
    rescale: str
    # Order of the returned detections: "score" (descending) or "class" (ascending class
    # index, then score: maskrcnn-benchmark and Detectron concatenate per-class NMS results).
    result_order: str
    mask_head_convs: int
    mask_head_norm: str | None
    norm_eps: float


@dataclass(frozen=True)
class PasteConfig:
    method: str  # "torchvision" (int box + resize) | "detectron2" (grid_sample)
    threshold: float
    strict: bool  # mask = p > threshold (torchvision eval, maskrcnn-benchmark); False: >=
    padding: int  # "torchvision" method: zero border before resizing


@dataclass(frozen=True)
class ModelConfig:
    name: str
    input: InputConfig
    backbone: BackboneConfig
    fpn: FPNConfig
    anchors: AnchorConfig
    rpn: RPNConfig
    pooler: PoolerConfig
    roi_heads: ROIHeadsConfig
    paste: PasteConfig

    def replace(self, **parts) -> ModelConfig:
        """`cfg.replace(input=dict(min_size=512))` or with whole sub-configs."""
        new = {}
        for k, v in parts.items():
            cur = getattr(self, k)
            new[k] = dataclasses.replace(cur, **v) if isinstance(v, dict) else v
        return dataclasses.replace(self, **new)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def validate(self) -> None:
        """See `validate` below: ValueError naming each wrong field."""
        validate(self)

    @staticmethod
    def from_json(text: str, *, fill_from: ModelConfig | None = None) -> ModelConfig:
        """Parses `to_json` output. `fill_from`: a config whose values fill fields the JSON
        lacks (reading files written before those fields existed); else they are an error."""
        base = None if fill_from is None else dataclasses.asdict(fill_from)
        return _from_dict(ModelConfig, json.loads(text), base)


def _from_dict(cls, data: dict, base: dict | None = None):
    if not isinstance(data, dict):
        raise ValueError(f"config for {cls.__name__} must be a JSON object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    if base is not None:
        data = {**{k: v for k, v in base.items() if k not in data}, **data}
    missing = names - set(data)
    if missing:
        raise ValueError(f"{cls.__name__} lacks fields {sorted(missing)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, None if base is None else base.get(name))
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


# ----------------------------------------------------------------------------- validation
# The allowed values of every string-valued field (None: the field may be None). The modules
# that act on them keep the same lists (preprocess.RESIZE_RULES, ops.ANCHOR_FLAVOURS, ...);
# tests/test_load_validation.py checks that the two agree.
CHOICES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("input", "channel_order"): ("RGB", "BGR"),
    ("input", "resize_rule"): ("torchvision", "detectron2", "maskrcnn_benchmark", "mmdet"),
    ("input", "resize_impl"): ("torch_bilinear", "pillow_bilinear", "opencv_linear"),
    ("backbone", "norm"): ("frozen_bn", "affine"),
    ("fpn", "norm"): (None, "bn"),
    ("anchors", "flavour"): ("torchvision", "detectron2", "mmdet", "legacy"),
    ("anchors", "stride_rule"): ("torchvision", "nominal"),
    ("rpn", "coder_style"): ("torchvision", "legacy", "mmdet"),
    ("pooler", "level_rule"): ("torchvision", "detectron2", "legacy", "mmdet"),
    ("roi_heads", "box_head"): ("2fc", "4conv1fc"),
    ("roi_heads", "box_head_norm"): (None, "bn"),
    ("roi_heads", "box_reg"): ("per_class", "per_foreground_class", "agnostic"),
    ("roi_heads", "coder_style"): ("torchvision", "legacy", "mmdet"),
    ("roi_heads", "rescale"): ("multiply", "divide"),
    ("roi_heads", "result_order"): ("score", "class"),
    ("roi_heads", "mask_head_norm"): (None, "bn"),
    ("paste", "method"): ("torchvision", "detectron2"),
}
FREE_TEXT = {("", "name")}  # string fields with any value


def validate(cfg: ModelConfig) -> None:
    """Raises ValueError naming every field (the first few) whose type or value this
    jaxmrcnn cannot run: each field has its annotated type (ints where ints are declared,
    tuples of the declared length, bools as bools), each string field one of CHOICES, and
    the numbers are in range (sizes positive, thresholds in [0, 1], background first or
    last)."""
    problems = _type_problems(ModelConfig, cfg, "")
    if not problems:  # values are checked only once every type is right
        problems = _value_problems(cfg)
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError("invalid model config: " + "; ".join(problems[:8]) + more)


def _type_problems(cls, obj, where: str) -> list[str]:
    if not isinstance(obj, cls):
        return [f"{where or 'config'} must be a {cls.__name__}, got {type(obj).__name__}"]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        value = getattr(obj, f.name)
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _type_problems(hint, value, name)
        elif not _has_type(value, hint):
            out.append(f"{name} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})")
        elif isinstance(value, str) and (where, f.name) not in FREE_TEXT:
            allowed = CHOICES[(where, f.name)]
            if value not in allowed:
                out.append(f"{name} must be one of {list(allowed)}, got {value!r}")
    return out


def _has_type(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON may hold a whole float as an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(
            _has_type(v, a) for v, a in zip(value, args, strict=True))
    raise TypeError(f"config.validate does not know the type {hint!r}")  # a new field's type


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        plural = {int: "integers", float: "numbers"}.get(args[0], str(args[0]))
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural}"
        return f"a list of {len(args)} {plural}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint))


def _value_problems(cfg: ModelConfig) -> list[str]:
    i, b, a, r, p, h, m = (cfg.input, cfg.backbone, cfg.anchors, cfg.rpn, cfg.pooler,
                           cfg.roi_heads, cfg.paste)
    checks = [
        (i.pixel_scale > 0 and i.pixel_rescale > 0,
         "input.pixel_scale and pixel_rescale must be > 0"),
        (all(s > 0 for s in i.std), "input.std must be > 0"),
        (0 < i.min_size <= i.max_size, "input needs 0 < min_size <= max_size"),
        (i.size_divisible > 0, "input.size_divisible must be > 0"),
        (b.depth in (26, 50, 101, 152),
         f"backbone.depth must be 26, 50, 101 or 152, got {b.depth}"),
        (b.base_channels >= 1, "backbone.base_channels must be >= 1"),
        (b.groups >= 1 and b.width_per_group >= 1,
         "backbone.groups and width_per_group must be >= 1"),
        (b.norm_eps >= 0, "backbone.norm_eps must be >= 0"),
        (cfg.fpn.out_channels > 0 and cfg.fpn.norm_eps >= 0,
         "fpn.out_channels must be > 0, norm_eps >= 0"),
        (len(a.sizes) == 5 and all(s > 0 for s in a.sizes),
         f"anchors.sizes must be 5 positive sizes (P2..P6), got {a.sizes}"),
        (len(a.aspect_ratios) > 0 and all(x > 0 for x in a.aspect_ratios),
         "anchors.aspect_ratios must be positive"),
        (r.num_convs >= 1 and r.pre_nms_top_n > 0 and r.post_nms_top_n > 0,
         "rpn.num_convs, pre_nms_top_n and post_nms_top_n must be > 0"),
        (0 <= r.nms_thresh <= 1, "rpn.nms_thresh must be in [0, 1]"),
        (all(w > 0 for w in r.box_weights), "rpn.box_weights must be > 0"),
        (p.box_output_size > 0 and p.mask_output_size > 0 and p.sampling_ratio >= 0
         and p.max_samples > 0, "pooler sizes must be > 0 and sampling_ratio >= 0"),
        (h.num_classes >= 2, f"roi_heads.num_classes must be >= 2 (background included), got "
         f"{h.num_classes}"),
        (h.background_index in (0, h.num_classes - 1),
         f"roi_heads.background_index must be 0 or num_classes - 1, got {h.background_index}"),
        (h.fc_dim > 0 and h.conv_dim > 0 and h.detections_per_img > 0 and h.mask_head_convs >= 0,
         "roi_heads.fc_dim, conv_dim and detections_per_img must be > 0"),
        (all(w > 0 for w in h.box_weights), "roi_heads.box_weights must be > 0"),
        (0 <= h.nms_thresh <= 1, "roi_heads.nms_thresh must be in [0, 1]"),
        (0 <= m.threshold <= 1 and m.padding >= 0,
         "paste.threshold must be in [0, 1], padding >= 0"),
    ]
    return [msg for ok, msg in checks if not ok]


# ----------------------------------------------------------------------------- presets
# Each preset states every field. Values cite the framework's own source in CONVENTIONS.md
# terms; tests/test_presets.py checks them against the real frameworks' configs.

COCO_SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)
CAFFE_BGR_MEAN = (103.530, 116.280, 123.675)  # Detectron2 / mmdet caffe-style, BGR order
X101_32X8D_BGR_STD = (57.375, 57.120, 58.395)  # Detectron2's X-101-32x8d, BGR order


def torchvision_maskrcnn_r50_fpn(num_classes: int = 91, *, bn_eps: float = 0.0) -> ModelConfig:
    """torchvision `maskrcnn_resnet50_fpn` (v1). The COCO_V1 weights use FrozenBatchNorm2d
    with eps = 0 (the builder calls overwrite_eps(model, 0.0))."""
    return ModelConfig(
        name="torchvision_maskrcnn_r50_fpn",
        input=InputConfig(
            channel_order="RGB", pixel_scale=255.0, pixel_rescale=1.0, mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225), min_size=800, max_size=1333,
            resize_rule="torchvision", resize_impl="torch_bilinear", size_divisible=32,
        ),
        backbone=BackboneConfig(
            depth=50, base_channels=64, groups=1, width_per_group=64, stride_in_1x1=False,
            norm="frozen_bn", norm_eps=bn_eps,
        ),
        fpn=FPNConfig(out_channels=256, norm=None, norm_eps=1e-5),
        anchors=AnchorConfig(
            sizes=COCO_SIZES, aspect_ratios=RATIOS, flavour="torchvision", offset=0.0,
            stride_rule="torchvision",
        ),
        rpn=RPNConfig(
            num_convs=1, pre_nms_top_n=1000, post_nms_top_n=1000, nms_thresh=0.7,
            min_size=1e-3, min_size_strict=False, score_thresh=0.0,
            box_weights=(1.0, 1.0, 1.0, 1.0), coder_style="torchvision", box_plus_one=False,
            nms_suppress_equal=False, nms_offset_trick_max_boxes=1000,
        ),
        pooler=PoolerConfig(
            box_output_size=7, mask_output_size=14, sampling_ratio=2, aligned=False,
            level_rule="torchvision", max_samples=4,
        ),
        roi_heads=ROIHeadsConfig(
            num_classes=num_classes, background_index=0, box_head="2fc", box_head_norm=None,
            fc_dim=1024, conv_dim=256, box_reg="per_class", box_weights=(10.0, 10.0, 5.0, 5.0),
            coder_style="torchvision", box_plus_one=False, score_thresh=0.05, nms_thresh=0.5,
            nms_suppress_equal=False, detections_per_img=100, min_box_size=1e-2,
            nms_offset_trick_max_boxes=1000, clip_to_original=False, rescale="multiply",
            result_order="score",
            mask_head_convs=4, mask_head_norm=None, norm_eps=1e-5,
        ),
        paste=PasteConfig(method="torchvision", threshold=0.5, strict=True, padding=1),
    )


def torchvision_maskrcnn_r50_fpn_v2(num_classes: int = 91) -> ModelConfig:
    """torchvision `maskrcnn_resnet50_fpn_v2`: BatchNorm (eps 1e-5) in the backbone, FPN,
    box head (4conv1fc) and mask head; a two-conv RPN head. Otherwise as v1."""
    v1 = torchvision_maskrcnn_r50_fpn(num_classes, bn_eps=1e-5)
    return v1.replace(
        name="torchvision_maskrcnn_r50_fpn_v2",
        fpn=dict(norm="bn", norm_eps=1e-5),
        rpn=dict(num_convs=2),
        roi_heads=dict(box_head="4conv1fc", box_head_norm="bn", mask_head_norm="bn"),
    )


def detectron2_mask_rcnn(
    depth: int = 50, groups: int = 1, width_per_group: int = 64, num_classes: int = 81
) -> ModelConfig:
    """Detectron2 `mask_rcnn_{R_50,R_101,X_101_32x8d}_FPN_{1x,3x}` (configs/Base-RCNN-FPN.yaml
    + config/defaults.py): BGR 0-255 input with the caffe mean (X-101-32x8d adds its pixel
    std), ResizeShortestEdge (int(x + 0.5), PIL bilinear), MSRA ResNet (stride in the 1x1,
    except ResNeXt) with FrozenBN eps 1e-5, unrounded anchors on nominal strides, RPN boxes
    kept if w, h > 0, ROIAlignV2 (aligned, adaptive sampling), background last with a
    regressor per foreground class, boxes clipped to the original image, grid_sample paste
    thresholded at >= 0.5."""
    resnext = groups > 1
    arch = f"R_{depth}" if not resnext else f"X_{depth}_{groups}x{width_per_group}d"
    return ModelConfig(
        name=f"detectron2_mask_rcnn_{arch}_FPN",
        input=InputConfig(
            channel_order="BGR", pixel_scale=1.0, pixel_rescale=1.0, mean=CAFFE_BGR_MEAN,
            std=X101_32X8D_BGR_STD if resnext else (1.0, 1.0, 1.0), min_size=800,
            max_size=1333, resize_rule="detectron2", resize_impl="pillow_bilinear",
            size_divisible=32,
        ),
        backbone=BackboneConfig(
            depth=depth, base_channels=64, groups=groups, width_per_group=width_per_group,
            stride_in_1x1=not resnext, norm="frozen_bn", norm_eps=1e-5,
        ),
        fpn=FPNConfig(out_channels=256, norm=None, norm_eps=1e-5),
        anchors=AnchorConfig(
            sizes=COCO_SIZES, aspect_ratios=RATIOS, flavour="detectron2", offset=0.0,
            stride_rule="nominal",
        ),
        rpn=RPNConfig(
            num_convs=1, pre_nms_top_n=1000, post_nms_top_n=1000, nms_thresh=0.7,
            min_size=0.0, min_size_strict=True, score_thresh=0.0,
            box_weights=(1.0, 1.0, 1.0, 1.0), coder_style="torchvision", box_plus_one=False,
            nms_suppress_equal=False, nms_offset_trick_max_boxes=1000,
        ),
        pooler=PoolerConfig(
            box_output_size=7, mask_output_size=14, sampling_ratio=0, aligned=True,
            level_rule="detectron2", max_samples=4,
        ),
        roi_heads=ROIHeadsConfig(
            num_classes=num_classes, background_index=num_classes - 1, box_head="2fc",
            box_head_norm=None, fc_dim=1024, conv_dim=256, box_reg="per_foreground_class",
            box_weights=(10.0, 10.0, 5.0, 5.0), coder_style="torchvision", box_plus_one=False,
            score_thresh=0.05, nms_thresh=0.5, nms_suppress_equal=False, detections_per_img=100,
            min_box_size=None, nms_offset_trick_max_boxes=1000, clip_to_original=True,
            rescale="multiply", result_order="score", mask_head_convs=4, mask_head_norm=None,
            norm_eps=1e-5,
        ),
        paste=PasteConfig(method="detectron2", threshold=0.5, strict=False, padding=0),
    )


DETECTRON_BGR_MEAN = (102.9801, 115.9465, 122.7717)  # Detectron / maskrcnn-benchmark, BGR


def maskrcnn_benchmark_mask_rcnn(
    depth: int = 50, groups: int = 1, width_per_group: int = 64, num_classes: int = 81
) -> ModelConfig:
    """maskrcnn-benchmark `e2e_mask_rcnn_{R_50,R_101,X_101_32x8d}_FPN_1x` (its configs +
    config/defaults.py), as its COCO evaluation runs it: PIL RGB -> Resize (round, then
    floor) -> ToTensor -> BGR x 255 -> minus the Detectron mean; MSRA ResNet (stride in the
    1x1, except ResNeXt) with FrozenBatchNorm without epsilon; the legacy +1 box convention
    everywhere (anchors, coder, clipping to W - 1, level mapping, NMS IoU); ROIAlign v1
    (sampling 2); background first, per-class NMS loop, results ordered by class; Masker
    paste (padding 1, > 0.5)."""
    resnext = groups > 1
    arch = f"R_{depth}" if not resnext else f"X_{depth}_{groups}x{width_per_group}d"
    return ModelConfig(
        name=f"maskrcnn_benchmark_e2e_mask_rcnn_{arch}_FPN",
        input=InputConfig(
            channel_order="BGR", pixel_scale=255.0, pixel_rescale=255.0,
            mean=DETECTRON_BGR_MEAN, std=(1.0, 1.0, 1.0), min_size=800, max_size=1333,
            resize_rule="maskrcnn_benchmark", resize_impl="pillow_bilinear", size_divisible=32,
        ),
        backbone=BackboneConfig(
            depth=depth, base_channels=64, groups=groups, width_per_group=width_per_group,
            stride_in_1x1=not resnext, norm="frozen_bn", norm_eps=0.0,
        ),
        fpn=FPNConfig(out_channels=256, norm=None, norm_eps=1e-5),
        anchors=AnchorConfig(
            sizes=COCO_SIZES, aspect_ratios=RATIOS, flavour="legacy", offset=0.0,
            stride_rule="nominal",
        ),
        rpn=RPNConfig(
            num_convs=1, pre_nms_top_n=1000, post_nms_top_n=1000, nms_thresh=0.7,
            min_size=0.0, min_size_strict=False, score_thresh=0.0,
            box_weights=(1.0, 1.0, 1.0, 1.0), coder_style="legacy", box_plus_one=True,
            nms_suppress_equal=True, nms_offset_trick_max_boxes=None,
        ),
        pooler=PoolerConfig(
            box_output_size=7, mask_output_size=14, sampling_ratio=2, aligned=False,
            level_rule="legacy", max_samples=4,
        ),
        roi_heads=ROIHeadsConfig(
            num_classes=num_classes, background_index=0, box_head="2fc", box_head_norm=None,
            fc_dim=1024, conv_dim=256, box_reg="per_class", box_weights=(10.0, 10.0, 5.0, 5.0),
            coder_style="legacy", box_plus_one=True, score_thresh=0.05, nms_thresh=0.5,
            nms_suppress_equal=True, detections_per_img=100, min_box_size=None,
            nms_offset_trick_max_boxes=None, clip_to_original=False, rescale="multiply",
            result_order="class",
            mask_head_convs=4, mask_head_norm=None, norm_eps=1e-5,
        ),
        paste=PasteConfig(method="torchvision", threshold=0.5, strict=True, padding=1),
    )


def detectron_mask_rcnn(
    depth: int = 50, groups: int = 1, width_per_group: int = 64, num_classes: int = 81
) -> ModelConfig:
    """Detectron (Caffe2) `e2e_mask_rcnn_{R-50,R-101,X-101-32x8d}-FPN_1x` weights as
    maskrcnn-benchmark runs them (its configs/caffe2/*_caffe2.yaml, the faithful way to run
    Detectron weights in PyTorch): maskrcnn-benchmark's inference with AffineChannel norms
    (y = x * s + b, the `*_bn_s` / `*_bn_b` blobs, no running statistics)."""
    mb = maskrcnn_benchmark_mask_rcnn(depth, groups, width_per_group, num_classes)
    resnext = groups > 1
    arch = f"R-{depth}" if not resnext else f"X-{depth}-{groups}x{width_per_group}d"
    return mb.replace(name=f"detectron_e2e_mask_rcnn_{arch}-FPN", backbone=dict(norm="affine"))


MMDET_RGB_MEAN = (123.675, 116.28, 103.53)  # mmdet pytorch style, RGB
MMDET_RGB_STD = (58.395, 57.12, 57.375)


def mmdet_mask_rcnn(
    depth: int = 50, groups: int = 1, width_per_group: int = 64, num_classes: int = 81,
    style: str = "pytorch",
) -> ModelConfig:
    """mmdetection (v2 and v3) `mask-rcnn_{r50,r101,x101-32x4d,x101-64x4d}_fpn_1x_coco` and the
    caffe-style `mask-rcnn_r50-caffe_fpn_1x_coco` (configs/_base_/models/mask-rcnn_r50_fpn.py,
    _base_/datasets/coco_instance.py): cv2 BGR image -> Resize keep_ratio (int(x + 0.5), cv2
    bilinear) -> RGB (pytorch style) -> (x - mean) / std; ResNet/ResNeXt with BatchNorm (eval,
    eps 1e-5), stride in the 3x3 (pytorch) or 1x1 (caffe); unrounded float32 anchors; RPN keeps
    w, h > 0, mmcv's batched NMS (offsets below 10000 boxes); DeltaXYWHBBoxCoder (stds, clamp
    both sides); RoIAlign aligned with adaptive sampling, levels by finest scale 56;
    background last, 4 rows per foreground class; boxes divided by the scale factor;
    grid_sample paste thresholded at >= 0.5."""
    if style not in ("pytorch", "caffe"):
        raise ValueError(f"mmdet ResNet style must be 'pytorch' or 'caffe', got {style!r}")
    caffe = style == "caffe"
    resnext = groups > 1
    arch = f"r{depth}" if not resnext else f"x{depth}-{groups}x{width_per_group}d"
    return ModelConfig(
        name=f"mmdet_mask-rcnn_{arch}{'-caffe' if caffe else ''}_fpn",
        input=InputConfig(
            channel_order="BGR" if caffe else "RGB", pixel_scale=1.0, pixel_rescale=1.0,
            mean=CAFFE_BGR_MEAN if caffe else MMDET_RGB_MEAN,
            std=(1.0, 1.0, 1.0) if caffe else MMDET_RGB_STD, min_size=800, max_size=1333,
            resize_rule="mmdet", resize_impl="opencv_linear", size_divisible=32,
        ),
        backbone=BackboneConfig(
            depth=depth, base_channels=64, groups=groups, width_per_group=width_per_group,
            stride_in_1x1=caffe, norm="frozen_bn", norm_eps=1e-5,
        ),
        fpn=FPNConfig(out_channels=256, norm=None, norm_eps=1e-5),
        anchors=AnchorConfig(
            sizes=COCO_SIZES, aspect_ratios=RATIOS, flavour="mmdet", offset=0.0,
            stride_rule="nominal",
        ),
        rpn=RPNConfig(
            num_convs=1, pre_nms_top_n=1000, post_nms_top_n=1000, nms_thresh=0.7,
            min_size=0.0, min_size_strict=True, score_thresh=0.0,
            box_weights=(1.0, 1.0, 1.0, 1.0), coder_style="mmdet", box_plus_one=False,
            nms_suppress_equal=False, nms_offset_trick_max_boxes=9999,
        ),
        pooler=PoolerConfig(
            box_output_size=7, mask_output_size=14, sampling_ratio=0, aligned=True,
            level_rule="mmdet", max_samples=4,
        ),
        roi_heads=ROIHeadsConfig(
            num_classes=num_classes, background_index=num_classes - 1, box_head="2fc",
            box_head_norm=None, fc_dim=1024, conv_dim=256, box_reg="per_foreground_class",
            box_weights=(10.0, 10.0, 5.0, 5.0), coder_style="mmdet", box_plus_one=False,
            score_thresh=0.05, nms_thresh=0.5, nms_suppress_equal=False, detections_per_img=100,
            min_box_size=None, nms_offset_trick_max_boxes=9999, clip_to_original=False,
            rescale="divide", result_order="score", mask_head_convs=4, mask_head_norm=None,
            norm_eps=1e-5,
        ),
        paste=PasteConfig(method="detectron2", threshold=0.5, strict=False, padding=0),
    )


PRESETS = {
    "torchvision_maskrcnn_r50_fpn": torchvision_maskrcnn_r50_fpn,
    "torchvision_maskrcnn_r50_fpn_v2": torchvision_maskrcnn_r50_fpn_v2,
    # Detectron2 model zoo names (1x and 3x differ only in training length).
    "detectron2/mask_rcnn_R_50_FPN_1x": lambda num_classes=81: detectron2_mask_rcnn(
        50, num_classes=num_classes),
    "detectron2/mask_rcnn_R_50_FPN_3x": lambda num_classes=81: detectron2_mask_rcnn(
        50, num_classes=num_classes),
    "detectron2/mask_rcnn_R_101_FPN_3x": lambda num_classes=81: detectron2_mask_rcnn(
        101, num_classes=num_classes),
    "detectron2/mask_rcnn_X_101_32x8d_FPN_3x": lambda num_classes=81: detectron2_mask_rcnn(
        101, 32, 8, num_classes=num_classes),
    # maskrcnn-benchmark MODEL_ZOO names.
    "maskrcnn_benchmark/e2e_mask_rcnn_R_50_FPN_1x": lambda num_classes=81: (
        maskrcnn_benchmark_mask_rcnn(50, num_classes=num_classes)),
    "maskrcnn_benchmark/e2e_mask_rcnn_R_101_FPN_1x": lambda num_classes=81: (
        maskrcnn_benchmark_mask_rcnn(101, num_classes=num_classes)),
    "maskrcnn_benchmark/e2e_mask_rcnn_X_101_32x8d_FPN_1x": lambda num_classes=81: (
        maskrcnn_benchmark_mask_rcnn(101, 32, 8, num_classes=num_classes)),
    # Detectron (Caffe2) model zoo names.
    "detectron/e2e_mask_rcnn_R-50-FPN_1x": lambda num_classes=81: detectron_mask_rcnn(
        50, num_classes=num_classes),
    "detectron/e2e_mask_rcnn_R-101-FPN_1x": lambda num_classes=81: detectron_mask_rcnn(
        101, num_classes=num_classes),
    "detectron/e2e_mask_rcnn_X-101-32x8d-FPN_1x": lambda num_classes=81: detectron_mask_rcnn(
        101, 32, 8, num_classes=num_classes),
    # mmdetection config names (v2 and v3 zoo files hold the same weights).
    "mmdet/mask-rcnn_r50_fpn_1x_coco": lambda num_classes=81: mmdet_mask_rcnn(
        50, num_classes=num_classes),
    "mmdet/mask-rcnn_r50-caffe_fpn_1x_coco": lambda num_classes=81: mmdet_mask_rcnn(
        50, num_classes=num_classes, style="caffe"),
    "mmdet/mask-rcnn_r101_fpn_1x_coco": lambda num_classes=81: mmdet_mask_rcnn(
        101, num_classes=num_classes),
    "mmdet/mask-rcnn_x101-32x4d_fpn_1x_coco": lambda num_classes=81: mmdet_mask_rcnn(
        101, 32, 4, num_classes=num_classes),
    "mmdet/mask-rcnn_x101-64x4d_fpn_1x_coco": lambda num_classes=81: mmdet_mask_rcnn(
        101, 64, 4, num_classes=num_classes),
}
