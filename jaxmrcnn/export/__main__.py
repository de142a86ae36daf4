"""python -m jaxmrcnn.export WEIGHTS --out DIR [--size H W] [--batch B] [--no-onnx]

WEIGHTS: a converted checkpoint, a framework's checkpoint file or a model-zoo name (as
jaxmrcnn.load). See jaxmrcnn/export/__init__.py for what DIR holds."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxmrcnn.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--out", required=True, help="output folder (refused if it holds files, "
                    "unless --overwrite)")
    ap.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                    help="canvas (multiples of the size divisor); default: max_size square")
    ap.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    ap.add_argument("--no-onnx", action="store_true", help="StableHLO only")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)

    from jaxmrcnn.checkpoint import CheckpointError
    from jaxmrcnn.detector import read_any_checkpoint
    from jaxmrcnn.export import export

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} is not empty; choose a new --out or pass --overwrite",
              file=sys.stderr)
        return 2
    try:
        ckpt = read_any_checkpoint(args.weights)
        meta = export(ckpt, out, args.size, args.batch, onnx=not args.no_onnx)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: " + ", ".join(meta["files"].values()) + ", export.json "
          f"(canvas {meta['canvas_hw'][0]}x{meta['canvas_hw'][1]}, batch {meta['batch']})")
    print(f"run: python {out / 'run_export.py'} {out} IMAGE [--onnx]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
