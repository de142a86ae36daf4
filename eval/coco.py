"""COCO box and mask AP of a converted Mask R-CNN, with pycocotools.

    python eval/coco.py --weights PATH --images DIR --annotations JSON
                        [--batch-size N] [--max-images N] [--out RUN_DIR] [--overwrite]
                        [--resume RUN_DIR] [--strict] [--per-category] [--class-map JSON]
                        [--min-size S --max-size S] [--reference torchvision]

Every run writes to its own run folder: --out RUN_DIR (refused when it already holds files,
unless --overwrite), else a new eval_results/run-<date>-<time>/. In it:

    run.json                  the run's parameters (weights and annotations with their sha256)
    results.jsonl             one JSON line per image, appended and flushed as it is produced:
                              boxes_xywh, scores, category_ids, masks (RLE); or `error` for an
                              image that could not be read (it is skipped and counted)
    results_bbox.json, results_segm.json   the COCO results format, at the end
    metrics.json              written last, in one piece: the 12 COCOeval numbers for bbox
                              and segm, counts (images evaluated, skipped and why), timing

A killed run loses at most the image in flight: `--resume RUN_DIR` continues it (the images
already in results.jsonl are not run again; a torn last line is dropped), with the
parameters recorded in run.json; giving different ones is refused. The final numbers equal
an uninterrupted run's. Unreadable or missing images are reported on stderr, skipped and
counted; --strict makes them fail the run (exit status 1, after everything is written).

`--reference torchvision` also runs the original torchvision model rebuilt from the same
converted weights over the same images (streamed to reference_results.jsonl, resumable too),
prints both tables side by side with the difference, and how many of torchvision's
detections ours match one to one. If it fails, metrics.json records the failure beside our
numbers and the exit status is 1; --resume retries it.

With no arguments it runs a complete evaluation that needs nothing downloaded: the model
that ships with jaxmrcnn (jaxmrcnn/weights: a narrow R26-FPN Mask R-CNN trained here with
`train/train.py --preset shapes`) on the held-out split of its generated five-class shapes
dataset (jaxmrcnn/data/synth.py; generated once into ~/.cache/jaxmrcnn).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from jaxmrcnn.checkpoint import atomic_write  # noqa: E402
from jaxmrcnn.coco import (  # noqa: E402
    STAT_LABELS,
    STAT_NAMES,
    DatasetError,
    ResultsFileError,
    append_record,
    category_mapping,
    error_record,
    evaluate,
    image_record,
    load_dataset,
    read_records,
    record_detections,
    records_to_results,
)
from jaxmrcnn.compare import match_detections  # noqa: E402
from jaxmrcnn.images import ImageReadError, read_image  # noqa: E402


class EvalError(Exception):
    """A problem with the command's inputs; printed as `error: ...` with exit status 1."""


# ---------------------------------------------------------------------------------------------
# The embedded default
# ---------------------------------------------------------------------------------------------
def default_run():
    """(weights, images folder, annotations, description) of the built-in evaluation: the
    model that ships with jaxmrcnn (jaxmrcnn/weights), trained here on generated shapes, on
    its held-out validation split (generated once into ~/.cache/jaxmrcnn)."""
    from jaxmrcnn import weights

    try:
        model = weights.default_checkpoint_path()
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    img_dir, ann = weights.validation_set()
    return (model, img_dir, ann,
            f"the shipped shapes model ({model.name}) on its held-out split of "
            f"{weights.VAL_IMAGES} generated images ({img_dir.parent})")


# ---------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------
PARAMS_FILE = "run.json"
RESULTS_FILE = "results.jsonl"
REFERENCE_FILE = "reference_results.jsonl"
METRICS_FILE = "metrics.json"
RUN_FILES = (PARAMS_FILE, RESULTS_FILE, RESULTS_FILE + ".torn", REFERENCE_FILE,
             REFERENCE_FILE + ".torn", "results_bbox.json", "results_segm.json",
             "reference_results_bbox.json", "reference_results_segm.json", METRICS_FILE)
# The parameters that decide the numbers; a resumed run must have the same (weights and
# annotations are compared by content, the images folder by path).
RECORDED = ("weights", "images", "annotations", "min_size", "max_size", "max_images",
            "class_map", "reference")


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def new_run_dir(out, overwrite: bool) -> Path:
    """--out RUN_DIR (refused when it holds files, unless --overwrite: then the previous run's
    files are removed, nothing else), or a new eval_results/run-<date>-<time>[-n]/."""
    if out is None:
        stamp = time.strftime("run-%Y%m%d-%H%M%S")
        for n in range(1, 1000):
            run_dir = Path("eval_results") / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                run_dir.mkdir(parents=True)
                return run_dir
            except FileExistsError:
                continue
        raise EvalError(f"could not create a new folder eval_results/{stamp}-*; pass --out")
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise EvalError(f"--out {run_dir} is a file, not a folder")
    present = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if present and not overwrite:
        raise EvalError(
            f"--out {run_dir} already holds files ({', '.join(present[:4])}"
            f"{', ...' if len(present) > 4 else ''}), and a previous run's results are never "
            f"replaced silently: continue that run with --resume {run_dir}, replace it with "
            f"--overwrite, or pass a new --out folder (nothing was written)")
    for name in RUN_FILES if overwrite else ():
        (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def read_run_params(run_dir: Path) -> dict:
    path = run_dir / PARAMS_FILE
    if not path.is_file():
        raise EvalError(f"--resume {run_dir}: not an evaluation run folder (it has no "
                        f"{PARAMS_FILE}); start a new run with --out {run_dir}")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"--resume {run_dir}: {path} is not JSON ({e}); start a new run") from None
    if not isinstance(params, dict) or not set(RECORDED) <= set(params):
        raise EvalError(f"--resume {run_dir}: {path} does not list the run's parameters "
                        f"({', '.join(RECORDED)}); start a new run")
    return params


def take_recorded(args, recorded: dict) -> None:
    """The recorded parameters for those not given on the command line."""
    for key in RECORDED:
        if getattr(args, key) is None and recorded[key] is not None:
            value = recorded[key]
            setattr(args, key, json.dumps(value) if key == "class_map" else value)


def weights_file(weights: str) -> Path:
    """The file behind --weights: the path itself, or a model-zoo name's verified download."""
    from jaxmrcnn import zoo

    if not Path(weights).exists() and zoo.is_known(weights):
        try:
            return zoo.resolve(weights)
        except zoo.ZooError as e:
            raise EvalError(str(e)) from None
    return Path(weights)


def run_params(args, class_map) -> dict:
    wfile = weights_file(args.weights)
    return dict(weights=str(wfile.resolve()), weights_sha256=sha256(wfile),
                images=str(Path(args.images).resolve()),
                annotations=str(Path(args.annotations).resolve()),
                annotations_sha256=sha256(args.annotations),
                min_size=args.min_size, max_size=args.max_size, max_images=args.max_images,
                class_map=class_map, reference=args.reference)


def check_same_params(run_dir: Path, recorded: dict, params: dict) -> None:
    diffs = []
    for key in RECORDED:
        if key in ("weights", "annotations"):
            if recorded.get(f"{key}_sha256") != params[f"{key}_sha256"]:
                diffs.append(f"{key}: {params[key]} differs in content from the recorded "
                             f"{recorded[key]}")
        elif recorded[key] != params[key]:
            diffs.append(f"{key}: {params[key]!r} given, {recorded[key]!r} recorded")
    if diffs:
        raise EvalError(
            f"--resume {run_dir}: the run was started with other parameters ("
            + "; ".join(diffs) + "). Results from different parameters are never mixed: "
            "resume without them (the recorded ones are used) or start a new run with --out")


# ---------------------------------------------------------------------------------------------
# Running the models, streaming each image's detections to the results file
# ---------------------------------------------------------------------------------------------
def read_images(gt, image_ids, img_dir, on_error):
    """(image_id, image) for the readable images; `on_error(image_id, message)` for others."""
    for iid in image_ids:
        info = gt.imgs[iid]
        try:
            image = read_image(img_dir / info["file_name"], (info["height"], info["width"]))
        except ImageReadError as e:
            on_error(iid, str(e))
            continue
        yield iid, image


def detect(det, items):
    """The inference loop: (image_id, image) pairs -> (image_id, Detections), in order.
    Uses `det.stream(images)` where the Detector has it (host preparation overlapped with
    device compute), else `det(chunk)` per `det.batch_size` images."""
    if hasattr(det, "stream"):
        ids = deque()

        def images():
            for iid, image in items:
                ids.append(iid)
                yield image

        for d in det.stream(images()):
            yield ids.popleft(), d
        return
    size = max(1, getattr(det, "batch_size", 1))
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield from zip([i for i, _ in chunk], det([a for _, a in chunk]), strict=True)
            chunk = []
    if chunk:
        yield from zip([i for i, _ in chunk], det([a for _, a in chunk]), strict=True)


def make_detector(ckpt, *, batch_size, buckets):
    import jaxmrcnn

    return jaxmrcnn.Detector(ckpt, batch_size=batch_size, buckets=buckets)


def make_reference(ckpt):
    """The torchvision model rebuilt from the converted weights."""
    from jaxmrcnn.converters.to_torch import torchvision_model

    return torchvision_model(ckpt)


def torchvision_detect(model, items, mask_threshold):
    """Like `detect`, for the torchvision model (one image at a time)."""
    import torch

    for iid, img in items:
        x = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0
        with torch.inference_mode():
            out = model([x])[0]
        yield iid, SimpleNamespace(boxes=out["boxes"].numpy(), scores=out["scores"].numpy(),
                                   class_index=out["labels"].numpy(),
                                   masks=out["masks"][:, 0].numpy() > mask_threshold)


def stream_run(path: Path, run_dir: Path, gt, image_ids, img_dir, cat_map, detector, desc):
    """Runs `detector(items)` (a `detect`-like function) over the images of `image_ids` that
    `path` has no record of yet, appending each image's record as it comes. Memory does not
    grow with the number of images. Returns (images run now, seconds)."""
    done, note = read_records(path)
    if note:
        print(note, file=sys.stderr)
    todo = [i for i in image_ids if i not in done]
    del done
    bar = tqdm(total=len(image_ids), initial=len(image_ids) - len(todo), desc=desc, unit="img",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    lock = threading.Lock()  # `Detector.stream` reads images (and so skips some) in a thread
    with open(path, "a") as f:

        def write(record):
            with lock:
                append_record(f, record)
                bar.update(1)

        def skip(iid, message):
            write(error_record(iid, message, file_name=gt.imgs[iid]["file_name"]))
            tqdm.write(f"skipped image {iid} ({gt.imgs[iid]['file_name']}): {message}",
                       file=sys.stderr)

        try:
            for iid, d in detector(read_images(gt, todo, img_dir, skip)):
                write(image_record(iid, d.boxes, d.scores, d.class_index, d.masks, cat_map,
                                   file_name=gt.imgs[iid]["file_name"]))
        except BaseException:
            bar.close()
            print(f"stopped: the images done so far are kept in {path}; continue with "
                  f"python eval/coco.py --resume {run_dir}", file=sys.stderr)
            raise
    bar.close()
    return len(todo), time.perf_counter() - t0


def match_fraction(ref: dict, ours: dict, *, iou=0.99, score_tol=1e-3):
    """(matched, total): the reference's detections (records per image id) matched one to one
    by ours: same category, box IoU >= iou, |score diff| <= score_tol."""
    matched = total = 0
    for iid, r in ref.items():
        r = record_detections(r)
        total += len(r["scores"])
        if iid in ours:
            pairs, _ = match_detections(r, record_detections(ours[iid]), iou=iou,
                                        score_tol=score_tol)
            matched += len(pairs)
    return matched, total


def read_results(path: Path, image_ids, what: str):
    """The records of `path` for `image_ids` (all must be there), in that order."""
    records, note = read_records(path)
    if note:
        print(note, file=sys.stderr)
    lacking = [i for i in image_ids if i not in records]
    if lacking:
        raise EvalError(f"{path} has no {what} record for {len(lacking)} images (e.g. image "
                        f"{lacking[0]}); continue the run with --resume {path.parent}")
    return {i: records[i] for i in image_ids}


def per_second(n, secs):
    return round(n / secs, 3) if n and secs > 0 else None


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
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With no arguments: " + __doc__.split("With no arguments")[1],
    )
    ap.add_argument("--weights", help="converted checkpoint (converters/from_torch.py), a "
                    "framework's checkpoint file, or a model-zoo name (converters/from_torch.py "
                    "--list)")
    ap.add_argument("--images", help="folder of the dataset's images")
    ap.add_argument("--annotations", help="COCO instances JSON")
    ap.add_argument("--batch-size", type=int, default=1, help="images per jitted batch")
    ap.add_argument("--max-images", type=int, default=None, help="evaluate the first N images")
    ap.add_argument("--out", help="the run folder (refused if it holds files, unless "
                    "--overwrite); default: a new eval_results/run-<date>-<time>/")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the previous run's files in --out")
    ap.add_argument("--resume", metavar="RUN_DIR",
                    help="continue a stopped run in its folder, with its recorded parameters")
    ap.add_argument("--strict", action="store_true",
                    help="exit with status 1 if any image could not be read (they are skipped "
                    "and counted either way)")
    ap.add_argument("--per-category", action="store_true", help="also print per-category AP")
    # Missing images are skipped and counted by default now; the old flag is still accepted.
    ap.add_argument("--skip-missing", action="store_true", help=argparse.SUPPRESS)
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


def parse_class_map(text):
    if not text:
        return None
    src = Path(text)
    try:
        return json.loads(src.read_text() if src.is_file() else text)
    except json.JSONDecodeError as e:
        raise EvalError(f"--class-map is neither a JSON object nor a JSON file ({e})") from None


def load_weights(path):
    """A converted checkpoint, a framework's checkpoint file, or a model-zoo name."""
    from jaxmrcnn import zoo
    from jaxmrcnn.detector import read_any_checkpoint

    try:
        return read_any_checkpoint(path)
    except zoo.ZooError as e:
        raise EvalError(str(e)) from None


def run(args) -> dict:
    recorded = None
    if args.resume:
        if args.out or args.overwrite:
            raise EvalError("--resume continues a run in its own folder: pass it without --out "
                            "and --overwrite")
        recorded = read_run_params(Path(args.resume))
        take_recorded(args, recorded)
    default = not (args.weights or args.images or args.annotations)
    if default:
        model, img_dir, ann, what = default_run()
        args.weights, args.images, args.annotations = str(model), str(img_dir), str(ann)
        print(f"evaluating {what}")
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
    if not image_ids:
        raise EvalError("no images to evaluate")
    if not any((img_dir / gt.imgs[i]["file_name"]).is_file() for i in image_ids):
        raise EvalError(f"none of the {len(image_ids)} images listed in {args.annotations} is in "
                        f"{img_dir} (e.g. {gt.imgs[image_ids[0]]['file_name']}); is --images "
                        f"the right folder?")

    ckpt = load_weights(args.weights)
    size = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v}
    if size:
        ckpt.config = ckpt.config.replace(input=size)
    class_map = parse_class_map(args.class_map)
    cat_map = category_mapping(ckpt.classes, ckpt.category_ids, gt, class_map)

    params = run_params(args, class_map)
    if recorded is not None:
        run_dir = Path(args.resume)
        check_same_params(run_dir, recorded, params)
        # A finished run's metrics are recomputed at the end; none stays beside new results.
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    else:
        run_dir = new_run_dir(args.out, args.overwrite)
        _write_json(run_dir / PARAMS_FILE, params)
    print(f"run folder: {run_dir}")

    buckets = args.buckets or ("coarse" if len(image_ids) < 1000 else "auto")
    det = make_detector(ckpt, batch_size=args.batch_size, buckets=buckets)
    n_run, secs = stream_run(run_dir / RESULTS_FILE, run_dir, gt, image_ids, img_dir, cat_map,
                             lambda items: detect(det, items), "jaxmrcnn")
    records = read_results(run_dir / RESULTS_FILE, image_ids, "jaxmrcnn")
    skipped = [dict(image_id=i, file_name=r.get("file_name"), error=r["error"])
               for i, r in records.items() if "error" in r]
    ok_ids = [i for i, r in records.items() if "error" not in r]
    if not ok_ids:
        raise EvalError(f"none of the {len(image_ids)} images could be read (see the 'skipped' "
                        f"lines above and {run_dir / RESULTS_FILE})")
    bbox, segm = records_to_results(records[i] for i in ok_ids)
    _write_json(run_dir / "results_bbox.json", bbox)
    _write_json(run_dir / "results_segm.json", segm)
    metrics = dict(weights=str(args.weights), annotations=str(args.annotations),
                   run_dir=str(run_dir), images=len(ok_ids), images_listed=len(image_ids),
                   images_skipped=len(skipped), skipped=skipped,
                   images_done_before=len(image_ids) - n_run, images_run_now=n_run,
                   seconds=round(secs, 2), images_per_second=per_second(n_run, secs))
    per_cat = {}
    for iou_type, res in (("bbox", bbox), ("segm", segm)):
        stats, pc, _ = evaluate(gt, res, iou_type, image_ids=ok_ids, per_category=True)
        metrics[iou_type] = dict(zip(STAT_NAMES, stats, strict=True))
        per_cat[iou_type] = pc
    if args.per_category:
        metrics["per_category_AP"] = per_cat
    del bbox, segm

    ref = None
    if args.reference:
        ref = run_reference(args, ckpt, gt, ok_ids, img_dir, cat_map, run_dir, records)
        metrics["reference"] = ref
    ref_ok = ref is not None and "error" not in ref

    for iou_type in ("bbox", "segm"):
        ours = [metrics[iou_type][n] for n in STAT_NAMES]
        theirs = [ref[iou_type][n] for n in STAT_NAMES] if ref_ok else None
        print_table(f"{iou_type} ({len(ok_ids)} images)", ours, theirs)
        if args.per_category:
            print(f"\nper-category {iou_type} AP:")
            for name, ap in sorted(per_cat[iou_type].items()):
                print(f"  {name:<20} {ap:.3f}")
    print(f"\njaxmrcnn: {n_run} images in {secs:.1f} s ({n_run / max(secs, 1e-9):.2f} images/s, "
          f"end to end with compilation, paste and RLE)")
    if metrics["images_done_before"]:
        print(f"resumed: {metrics['images_done_before']} of {len(image_ids)} images were "
              f"already in {run_dir / RESULTS_FILE}")
    if skipped:
        print(f"skipped {len(skipped)} of {len(image_ids)} images that could not be read "
              f"(listed in metrics.json)")
    if ref_ok:
        print(f"torchvision: {ref['seconds']:.1f} s ({ref['images_per_second'] or 0:.2f} "
              f"images/s); {ref['matched']} of its {ref['detections']} detections matched one "
              f"to one ({100 * ref['matched_fraction']:.2f}%)")
    _write_json(run_dir / METRICS_FILE, metrics)
    print(f"wrote {run_dir}/results_bbox.json, results_segm.json, metrics.json")
    return metrics


def run_reference(args, ckpt, gt, ok_ids, img_dir, cat_map, run_dir, records) -> dict:
    """The reference framework over the images ours evaluated -> its part of metrics.json;
    a failure is recorded there (`error`) rather than raised."""
    try:
        model = make_reference(ckpt)
        n_run, secs = stream_run(
            run_dir / REFERENCE_FILE, run_dir, gt, ok_ids, img_dir, cat_map,
            lambda items: torchvision_detect(model, items, ckpt.config.paste.threshold),
            args.reference)
        refs = read_results(run_dir / REFERENCE_FILE, ok_ids, args.reference)
    except Exception as e:  # noqa: BLE001 - any failure of the other framework is reported
        message = f"{type(e).__name__}: {e}"
        print(f"error: the {args.reference} reference run failed ({message}); jaxmrcnn's "
              f"numbers are in {run_dir / METRICS_FILE}; retry the reference with "
              f"python eval/coco.py --resume {run_dir}", file=sys.stderr)
        return dict(framework=args.reference, error=message)
    ids = [i for i, r in refs.items() if "error" not in r]
    rb, rs = records_to_results(refs[i] for i in ids)
    _write_json(run_dir / "reference_results_bbox.json", rb)
    _write_json(run_dir / "reference_results_segm.json", rs)
    matched, total = match_fraction({i: refs[i] for i in ids}, records)
    ref = dict(framework=args.reference, images=len(ids), seconds=round(secs, 2),
               images_per_second=per_second(n_run, secs), detections=total, matched=matched,
               matched_fraction=round(matched / max(total, 1), 5))
    for iou_type, res in (("bbox", rb), ("segm", rs)):
        stats, _, _ = evaluate(gt, res, iou_type, image_ids=ids)
        ref[iou_type] = dict(zip(STAT_NAMES, stats, strict=True))
    return ref


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        metrics = run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (EvalError, DatasetError, ResultsFileError, ImageReadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad checkpoint, image or class map: say what, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "error" in metrics.get("reference", {}):
        return 1
    if args.strict and metrics["images_skipped"]:
        first = metrics["skipped"][0]
        print(f"error: --strict: {metrics['images_skipped']} images could not be read (e.g. "
              f"{first['file_name']}: {first['error']}); they are listed in "
              f"{metrics['run_dir']}/metrics.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
