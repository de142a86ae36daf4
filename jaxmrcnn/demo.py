"""Draw detections on images.

    python -m jaxmrcnn.demo --weights model.jaxmrcnn.msgpack IMAGE... --out DIR

Writes DIR/<image name>.png with masks, boxes, class names and scores drawn on the image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from jaxmrcnn.images import read_image

PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
        (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    ],
    np.float32,
)  # fmt: skip


def draw(image: np.ndarray, det, *, score_thresh: float = 0.5, alpha: float = 0.5) -> Image.Image:
    """Returns a PIL image with the detections above `score_thresh` drawn on `image`."""
    out = image.astype(np.float32).copy()
    keep = [i for i in range(len(det)) if det.scores[i] >= score_thresh]
    for rank, i in enumerate(keep):
        color = PALETTE[rank % len(PALETTE)]
        m = det.masks[i]
        if m.size:
            out[m] = out[m] * (1 - alpha) + color * alpha
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    canvas = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    for rank, i in enumerate(keep):
        color = tuple(int(c) for c in PALETTE[rank % len(PALETTE)])
        x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
        canvas.rectangle([x1, y1, x2, y2], outline=color, width=2)
        label = f"{det.names[i]} {det.scores[i]:.2f}"
        tw = canvas.textlength(label, font=font)
        ty = max(0.0, y1 - 12)
        canvas.rectangle([x1, ty, x1 + tw + 4, ty + 12], fill=color)
        canvas.text((x1 + 2, ty), label, fill=(0, 0, 0), font=font)
    return pil


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Draw Mask R-CNN detections on images.")
    ap.add_argument("--weights", required=True, help="converted checkpoint (.jaxmrcnn.msgpack)")
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--out", required=True, help="output folder for the PNGs")
    ap.add_argument("--score-thresh", type=float, default=0.5, help="draw detections above this")
    args = ap.parse_args(argv)

    import jaxmrcnn

    try:
        det = jaxmrcnn.load(args.weights)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in tqdm(args.images, desc="images", unit="img"):
        try:
            image = read_image(path)
        except ValueError as e:
            tqdm.write(f"skipped: {e}")
            failed += 1
            continue
        result = det([image])[0]
        target = out_dir / (Path(path).stem + ".png")
        draw(image, result, score_thresh=args.score_thresh).save(target)
        shown = int((result.scores >= args.score_thresh).sum())
        tqdm.write(f"{path}: {len(result)} detections, {shown} drawn -> {target}")
    return 1 if failed == len(args.images) else 0


if __name__ == "__main__":
    sys.exit(main())
