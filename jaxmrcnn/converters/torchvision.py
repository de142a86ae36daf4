"""torchvision Mask R-CNN state dict -> jaxmrcnn params + config.

A declarative key map (torchvision name -> our param path + tensor transform), applied
tensor by tensor. Every torchvision key must be consumed and every param produced, with
the shape the Flax model expects; anything else is an error that lists the keys.

Handles `maskrcnn_resnet50_fpn` (v1) and `maskrcnn_resnet50_fpn_v2`, both the old key style
(`fpn.inner_blocks.0.weight`, `mask_head.mask_fcn1.weight`, `rpn.head.conv.weight`) and the
new one (`fpn.inner_blocks.0.0.weight`, `mask_head.0.0.weight`, `rpn.head.conv.0.0.weight`),
also ResNet-101/152 and ResNeXt bodies (depth, groups and width are read off the shapes).
"""

from __future__ import annotations

import re

from jaxmrcnn.classes import generic_classes, torchvision_coco_classes
from jaxmrcnn.config import (
    ModelConfig,
    torchvision_maskrcnn_r50_fpn,
    torchvision_maskrcnn_r50_fpn_v2,
)
from jaxmrcnn.converters.common import (
    BN_KEYS,
    ConversionError,
    Converted,
    Transform,
    apply_key_map,
    arch_name,
    bottlenecks,
    conv1x1_io,
    conv_hwio,
    conventions,
    deconv_abio,
    linear,
    linear_from_chw,
    same,
)

NAME = "torchvision"
__all__ = ["NAME", "ConversionError", "convert", "detect", "key_map", "read_arch"]


def detect(sd: dict) -> bool:
    """torchvision key names: `backbone.body.*` and `roi_heads.box_predictor.*`."""
    return any(k.startswith("backbone.body.") for k in sd) and any(
        k.startswith("roi_heads.box_predictor.") for k in sd
    ) and "backbone.body.stem.conv1.weight" not in sd


def read_arch(sd: dict) -> dict:
    """Reads the architecture off the keys and shapes. Raises ConversionError if the state
    dict is not a torchvision Mask R-CNN."""
    keys = set(sd)
    if (
        "backbone.body.conv1.weight" not in keys
        or "roi_heads.box_predictor.cls_score.weight" not in keys
    ):
        raise ConversionError(
            "not a torchvision Mask R-CNN state dict: expected keys like "
            "'backbone.body.conv1.weight' and 'roi_heads.box_predictor.cls_score.weight'"
        )
    if not any(k.startswith("roi_heads.mask_predictor.") for k in keys):
        raise ConversionError(
            "this torchvision checkpoint has no mask head (roi_heads.mask_predictor.*): it is a "
            "Faster R-CNN, not a Mask R-CNN"
        )
    v2 = "roi_heads.box_head.0.0.weight" in keys
    blocks = []
    for s in range(1, 5):
        pattern = rf"backbone\.body\.layer{s}\.(\d+)\."
        ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
        blocks.append(max(ids) + 1 if ids else 0)
    depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}.get(tuple(blocks))
    if depth is None:
        raise ConversionError(f"unsupported ResNet block counts {tuple(blocks)} (50/101/152 known)")
    c2 = sd["backbone.body.layer1.0.conv2.weight"].shape  # (width, width / groups, 3, 3)
    groups = c2[0] // c2[1]
    width_per_group = c2[0] // groups
    num_classes = int(sd["roi_heads.box_predictor.cls_score.weight"].shape[0])
    has_bn_stats = any(
        k.endswith("num_batches_tracked") for k in keys if k.startswith("backbone.body.")
    )
    return dict(
        v2=v2,
        depth=depth,
        groups=groups,
        width_per_group=width_per_group,
        num_classes=num_classes,
        old_fpn_keys="backbone.fpn.inner_blocks.0.weight" in keys,
        old_rpn_keys="rpn.head.conv.weight" in keys,
        old_mask_keys="roi_heads.mask_head.mask_fcn1.weight" in keys,
        backbone_batchnorm=has_bn_stats,
    )


def build_config(info: dict, *, bn_eps: float | None = None) -> ModelConfig:
    if info["v2"]:
        cfg = torchvision_maskrcnn_r50_fpn_v2(info["num_classes"])
        eps = 1e-5 if bn_eps is None else bn_eps
    else:
        # FrozenBatchNorm2d with eps 0 for the official COCO weights; a backbone saved with
        # BatchNorm2d (num_batches_tracked present) used eps 1e-5.
        eps = (1e-5 if info["backbone_batchnorm"] else 0.0) if bn_eps is None else bn_eps
        cfg = torchvision_maskrcnn_r50_fpn(info["num_classes"], bn_eps=eps)
    name = cfg.name
    if (info["depth"], info["groups"], info["width_per_group"]) != (50, 1, 64):
        arch = f"r{info['depth']}" if info["groups"] == 1 else (
            f"x{info['depth']}_{info['groups']}x{info['width_per_group']}d"
        )
        name = name.replace("r50", arch)
    return cfg.replace(
        name=name,
        backbone=dict(
            depth=info["depth"],
            groups=info["groups"],
            width_per_group=info["width_per_group"],
            norm_eps=eps,
        ),
    )


def key_map(info: dict, sd: dict) -> dict[str, tuple[tuple[str, ...], Transform]]:
    """torchvision key -> (our param path, transform)."""
    m: dict[str, tuple[tuple[str, ...], Transform]] = {}

    def bn(src: str, dst: tuple[str, ...]):
        for k, v in BN_KEYS.items():
            m[f"{src}.{k}"] = (dst + (v,), same)

    def conv(src: str, dst: tuple[str, ...], bias: bool, fn: Transform = conv_hwio):
        m[f"{src}.weight"] = (dst + ("kernel",), fn)
        if bias:
            m[f"{src}.bias"] = (dst + ("bias",), same)

    def conv_block(src: str, old_src: str, dst: tuple[str, ...], old: bool):
        """Conv2dNormActivation `src` ({src}.0 conv, {src}.1 BatchNorm in v2, else a conv
        with bias), or, when `old`, the pre-0.13 key `old_src` of a plain conv."""
        if info["v2"]:
            conv(f"{src}.0", dst + ("conv",), False)
            bn(f"{src}.1", dst + ("bn",))
        else:
            conv(old_src if old else f"{src}.0", dst + ("conv",), True)

    # Backbone body.
    conv("backbone.body.conv1", ("backbone", "conv1"), False)
    bn("backbone.body.bn1", ("backbone", "bn1"))
    for s, b, dst in bottlenecks(info["depth"]):
        src = f"backbone.body.layer{s}.{b}"
        for k in (1, 2, 3):
            conv(f"{src}.conv{k}", dst + (f"conv{k}",), False)
            bn(f"{src}.bn{k}", dst + (f"bn{k}",))
        if b == 0:
            conv(f"{src}.downsample.0", dst + ("downsample_conv",), False)
            bn(f"{src}.downsample.1", dst + ("downsample_bn",))

    # FPN.
    for i in range(4):
        for kind, ours in (("inner_blocks", "inner"), ("layer_blocks", "layer")):
            src = f"backbone.fpn.{kind}.{i}"
            conv_block(src, src, ("fpn", f"{ours}_{i}"), info["old_fpn_keys"])

    # RPN head.
    n_rpn = 2 if info["v2"] else 1
    for i in range(n_rpn):
        src = "rpn.head.conv" if info["old_rpn_keys"] else f"rpn.head.conv.{i}.0"
        conv(src, ("rpn_head", f"conv_{i}"), True)
    conv("rpn.head.cls_logits", ("rpn_head", "cls_logits"), True)
    conv("rpn.head.bbox_pred", ("rpn_head", "bbox_pred"), True)

    # Box head + predictor.
    if info["v2"]:
        for i in range(4):
            conv(f"roi_heads.box_head.{i}.0", ("box_head", f"conv_{i}", "conv"), False)
            bn(f"roi_heads.box_head.{i}.1", ("box_head", f"conv_{i}", "bn"))
        m["roi_heads.box_head.5.weight"] = (
            ("box_head", "fc", "kernel"), linear_from_chw(256, 7, 7)
        )
        m["roi_heads.box_head.5.bias"] = (("box_head", "fc", "bias"), same)
    else:
        fc6 = "roi_heads.box_head.fc6.weight"
        c_in = sd[fc6].shape[1] // 49 if fc6 in sd else 256
        m[fc6] = (("box_head", "fc6", "kernel"), linear_from_chw(c_in, 7, 7))
        m["roi_heads.box_head.fc6.bias"] = (("box_head", "fc6", "bias"), same)
        m["roi_heads.box_head.fc7.weight"] = (("box_head", "fc7", "kernel"), linear)
        m["roi_heads.box_head.fc7.bias"] = (("box_head", "fc7", "bias"), same)
    for name in ("cls_score", "bbox_pred"):
        m[f"roi_heads.box_predictor.{name}.weight"] = (("box_predictor", name, "kernel"), linear)
        m[f"roi_heads.box_predictor.{name}.bias"] = (("box_predictor", name, "bias"), same)

    # Mask head + predictor.
    for i in range(4):
        conv_block(f"roi_heads.mask_head.{i}", f"roi_heads.mask_head.mask_fcn{i + 1}",
                   ("mask_head", f"fcn_{i}"), info["old_mask_keys"])
    m["roi_heads.mask_predictor.conv5_mask.weight"] = (("mask_head", "deconv_kernel"), deconv_abio)
    m["roi_heads.mask_predictor.conv5_mask.bias"] = (("mask_head", "deconv_bias"), same)
    m["roi_heads.mask_predictor.mask_fcn_logits.weight"] = (
        ("mask_head", "logits_kernel"), conv1x1_io
    )
    m["roi_heads.mask_predictor.mask_fcn_logits.bias"] = (("mask_head", "logits_bias"), same)
    return m


def is_ignorable(key: str) -> bool:
    """Buffers that carry no weights: BatchNorm step counters."""
    return key.endswith("num_batches_tracked")


def convert(sd: dict, meta: dict | None = None, *, arch: str | None = None,
            bn_eps: float | None = None) -> Converted:
    """state dict (name -> np.ndarray) -> Converted."""
    if arch is not None:
        raise ConversionError("--arch is not used for torchvision files (read off the shapes)")
    info = read_arch(sd)
    cfg = build_config(info, bn_eps=bn_eps)
    model = "maskrcnn_resnet50_fpn_v2" if info["v2"] else "maskrcnn_resnet50_fpn"
    params = apply_key_map(
        sd, key_map(info, sd), cfg, ignorable=is_ignorable,
        what=f"torchvision {model} (depth {info['depth']})",
    )
    k = cfg.roi_heads.num_classes
    names, ids = torchvision_coco_classes() if k == 91 else generic_classes(k, 0)
    n_tensors = sum(1 for key in sd if not is_ignorable(key))
    n_ignored = len(sd) - n_tensors
    b = cfg.backbone
    style = "old" if info["old_fpn_keys"] or info["old_mask_keys"] else "new"
    summary = [
        f"detected format: torchvision ({model}, {style} key style)",
        f"architecture:    {cfg.name}: {arch_name(b.depth, b.groups, b.width_per_group)}, "
        f"frozen BN eps {b.norm_eps:g}, {k} classes" + (" (COCO)" if k == 91 else ""),
        f"tensors:         {n_tensors} converted, {n_ignored} ignored (num_batches_tracked)",
    ] + ["convention       " + line for line in conventions(cfg)]
    return Converted(cfg, params, names, ids,
                     dict(format=NAME, version="v2" if info["v2"] else "v1", arch=cfg.name),
                     summary)
