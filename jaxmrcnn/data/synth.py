"""A harder generated COCO-format dataset than jaxmrcnn/shapes.py, for training runs.

Five classes of filled shapes (circle, square, triangle, ellipse, star) with random sizes,
rotations, aspect ratios and colours (sometimes close to the background's) on a noisy
gradient background; shapes overlap, and later shapes occlude earlier ones: each
annotation is the instance's VISIBLE region (compressed RLE), its box that region's, and
instances left with fewer than `min_visible` pixels are not annotated (as COCO's
annotators would not). Category ids start at 1; the names are new (not COCO's), so a
model for them gets freshly initialised class heads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "ellipse", "supercategory": "shape"},
    {"id": 5, "name": "star", "supercategory": "shape"},
]


def _outline(kind: int, cx, cy, r, angle, aspect, n=32):
    def rot(pts):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]

    if kind == 0:  # circle
        return [(cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n))
                for i in range(n)]
    if kind == 1:  # square, rotated
        return rot([(-r, -r), (r, -r), (r, r), (-r, r)])
    if kind == 2:  # triangle
        return rot([(0, -r), (0.9 * r, 0.7 * r), (-0.9 * r, 0.7 * r)])
    if kind == 3:  # ellipse, aspect 0.35..0.7
        return rot([(r * math.cos(2 * math.pi * i / n), aspect * r * math.sin(2 * math.pi * i / n))
                    for i in range(n)])
    pts = []  # five-pointed star
    for i in range(10):
        rr = r if i % 2 == 0 else 0.45 * r
        a = math.pi * i / 5 - math.pi / 2
        pts.append((rr * math.cos(a), rr * math.sin(a)))
    return rot(pts)


def render(rng: np.random.Generator, size_hw, max_shapes: int = 6, min_visible: int = 30):
    """One image: (rgb uint8 [H, W, 3], [(category index 0..4, visible mask [H, W] bool)])."""
    h, w = size_hw
    yy, xx = np.mgrid[:h, :w]
    base = rng.integers(0, 160, 3)
    grad = rng.uniform(-40, 40, 3)
    img = base + grad * (xx[..., None] / w) + rng.normal(0, 8, (h, w, 3))
    labels = np.full((h, w), -1, np.int32)
    kinds = []
    for j in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(0, len(CATEGORIES)))
        r = float(rng.uniform(0.06, 0.28) * min(h, w))
        cx, cy = float(rng.uniform(0, w)), float(rng.uniform(0, h))  # may leave the image
        pts = _outline(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)),
                       float(rng.uniform(0.35, 0.7)))
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(pts, fill=1)
        m = np.asarray(canvas, bool)
        if rng.random() < 0.2:  # low contrast
            colour = base + rng.normal(0, 30, 3)
        else:
            colour = rng.integers(0, 256, 3)
        img[m] = colour + rng.normal(0, 6, (int(m.sum()), 3))
        labels[m] = j
        kinds.append(kind)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    instances = [(k, labels == j) for j, k in enumerate(kinds)]
    return rgb, [(k, m) for k, m in instances if m.sum() >= min_visible]


def generate(out_dir, n_images: int = 64, *, seed: int = 0, size_hw=(256, 256),
             max_shapes: int = 6) -> tuple[Path, Path]:
    """Writes `out_dir/images/*.png` and `out_dir/annotations.json`; returns both paths."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n_images):
        rgb, inst = render(rng, size_hw, max_shapes)
        name = f"synth_{i:05d}.png"
        Image.fromarray(rgb).save(img_dir / name)
        images.append(dict(id=i + 1, file_name=name, height=size_hw[0], width=size_hw[1]))
        for kind, m in inst:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            anns.append(dict(id=len(anns) + 1, image_id=i + 1,
                             category_id=CATEGORIES[kind]["id"],
                             segmentation=dict(size=list(rle["size"]),
                                               counts=rle["counts"].decode("ascii")),
                             area=float(mask_utils.area(rle)), bbox=[x, y, bw, bh], iscrowd=0))
    ann_path = out_dir / "annotations.json"
    ann_path.write_text(json.dumps(dict(images=images, annotations=anns, categories=CATEGORIES)))
    return img_dir, ann_path
