"""Convert a PyTorch Mask R-CNN checkpoint into a jaxmrcnn checkpoint.

    python converters/from_torch.py CKPT [--format auto|torchvision] [--out PATH] [--bn-eps E]

Reads the file without executing code from it, detects the framework and architecture,
maps every tensor, checks every shape against the Flax model, and writes params + config +
class list to PATH (default: CKPT with the suffix .jaxmrcnn.msgpack). On any error nothing
is written and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters.load import CheckpointError, detect_format, read_checkpoint  # noqa: E402

FORMATS = ("auto", "torchvision", "detectron2", "mmdet", "maskrcnn_benchmark", "detectron")


def convert_file(path, *, fmt: str = "auto", bn_eps: float | None = None):
    """CKPT path -> (Checkpoint, summary lines). Raises CheckpointError / ConversionError."""
    from converters import torchvision as tv_conv
    from jaxmrcnn.checkpoint import Checkpoint
    from jaxmrcnn.classes import generic_classes, torchvision_coco_classes

    sd = read_checkpoint(path)
    detected = detect_format(sd)
    if fmt == "auto":
        fmt = detected
        if fmt == "unknown":
            sample = ", ".join(list(sd)[:5])
            raise CheckpointError(
                f"{path}: cannot tell which framework wrote this checkpoint (first keys: "
                f"{sample}). Pass --format explicitly if you know it."
            )
    if fmt != "torchvision":
        raise CheckpointError(
            f"{path} looks like a {detected} checkpoint; this version converts torchvision "
            f"checkpoints only ({fmt} support is planned)"
        )
    cfg, params, info = tv_conv.convert(sd, bn_eps=bn_eps)
    k = cfg.roi_heads.num_classes
    names, ids = torchvision_coco_classes() if k == 91 else generic_classes(k, 0)
    ckpt = Checkpoint(
        config=cfg,
        params=params,
        classes=names,
        category_ids=ids,
        source=dict(format="torchvision", file=Path(path).name, version="v2" if info["v2"] else "v1"),
    )
    summary = [
        f"detected format: torchvision ({'maskrcnn_resnet50_fpn_v2' if info['v2'] else 'maskrcnn_resnet50_fpn'}, "
        f"{'old' if info['old_fpn_keys'] or info['old_mask_keys'] else 'new'} key style)",
        f"architecture:    {cfg.name}: ResNet-{cfg.backbone.depth}"
        + (f" {cfg.backbone.groups}x{cfg.backbone.width_per_group}d" if cfg.backbone.groups > 1 else "")
        + f", frozen BN eps {cfg.backbone.norm_eps:g}, {k} classes"
        + (" (COCO)" if k == 91 else ""),
        f"tensors:         {info['n_tensors']} converted, {info['n_ignored']} ignored (num_batches_tracked)",
    ]
    return ckpt, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", help="PyTorch checkpoint (.pth/.pt, or .pkl)")
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument("--out", help="output path (default: CKPT.jaxmrcnn.msgpack)")
    ap.add_argument(
        "--bn-eps",
        type=float,
        default=None,
        help="override the frozen-BatchNorm epsilon (default: 0 for torchvision v1 COCO "
        "weights, 1e-5 for v2 or BatchNorm2d backbones)",
    )
    args = ap.parse_args(argv)
    from converters.torchvision import ConversionError

    src = Path(args.ckpt)
    out = Path(args.out) if args.out else src.with_name(src.name.split(".")[0] + ".jaxmrcnn.msgpack")
    try:
        ckpt, summary = convert_file(src, fmt=args.format, bn_eps=args.bn_eps)
    except (CheckpointError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        print("nothing was written", file=sys.stderr)
        return 1
    ckpt.save(out)
    for line in summary:
        print(line)
    print(f"wrote:           {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
