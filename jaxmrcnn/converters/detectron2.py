"""Detectron2 Mask R-CNN checkpoints -> jaxmrcnn params + config.

Files: the model zoo's `.pkl` (`{'model': {name: ndarray}, '__author__': ...}`) and the
`.pth` that DetectionCheckpointer saves (`{'model': state_dict, 'optimizer': ...}`); both
arrive here as a flat state dict. Architectures: ResNet-50/101 (MSRA weights, stride in the
1x1) and ResNeXt (stride in the 3x3, X-101-32x8d's pixel std), read off the shapes.

Key layout (D2 name -> ours): `backbone.bottom_up.stem.conv1{,.norm}` -> backbone conv1/bn1;
`backbone.bottom_up.res{2..5}.{b}.conv{k}{,.norm}` and `.shortcut{,.norm}` -> layer{1..4}_{b};
`backbone.fpn_lateral{2..5}` / `fpn_output{2..5}`; `proposal_generator.rpn_head.{conv,
objectness_logits,anchor_deltas}`; `roi_heads.box_head.fc{1,2}`; `roi_heads.box_predictor.
{cls_score (K+1 rows, background last), bbox_pred (4K rows, no background)}`;
`roi_heads.mask_head.{mask_fcn1..4, deconv, predictor (K channels)}`.
"""

from __future__ import annotations

import re

from jaxmrcnn.classes import coco80_classes, generic_classes
from jaxmrcnn.config import ModelConfig, detectron2_mask_rcnn
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

NAME = "detectron2"
_BLOCK = re.compile(r"backbone\.bottom_up\.res(\d)\.(\d+)\.")


def detect(sd: dict) -> bool:
    return any(k.startswith("backbone.bottom_up.") for k in sd)


def read_arch(sd: dict) -> dict:
    for key in ("backbone.bottom_up.stem.conv1.weight", "roi_heads.box_predictor.cls_score.weight",
                "backbone.bottom_up.res2.0.conv2.weight"):
        if key not in sd:
            raise ConversionError(f"not a Detectron2 Mask R-CNN state dict: no {key}")
    if "roi_heads.mask_head.predictor.weight" not in sd:
        raise ConversionError(
            "this Detectron2 checkpoint has no mask head (roi_heads.mask_head.predictor): it is "
            "not a Mask R-CNN (a Faster R-CNN or another meta-architecture)"
        )
    depth = depth_from_blocks(block_counts(sd, _BLOCK), "Detectron2")
    groups, width = groups_and_width(sd["backbone.bottom_up.res2.0.conv2.weight"].shape)
    num_classes = int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0])
    reg_rows = int(sd["roi_heads.box_predictor.bbox_pred.weight"].shape[0])
    if reg_rows == 4:
        raise ConversionError("class-agnostic box regression (CLS_AGNOSTIC_BBOX_REG) is not "
                              "supported yet for Detectron2 checkpoints")
    return dict(depth=depth, groups=groups, width_per_group=width, num_classes=num_classes)


def build_config(
    info: dict, *, arch: str | None = None, bn_eps: float | None = None
) -> ModelConfig:
    cfg = choose_preset(NAME, "Detectron2", info, arch, lambda: detectron2_mask_rcnn(
        info["depth"], info["groups"], info["width_per_group"], num_classes=info["num_classes"]))
    if bn_eps is not None:
        cfg = cfg.replace(backbone=dict(norm_eps=bn_eps))
    return cfg


def key_map(info: dict) -> KeyMap:
    m: KeyMap = {}

    def conv(src, dst, bias, fn=conv_hwio):
        m[f"{src}.weight"] = (dst + ("kernel",), fn)
        if bias:
            m[f"{src}.bias"] = (dst + ("bias",), same)

    def conv_norm(src, dst_conv, dst_norm):
        conv(src, dst_conv, False)
        for k, v in BN_KEYS.items():
            m[f"{src}.norm.{k}"] = (dst_norm + (v,), same)

    body = "backbone.bottom_up"
    conv_norm(f"{body}.stem.conv1", ("backbone", "conv1"), ("backbone", "bn1"))
    for s, b, dst in bottlenecks(info["depth"]):
        src = f"{body}.res{s + 1}.{b}"
        for k in (1, 2, 3):
            conv_norm(f"{src}.conv{k}", dst + (f"conv{k}",), dst + (f"bn{k}",))
        if b == 0:
            conv_norm(f"{src}.shortcut", dst + ("downsample_conv",), dst + ("downsample_bn",))
    for i in range(4):
        conv(f"backbone.fpn_lateral{i + 2}", ("fpn", f"inner_{i}", "conv"), True)
        conv(f"backbone.fpn_output{i + 2}", ("fpn", f"layer_{i}", "conv"), True)
    rpn = "proposal_generator.rpn_head"
    conv(f"{rpn}.conv", ("rpn_head", "conv_0"), True)
    conv(f"{rpn}.objectness_logits", ("rpn_head", "cls_logits"), True)
    conv(f"{rpn}.anchor_deltas", ("rpn_head", "bbox_pred"), True)
    conv("roi_heads.box_head.fc1", ("box_head", "fc6"), True, linear_from_chw(256, 7, 7))
    conv("roi_heads.box_head.fc2", ("box_head", "fc7"), True, linear)
    conv("roi_heads.box_predictor.cls_score", ("box_predictor", "cls_score"), True, linear)
    conv("roi_heads.box_predictor.bbox_pred", ("box_predictor", "bbox_pred"), True, linear)
    for i in range(4):
        conv(f"roi_heads.mask_head.mask_fcn{i + 1}", ("mask_head", f"fcn_{i}", "conv"), True)
    m["roi_heads.mask_head.deconv.weight"] = (("mask_head", "deconv_kernel"), deconv_abio)
    m["roi_heads.mask_head.deconv.bias"] = (("mask_head", "deconv_bias"), same)
    m["roi_heads.mask_head.predictor.weight"] = (("mask_head", "logits_kernel"), conv1x1_io)
    m["roi_heads.mask_head.predictor.bias"] = (("mask_head", "logits_bias"), same)
    return m


def is_ignorable(key: str) -> bool:
    """Buffers Detectron2 itself drops on load: old files' anchor buffers, the pixel
    mean/std (taken from the config) and BatchNorm step counters."""
    return (key.startswith("proposal_generator.anchor_generator.cell_anchors.")
            or key in ("pixel_mean", "pixel_std") or key.endswith("num_batches_tracked"))


def convert(sd: dict, meta: dict | None = None, *, arch: str | None = None,
            bn_eps: float | None = None) -> Converted:
    info = read_arch(sd)
    cfg = build_config(info, arch=arch, bn_eps=bn_eps)
    params = apply_key_map(sd, key_map(info), cfg, ignorable=is_ignorable,
                           what=f"Detectron2 {cfg.name}")
    k = cfg.roi_heads.num_classes
    names, ids = coco80_classes(k - 1) if k == 81 else generic_classes(k, k - 1)
    n_ignored = sum(1 for key in sd if is_ignorable(key))
    b = cfg.backbone
    container = (meta or {}).get("container", "")
    summary = [
        f"detected format: detectron2 ({container or 'state dict'})",
        f"architecture:    {cfg.name}: {arch_name(b.depth, b.groups, b.width_per_group)}, "
        f"{k - 1} classes + background" + (" (COCO)" if k == 81 else ""),
        f"tensors:         {len(sd) - n_ignored} converted, {n_ignored} ignored",
    ] + ["convention       " + line for line in conventions(cfg)]
    return Converted(cfg, params, names, ids, dict(format=NAME, arch=cfg.name), summary)
