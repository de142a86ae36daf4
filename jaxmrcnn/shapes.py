"""A small generated COCO-format dataset of coloured shapes (for runs that need no download).

Categories reuse COCO names and ids (a ball is a "sports ball", a rectangle a "tv", a
triangle a "kite") so that COCO models can be evaluated on it without a class map.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [
    {"id": 37, "name": "sports ball", "supercategory": "sports"},
    {"id": 72, "name": "tv", "supercategory": "electronic"},
    {"id": 38, "name": "kite", "supercategory": "sports"},
]


def _polygon(kind: int, cx: float, cy: float, r: float, n: int = 24) -> list[float]:
    if kind == 0:  # circle
        pts = [(cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n))
               for i in range(n)]
    elif kind == 1:  # axis-aligned rectangle, 4:3
        pts = [(cx - r, cy - 0.75 * r), (cx + r, cy - 0.75 * r), (cx + r, cy + 0.75 * r),
               (cx - r, cy + 0.75 * r)]
    else:  # triangle
        pts = [(cx, cy - r), (cx + 0.9 * r, cy + 0.7 * r), (cx - 0.9 * r, cy + 0.7 * r)]
    return [round(float(v), 2) for p in pts for v in p]


def generate(
    out_dir, n_images: int = 16, *, seed: int = 0, size_hw=(360, 480)
) -> tuple[Path, Path]:
    """Writes `out_dir/images/*.png` and `out_dir/annotations.json`; returns both paths."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size_hw
    images, anns = [], []
    for i in range(n_images):
        bg = tuple(int(v) for v in rng.integers(0, 80, 3))
        im = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 5))):
            kind = int(rng.integers(0, 3))
            r = float(rng.uniform(20, 70))
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            poly = _polygon(kind, cx, cy, r)
            color = tuple(int(v) for v in rng.integers(120, 256, 3))
            draw.polygon(poly, fill=color)
            xs, ys = poly[0::2], poly[1::2]
            x0, y0 = min(xs), min(ys)
            bw, bh = max(xs) - x0, max(ys) - y0
            # area of the polygon (shoelace); later shapes may cover earlier ones, as in COCO
            area = 0.5 * abs(sum(xs[j] * ys[j - 1] - xs[j - 1] * ys[j] for j in range(len(xs))))
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=CATEGORIES[kind]["id"],
                             segmentation=[poly], area=round(area, 2),
                             bbox=[round(v, 2) for v in (x0, y0, bw, bh)], iscrowd=0))
        name = f"shape_{i:04d}.png"
        im.save(img_dir / name)
        images.append(dict(id=i + 1, file_name=name, height=h, width=w))
    ann_path = out_dir / "annotations.json"
    ann_path.write_text(json.dumps(dict(images=images, annotations=anns, categories=CATEGORIES)))
    return img_dir, ann_path
