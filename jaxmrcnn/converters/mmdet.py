"""mmdetection (v2 and v3) Mask R-CNN checkpoints -> jaxmrcnn params + config.

Files: `{'meta': {...}, 'state_dict': sd, 'optimizer': ...}` (v2 zoo files, which are also
mmdet 3's zoo weights), mmengine's v3 training checkpoints (with `message_hub`, schedulers),
and bare state dicts. Class names come from `meta['dataset_meta']['classes']` (v3) or
`meta['CLASSES']` (v2) when present. The ResNet style (stride in the 3x3 for `pytorch`, in
the 1x1 for `caffe`, which also changes the input to BGR with the caffe mean) is not
recorded in the weights: it is read from the config text the meta holds when it does, else
`pytorch` (mmdet's default); `--arch mmdet/mask-rcnn_r50-caffe_fpn_1x_coco` sets it.

Key layout: `backbone.{conv1,bn1}`, `backbone.layer{1..4}.{b}.{conv,bn}{1,2,3}` +
`downsample.{0,1}`; `neck.lateral_convs.{0..3}.conv`, `neck.fpn_convs.{0..3}.conv`;
`rpn_head.{rpn_conv,rpn_cls,rpn_reg}`; `roi_head.bbox_head.shared_fcs.{0,1}`, `fc_cls` (K+1
rows, background last), `fc_reg` (4K rows); `roi_head.mask_head.convs.{0..3}.conv`,
`upsample`, `conv_logits` (K channels).
"""

from __future__ import annotations

import re

from jaxmrcnn.classes import coco80_classes, generic_classes
from jaxmrcnn.config import ModelConfig, mmdet_mask_rcnn
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

NAME = "mmdet"
_BLOCK = re.compile(r"backbone\.layer(\d)\.(\d+)\.")


def detect(sd: dict) -> bool:
    return any(k.startswith(("neck.lateral_convs.", "roi_head.bbox_head.")) for k in sd)


def read_arch(sd: dict) -> dict:
    for key in ("backbone.conv1.weight", "roi_head.bbox_head.fc_cls.weight",
                "backbone.layer1.0.conv2.weight", "neck.lateral_convs.0.conv.weight"):
        if key not in sd:
            raise ConversionError(f"not an mmdet Mask R-CNN state dict: no {key}")
    if "roi_head.mask_head.conv_logits.weight" not in sd:
        raise ConversionError(
            "this mmdet checkpoint has no mask head (roi_head.mask_head.conv_logits): it is a "
            "Faster R-CNN or another detector, not a Mask R-CNN"
        )
    if "roi_head.bbox_head.shared_fcs.0.weight" not in sd:
        raise ConversionError("only the Shared2FCBBoxHead box head is supported")
    depth = depth_from_blocks(block_counts(sd, _BLOCK), "mmdet")
    groups, width = groups_and_width(sd["backbone.layer1.0.conv2.weight"].shape)
    num_classes = int(sd["roi_head.bbox_head.fc_cls.weight"].shape[0])
    reg_rows = int(sd["roi_head.bbox_head.fc_reg.weight"].shape[0])
    if reg_rows != 4 * (num_classes - 1):
        raise ConversionError(
            f"box regressor has {reg_rows} rows for {num_classes - 1} classes; only "
            f"class-specific regression ({4 * (num_classes - 1)} rows) is supported"
        )
    return dict(depth=depth, groups=groups, width_per_group=width, num_classes=num_classes)


def meta_classes(meta: dict | None) -> list[str] | None:
    """Class names from an mmdet checkpoint's meta (v3 dataset_meta, or v2 CLASSES)."""
    if not meta:
        return None
    dm = meta.get("dataset_meta")
    names = dm.get("classes") if isinstance(dm, dict) else None
    if names is None:
        names = meta.get("CLASSES")
    if names is None:
        return None
    if not all(isinstance(n, str) for n in names):
        raise ConversionError(f"the checkpoint's meta holds class names that are not strings: "
                              f"{list(names)[:5]}")
    return list(names)


def meta_style(meta: dict | None) -> str | None:
    """'caffe' or 'pytorch' when the config text in the meta says so."""
    text = ""
    for key in ("config", "cfg"):
        if meta and isinstance(meta.get(key), str):
            text += meta[key]
    m = re.search(r"style\s*=\s*['\"](caffe|pytorch)['\"]", text)
    return m.group(1) if m else None


def build_config(info: dict, *, arch: str | None, style: str | None,
                 bn_eps: float | None = None) -> ModelConfig:
    cfg = choose_preset(NAME, "mmdet", info, arch, lambda: mmdet_mask_rcnn(
        info["depth"], info["groups"], info["width_per_group"], num_classes=info["num_classes"],
        style=style or "pytorch"))
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

    conv("backbone.conv1", ("backbone", "conv1"), False)
    bn("backbone.bn1", ("backbone", "bn1"))
    for s, b, dst in bottlenecks(info["depth"]):
        src = f"backbone.layer{s}.{b}"
        for k in (1, 2, 3):
            conv(f"{src}.conv{k}", dst + (f"conv{k}",), False)
            bn(f"{src}.bn{k}", dst + (f"bn{k}",))
        if b == 0:
            conv(f"{src}.downsample.0", dst + ("downsample_conv",), False)
            bn(f"{src}.downsample.1", dst + ("downsample_bn",))
    for i in range(4):
        conv(f"neck.lateral_convs.{i}.conv", ("fpn", f"inner_{i}", "conv"), True)
        conv(f"neck.fpn_convs.{i}.conv", ("fpn", f"layer_{i}", "conv"), True)
    conv("rpn_head.rpn_conv", ("rpn_head", "conv_0"), True)
    conv("rpn_head.rpn_cls", ("rpn_head", "cls_logits"), True)
    conv("rpn_head.rpn_reg", ("rpn_head", "bbox_pred"), True)
    bh = "roi_head.bbox_head"
    conv(f"{bh}.shared_fcs.0", ("box_head", "fc6"), True, linear_from_chw(256, 7, 7))
    conv(f"{bh}.shared_fcs.1", ("box_head", "fc7"), True, linear)
    conv(f"{bh}.fc_cls", ("box_predictor", "cls_score"), True, linear)
    conv(f"{bh}.fc_reg", ("box_predictor", "bbox_pred"), True, linear)
    mh = "roi_head.mask_head"
    for i in range(4):
        conv(f"{mh}.convs.{i}.conv", ("mask_head", f"fcn_{i}", "conv"), True)
    m[f"{mh}.upsample.weight"] = (("mask_head", "deconv_kernel"), deconv_abio)
    m[f"{mh}.upsample.bias"] = (("mask_head", "deconv_bias"), same)
    m[f"{mh}.conv_logits.weight"] = (("mask_head", "logits_kernel"), conv1x1_io)
    m[f"{mh}.conv_logits.bias"] = (("mask_head", "logits_bias"), same)
    return m


def is_ignorable(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def convert(sd: dict, meta: dict | None = None, *, arch: str | None = None,
            bn_eps: float | None = None) -> Converted:
    info = read_arch(sd)
    notes = meta or {}
    file_meta = notes.get("meta")
    style = meta_style(file_meta)
    cfg = build_config(info, arch=arch, style=style, bn_eps=bn_eps)
    params = apply_key_map(sd, key_map(info), cfg, ignorable=is_ignorable,
                           what=f"mmdet {cfg.name}")
    k = cfg.roi_heads.num_classes
    names = meta_classes(file_meta)
    coco_names, coco_ids = coco80_classes(k - 1)
    if names is not None and len(names) != k - 1:
        raise ConversionError(
            f"the checkpoint's meta names {len(names)} classes but its classifier has "
            f"{k - 1} foreground classes (+ background): the file is inconsistent"
        )
    if names is None or names == coco_names[:-1]:
        names, ids = (coco_names, coco_ids) if k == 81 else generic_classes(k, k - 1)
        class_source = "COCO (80)" if k == 81 else "unnamed"
    else:
        ids = list(range(1, k)) + [-1]  # a custom dataset: category id = index + 1
        names = names + ["__background__"]
        class_source = f"{k - 1} from the checkpoint's meta"
    n_ignored = sum(1 for key in sd if is_ignorable(key))
    b = cfg.backbone
    version = "v3" if isinstance(file_meta, dict) and "dataset_meta" in file_meta else (
        "v2" if file_meta else "no meta")
    summary = [
        f"detected format: mmdet ({notes.get('container') or 'state dict'}, {version})",
        f"architecture:    {cfg.name}: {arch_name(b.depth, b.groups, b.width_per_group)}, "
        f"style {'caffe' if b.stride_in_1x1 else 'pytorch'}"
        f" ({'from the meta config' if style else ('--arch' if arch else 'default')}), "
        f"classes {class_source}",
        f"tensors:         {len(sd) - n_ignored} converted, {n_ignored} ignored",
    ] + ["convention       " + line for line in conventions(cfg)]
    return Converted(cfg, params, names, ids, dict(format=NAME, arch=cfg.name), summary)
