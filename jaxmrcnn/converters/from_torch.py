"""Convert a PyTorch (or Detectron pickle) Mask R-CNN checkpoint into a jaxmrcnn checkpoint.

    python converters/from_torch.py CKPT [--format auto|torchvision|detectron2|...]
                                         [--arch PRESET] [--out PATH] [--overwrite] [--bn-eps E]

Reads the file without executing code from it, detects the framework from the container and
key names and the architecture from the shapes, maps every tensor (float16 / bfloat16 ones
upcast to float32, exactly), checks every shape against the Flax model, and writes params +
config + class list to PATH (default: CKPT's name with its last suffix replaced by
.jaxmrcnn.msgpack: model.epoch1.pth -> model.epoch1.jaxmrcnn.msgpack). An existing PATH is
replaced only with --overwrite. The file is written atomically (fsynced, renamed into place)
with the usual permissions. The summary names the framework, architecture, classes and every
convention applied. On any error nothing is written and the exit status is 1.

This file only dispatches: each format is a module with the same interface
(jaxmrcnn/converters/common.py). `converters/from_torch.py` at the repository root is the
same command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxmrcnn.converters import (
    detectron,
    detectron2,
    maskrcnn_benchmark,
    matterport,
    mmdet,
    torchvision,
)
from jaxmrcnn.converters.common import ConversionError, Converted
from jaxmrcnn.converters.load import CheckpointError, read_checkpoint

CONVERTERS = {
    torchvision.NAME: torchvision,
    detectron2.NAME: detectron2,
    maskrcnn_benchmark.NAME: maskrcnn_benchmark,
    detectron.NAME: detectron,
    mmdet.NAME: mmdet,
    matterport.NAME: matterport,
}

# Formats recognised by their key names but not converted yet.
PLANNED: dict[str, tuple[str, ...]] = {}
FORMATS = ("auto", *CONVERTERS, *PLANNED)


def detect_format(sd: dict) -> str:
    for name, module in CONVERTERS.items():
        if module.detect(sd):
            return name
    for name, prefixes in PLANNED.items():
        if any(k.startswith(p) for k in sd for p in prefixes):
            return name
    return "unknown"


def convert_file(path, *, fmt: str = "auto", arch: str | None = None,
                 bn_eps: float | None = None) -> tuple:
    """CKPT path -> (Checkpoint, summary lines). Raises CheckpointError / ConversionError."""
    from jaxmrcnn.checkpoint import Checkpoint

    meta: dict = {}
    sd = read_checkpoint(path, meta)
    detected = detect_format(sd)
    if fmt == "auto":
        fmt = detected
        if fmt == "unknown":
            sample = ", ".join(list(sd)[:5])
            raise CheckpointError(
                f"{path}: cannot tell which framework wrote this checkpoint (first keys: "
                f"{sample}). Pass --format explicitly if you know it."
            )
    if fmt not in CONVERTERS:
        raise CheckpointError(
            f"{path} looks like a {detected} checkpoint; this version converts "
            f"{', '.join(CONVERTERS)} checkpoints ({fmt} support is planned)"
        )
    if fmt != detected:
        raise ConversionError(
            f"{path}: --format {fmt} was asked for, but the key names are {detected}'s"
        )
    out: Converted = CONVERTERS[fmt].convert(sd, meta, arch=arch, bn_eps=bn_eps)
    source = dict(out.source, file=Path(path).name)
    ckpt = Checkpoint(config=out.config, params=out.params, classes=out.classes,
                      category_ids=out.category_ids, source=source)
    return ckpt, out.summary


def default_output(src: Path) -> Path:
    """CKPT's path with its last suffix replaced: model.epoch1.pth ->
    model.epoch1.jaxmrcnn.msgpack (the whole stem, so checkpoints of one run never share an
    output)."""
    return src.with_name(src.stem + ".jaxmrcnn.msgpack")


def print_zoo() -> None:
    """The model-zoo catalogue: name, framework, published box / mask AP."""
    from jaxmrcnn import zoo

    print(f"{'name':<52} {'framework':<20} {'box AP':>6} {'mask AP':>7}")
    for e in zoo.list():
        box, mask = e.get("box_ap"), e.get("mask_ap")
        print(f"{e['name']:<52} {e['framework']:<20} {box if box is not None else '-':>6} "
              f"{mask if mask is not None else '-':>7}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?",
                    help="checkpoint (.pth/.pt, or .pkl), or a model-zoo name (see --list), "
                    "e.g. detectron2/mask_rcnn_R_50_FPN_3x: downloaded, verified and cached")
    ap.add_argument("--list", action="store_true", help="list the model zoo and exit")
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument("--arch", default=None,
                    help="preset name to use instead of the one read off the shapes, e.g. "
                    "detectron2/mask_rcnn_R_50_FPN_3x (see jaxmrcnn.config.PRESETS)")
    ap.add_argument("--out", help="output path (default: CKPT's name with its last suffix "
                    "replaced by .jaxmrcnn.msgpack)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the output file if it exists (default: refuse)")
    ap.add_argument(
        "--bn-eps",
        type=float,
        default=None,
        help="override the frozen-BatchNorm epsilon (default: the framework's: 0 for "
        "torchvision v1 COCO weights, 1e-5 for v2, BatchNorm2d and Detectron2 backbones)",
    )
    args = ap.parse_args(argv)
    from jaxmrcnn import zoo

    if args.list:
        print_zoo()
        return 0
    if args.ckpt is None:
        ap.error("give a checkpoint file or a model-zoo name (--list shows them)")

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        print("nothing was written", file=sys.stderr)
        return 1

    src = Path(args.ckpt)
    if not src.exists() and zoo.is_known(args.ckpt):  # a model-zoo name
        entry = zoo.get(args.ckpt)
        try:
            src = zoo.resolve(args.ckpt)
        except zoo.ZooError as e:
            return fail(str(e))
        args.arch = args.arch or entry.get("preset")
        out = Path(args.out) if args.out else Path.cwd() / (src.stem + ".jaxmrcnn.msgpack")
    else:
        out = Path(args.out) if args.out else default_output(src)

    if out.exists() and src.exists() and out.resolve() == src.resolve():
        return fail(f"the output {out} is the input checkpoint; pass another --out")
    if out.exists() and not args.overwrite:
        return fail(f"{out} exists; pass --overwrite to replace it, or --out another path")
    try:
        ckpt, summary = convert_file(src, fmt=args.format, arch=args.arch, bn_eps=args.bn_eps)
    except (CheckpointError, ConversionError) as e:
        return fail(str(e))
    try:
        ckpt.save(out, overwrite=args.overwrite)
    except FileExistsError:  # appeared while converting
        return fail(f"{out} exists; pass --overwrite to replace it, or --out another path")
    except OSError as e:
        return fail(f"cannot write {out}: {e.strerror or e}")
    for line in summary:
        print(line)
    print(f"wrote:           {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
