"""COCO box and mask AP of a converted Mask R-CNN, with pycocotools.

    python eval/coco.py --weights PATH --images DIR --annotations JSON
                        [--batch-size N] [--max-images N] [--out DIR] [--per-category]
                        [--skip-missing] [--class-map JSON] [--min-size S --max-size S]
                        [--reference torchvision]

Runs the Detector over the dataset's images in batches per canvas bucket, writes
`results_bbox.json`, `results_segm.json` (COCO results format, masks as RLE) and
`metrics.json` to --out, and prints the 12-number COCOeval table for bbox and segm.

`--reference torchvision` also runs the original torchvision model rebuilt from the same
converted weights over the same images, prints both tables side by side with the
difference, and how many of torchvision's detections ours match one to one.

With no arguments it runs a complete evaluation that needs nothing downloaded: a torchvision
Mask R-CNN with seeded random weights (calibrated as in tests/torch_reference.py; no trained
model ships yet), converted, on coco-mini (../shared/data/coco-mini or $JAXMRCNN_COCO_MINI)
or, where that folder is absent, on a generated shapes dataset, at a short side of 384, in
reference mode.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from jaxmrcnn.checkpoint import atomic_write  # noqa: E402
from jaxmrcnn.coco import (  # noqa: E402
    STAT_LABELS,
    STAT_NAMES,
    DatasetError,
    category_mapping,
    evaluate,
    load_dataset,
    to_coco_results,
)
from jaxmrcnn.compare import match_detections  # noqa: E402
from jaxmrcnn.images import ImageReadError, read_image  # noqa: E402

COCO_MINI = Path(os.environ.get("JAXMRCNN_COCO_MINI", ROOT.parent / "shared" / "data" / "coco-mini"))


class EvalError(Exception):
    """A problem with the command's inputs; printed as `error: ...` with exit status 1."""


# ---------------------------------------------------------------------------------------------
# The embedded default
# ---------------------------------------------------------------------------------------------
def default_weights(images, cache_dir: Path) -> Path:
    """Seeded, calibrated random torchvision v1 weights, converted (cached between runs)."""
    path = cache_dir / "default_eval_torchvision_v1_seed0.jaxmrcnn.msgpack"
    if path.exists():
        return path
    try:
        import torch
    except ImportError:
        raise EvalError("the default run builds torchvision weights and needs PyTorch: "
                        "pip install -e '.[torch]' (or pass --weights)") from None
    sys.path.insert(0, str(ROOT / "tests"))
    import torch_reference as R

    from jaxmrcnn.converters.from_torch import convert_file

    print("building the default weights: torchvision maskrcnn_resnet50_fpn, seed 0, "
          f"calibrated on {len(images)} images ...", flush=True)
    model = R.build("v1", min_size=384, max_size=640)
    R.calibrate(model, [R.to_tensor(a) for a in images])
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pth = Path(tmp) / "default_v1.pth"
        torch.save(model.state_dict(), pth)
        ckpt, _ = convert_file(pth)
    ckpt.source["note"] = "seeded random weights, calibrated (tests/torch_reference.py)"
    ckpt.save(path)
    return path


def default_dataset():
    if (COCO_MINI / "annotations" / "instances_train2017.json").exists():
        return (COCO_MINI / "train2017", COCO_MINI / "annotations" / "instances_train2017.json",
                f"coco-mini ({COCO_MINI}: 80 COCO train2017 images, official annotations)")
    from jaxmrcnn.shapes import generate

    tmp = Path(tempfile.mkdtemp(prefix="jaxmrcnn_shapes_"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    img_dir, ann = generate(tmp, n_images=16)
    return img_dir, ann, "a generated shapes dataset (16 images; coco-mini was not found)"


# ---------------------------------------------------------------------------------------------
# Running the models
# ---------------------------------------------------------------------------------------------
def _read_all(gt, image_ids, img_dir):
    for iid in image_ids:
        info = gt.imgs[iid]
        yield iid, read_image(img_dir / info["file_name"], (info["height"], info["width"]))


def run_jax(det, gt, image_ids, img_dir, cat_map, batch_size):
    """Ours over the images -> (bbox results, segm results, raw detections per image, seconds)."""
    bbox, segm, raw = [], [], {}
    t0 = time.perf_counter()
    group = max(1, batch_size) * 4  # images read and prepared at a time
    bar = tqdm(total=len(image_ids), desc="jaxmrcnn", unit="img", dynamic_ncols=True)
    ids = list(image_ids)
    for start in range(0, len(ids), group):
        chunk = list(_read_all(gt, ids[start : start + group], img_dir))
        prepared = det.prepare([a for _, a in chunk])
        outs = det.run_prepared(prepared)
        for (iid, _), out, p in zip(chunk, outs, prepared, strict=True):
            d = det.to_detections(out, p.orig_hw)
            b, s = to_coco_results(iid, d.boxes, d.scores, d.class_index, d.masks, cat_map)
            bbox += b
            segm += s
            raw[iid] = dict(boxes=d.boxes, scores=d.scores, labels=d.class_index)
            bar.update(1)
    bar.close()
    return bbox, segm, raw, time.perf_counter() - t0


def run_torchvision(ckpt, gt, image_ids, img_dir, cat_map):
    import torch

    from jaxmrcnn.converters.to_torch import torchvision_model

    model = torchvision_model(ckpt)
    bbox, segm, raw = [], [], {}
    t0 = time.perf_counter()
    for iid, img in tqdm(_read_all(gt, image_ids, img_dir), total=len(image_ids),
                         desc="torchvision", unit="img", dynamic_ncols=True):
        x = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0
        with torch.inference_mode():
            out = model([x])[0]
        boxes, scores = out["boxes"].numpy(), out["scores"].numpy()
        labels = out["labels"].numpy()
        masks = out["masks"][:, 0].numpy() > ckpt.config.paste.threshold
        b, s = to_coco_results(iid, boxes, scores, labels, masks, cat_map)
        bbox += b
        segm += s
        raw[iid] = dict(boxes=boxes, scores=scores, labels=labels)
    return bbox, segm, raw, time.perf_counter() - t0


def match_fraction(ref: dict, ours: dict, *, iou=0.99, score_tol=1e-3):
    """(matched, total): the reference's detections (per image id) matched one to one by
    ours: same label, box IoU >= iou, |score diff| <= score_tol."""
    matched = total = 0
    for iid, r in ref.items():
        total += len(r["scores"])
        if iid in ours:
            pairs, _ = match_detections(r, ours[iid], iou=iou, score_tol=score_tol)
            matched += len(pairs)
    return matched, total


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj).encode())


def print_table(title, stats, ref=None):
    print(f"\n{title}")
    if ref is None:
        for label, v in zip(STAT_LABELS, stats, strict=True):
            print(f" {label} = {v:.3f}")
        return
    print(f" {'':71} {'jaxmrcnn':>9} {'torchvision':>12} {'diff':>8}")
    for label, a, b in zip(STAT_LABELS, stats, ref, strict=True):
        print(f" {label} {a:9.4f} {b:12.4f} {a - b:+8.4f}")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="With no arguments: " + __doc__.split("With no arguments")[1])
    ap.add_argument("--weights", help="converted checkpoint (converters/from_torch.py)")
    ap.add_argument("--images", help="folder of the dataset's images")
    ap.add_argument("--annotations", help="COCO instances JSON")
    ap.add_argument("--batch-size", type=int, default=1, help="images per jitted batch")
    ap.add_argument("--max-images", type=int, default=None, help="evaluate the first N images")
    ap.add_argument("--out", default="eval_results", help="output folder (default: eval_results)")
    ap.add_argument("--per-category", action="store_true", help="also print per-category AP")
    ap.add_argument("--skip-missing", action="store_true",
                    help="evaluate without images listed in the JSON but missing on disk")
    ap.add_argument("--class-map", help="JSON object or file: model class name -> dataset "
                    "category name or id, for models trained on other classes")
    ap.add_argument("--min-size", type=int, help="override the model's resize short side")
    ap.add_argument("--max-size", type=int, help="override the model's resize long side cap")
    ap.add_argument("--buckets", choices=["auto", "coarse", "exact"],
                    help="canvas buckets: coarse (3 canvases, fewest compilations; the default "
                    "below 1000 images) or auto (finer, less padding; the default above)")
    ap.add_argument("--reference", choices=["torchvision"],
                    help="also run the original framework on the same weights and compare")
    return ap.parse_args(argv)


def run(args) -> dict:
    import jaxmrcnn
    from jaxmrcnn.checkpoint import load_checkpoint

    default = not (args.weights or args.images or args.annotations)
    if default:
        img_dir, ann, what = default_dataset()
        args.images, args.annotations = str(img_dir), str(ann)
        args.reference = args.reference or "torchvision"
        args.min_size, args.max_size = args.min_size or 384, args.max_size or 640
    elif not (args.weights and args.images and args.annotations):
        raise EvalError("pass --weights, --images and --annotations together (or none of them "
                        "for the built-in default evaluation)")
    img_dir = Path(args.images)
    if not img_dir.is_dir():
        raise EvalError(f"--images {img_dir}: no such folder")
    gt = load_dataset(args.annotations)

    image_ids = sorted(gt.imgs)
    if args.max_images is not None:
        image_ids = image_ids[: args.max_images]
    missing = [i for i in image_ids if not (img_dir / gt.imgs[i]["file_name"]).is_file()]
    if missing:
        names = ", ".join(gt.imgs[i]["file_name"] for i in missing[:5])
        if not args.skip_missing:
            raise EvalError(f"{len(missing)} of {len(image_ids)} images listed in "
                            f"{args.annotations} are missing from {img_dir} ({names}"
                            f"{', ...' if len(missing) > 5 else ''}); pass --skip-missing to "
                            f"evaluate the others")
        print(f"skipping {len(missing)} missing images ({names}{', ...' if len(missing) > 5 else ''})")
        image_ids = [i for i in image_ids if i not in set(missing)]
    if not image_ids:
        raise EvalError("no images to evaluate")

    if default:
        calib = [read_image(img_dir / gt.imgs[i]["file_name"]) for i in image_ids[:3]]
        args.weights = str(default_weights(calib, Path.home() / ".cache" / "jaxmrcnn"))
        print(f"evaluating seeded random torchvision weights (no trained model ships yet) on "
              f"{what}, short side {args.min_size}, in reference mode")
    ckpt = load_checkpoint(args.weights)
    size = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v}
    if size:
        ckpt.config = ckpt.config.replace(input=size)
    class_map = None
    if args.class_map:
        src = Path(args.class_map)
        try:
            class_map = json.loads(src.read_text() if src.is_file() else args.class_map)
        except json.JSONDecodeError as e:
            raise EvalError(f"--class-map is neither a JSON object nor a JSON file ({e})") from None
    cat_map = category_mapping(ckpt.classes, ckpt.category_ids, gt, class_map)

    buckets = args.buckets or ("coarse" if len(image_ids) < 1000 else "auto")
    det = jaxmrcnn.Detector(ckpt, batch_size=args.batch_size, buckets=buckets)
    bbox, segm, raw, secs = run_jax(det, gt, image_ids, img_dir, cat_map, args.batch_size)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "results_bbox.json", bbox)
    _write_json(out_dir / "results_segm.json", segm)
    metrics = dict(weights=str(args.weights), annotations=str(args.annotations),
                   images=len(image_ids), seconds=round(secs, 2),
                   images_per_second=round(len(image_ids) / secs, 3))
    per_cat = {}
    for iou_type, res in (("bbox", bbox), ("segm", segm)):
        stats, pc, _ = evaluate(gt, res, iou_type, image_ids=image_ids, per_category=True)
        metrics[iou_type] = dict(zip(STAT_NAMES, stats, strict=True))
        per_cat[iou_type] = pc
    if args.per_category:
        metrics["per_category_AP"] = per_cat

    ref = None
    if args.reference:
        rb, rs, rraw, rsecs = run_torchvision(ckpt, gt, image_ids, img_dir, cat_map)
        _write_json(out_dir / "reference_results_bbox.json", rb)
        _write_json(out_dir / "reference_results_segm.json", rs)
        matched, total = match_fraction(rraw, raw)
        ref = dict(framework=args.reference, seconds=round(rsecs, 2),
                   images_per_second=round(len(image_ids) / rsecs, 3),
                   detections=total, matched=matched,
                   matched_fraction=round(matched / max(total, 1), 5))
        for iou_type, res in (("bbox", rb), ("segm", rs)):
            stats, _, _ = evaluate(gt, res, iou_type, image_ids=image_ids)
            ref[iou_type] = dict(zip(STAT_NAMES, stats, strict=True))
        metrics["reference"] = ref

    for iou_type in ("bbox", "segm"):
        ours = [metrics[iou_type][n] for n in STAT_NAMES]
        theirs = [ref[iou_type][n] for n in STAT_NAMES] if ref else None
        print_table(f"{iou_type} ({len(image_ids)} images)", ours, theirs)
        if args.per_category:
            print(f"\nper-category {iou_type} AP:")
            for name, ap in sorted(per_cat[iou_type].items()):
                print(f"  {name:<20} {ap:.3f}")
    print(f"\njaxmrcnn: {len(image_ids)} images in {secs:.1f} s "
          f"({len(image_ids) / secs:.2f} images/s, end to end with compilation, paste and RLE)")
    if ref:
        print(f"torchvision: {ref['seconds']:.1f} s ({ref['images_per_second']:.2f} images/s); "
              f"{ref['matched']} of its {ref['detections']} detections matched one to one "
              f"({100 * ref['matched_fraction']:.2f}%)")
    _write_json(out_dir / "metrics.json", metrics)
    print(f"wrote {out_dir}/results_bbox.json, results_segm.json, metrics.json")
    return metrics


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (EvalError, DatasetError, ImageReadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad checkpoint, image or class map: say what, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
