"""COCO-format instance annotations for training: read, check, decode masks.

What torchvision's detection reference does (references/detection/coco_utils.py
ConvertCocoPolysToMask and _coco_remove_images_without_annotations), and so what we do:
  crowd regions (iscrowd=1) are dropped; boxes are COCO xywh -> xyxy clamped to the image,
  and those with x2 <= x1 or y2 <= y1 dropped; polygons and RLE (compressed or not) are
  decoded with pycocotools and a multi-polygon's parts merged; training images left with
  no annotation are not used.
Beyond that, anything that would break training is skipped and counted, never raised:
  no or empty segmentation, a polygon of fewer than 3 points, a mask with no pixel inside
  the image (e.g. a polygon outside it), an unknown category, a box of zero size.
`Dataset.skipped` counts each reason.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


@dataclasses.dataclass
class Record:
    """One image: its file and the raw (checked) annotations, decoded lazily."""

    image_id: int
    path: Path
    height: int
    width: int
    anns: list[dict]  # category_id, bbox (xyxy, clamped), segmentation


@dataclasses.dataclass
class Dataset:
    records: list[Record]
    category_ids: list[int]  # dataset category id per foreground class (index 1..K)
    names: list[str]  # category name per foreground class
    skipped: collections.Counter  # reason -> count (annotations and images)

    @property
    def num_classes(self) -> int:  # background included (index 0, torchvision)
        return len(self.category_ids) + 1

    def class_index(self) -> dict[int, int]:
        return {c: i + 1 for i, c in enumerate(self.category_ids)}

    def classes(self) -> tuple[list[str], list[int]]:
        """(names, category ids) per model class index, background first (as a Checkpoint)."""
        return ["__background__", *self.names], [-1, *self.category_ids]


def _box_ok(ann, h: int, w: int):
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, bw, bh = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not np.isfinite([x, y, bw, bh]).all():
        return None
    x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
    x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
    if x2 <= x1 or y2 <= y1:
        return None
    return [x1, y1, x2, y2]


def _segm_ok(segm) -> str | None:
    """None if usable, else the reason."""
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, (list, tuple)) and len(p) >= 6]
        if not segm:
            return "empty_segmentation"
        if len(polys) != len(segm):
            return "degenerate_polygon"
        return None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        return None
    return "no_segmentation"


def read_coco(annotations, images_dir, *, category_ids=None) -> Dataset:
    """Reads a COCO instances JSON. `category_ids`: the foreground classes, in order
    (default: every category of the file, sorted by id)."""
    data = json.loads(Path(annotations).read_text())
    images_dir = Path(images_dir)
    cats = {int(c["id"]): c.get("name", str(c["id"])) for c in data.get("categories", [])}
    ids = sorted(cats) if category_ids is None else [int(c) for c in category_ids]
    known = set(ids)
    skipped: collections.Counter = collections.Counter()
    by_image: dict[int, list] = collections.defaultdict(list)
    for ann in data.get("annotations", []):
        by_image[ann.get("image_id")].append(ann)
    records = []
    for img in data.get("images", []):
        h, w = int(img["height"]), int(img["width"])
        anns = []
        for ann in by_image.get(img["id"], []):
            if ann.get("iscrowd", 0):
                skipped["crowd"] += 1
                continue
            if ann.get("category_id") not in known:
                skipped["unknown_category"] += 1
                continue
            box = _box_ok(ann, h, w)
            if box is None:
                skipped["degenerate_box"] += 1
                continue
            reason = _segm_ok(ann.get("segmentation"))
            if reason:
                skipped[reason] += 1
                continue
            anns.append(dict(category_id=int(ann["category_id"]), bbox=box,
                             segmentation=ann["segmentation"]))
        if not anns:
            skipped["image_without_annotations"] += 1
            continue
        records.append(Record(int(img["id"]), images_dir / img["file_name"], h, w, anns))
    return Dataset(records, ids, [cats.get(i, str(i)) for i in ids], skipped)


def decode_mask(segm, h: int, w: int) -> np.ndarray:
    """Polygons / RLE -> `[h, w]` uint8 (a multi-polygon's parts merged)."""
    if isinstance(segm, list):
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in segm], h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(segm["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    m = mask_utils.decode(rle)
    if m.shape != (h, w):  # an RLE of another size: treat as unusable
        return np.zeros((h, w), np.uint8)
    return m.astype(np.uint8)


def load_example(record: Record, class_index: dict[int, int], skipped=None):
    """(rgb uint8 [H, W, 3], boxes [n, 4] xyxy, classes [n], masks [n, H, W] uint8).
    Annotations whose mask has no pixel in the image are dropped (counted in `skipped`)."""
    with Image.open(record.path) as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = rgb.shape[:2]
    boxes, classes, masks = [], [], []
    for ann in record.anns:
        try:
            m = decode_mask(ann["segmentation"], h, w)
        except Exception:  # pycocotools raises several types for malformed input
            m = None
        if m is None or not m.any():
            if skipped is not None:
                skipped["empty_mask"] += 1
            continue
        boxes.append(ann["bbox"])
        classes.append(class_index[ann["category_id"]])
        masks.append(m)
    n = len(boxes)
    return (rgb, np.asarray(boxes, np.float32).reshape(n, 4), np.asarray(classes, np.int32),
            np.asarray(masks, np.uint8).reshape(n, h, w))
