"""COCO-format datasets, detections as COCO results, and COCOeval (pycocotools).

The pieces `eval/coco.py` is made of, usable on their own:

    gt = load_dataset("instances_val2017.json")          # validated, clear errors
    cat_map = category_mapping(det.classes, det.category_ids, gt)
    results = to_coco_results(image_id, detections, cat_map)   # bbox xywh + RLE segm
    stats = evaluate(gt, results, "bbox")                 # the 12 standard numbers

and the per-image results file a long evaluation streams to (one JSON line per image,
appended and flushed as produced, so a killed run keeps all but the image in flight):

    with open(path, "a") as f: append_record(f, image_record(image_id, ..., cat_map))
    records, note = read_records(path)                    # drops a torn last line
    bbox, segm = records_to_results(records.values())
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip

STAT_LABELS = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)

_REQUIRED = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox", "area", "iscrowd"),
    "categories": ("id", "name"),
}


class DatasetError(ValueError):
    """A COCO-format file that is not usable; the message names what is wrong."""


def load_dataset(path) -> COCO:
    """Reads and validates a COCO instances JSON, returning a pycocotools COCO object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such annotation file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not JSON ({e})") from None
    return dataset_from_dict(data, str(path))


def dataset_from_dict(data, name: str = "dataset") -> COCO:
    if not isinstance(data, dict):
        raise DatasetError(f"{name} is not COCO format: the top level must be an object with "
                           f"'images', 'annotations' and 'categories', got {type(data).__name__}")
    for field, keys in _REQUIRED.items():
        if field not in data:
            raise DatasetError(f"{name} is not COCO format: missing the top-level field '{field}'")
        if not isinstance(data[field], list):
            raise DatasetError(f"{name}: '{field}' must be a list")
        for i, item in enumerate(data[field]):
            if not isinstance(item, dict):
                raise DatasetError(f"{name}: {field}[{i}] must be an object")
            for k in keys:
                if k not in item:
                    raise DatasetError(
                        f"{name} is not COCO format: {field}[{i}] has no '{k}' field"
                    )
    for i, a in enumerate(data["annotations"]):
        if "segmentation" not in a:
            raise DatasetError(
                f"{name}: annotations[{i}] has no 'segmentation' field; mask AP needs instance "
                f"masks (polygons or RLE)"
            )
        if not (isinstance(a["bbox"], list) and len(a["bbox"]) == 4):
            raise DatasetError(f"{name}: annotations[{i}].bbox must be [x, y, width, height]")
    image_ids = {im["id"] for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for i, a in enumerate(data["annotations"]):
        if a["image_id"] not in image_ids:
            raise DatasetError(f"{name}: annotations[{i}] refers to image_id {a['image_id']}, "
                               f"which is not in 'images'")
        if a["category_id"] not in cat_ids:
            raise DatasetError(f"{name}: annotations[{i}] refers to category_id "
                               f"{a['category_id']}, which is not in 'categories'")
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def category_mapping(classes, category_ids, gt: COCO, mapping: Mapping | None = None) -> dict:
    """Model class index -> dataset category id.

    By default the model's category ids must be the dataset's (same id, same name, as for a
    COCO model on a COCO dataset). `mapping` ({model class name: dataset category name or
    id}) maps classes explicitly; unmapped classes are then dropped from the results.
    """
    cats = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    by_name = {v: k for k, v in cats.items()}
    model = {i: (n, int(c)) for i, (n, c) in enumerate(zip(classes, category_ids, strict=True))
             if int(c) >= 0 and n not in ("__background__", "N/A")}
    if mapping:
        names = {n: i for i, (n, _) in model.items()}
        out = {}
        for src, dst in mapping.items():
            if src not in names:
                raise DatasetError(f"--class-map: the model has no class {src!r}")
            if isinstance(dst, str) and not dst.lstrip("-").isdigit():
                if dst not in by_name:
                    raise DatasetError(f"--class-map: the dataset has no category {dst!r}")
                dst = by_name[dst]
            if int(dst) not in cats:
                raise DatasetError(f"--class-map: the dataset has no category id {dst}")
            out[names[src]] = int(dst)
        return out
    problems = [f"{cid} ({cats[cid]!r} in the dataset, not in the model)"
                for cid in cats if cid not in {c for _, c in model.values()}]
    problems += [f"{c} ({n!r} in the model, {cats[c]!r} in the dataset)"
                 for n, c in model.values() if c in cats and cats[c] != n]
    if problems:
        raise DatasetError(
            "the model's classes do not match the dataset's categories: "
            + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
            + ". Pass --class-map JSON ({\"model class\": \"dataset category\"})"
            " to evaluate anyway."
        )
    return {i: c for i, (_, c) in model.items() if c in cats}


def encode_masks(masks: np.ndarray) -> list[dict]:
    """`[N, H, W]` bool -> COCO RLEs (counts as str, JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def to_coco_results(image_id: int, boxes, scores, class_index, masks, cat_map: Mapping) -> tuple:
    """One image's detections -> (bbox results, segm results), COCO results format."""
    keep = [i for i, c in enumerate(class_index) if int(c) in cat_map]
    boxes = np.asarray(boxes, np.float64)[keep]
    bbox, segm = [], []
    rles = encode_masks(np.asarray(masks)[keep]) if masks is not None else [None] * len(keep)
    for j, i in enumerate(keep):
        x1, y1, x2, y2 = boxes[j]
        common = dict(image_id=int(image_id), category_id=int(cat_map[int(class_index[i])]),
                      score=round(float(scores[i]), 6))
        bbox.append(dict(common, bbox=[round(float(v), 3) for v in (x1, y1, x2 - x1, y2 - y1)]))
        if rles[j] is not None:
            segm.append(dict(common, segmentation=rles[j]))
    return bbox, segm


def evaluate(gt: COCO, results: list[dict], iou_type: str, *, image_ids=None,
             per_category: bool = False):
    """COCOeval on `results` -> (12 stats, {category name: AP} or None, the printed table)."""
    # pycocotools writes into both: loadRes adds fields to the result dicts and COCOeval
    # replaces ground-truth polygons by RLEs. Work on copies so the caller's data is intact.
    gt_copy = COCO()
    gt_copy.dataset = copy.deepcopy(gt.dataset)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        gt_copy.createIndex()
        gt = gt_copy
        results = [dict(r) for r in results]
        dt = gt.loadRes(results) if results else COCO()
        if not results:  # loadRes refuses an empty list; an empty result set scores 0
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                          "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    per_cat = None
    if per_category:
        prec = ev.eval["precision"]  # [T, R, K, A, M]
        per_cat = {}
        for k, cid in enumerate(ev.params.catIds):
            p = prec[:, :, k, 0, -1]
            p = p[p > -1]
            per_cat[gt.cats[cid]["name"]] = float(p.mean()) if p.size else float("nan")
    return [float(s) for s in ev.stats], per_cat, buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The per-image results file (JSON lines)
# ---------------------------------------------------------------------------------------------
class ResultsFileError(ValueError):
    """A results file that is damaged other than by a torn last line; the message says where."""


def image_record(image_id: int, boxes, scores, class_index, masks, cat_map: Mapping,
                 **extra) -> dict:
    """One image's detections as one JSON-ready record: `boxes_xywh` (COCO [x, y, w, h]),
    `scores`, `category_ids` (the dataset's) and `masks` (COCO RLEs), in the detections'
    order, with the classes `cat_map` drops left out (as `to_coco_results` does)."""
    bbox, segm = to_coco_results(image_id, boxes, scores, class_index, masks, cat_map)
    return dict(image_id=int(image_id), **extra,
                boxes_xywh=[r["bbox"] for r in bbox], scores=[r["score"] for r in bbox],
                category_ids=[r["category_id"] for r in bbox],
                masks=[r["segmentation"] for r in segm])


def error_record(image_id: int, error: str, **extra) -> dict:
    """The record of an image that could not be evaluated (unreadable, missing): `error`."""
    return dict(image_id=int(image_id), **extra, error=str(error))


def records_to_results(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    """Records (in the order given; error records skipped) -> (bbox results, segm results)."""
    bbox, segm = [], []
    for r in records:
        if "error" in r:
            continue
        for j, (box, score, cid) in enumerate(zip(r["boxes_xywh"], r["scores"], r["category_ids"],
                                                  strict=True)):
            common = dict(image_id=r["image_id"], category_id=cid, score=score)
            bbox.append(dict(common, bbox=box))
            if r["masks"]:
                segm.append(dict(common, segmentation=r["masks"][j]))
    return bbox, segm


def record_detections(record: dict) -> dict:
    """A record as detections for `compare.match_detections`: boxes `[N, 4]` xyxy, scores
    `[N]`, labels `[N]` (category ids)."""
    b = np.asarray(record.get("boxes_xywh", []), np.float64).reshape(-1, 4)
    return dict(boxes=np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1),
                scores=np.asarray(record.get("scores", []), np.float64),
                labels=np.asarray(record.get("category_ids", []), np.int64))


def append_record(f, record: dict) -> None:
    """Appends `record` as one line to the open file `f` and flushes it to the OS (and the
    disk): a run killed after this call keeps the record."""
    f.write(json.dumps(record, separators=(",", ":")) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_records(path) -> tuple[dict[int, dict], str | None]:
    """The records of a results file by image id (first record of an id wins), and a note
    when a torn last line (from a run killed mid-write) was dropped: the file is cut back
    to its last complete line and the torn bytes are kept in `<path>.torn`. A bad line
    anywhere else is damage, not a kill: `ResultsFileError`. No file: no records."""
    path = Path(path)
    if not path.exists():
        return {}, None
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last element is what follows the last newline
    records: dict[int, dict] = {}
    good = 0  # bytes of the complete, valid lines read so far
    for n, line in enumerate(lines, 1):
        ended = n < len(lines)  # a newline follows this line
        if not line.strip():
            good += len(line) + ended
            continue
        try:
            rec = json.loads(line)
            if not (isinstance(rec, dict) and isinstance(rec.get("image_id"), int)):
                raise ValueError("not a record with an integer image_id")
            if not ended:
                raise ValueError("no end of line")
        except ValueError as e:
            if any(rest.strip() for rest in lines[n:]):
                raise ResultsFileError(
                    f"{path} line {n} is damaged ({e}) and is not the last line, so it is not "
                    f"a run killed mid-write; fix or remove that line, or start a new run"
                ) from None
            torn = data[good:]
            with open(path.with_name(path.name + ".torn"), "ab") as f:
                f.write(torn)
            with open(path, "r+b") as f:
                f.truncate(good)
            return records, (f"{path}: dropped a torn last line ({len(torn)} bytes, kept in "
                             f"{path.name}.torn); the image it was writing is run again")
        records.setdefault(rec["image_id"], rec)
        good += len(line) + 1
    return records, None
