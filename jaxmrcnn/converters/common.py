"""What every framework's converter shares: tensor layout transforms, applying a declarative
key map (source key -> our param path + transform) with full accounting of keys and shapes,
and the result type.

Each framework module (converters/<framework>.py) provides the same interface:

    NAME                          the --format name
    detect(sd) -> bool            whether the state dict's key names are this framework's
    convert(sd, meta, *, arch=None, bn_eps=None) -> Converted
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxmrcnn.checkpoint import CheckpointError
from jaxmrcnn.config import ModelConfig
from jaxmrcnn.layers.resnet import BLOCKS as BLOCKS_PER_DEPTH
from jaxmrcnn.model import check_params, flatten_tree, param_shapes

Transform = Callable[[np.ndarray], np.ndarray]
KeyMap = dict[str, tuple[tuple[str, ...], Transform]]

BLOCKS = {blocks: depth for depth, blocks in BLOCKS_PER_DEPTH.items()}  # counts -> depth
BN_KEYS = {"weight": "weight", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def bottlenecks(depth: int):
    """(stage 1..4, block index, our param path) of every bottleneck of a ResNet-`depth`, in
    order: the walk every converter's key map makes over its framework's block names."""
    for stage, n in enumerate(BLOCKS_PER_DEPTH[depth], start=1):
        for b in range(n):
            yield stage, b, ("backbone", f"layer{stage}_{b}")


class ConversionError(CheckpointError):
    """The checkpoint does not fit the architecture; the message lists what is wrong. A
    CheckpointError, so that jaxmrcnn.load raises one error type for every bad file."""


@dataclasses.dataclass
class Converted:
    config: ModelConfig
    params: dict
    classes: list[str]
    category_ids: list[int]
    source: dict  # provenance stored in the checkpoint (format, file, arch, ...)
    summary: list[str]  # lines the CLI prints: framework, architecture, conventions


def conv_hwio(w: np.ndarray) -> np.ndarray:
    """PyTorch conv OIHW -> Flax HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def linear(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear (out, in) -> Flax Dense (in, out)."""
    return np.transpose(w)


def linear_from_chw(c: int, h: int, w_: int) -> Transform:
    """Linear over a PyTorch (C, H, W) flatten -> Dense over our NHWC (H, W, C) flatten."""

    def f(w: np.ndarray) -> np.ndarray:
        out = w.shape[0]
        return w.reshape(out, c, h, w_).transpose(2, 3, 1, 0).reshape(h * w_ * c, out)

    return f


def deconv_abio(w: np.ndarray) -> np.ndarray:
    """ConvTranspose2d weight (in, out, kh, kw) -> our (kh, kw, in, out), no flip."""
    return np.transpose(w, (2, 3, 0, 1))


def conv1x1_io(w: np.ndarray) -> np.ndarray:
    """1x1 conv (out, in, 1, 1) -> (in, out)."""
    return np.transpose(w[:, :, 0, 0])


def same(w: np.ndarray) -> np.ndarray:
    return w


def block_counts(sd: dict, pattern) -> tuple[int, ...]:
    """Blocks per ResNet stage: `pattern` is a compiled regex with the stage and block
    index as groups 1 and 2 (e.g. r"backbone\\.body\\.layer(\\d)\\.(\\d+)\\.")."""
    found: dict[int, set[int]] = {}
    for k in sd:
        m = pattern.match(k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    stages = sorted(found)
    return tuple(max(found[s]) + 1 for s in stages)


def depth_from_blocks(blocks: tuple[int, ...], framework: str) -> int:
    if blocks not in BLOCKS:
        raise ConversionError(
            f"unsupported {framework} ResNet with {blocks} blocks per stage; known: "
            + ", ".join(f"ResNet-{d} {b}" for b, d in BLOCKS.items())
        )
    return BLOCKS[blocks]


def groups_and_width(conv2_weight_shape) -> tuple[int, int]:
    """(groups, width per group) from the first block's 3x3 conv (width, width/groups, 3, 3)."""
    out_ch, in_per_group = conv2_weight_shape[:2]
    groups = out_ch // in_per_group
    return groups, out_ch // groups


def arch_name(depth: int, groups: int, width_per_group: int) -> str:
    return f"ResNet-{depth}" if groups == 1 else f"ResNeXt-{depth} {groups}x{width_per_group}d"


def choose_preset(prefix: str, label: str, info: dict, arch: str | None, default) -> ModelConfig:
    """The config for a checkpoint: the preset named by `--arch` (one of this framework's,
    `prefix/...`, and it must fit the architecture read off the shapes), else `default()`."""
    from jaxmrcnn.config import PRESETS

    if arch is None:
        return default()
    if arch not in PRESETS or not arch.startswith(prefix + "/"):
        names = ", ".join(k for k in PRESETS if k.startswith(prefix + "/"))
        raise ConversionError(f"unknown {label} --arch {arch!r}; known: {names}")
    cfg = PRESETS[arch](num_classes=info["num_classes"])
    want = (cfg.backbone.depth, cfg.backbone.groups, cfg.backbone.width_per_group)
    got = (info["depth"], info["groups"], info["width_per_group"])
    if want != got:
        raise ConversionError(f"--arch {arch} is {arch_name(*want)} but the checkpoint "
                              f"holds a {arch_name(*got)}")
    return cfg


def apply_key_map(
    sd: dict, mapping: KeyMap, cfg: ModelConfig, *, ignorable: Callable[[str], bool], what: str
) -> dict:
    """Builds the params tree from `sd` through `mapping`. Every source key must be consumed
    (or be `ignorable`), every param produced, every shape right; otherwise ConversionError
    listing the keys (a few of each kind)."""
    missing = sorted(k for k in mapping if k not in sd)
    unexpected = sorted(k for k in sd if k not in mapping and not ignorable(k))
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:20]))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]))
        raise ConversionError(f"the checkpoint does not match {what}:\n  " + "\n  ".join(lines))
    shapes = param_shapes(cfg)
    want = dict(flatten_tree(shapes))
    params: dict = {}
    mismatched = []
    for key, (path, fn) in mapping.items():
        value = np.asarray(sd[key])
        if not np.issubdtype(value.dtype, np.floating):
            raise ConversionError(f"{key} has dtype {value.dtype}; expected floating point weights")
        try:
            array = np.ascontiguousarray(fn(value.astype(np.float32)))
        except ValueError:  # a reshape that cannot work: the shape is wrong
            array = None
        expected = want.get("/".join(path))
        if array is None or (expected is not None and tuple(array.shape) != expected):
            mismatched.append(f"{key}: shape {tuple(value.shape)} does not fit {cfg.name}")
            continue
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = array
    if mismatched:
        raise ConversionError(
            f"shape mismatches ({len(mismatched)}):\n  " + "\n  ".join(mismatched[:20])
        )
    try:  # every param of the model got a tensor (guards the key map itself)
        check_params(cfg, params, shapes)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return params


def conventions(cfg: ModelConfig) -> list[str]:
    """One line per convention a config applies, for the CLI summary."""
    i, b, a, r, p, h, m = (cfg.input, cfg.backbone, cfg.anchors, cfg.rpn, cfg.pooler,
                           cfg.roi_heads, cfg.paste)
    bg = "first" if h.background_index == 0 else "last"
    return [
        f"input:     {i.channel_order}, x / {i.pixel_scale:g}, mean {list(i.mean)}, std "
        f"{list(i.std)}; resize {i.min_size}/{i.max_size} ({i.resize_rule} rounding, "
        f"{i.resize_impl}), pad to {i.size_divisible}",
        f"backbone:  {arch_name(b.depth, b.groups, b.width_per_group)}, stride in the "
        f"{'1x1' if b.stride_in_1x1 else '3x3'}, {b.norm} eps {b.norm_eps:g}",
        f"anchors:   {a.flavour} cell anchors, offset {a.offset:g}, {a.stride_rule} strides",
        f"rpn:       top {r.pre_nms_top_n}/level, NMS {r.nms_thresh:g}, {r.post_nms_top_n}/image, "
        f"min size {'>' if r.min_size_strict else '>='} {r.min_size:g}, "
        f"{'+1' if r.box_plus_one else 'no +1'} boxes",
        f"roialign:  aligned={p.aligned}, sampling_ratio={p.sampling_ratio}, "
        f"{p.level_rule} level mapping",
        f"box head:  {h.num_classes} classes (background {bg}), regression {h.box_reg}, "
        f"{h.coder_style} coder, score > {h.score_thresh:g}, NMS {h.nms_thresh:g}, "
        f"{h.detections_per_img}/image"
        + (", clipped to the original image" if h.clip_to_original else ""),
        f"masks:     {m.method} paste, mask {'>' if m.strict else '>='} {m.threshold:g}",
    ]
