"""Detectron (Caffe2) Mask R-CNN checkpoints -> jaxmrcnn params + config.

Files: the `.pkl` that Detectron's `save_model_to_weights_file` writes, `{'blobs': {name:
ndarray}, 'cfg': <yaml text>}` (Detectron detectron/utils/net.py:136-169), or a bare blob dict.
Besides the parameters the blobs hold a `<param>_momentum` per trainable parameter (dropped, as
maskrcnn-benchmark drops them, utils/c2_model_loading.py:120-121) and the ImageNet
initialisation's blobs the detection net never used, which Detectron preserves and saves
again (net.py:119-133,159-167): the classifier `fc1000_{w,b}` (`pred_{w,b}` in X-101 files;
ignored as maskrcnn-benchmark ignores them, c2_model_loading.py:89-90) and `conv1_b` (the stem
conv is built with no_bias=1, Detectron detectron/modeling/ResNet.py:252, and the bias never
reaches maskrcnn-benchmark's bias-free stem either). Every other blob must be consumed.

Architectures: `e2e_mask_rcnn_{R-50,R-101,X-101-32x8d}-FPN_1x`, run as maskrcnn-benchmark runs
them (configs/caffe2/*_caffe2.yaml; jaxmrcnn.config.detectron_mask_rcnn). Depth from the
block counts, groups and width from `res2_0_branch2b_w`; stride in the 1x1 for ResNet, in the
3x3 for ResNeXt (Detectron's RESNETS.STRIDE_1X1, which the file does not record).

Blob layout (Detectron name -> ours; the renaming maskrcnn-benchmark applies is in
utils/c2_model_loading.py): `conv1_w`, `res_conv1_bn_{s,b}` -> backbone conv1/bn1;
`res{2..5}_{b}_branch2{a,b,c}_w` + `_bn_{s,b}` -> layer{1..4}_{b} conv{1,2,3}/bn{1,2,3};
`res{s}_0_branch1_w` + `_bn_{s,b}` -> the shortcut. AffineChannel `_bn_s` / `_bn_b` (y = x * s
+ b, no statistics) -> our affine FrozenNorm weight / bias. FPN blobs are named after the last
block of each stage (R50 `res2_2, res3_3, res4_5, res5_2`, R101 `res4_22`): the top lateral
`fpn_inner_res5_2_sum_{w,b}`, the others `fpn_inner_res{4,3,2}_{last}_sum_lateral_{w,b}`,
outputs `fpn_res{5..2}_{last}_sum_{w,b}`. RPN `conv_rpn_fpn2`, `rpn_cls_logits_fpn2`,
`rpn_bbox_pred_fpn2` (shared by all levels). Box head `fc6` (over the C-major (256, 7, 7)
flatten), `fc7`, `cls_score` (K rows, background 0), `bbox_pred` (4K rows). Mask head
`_[mask]_fcn{1..4}`, `conv5_mask` (ConvTranspose, (in, out, kh, kw)), `mask_fcn_logits` (K
channels). Weights are Caffe2 NCHW/OIHW, FC (out, in).
"""

from __future__ import annotations

import re

from jaxmrcnn.classes import coco80_classes, generic_classes
from jaxmrcnn.config import ModelConfig, detectron_mask_rcnn
from jaxmrcnn.converters.common import (
    BLOCKS_PER_DEPTH,
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
    groups_and_width,
    linear,
    linear_from_chw,
    same,
)

NAME = "detectron"
_BLOCK = re.compile(r"res(\d)_(\d+)_branch")
# Block counts per stage (res2..res5) this converter has a preset for.
_BLOCKS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}
_IMAGENET_LEFTOVERS = ("fc1000_w", "fc1000_b", "pred_w", "pred_b", "conv1_b")
_CFG_KEYS = ("CONV_BODY", "NUM_CLASSES", "STRIDE_1X1", "NUM_GROUPS", "WIDTH_PER_GROUP")


def detect(sd: dict) -> bool:
    return "conv1_w" in sd or "res_conv1_bn_s" in sd or any(
        k.startswith("res2_0_branch2a") for k in sd
    )


def read_arch(sd: dict) -> dict:
    for key in ("conv1_w", "res2_0_branch2b_w", "cls_score_w"):
        if key not in sd:
            raise ConversionError(f"not a Detectron Mask R-CNN blob dict: no {key}")
    if "mask_fcn_logits_w" not in sd:
        raise ConversionError(
            "this Detectron checkpoint has no mask head (mask_fcn_logits_w): it is a Faster "
            "R-CNN (or another model), not a Mask R-CNN"
        )
    if "fc6_w" not in sd:
        raise ConversionError("only the FPN box head (fc6/fc7) is supported; this checkpoint has "
                              "another Detectron box head (C4 res5 or Xconv1fc)")
    if "conv_rpn_fpn2_w" not in sd:
        raise ConversionError("only FPN models are supported; this checkpoint has no FPN RPN "
                              "(conv_rpn_fpn2_w): a C4 or RetinaNet model")
    if any(k.endswith(("_gn_s", "_gn_b")) for k in sd):
        raise ConversionError("GroupNorm Detectron models (*_gn_s / *_gn_b blobs) are not "
                              "supported")
    blocks = block_counts(sd, _BLOCK)
    if blocks not in _BLOCKS:
        raise ConversionError(
            f"unsupported Detectron ResNet with {blocks} blocks per stage (res2..res5); known: "
            + ", ".join(f"ResNet-{d} {b}" for b, d in _BLOCKS.items())
            + " (ResNet-152 (3, 8, 36, 3), e.g. X-152-32x8d-FPN-IN5k, has no preset)"
        )
    groups, width = groups_and_width(sd["res2_0_branch2b_w"].shape)
    num_classes = int(sd["cls_score_w"].shape[0])
    reg_rows = int(sd["bbox_pred_w"].shape[0]) if "bbox_pred_w" in sd else 4 * num_classes
    if reg_rows != 4 * num_classes:
        raise ConversionError(
            f"box regressor bbox_pred_w has {reg_rows} rows for the {num_classes} classes of "
            f"cls_score_w; only class-specific regression ({4 * num_classes} rows) is supported"
        )
    mask_ch = int(sd["mask_fcn_logits_w"].shape[0])
    if mask_ch != num_classes:
        raise ConversionError(
            f"mask_fcn_logits_w has {mask_ch} channels for the {num_classes} classes of "
            f"cls_score_w; only class-specific masks ({num_classes} channels) are supported"
        )
    return dict(depth=_BLOCKS[blocks], groups=groups, width_per_group=width,
                num_classes=num_classes)


def build_config(info: dict, *, arch: str | None = None,
                 bn_eps: float | None = None) -> ModelConfig:
    if bn_eps is not None:
        raise ConversionError("--bn-eps does not apply: Detectron's norms are AffineChannel "
                              "(y = x * s + b), with no statistics and no epsilon")
    return choose_preset(NAME, "Detectron", info, arch, lambda: detectron_mask_rcnn(
        info["depth"], info["groups"], info["width_per_group"], num_classes=info["num_classes"]))


def fpn_stage_blobs(depth: int) -> list[str]:
    """Detectron's FPN input blobs res2..res5, named after each stage's last block
    (FPN.py fpn_level_info_ResNet{50,101}_conv5; maskrcnn-benchmark's _C2_STAGE_NAMES)."""
    blocks = BLOCKS_PER_DEPTH[depth]
    return [f"res{s}_{n - 1}_sum" for s, n in zip(range(2, 6), blocks, strict=True)]


def key_map(info: dict) -> KeyMap:
    m: KeyMap = {}

    def conv(src, dst, bias, fn=conv_hwio):
        m[f"{src}_w"] = (dst + ("kernel",), fn)
        if bias:
            m[f"{src}_b"] = (dst + ("bias",), same)

    def affine(src, dst):
        m[f"{src}_s"] = (dst + ("weight",), same)
        m[f"{src}_b"] = (dst + ("bias",), same)

    conv("conv1", ("backbone", "conv1"), False)
    affine("res_conv1_bn", ("backbone", "bn1"))
    for s, b, dst in bottlenecks(info["depth"]):
        src = f"res{s + 1}_{b}"
        for k, br in enumerate("abc", start=1):
            conv(f"{src}_branch2{br}", dst + (f"conv{k}",), False)
            affine(f"{src}_branch2{br}_bn", dst + (f"bn{k}",))
        if b == 0:
            conv(f"{src}_branch1", dst + ("downsample_conv",), False)
            affine(f"{src}_branch1_bn", dst + ("downsample_bn",))
    stages = fpn_stage_blobs(info["depth"])
    for i, blob in enumerate(stages):  # i = 0 for res2 (C2) .. 3 for res5 (C5)
        lateral = f"fpn_inner_{blob}" + ("" if i == 3 else "_lateral")
        conv(lateral, ("fpn", f"inner_{i}", "conv"), True)
        conv(f"fpn_{blob}", ("fpn", f"layer_{i}", "conv"), True)
    conv("conv_rpn_fpn2", ("rpn_head", "conv_0"), True)
    conv("rpn_cls_logits_fpn2", ("rpn_head", "cls_logits"), True)
    conv("rpn_bbox_pred_fpn2", ("rpn_head", "bbox_pred"), True)
    conv("fc6", ("box_head", "fc6"), True, linear_from_chw(256, 7, 7))
    conv("fc7", ("box_head", "fc7"), True, linear)
    conv("cls_score", ("box_predictor", "cls_score"), True, linear)
    conv("bbox_pred", ("box_predictor", "bbox_pred"), True, linear)
    for i in range(4):
        conv(f"_[mask]_fcn{i + 1}", ("mask_head", f"fcn_{i}", "conv"), True)
    m["conv5_mask_w"] = (("mask_head", "deconv_kernel"), deconv_abio)
    m["conv5_mask_b"] = (("mask_head", "deconv_bias"), same)
    m["mask_fcn_logits_w"] = (("mask_head", "logits_kernel"), conv1x1_io)
    m["mask_fcn_logits_b"] = (("mask_head", "logits_bias"), same)
    return m


def is_momentum(key: str) -> bool:
    return key.endswith("_momentum")


def is_ignorable(key: str) -> bool:
    """SGD momentum blobs and the ImageNet initialisation's unused blobs (module docstring)."""
    return is_momentum(key) or key in _IMAGENET_LEFTOVERS


def cfg_notes(text) -> str:
    """A few entries of the training cfg yaml Detectron stores next to the blobs (informative
    only: the converter reads the architecture off the blobs)."""
    if not isinstance(text, (str, bytes)):
        return ""
    if isinstance(text, bytes):
        text = text.decode("latin1")
    found = []
    for key in _CFG_KEYS:
        match = re.search(rf"^\s*{key}:\s*(\S[^\n]*?)\s*$", text, re.MULTILINE)
        if match:
            found.append(f"{key} {match.group(1)}")
    return ", ".join(found)


def convert(sd: dict, meta: dict | None = None, *, arch: str | None = None,
            bn_eps: float | None = None) -> Converted:
    info = read_arch(sd)
    cfg = build_config(info, arch=arch, bn_eps=bn_eps)
    params = apply_key_map(sd, key_map(info), cfg, ignorable=is_ignorable,
                           what=f"Detectron {cfg.name}")
    k = cfg.roi_heads.num_classes
    names, ids = coco80_classes(0) if k == 81 else generic_classes(k, 0)
    n_momentum = sum(1 for key in sd if is_momentum(key))
    leftovers = [key for key in _IMAGENET_LEFTOVERS if key in sd]
    b = cfg.backbone
    meta = meta or {}
    container = meta.get("container") or "bare blob dict"
    if "cfg" in (meta.get("extra_keys") or []) or meta.get("cfg"):
        container += ", with its training 'cfg'"
    ignored = [f"{n_momentum} *_momentum"] if n_momentum else []
    if leftovers:
        ignored.append("unused ImageNet blobs " + ", ".join(leftovers))
    n_ignored = n_momentum + len(leftovers)
    summary = [
        f"detected format: detectron ({container})",
        f"architecture:    {cfg.name}: {arch_name(b.depth, b.groups, b.width_per_group)}, "
        f"{k - 1} classes + background" + (" (COCO)" if k == 81 else ""),
        f"tensors:         {len(sd) - n_ignored} converted, {n_ignored} ignored"
        + (f" ({'; '.join(ignored)})" if ignored else ""),
    ]
    notes = cfg_notes(meta.get("cfg"))
    if notes:
        summary.append(f"training cfg:    {notes}")
    summary += ["convention       " + line for line in conventions(cfg)]
    return Converted(cfg, params, names, ids, dict(format=NAME, arch=cfg.name), summary)
