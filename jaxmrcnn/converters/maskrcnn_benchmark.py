"""maskrcnn-benchmark Mask R-CNN checkpoints -> jaxmrcnn params + config.

Files: `{'model': state_dict, 'optimizer', 'scheduler', 'iteration'}` as its Checkpointer
saves them, with `module.` on every key when trained with DistributedDataParallel (stripped
by the reader, as maskrcnn-benchmark strips it), often in PyTorch's legacy (pre-1.6)
serialization. Architectures: ResNet-50/101 (stride in the 1x1) and ResNeXt-101 32x8d
(stride in the 3x3), read off the shapes.

Key layout (after `module.`): `backbone.body.stem.{conv1,bn1}`, `backbone.body.layer{1..4}.{b}.
{conv,bn}{1,2,3}` + `downsample.{0,1}`; `backbone.fpn.fpn_inner{1..4}` (C2..C5 laterals),
`fpn_layer{1..4}`; `rpn.head.{conv,cls_logits,bbox_pred}` and the anchors it used,
`rpn.anchor_generator.cell_anchors.{0..4}` (checked against ours); `roi_heads.box.
feature_extractor.fc{6,7}`, `roi_heads.box.predictor.{cls_score (K rows, background 0),
bbox_pred (4K rows)}`; `roi_heads.mask.feature_extractor.mask_fcn{1..4}`,
`roi_heads.mask.predictor.{conv5_mask, mask_fcn_logits}`.
"""

from __future__ import annotations

import re

import numpy as np

from jaxmrcnn import ops
from jaxmrcnn.classes import coco80_classes, generic_classes
from jaxmrcnn.config import ModelConfig, maskrcnn_benchmark_mask_rcnn
from jaxmrcnn.converters.common import (
    BN_KEYS,
    ConversionError,
    Converted,
    KeyMap,
    apply_key_map,
    arch_name,
    block_counts,
    bottlenecks,
    choose_preset,
    conv1x1_io,
    conv_hwio,
    conventions,
    deconv_abio,
    depth_from_blocks,
    groups_and_width,
    linear,
    linear_from_chw,
    same,
)
from jaxmrcnn.proposals import level_strides

NAME = "maskrcnn_benchmark"
_BLOCK = re.compile(r"backbone\.body\.layer(\d)\.(\d+)\.")
_ANCHORS = "rpn.anchor_generator.cell_anchors."


def detect(sd: dict) -> bool:
    return "backbone.body.stem.conv1.weight" in sd or any(
        k.startswith("roi_heads.box.feature_extractor.") for k in sd
    )


def read_arch(sd: dict) -> dict:
    for key in ("backbone.body.stem.conv1.weight", "roi_heads.box.predictor.cls_score.weight",
                "backbone.body.layer1.0.conv2.weight"):
        if key not in sd:
            raise ConversionError(f"not a maskrcnn-benchmark Mask R-CNN state dict: no {key}")
    if "roi_heads.mask.predictor.mask_fcn_logits.weight" not in sd:
        raise ConversionError(
            "this maskrcnn-benchmark checkpoint has no mask head (roi_heads.mask.predictor): "
            "it is a Faster R-CNN, not a Mask R-CNN"
        )
    if "roi_heads.box.feature_extractor.fc6.weight" not in sd:
        raise ConversionError("only the FPN box head (fc6/fc7) is supported; this checkpoint "
                              "has another maskrcnn-benchmark box head (C4 or conv)")
    depth = depth_from_blocks(block_counts(sd, _BLOCK), "maskrcnn-benchmark")
    groups, width = groups_and_width(sd["backbone.body.layer1.0.conv2.weight"].shape)
    num_classes = int(sd["roi_heads.box.predictor.cls_score.weight"].shape[0])
    reg_rows = int(sd["roi_heads.box.predictor.bbox_pred.weight"].shape[0])
    if reg_rows != 4 * num_classes:
        raise ConversionError(
            f"box regressor has {reg_rows} rows for {num_classes} classes; only class-specific "
            f"regression ({4 * num_classes} rows) is supported"
        )
    return dict(depth=depth, groups=groups, width_per_group=width, num_classes=num_classes)


def build_config(
    info: dict, *, arch: str | None = None, bn_eps: float | None = None
) -> ModelConfig:
    cfg = choose_preset(
        NAME, "maskrcnn-benchmark", info, arch,
        lambda: maskrcnn_benchmark_mask_rcnn(
            info["depth"], info["groups"], info["width_per_group"],
            num_classes=info["num_classes"],
        ),
    )
    if bn_eps is not None:
        cfg = cfg.replace(backbone=dict(norm_eps=bn_eps))
    return cfg


def key_map(info: dict) -> KeyMap:
    m: KeyMap = {}

    def conv(src, dst, bias, fn=conv_hwio):
        m[f"{src}.weight"] = (dst + ("kernel",), fn)
        if bias:
            m[f"{src}.bias"] = (dst + ("bias",), same)

    def bn(src, dst):
        for k, v in BN_KEYS.items():
            m[f"{src}.{k}"] = (dst + (v,), same)

    body = "backbone.body"
    conv(f"{body}.stem.conv1", ("backbone", "conv1"), False)
    bn(f"{body}.stem.bn1", ("backbone", "bn1"))
    for s, b, dst in bottlenecks(info["depth"]):
        src = f"{body}.layer{s}.{b}"
        for k in (1, 2, 3):
            conv(f"{src}.conv{k}", dst + (f"conv{k}",), False)
            bn(f"{src}.bn{k}", dst + (f"bn{k}",))
        if b == 0:
            conv(f"{src}.downsample.0", dst + ("downsample_conv",), False)
            bn(f"{src}.downsample.1", dst + ("downsample_bn",))
    for i in range(4):
        conv(f"backbone.fpn.fpn_inner{i + 1}", ("fpn", f"inner_{i}", "conv"), True)
        conv(f"backbone.fpn.fpn_layer{i + 1}", ("fpn", f"layer_{i}", "conv"), True)
    conv("rpn.head.conv", ("rpn_head", "conv_0"), True)
    conv("rpn.head.cls_logits", ("rpn_head", "cls_logits"), True)
    conv("rpn.head.bbox_pred", ("rpn_head", "bbox_pred"), True)
    box = "roi_heads.box"
    conv(f"{box}.feature_extractor.fc6", ("box_head", "fc6"), True, linear_from_chw(256, 7, 7))
    conv(f"{box}.feature_extractor.fc7", ("box_head", "fc7"), True, linear)
    conv(f"{box}.predictor.cls_score", ("box_predictor", "cls_score"), True, linear)
    conv(f"{box}.predictor.bbox_pred", ("box_predictor", "bbox_pred"), True, linear)
    mask = "roi_heads.mask"
    for i in range(4):
        conv(f"{mask}.feature_extractor.mask_fcn{i + 1}", ("mask_head", f"fcn_{i}", "conv"), True)
    m[f"{mask}.predictor.conv5_mask.weight"] = (("mask_head", "deconv_kernel"), deconv_abio)
    m[f"{mask}.predictor.conv5_mask.bias"] = (("mask_head", "deconv_bias"), same)
    m[f"{mask}.predictor.mask_fcn_logits.weight"] = (("mask_head", "logits_kernel"), conv1x1_io)
    m[f"{mask}.predictor.mask_fcn_logits.bias"] = (("mask_head", "logits_bias"), same)
    return m


def is_ignorable(key: str) -> bool:
    """The stored anchors (checked separately) and BatchNorm step counters."""
    return key.startswith(_ANCHORS) or key.endswith("num_batches_tracked")


def check_anchors(sd: dict, cfg: ModelConfig) -> int:
    """The checkpoint's own cell anchors must equal the ones the config generates (the
    legacy generate_anchors). Returns how many levels were checked."""
    stored = sorted((k for k in sd if k.startswith(_ANCHORS)), key=lambda k: int(k.split(".")[-1]))
    a = cfg.anchors
    for key, stride, size in zip(stored, level_strides(len(a.sizes)), a.sizes, strict=False):
        ours = ops.cell_anchors(size, a.aspect_ratios, flavour=a.flavour, stride=stride)
        theirs = np.asarray(sd[key], np.float32)
        if theirs.shape != ours.shape or not np.array_equal(theirs, ours):
            raise ConversionError(
                f"{key} holds anchors {theirs.tolist()} but the {cfg.name} preset generates "
                f"{ours.tolist()} for stride {stride}, size {size}: this checkpoint was trained "
                f"with other anchor settings, which are not supported"
            )
    if len(stored) not in (0, len(a.sizes)):
        raise ConversionError(f"{len(stored)} anchor levels stored, expected {len(a.sizes)}")
    return len(stored)


def convert(sd: dict, meta: dict | None = None, *, arch: str | None = None,
            bn_eps: float | None = None) -> Converted:
    info = read_arch(sd)
    cfg = build_config(info, arch=arch, bn_eps=bn_eps)
    params = apply_key_map(sd, key_map(info), cfg, ignorable=is_ignorable,
                           what=f"maskrcnn-benchmark {cfg.name}")
    n_anchor_levels = check_anchors(sd, cfg)
    k = cfg.roi_heads.num_classes
    names, ids = coco80_classes(0) if k == 81 else generic_classes(k, 0)
    n_ignored = sum(1 for key in sd if is_ignorable(key))
    b = cfg.backbone
    meta = meta or {}
    container = meta.get("container") or "state dict"
    if meta.get("module_prefix"):
        container += ", 'module.' prefix stripped"
    summary = [
        f"detected format: maskrcnn_benchmark ({container})",
        f"architecture:    {cfg.name}: {arch_name(b.depth, b.groups, b.width_per_group)}, "
        f"{k - 1} classes + background" + (" (COCO)" if k == 81 else ""),
        f"tensors:         {len(sd) - n_ignored} converted, {n_ignored} ignored"
        + (f" ({n_anchor_levels} stored anchor levels checked)" if n_anchor_levels else ""),
    ] + ["convention       " + line for line in conventions(cfg)]
    return Converted(cfg, params, names, ids, dict(format=NAME, arch=cfg.name), summary)
