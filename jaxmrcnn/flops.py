"""Parameters and FLOPs of a Mask R-CNN, per stage, from XLA's cost analysis.

    python -m jaxmrcnn.flops WEIGHTS_OR_PRESET [--size H W] [--batch B]

WEIGHTS is a converted checkpoint or a framework's checkpoint file (anything jaxmrcnn.load
reads); a preset name (jaxmrcnn/config.py PRESETS, e.g. torchvision_maskrcnn_r50_fpn) needs
no file, since neither count depends on the weights' values.

Each stage is compiled on its own (`jax.jit(stage).lower(shapes).compile()`), on the shapes
the full model feeds it (found with jax.eval_shape, nothing is computed), and its
`cost_analysis()["flops"]` is reported; the whole program (the Detector's, canvas H x W) is
compiled too, and its FLOPs are the total. The stages, in the order the model runs them:

    backbone          ResNet C2..C5
    fpn               lateral and output convs, P2..P6
    rpn               RPN head convs, anchors, per-level top-k, decoding, NMS
    box_head          ROIAlign 7x7 on the proposals, the box head and predictor
    postprocess       per-class box decoding, score threshold, NMS, top detections
    mask_head         ROIAlign 14x14 on the detections, the mask head, sigmoid

XLA counts a multiply-add as 2 FLOPs and skips a convolution's taps that fall on zero padding
(fvcore / Detectron2 tables count 1 per multiply-add: half these figures). Loops (NMS) are
counted as XLA sees them statically: once per loop body, not per data-dependent iteration, so
the post-processing figures are XLA's static estimate. The sum of the stages differs from the
whole program by what lies between them (rescaling and sorting the outputs) and by what XLA
simplifies across stage boundaries.

Parameters: every tensor of the params tree; "frozen norm" are the FrozenNorm tensors
(weight, bias, mean, var), which PyTorch's FrozenBatchNorm2d keeps as buffers, so torchvision's
parameter count of a pretrained model is `params - frozen norm`; built with BatchNorm2d
(no weights), PyTorch counts `params - norm statistics` (mean and var are buffers).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmrcnn import ops
from jaxmrcnn.box_postprocess import box_detections
from jaxmrcnn.config import PRESETS, ModelConfig
from jaxmrcnn.model import MaskRCNN, matmul_precision, param_shapes
from jaxmrcnn.proposals import anchors_for_canvas, level_strides, select_proposals

STAGES = ("backbone", "fpn", "rpn", "box_head", "postprocess", "mask_head")
# params-tree entries of each stage (the post-processing has none)
STAGE_PARAMS = {"backbone": ("backbone",), "fpn": ("fpn",), "rpn": ("rpn_head",),
                "box_head": ("box_head", "box_predictor"), "postprocess": (),
                "mask_head": ("mask_head",)}


@dataclasses.dataclass
class ParamCount:
    total: int  # every tensor's size
    frozen_norm: int  # FrozenNorm weight, bias, mean, var
    norm_stats: int  # FrozenNorm mean, var


@dataclasses.dataclass
class Row:
    stage: str
    params: ParamCount
    flops: float  # XLA cost analysis of the stage compiled alone


@dataclasses.dataclass
class Report:
    config: ModelConfig
    canvas_hw: tuple[int, int]
    batch: int
    rows: list[Row]
    whole_flops: float  # the whole program compiled
    params: ParamCount  # the whole tree


def count_params(tree) -> ParamCount:
    """Sizes of a params tree (arrays or shape tuples), split as ParamCount says: a FrozenNorm
    is a node holding `weight` (convolutions and dense layers hold `kernel`)."""
    total = frozen = stats = 0

    def walk(node):
        nonlocal total, frozen, stats
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value)
                continue
            n = math.prod(value if isinstance(value, tuple) else value.shape)
            total += n
            if "weight" in node:
                frozen += n
                stats += n if key in ("mean", "var") else 0

    walk(tree)
    return ParamCount(total, frozen, stats)


def xla_flops(fn, *args) -> float:
    """FLOPs of `jax.jit(fn)` compiled for `args` (arrays or ShapeDtypeStructs)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def _struct(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x, jnp.float32) if isinstance(x, tuple)
        else jax.ShapeDtypeStruct(x.shape, x.dtype), tree,
        is_leaf=lambda x: isinstance(x, tuple))


def stage_functions(cfg: ModelConfig, precision: str = "float32") -> dict:
    """{stage: f(params, *inputs)} that compute what MaskRCNN._forward computes in that
    stage, with the same submodules and ops, at `precision`."""
    model = MaskRCNN(cfg, precision=precision)
    pc = cfg.pooler
    strides = level_strides(5)

    def pool_args(padded_hw):
        level_hw = jnp.stack([-(-padded_hw // s) for s in strides[:4]], axis=1)  # [B, 4, 2]
        return dict(spatial_scales=[1.0 / s for s in strides[:4]],
                    sampling_ratio=pc.sampling_ratio, aligned=pc.aligned,
                    level_rule=pc.level_rule, valid_hw=level_hw, max_samples=pc.max_samples)

    def apply(method):
        def fn(params, *args):
            with matmul_precision(precision):
                return model.apply({"params": params}, *args, method=method)
        return fn

    def rpn(m, levels, image_hw, padded_hw):
        logits, deltas = m.rpn_head(levels, strides, padded_hw)
        anchors, valid = anchors_for_canvas(cfg.anchors, [lv.shape[1:3] for lv in levels],
                                            padded_hw)
        return select_proposals(cfg.rpn, logits, deltas, anchors, valid, image_hw)

    def box_head(m, levels, proposals, padded_hw):
        feats, _ = ops.roi_align(levels, proposals, output_size=pc.box_output_size,
                                 **pool_args(padded_hw))  # [B, R, 7, 7, C]
        b, r = proposals.shape[:2]
        logits, deltas = m.box_predictor(m.box_head(feats.reshape((b * r,) + feats.shape[2:])))
        return logits.reshape(b, r, -1), deltas.reshape(b, r, -1, 4)

    def postprocess(params, class_logits, box_deltas, proposals, prop_valid, image_hw):
        with matmul_precision(precision):
            return box_detections(cfg.roi_heads, class_logits, box_deltas, proposals,
                                  prop_valid, image_hw)

    def mask_head(m, levels, boxes, labels, padded_hw):
        from jaxmrcnn.model import mask_num_classes

        feats, _ = ops.roi_align(levels, boxes, output_size=pc.mask_output_size,
                                 **pool_args(padded_hw))  # [B, D, 14, 14, C]
        b, d = boxes.shape[:2]
        if mask_num_classes(cfg) != cfg.roi_heads.num_classes:  # no background channel
            rh = cfg.roi_heads
            labels = jnp.where(labels > rh.background_index, labels - 1, labels)
        logits = m.mask_head(feats.reshape((b * d,) + feats.shape[2:]), labels.reshape(-1))
        return jax.nn.sigmoid(logits).reshape((b, d) + logits.shape[1:])

    return dict(
        backbone=apply(lambda m, x, hw: m.backbone(x, hw)),
        fpn=apply(lambda m, feats, hw: m.fpn(feats, hw)),
        rpn=apply(rpn),
        box_head=apply(box_head),
        postprocess=postprocess,
        mask_head=apply(mask_head),
        whole=apply(lambda m, x, info: m(x, info)[0]),
    )


def analyze(cfg: ModelConfig, params=None, canvas_hw=None, batch: int = 1,
            stages=STAGES, whole: bool = True) -> Report:
    """Parameters and XLA FLOPs per stage (and of the whole program unless not `whole`) for
    a batch of `batch` images filling a canvas of `canvas_hw` (default: the config's largest,
    short side min_size and long side max_size, rounded up to the size divisor). `params`:
    a params tree (arrays or shape tuples), default the config's shapes."""
    shapes = param_shapes(cfg) if params is None else params
    p = _struct(shapes)
    if canvas_hw is None:
        d = cfg.input.size_divisible
        canvas_hw = (-(-cfg.input.min_size // d) * d, -(-cfg.input.max_size // d) * d)
    h, w = canvas_hw
    fns = stage_functions(cfg)
    images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
    hw = jax.ShapeDtypeStruct((batch, 2), jnp.int32)
    info = dict(image_hw=hw, padded_hw=hw, orig_hw=hw)
    sub = lambda stage: {k: p[k] for k in STAGE_PARAMS[stage]}  # noqa: E731

    # The inputs of each stage, as the full model produces them (shapes only).
    feats = jax.eval_shape(fns["backbone"], sub("backbone"), images, hw)
    pyr = jax.eval_shape(fns["fpn"], sub("fpn"), feats, hw)
    levels = [pyr[f"p{i}"] for i in range(2, 7)]
    proposals, _, prop_valid = jax.eval_shape(fns["rpn"], sub("rpn"), levels, hw, hw)
    logits, deltas = jax.eval_shape(fns["box_head"], sub("box_head"), levels[:4], proposals, hw)
    det_boxes, _, det_labels, _, _ = jax.eval_shape(
        fns["postprocess"], {}, logits, deltas, proposals, prop_valid, hw)
    inputs = dict(
        backbone=(images, hw), fpn=(feats, hw), rpn=(levels, hw, hw),
        box_head=(levels[:4], proposals, hw),
        postprocess=(logits, deltas, proposals, prop_valid, hw),
        mask_head=(levels[:4], det_boxes, det_labels, hw),
    )
    rows = [Row(s, count_params(sub(s)), xla_flops(fns[s], sub(s), *inputs[s])) for s in stages]
    total = xla_flops(fns["whole"], p, images, info) if whole else float("nan")
    return Report(cfg, (h, w), batch, rows, total, count_params(shapes))


def format_report(r: Report) -> str:
    """The report as a Markdown table with notes."""
    lines = [
        f"{r.config.name}, {r.batch} x {r.canvas_hw[0]}x{r.canvas_hw[1]} canvas "
        f"(XLA cost analysis, {jax.default_backend()})",
        "",
        "| stage | params | GFLOPs | share |",
        "|---|---:|---:|---:|",
    ]
    stage_sum = sum(row.flops for row in r.rows)
    for row in r.rows:
        share = row.flops / r.whole_flops if r.whole_flops == r.whole_flops else float("nan")
        lines.append(f"| {row.stage} | {row.params.total:,} | {row.flops / 1e9:,.2f} | "
                     f"{share:.1%} |")
    lines.append(f"| sum of stages | {sum(row.params.total for row in r.rows):,} | "
                 f"{stage_sum / 1e9:,.2f} | |")
    lines.append(f"| whole program | {r.params.total:,} | {r.whole_flops / 1e9:,.2f} | 100% |")
    pc = r.params
    lines += [
        "",
        f"params: {pc.total:,} tensors' elements, of which {pc.frozen_norm:,} in frozen norms "
        f"({pc.norm_stats:,} of them mean/var statistics). PyTorch's count: "
        f"{pc.total - pc.frozen_norm:,} with FrozenBatchNorm2d (a pretrained torchvision "
        f"model), {pc.total - pc.norm_stats:,} with BatchNorm2d.",
        "FLOPs: a multiply-add is 2 (fvcore / Detectron2 tables count 1); NMS loops counted "
        "once per loop body (XLA's static estimate).",
    ]
    return "\n".join(lines)


def resolve(name_or_path: str, num_classes: int | None = None):
    """(config, params tree or None) for a checkpoint file or a preset name."""
    if Path(name_or_path).exists():
        from jaxmrcnn.detector import read_any_checkpoint

        ckpt = read_any_checkpoint(name_or_path)
        return ckpt.config, jax.tree_util.tree_map(lambda a: tuple(a.shape), ckpt.params)
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        return (preset() if num_classes is None else preset(num_classes)), None
    raise ValueError(f"{name_or_path} is neither a file nor a preset name; presets: "
                     f"{', '.join(sorted(PRESETS))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Parameters and FLOPs per stage (XLA cost "
                                 "analysis of the compiled programs).")
    ap.add_argument("weights", help="a checkpoint file, or a preset name such as "
                    "torchvision_maskrcnn_r50_fpn (no file needed)")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                    help="canvas the network sees (rounded up to the size divisor); default: "
                    "the config's largest (min_size x max_size)")
    ap.add_argument("--batch", type=int, default=1, help="images per batch")
    ap.add_argument("--num-classes", type=int, help="with a preset: classes incl. background")
    args = ap.parse_args(argv)
    try:
        cfg, params = resolve(args.weights, args.num_classes)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    canvas = None
    if args.size is not None:
        d = cfg.input.size_divisible
        h, w = args.size
        if h < 1 or w < 1:
            ap.error(f"--size must be positive, got {h} {w}")
        canvas = (-(-h // d) * d, -(-w // d) * d)
        if canvas != (h, w):
            print(f"note: {h}x{w} rounded up to the size divisor {d}: {canvas[0]}x{canvas[1]}",
                  file=sys.stderr)
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    print(format_report(analyze(cfg, params, canvas, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
