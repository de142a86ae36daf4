"""Draw detections on images.

    python -m jaxmrcnn.demo --weights model.jaxmrcnn.msgpack IMAGE... --out DIR [--overwrite]

Writes DIR/<image name>.png with masks, boxes, class names and scores drawn on the image.
No file is ever replaced by surprise: two inputs with the same name (a/x.jpg, b/x.jpg) get
distinct outputs (a_x.png, b_x.png), an output never replaces an input (x.png drawn into its
own folder becomes x-2.png), and existing outputs are refused before any work unless
--overwrite. Each PNG is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from collections import Counter
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


def output_paths(inputs, out_dir) -> list[Path]:
    """The PNG each input is drawn to in `out_dir`: `<stem>.png`; where stems repeat, the
    folders that tell the inputs apart, then the extension (a/x.jpg, b/x.jpg -> a_x.png,
    b_x.png; x.jpg, x.png -> x_jpg.png, x_png.png); a name still shared, or the path of an
    input itself, gets -2, -3, ... Never the same path twice, never an input's path."""
    srcs = [Path(os.path.abspath(p)) for p in inputs]
    names = [s.stem for s in srcs]
    for spell in (_with_folders, lambda group: [f"{n}_{s.suffix.lstrip('.')}" for n, s in group]):
        counts = Counter(names)
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            if counts[n] > 1:
                groups.setdefault(n, []).append(i)
        for idxs in groups.values():
            for i, new in zip(idxs, spell([(names[i], srcs[i]) for i in idxs]), strict=True):
                names[i] = new
    input_set = set(srcs)
    out_dir = Path(out_dir)
    taken: set[Path] = set()
    out = []
    for name in names:
        target, n = out_dir / f"{name}.png", 1
        while target in taken or _is_input(target, input_set):
            n += 1
            target = out_dir / f"{name}-{n}.png"
        taken.add(target)
        out.append(target)
    return out


def _with_folders(group):
    """(name, path) pairs of inputs sharing a name -> names with the folders below their
    common ancestor: a/x.jpg, b/x.jpg -> a_x, b_x."""
    parents = [p.parent.parts for _, p in group]
    common = len(os.path.commonprefix(parents))
    return ["_".join(p.parent.parts[common:] + (name,)) for name, p in group]


def _is_input(target: Path, inputs: set[Path]) -> bool:
    target = Path(os.path.abspath(target))
    if target in inputs:
        return True
    # the same file by another path (a link, a differently spelled folder)
    return target.exists() and any(s.exists() and os.path.samefile(target, s) for s in inputs)


def save_png(image: Image.Image, path: Path, overwrite: bool) -> None:
    """Writes `image` as PNG through a temporary file renamed into place; without
    `overwrite`, an existing `path` is never replaced (FileExistsError)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic: FileExistsError if something is there
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: create it exclusively
                with open(path, "xb") as f:
                    f.write(buf.getvalue())
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Draw Mask R-CNN detections on images.")
    ap.add_argument("--weights", required=True, help="converted checkpoint (.jaxmrcnn.msgpack)")
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--out", required=True, help="output folder for the PNGs")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace existing outputs (inputs are never replaced)")
    ap.add_argument("--score-thresh", type=float, default=0.5, help="draw detections above this")
    args = ap.parse_args(argv)

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: --out {out_dir} is a file, not a folder", file=sys.stderr)
        return 1
    targets = output_paths(args.images, out_dir)
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        print(f"error: {len(existing)} of the outputs already exist ("
              f"{', '.join(str(t) for t in existing[:4])}{', ...' if len(existing) > 4 else ''}); "
              f"pass --overwrite to replace them or another --out (nothing was written)",
              file=sys.stderr)
        return 1

    import jaxmrcnn

    try:
        det = jaxmrcnn.load(args.weights)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path, target in tqdm(list(zip(args.images, targets, strict=True)), desc="images",
                             unit="img"):
        try:
            image = read_image(path)
        except ValueError as e:
            tqdm.write(f"skipped: {e}")
            failed += 1
            continue
        result = det([image])[0]
        try:
            save_png(draw(image, result, score_thresh=args.score_thresh), target, args.overwrite)
        except FileExistsError:
            tqdm.write(f"skipped: {target} appeared meanwhile and is not replaced "
                       f"(--overwrite replaces it)")
            failed += 1
            continue
        shown = int((result.scores >= args.score_thresh).sum())
        tqdm.write(f"{path}: {len(result)} detections, {shown} drawn -> {target}")
    return 1 if failed == len(args.images) else 0


if __name__ == "__main__":
    sys.exit(main())
