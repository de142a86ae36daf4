"""pytorch-mask-rcnn (Matterport's Mask R-CNN, PyTorch port) state dict -> jaxmrcnn params +
MatterportConfig (jaxmrcnn/matterport/).

The port's `MaskRCNN.build` (model.py:1420-1466) registers `fpn` (holding the ResNet stages
`fpn.C1..C5` and the FPN convs), `rpn`, `classifier` and `mask`; every conv has a bias and
every BN running statistics (eps 1e-3 in the model, not in the file). The file written by its
convert_from_keras.py has no `num_batches_tracked` (ignored if a re-saved copy has them).
ResNet-50 / 101 from the block count of `fpn.C4`; classes from `classifier.linear_class`;
widths and the pool size from the shapes. An 81-class model is COCO's: 'BG' then the 80
classes in COCO id order (coco.py's contiguous ids), mapped to the COCO category ids.
"""

from __future__ import annotations

import re

import numpy as np

from jaxmrcnn.classes import coco80_classes, generic_classes
from jaxmrcnn.converters.common import (
    BN_KEYS,
    ConversionError,
    Converted,
    conv1x1_io,
    conv_hwio,
    deconv_abio,
    linear,
    same,
)

NAME = "matterport"
_C4 = re.compile(r"fpn\.C4\.(\d+)\.")
_REQUIRED = ("fpn.C1.0.weight", "classifier.conv1.weight", "classifier.linear_class.weight",
             "mask.conv5.weight", "rpn.conv_shared.weight")


def detect(sd: dict) -> bool:
    """The port's key names: `fpn.C1.0.weight` and `classifier.conv1.weight`."""
    return "fpn.C1.0.weight" in sd and "classifier.conv1.weight" in sd


def read_arch(sd: dict) -> dict:
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ConversionError(f"not a pytorch-mask-rcnn state dict: missing {missing}")
    c4 = {int(m.group(1)) for k in sd if (m := _C4.match(k))}
    depth = {6: 50, 23: 101}.get(max(c4) + 1 if c4 else 0)
    if depth is None:
        raise ConversionError(f"unsupported pytorch-mask-rcnn ResNet: {len(c4)} blocks in C4 "
                              f"(ResNet-50 has 6, ResNet-101 23)")
    cw = sd["classifier.conv1.weight"].shape  # [fc, C, P, P]
    return dict(
        depth=depth,
        num_classes=int(sd["classifier.linear_class.weight"].shape[0]),
        base_channels=int(sd["fpn.C1.0.weight"].shape[0]),
        fpn_channels=int(sd["fpn.P5_conv1.weight"].shape[0]) if "fpn.P5_conv1.weight" in sd
        else 256,
        rpn_channels=int(sd["rpn.conv_shared.weight"].shape[0]),
        fc_dim=int(cw[0]),
        mask_channels=int(sd["mask.conv5.weight"].shape[1]),
        pool_size=int(cw[2]),
    )


def key_map(cfg) -> dict:
    """Source key -> (our param path, transform)."""
    from jaxmrcnn.matterport.config import DEPTHS

    m: dict = {}

    def conv(src, path, fn=conv_hwio):
        m[f"{src}.weight"] = ((*path, "kernel"), fn)
        m[f"{src}.bias"] = ((*path, "bias"), same)

    def bn(src, path):
        for k, ours in BN_KEYS.items():
            m[f"{src}.{k}"] = ((*path, ours), same)

    bb = ("backbone",)
    conv("fpn.C1.0", (*bb, "C1_conv"))
    bn("fpn.C1.1", (*bb, "C1_bn"))
    for stage, n in enumerate(DEPTHS[cfg.depth], start=2):
        for b in range(n):
            src, dst = f"fpn.C{stage}.{b}", (*bb, f"C{stage}_{b}")
            for i in (1, 2, 3):
                conv(f"{src}.conv{i}", (*dst, f"conv{i}"))
                bn(f"{src}.bn{i}", (*dst, f"bn{i}"))
            if b == 0:
                conv(f"{src}.downsample.0", (*dst, "downsample_conv"))
                bn(f"{src}.downsample.1", (*dst, "downsample_bn"))
    for i in (2, 3, 4, 5):
        conv(f"fpn.P{i}_conv1", (*bb, f"P{i}_conv1"))
        conv(f"fpn.P{i}_conv2.1", (*bb, f"P{i}_conv2"))
    for name in ("conv_shared", "conv_class", "conv_bbox"):
        conv(f"rpn.{name}", ("rpn", name))
    conv("classifier.conv1", ("classifier", "conv1"))
    conv("classifier.conv2", ("classifier", "conv2"))
    bn("classifier.bn1", ("classifier", "bn1"))
    bn("classifier.bn2", ("classifier", "bn2"))
    conv("classifier.linear_class", ("classifier", "linear_class"), linear)
    conv("classifier.linear_bbox", ("classifier", "linear_bbox"), linear)
    for i in (1, 2, 3, 4):
        conv(f"mask.conv{i}", ("mask", f"conv{i}"))
        bn(f"mask.bn{i}", ("mask", f"bn{i}"))
    # ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out), no flip (see MaskHead).
    m["mask.deconv.weight"] = (("mask", "deconv_kernel"), deconv_abio)
    m["mask.deconv.bias"] = (("mask", "deconv_bias"), same)
    m["mask.conv5.weight"] = (("mask", "conv5_kernel"), conv1x1_io)
    m["mask.conv5.bias"] = (("mask", "conv5_bias"), same)
    return m


def params_from(sd: dict, cfg) -> dict:
    """The params tree, every key consumed, every param produced with its expected shape."""
    from jaxmrcnn.matterport.model import param_shapes
    from jaxmrcnn.model import flatten_tree

    mapping = key_map(cfg)
    ignorable = lambda k: k.endswith("num_batches_tracked")  # noqa: E731
    missing = sorted(k for k in mapping if k not in sd)
    unexpected = sorted(k for k in sd if k not in mapping and not ignorable(k))
    if missing or unexpected:
        lines = [f"{t} keys ({len(v)}): " + ", ".join(v[:20])
                 for t, v in (("missing", missing), ("unexpected", unexpected)) if v]
        raise ConversionError("the checkpoint does not match a pytorch-mask-rcnn "
                              f"ResNet-{cfg.depth}:\n  " + "\n  ".join(lines))
    want = {k: tuple(v.shape) for k, v in flatten_tree(param_shapes(cfg))}
    params: dict = {}
    bad = []
    for key, (path, fn) in mapping.items():
        value = np.asarray(sd[key])
        if not np.issubdtype(value.dtype, np.floating):
            raise ConversionError(f"{key} has dtype {value.dtype}; expected floating point")
        array = np.ascontiguousarray(fn(value.astype(np.float32)))
        if tuple(array.shape) != want.get("/".join(path)):
            bad.append(f"{key}: shape {tuple(value.shape)}")
            continue
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = array
    if bad:
        raise ConversionError(f"shape mismatches ({len(bad)}):\n  " + "\n  ".join(bad[:20]))
    produced = {k for k, _ in flatten_tree(params)}
    if produced != set(want):
        raise ConversionError(f"params not produced: {sorted(set(want) - produced)[:20]}")
    return params


def classes_for(num_classes: int) -> tuple[list[str], list[int]]:
    if num_classes == 81:
        return coco80_classes(0)
    return generic_classes(num_classes, 0)


def convert(sd: dict, meta: dict | None = None, *, arch: str | None = None,
            bn_eps: float | None = None) -> Converted:
    from jaxmrcnn.matterport.config import PRESETS, matterport_maskrcnn_r101_fpn

    info = read_arch(sd)
    if arch is not None:
        if arch not in PRESETS:
            raise ConversionError(f"unknown Matterport --arch {arch!r}; known: "
                                  f"{', '.join(PRESETS)}")
        cfg = PRESETS[arch](info["num_classes"])
        if cfg.depth != info["depth"]:
            raise ConversionError(f"--arch {arch} is ResNet-{cfg.depth} but the checkpoint "
                                  f"holds a ResNet-{info['depth']}")
    else:
        cfg = matterport_maskrcnn_r101_fpn(info["num_classes"], depth=info["depth"])
    pool = info.pop("pool_size")
    cfg = cfg.replace(**info, pool_size=pool)
    if bn_eps is not None:
        cfg = cfg.replace(norm_eps=float(bn_eps))
    params = params_from(sd, cfg)
    classes, ids = classes_for(cfg.num_classes)
    summary = [
        f"framework:       pytorch-mask-rcnn (Matterport), {NAME}",
        f"architecture:    ResNet-{cfg.depth} FPN, {cfg.num_classes} classes ({cfg.name})",
        f"input:           RGB - mean {list(cfg.mean)}, no std; upscale to {cfg.min_dim}, cap "
        f"{cfg.max_dim}, Pillow bilinear, centred on a {cfg.max_dim}^2 zero canvas",
        f"backbone:        TF 'SAME' padding, stride in the first 1x1, BN eps {cfg.norm_eps:g}",
        "anchors:         pixel anchors centred at k * stride; P6 = P5[::2, ::2]",
        f"rpn:             top {cfg.pre_nms_limit}, NMS {cfg.rpn_nms_threshold:g} (+1, "
        f"{'>=' if cfg.nms_suppress_equal else '>'}), {cfg.post_nms_rois} proposals",
        f"heads:           TF crop_and_resize {cfg.pool_size}/{cfg.mask_pool_size}, score >= "
        f"{cfg.min_confidence:g}, per-class NMS {cfg.detection_nms_threshold:g} (+1), "
        f"{cfg.max_instances}/image",
        "masks:           bytescale + Pillow bilinear into the int box, >= 128",
    ]
    return Converted(config=cfg, params=params, classes=classes, category_ids=ids,
                     source={"format": NAME, "arch": cfg.name}, summary=summary)
