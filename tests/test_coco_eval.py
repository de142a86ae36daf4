"""COCO evaluation: results conversion and COCOeval, bad inputs, and eval/coco.py end to end
(with the torchvision reference mode) on coco-mini; the run folder, streaming, resume and
unreadable images on a tiny generated shapes dataset with a stand-in detector (seconds)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jaxmrcnn.classes import torchvision_coco_classes
from jaxmrcnn.coco import (
    DatasetError,
    ResultsFileError,
    append_record,
    category_mapping,
    dataset_from_dict,
    evaluate,
    image_record,
    load_dataset,
    read_records,
    record_detections,
    records_to_results,
    to_coco_results,
)
from jaxmrcnn.images import ImageReadError, read_image

ROOT = Path(__file__).resolve().parent.parent


def _eval_cli():
    spec = importlib.util.spec_from_file_location("eval_coco", ROOT / "eval" / "coco.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gt(coco_mini):
    return load_dataset(coco_mini / "annotations" / "instances_train2017.json")


def _gt_as_detections(gt, image_id, rng=None):
    """The image's annotations as detections ([N, 4] xyxy, scores, class index, masks)."""
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                       a["bbox"][1] + a["bbox"][3]] for a in anns], np.float64).reshape(-1, 4)
    masks = np.stack([gt.annToMask(a).astype(bool) for a in anns]) if anns else None
    labels = np.array([a["category_id"] for a in anns], np.int64)  # torchvision index == id
    scores = np.ones(len(anns))
    if rng is not None:  # perturb: jitter boxes, erode masks, random scores, drop some
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(2, 1)
        boxes = boxes + rng.normal(0, 0.08, boxes.shape) * wh
        scores = rng.random(len(anns))
        masks = masks & (rng.random(masks.shape) > 0.15)
        keep = rng.random(len(anns)) > 0.2
        boxes, scores, labels, masks = boxes[keep], scores[keep], labels[keep], masks[keep]
    return boxes, scores, labels, masks


def _results(gt, cat_map, rng=None):
    bbox, segm = [], []
    for iid in sorted(gt.imgs):
        b, s = to_coco_results(iid, *_gt_as_detections(gt, iid, rng), cat_map)
        bbox += b
        segm += s
    return bbox, segm


def test_ground_truth_as_detections_scores_ap_1(gt):
    names, ids = torchvision_coco_classes()
    cat_map = category_mapping(names, ids, gt)  # torchvision's COCO classes fit coco-mini
    assert len(cat_map) == 80
    bbox, segm = _results(gt, cat_map)
    assert len(bbox) == len(segm) == len(gt.anns)
    for iou_type, res in (("bbox", bbox), ("segm", segm)):
        stats, per_cat, table = evaluate(gt, res, iou_type, per_category=True)
        assert "Average Precision" in table
        for name, v in zip(("AP", "AP50", "AP75"), stats[:3], strict=True):
            assert v == pytest.approx(1.0), f"{iou_type} {name} = {v}"
        # AP per area and AR@100: 1.0 (or -1 where no object has that area); AR@1 and AR@10
        # cannot reach 1 on images with more than 1 or 10 objects.
        for v in stats[3:6] + stats[8:]:
            assert v == pytest.approx(1.0) or v == -1
        assert 0.5 < stats[6] < 1.0 and 0.9 < stats[7] <= 1.0
        assert all(v == pytest.approx(1.0) for v in per_cat.values() if not np.isnan(v))


def test_perturbed_detections_equal_pycocotools_directly(gt, tmp_path):
    names, ids = torchvision_coco_classes()
    cat_map = category_mapping(names, ids, gt)
    bbox, segm = _results(gt, cat_map, np.random.default_rng(0))
    for iou_type, res in (("bbox", bbox), ("segm", segm)):
        ours, _, _ = evaluate(gt, res, iou_type)
        assert 0.05 < ours[0] < 0.95  # a non-trivial score
        path = tmp_path / f"{iou_type}.json"
        path.write_text(json.dumps(res))  # through JSON, as users and the CLI do
        ref_gt = COCO(str(gt_path(gt, tmp_path)))
        ev = COCOeval(ref_gt, ref_gt.loadRes(str(path)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ours == [float(v) for v in ev.stats]


def gt_path(gt, tmp_path):
    p = tmp_path / "gt.json"
    if not p.exists():
        p.write_text(json.dumps(gt.dataset))
    return p


# ---------------------------------------------------------------------------------------------
# Bad datasets and class maps
# ---------------------------------------------------------------------------------------------
def _mini_dataset():
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3],
                         "area": 9, "iscrowd": 0, "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]}],
        "categories": [{"id": 1, "name": "person"}],
    }


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("annotations"), "missing the top-level field 'annotations'"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\] has no 'file_name'"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] has no 'bbox'"),
        (lambda d: d["annotations"][0].pop("segmentation"), "no 'segmentation'"),
        (lambda d: d["categories"][0].pop("name"), r"categories\[0\] has no 'name'"),
        (lambda d: d["annotations"][0].update(image_id=7), "image_id 7"),
        (lambda d: d["annotations"][0].update(category_id=3), "category_id 3"),
        (lambda d: d.update(images={}), "'images' must be a list"),
    ],
)
def test_non_coco_json_names_the_problem(edit, message):
    d = _mini_dataset()
    edit(d)
    with pytest.raises(DatasetError, match=message):
        dataset_from_dict(d)


def test_unreadable_annotation_files(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DatasetError, match="is not JSON"):
        load_dataset(tmp_path / "x.json")
    with pytest.raises(DatasetError, match="no such annotation file"):
        load_dataset(tmp_path / "nope.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="top level must be an object"):
        load_dataset(tmp_path / "list.json")


def test_class_mismatch_is_refused_unless_mapped():
    d = _mini_dataset()
    d["categories"] = [{"id": 1, "name": "blob"}, {"id": 2, "name": "person"}]
    gt = dataset_from_dict(d)
    names, ids = torchvision_coco_classes()
    with pytest.raises(DatasetError, match=r"do not match.*'blob'.*--class-map"):
        category_mapping(names, ids, gt)
    m = category_mapping(names, ids, gt, {"person": "person", "dog": "blob"})
    assert m == {names.index("person"): 2, names.index("dog"): 1}
    with pytest.raises(DatasetError, match="no class 'unicorn'"):
        category_mapping(names, ids, gt, {"unicorn": "blob"})
    with pytest.raises(DatasetError, match="no category 'cat'"):
        category_mapping(names, ids, gt, {"dog": "cat"})


# ---------------------------------------------------------------------------------------------
# Image files as users have them
# ---------------------------------------------------------------------------------------------
def test_image_modes_are_converted(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.jpg")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 9, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray((rng.random((20, 30)) * 65535).astype(np.uint16)).save(tmp_path / "gray16.png")
    for name in ("rgb.png", "gray.png", "gray.jpg", "cmyk.jpg", "rgba.png", "palette.png",
                 "gray16.png"):
        a = read_image(tmp_path / name, (20, 30))
        assert a.shape == (20, 30, 3) and a.dtype == np.uint8, name
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped
    g = read_image(tmp_path / "gray.png")
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    cmyk = read_image(tmp_path / "cmyk.jpg").astype(int)
    assert np.abs(cmyk - rgb).mean() < 20  # JPEG-lossy, but the same picture


def test_exif_orientation(tmp_path):
    a = np.zeros((20, 30, 3), np.uint8)
    a[:5, :5] = 255  # a marker in the top-left corner
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    upright = read_image(tmp_path / "rot.jpg")
    assert upright.shape == (30, 20, 3)  # EXIF applied, as Detectron2's read_image
    assert upright[:5, -5:].mean() > 200  # the marker moved to the top-right
    assert read_image(tmp_path / "rot.jpg", (30, 20)).shape == (30, 20, 3)
    with pytest.warns(UserWarning, match="stored orientation"):  # annotated unrotated
        assert read_image(tmp_path / "rot.jpg", (20, 30)).shape == (20, 30, 3)
    with pytest.raises(ImageReadError, match="annotations list 31x20"):
        read_image(tmp_path / "rot.jpg", (20, 31))


def test_unreadable_images(tmp_path):
    (tmp_path / "a.jpg").write_text("not an image")
    with pytest.raises(ImageReadError, match="not a readable image"):
        read_image(tmp_path / "a.jpg")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "b.jpg")


# ---------------------------------------------------------------------------------------------
# eval/coco.py end to end, with the torchvision reference
# ---------------------------------------------------------------------------------------------
def _subset(coco_mini, tmp_path, n, missing=0):
    """A dataset of n coco-mini images (linked, not copied), `missing` of them absent."""
    data = json.loads((coco_mini / "annotations" / "instances_train2017.json").read_text())
    ims = sorted(data["images"], key=lambda im: im["id"])[:n]
    ids = {im["id"] for im in ims}
    sub = dict(
        data, images=ims, annotations=[a for a in data["annotations"] if a["image_id"] in ids]
    )
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for im in ims[missing:]:
        (img_dir / im["file_name"]).symlink_to(coco_mini / "train2017" / im["file_name"])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(sub))
    return img_dir, ann, ims


def test_cli_reference_mode_agrees(tv_v1, coco_mini, tmp_path, capsys):
    weights = tmp_path / "w.jaxmrcnn.msgpack"
    tv_v1.checkpoint.save(weights)
    img_dir, ann, ims = _subset(coco_mini, tmp_path, 4, missing=1)
    cli = _eval_cli()
    base = ["--weights", str(weights), "--images", str(img_dir), "--annotations", str(ann)]

    out = tmp_path / "out"
    rc = cli.main(base + ["--out", str(out), "--reference", "torchvision", "--per-category"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert ims[0]["file_name"] in printed.err and "no such file" in printed.err  # the missing one
    assert "skipped 1 of 4 images" in printed.out
    assert "jaxmrcnn" in printed.err and "torchvision" in printed.err  # progress bars
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["images_skipped"] == 1
    assert "per_category_AP" in metrics
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    assert len((out / "reference_results.jsonl").read_text().splitlines()) == 3
    gt = COCO(str(ann))
    for iou_type in ("bbox", "segm"):
        res = json.loads((out / f"results_{iou_type}.json").read_text())
        assert len(res) >= 150  # ~100 detections per image
        dt = gt.loadRes(str(out / f"results_{iou_type}.json"))  # loads as COCO results
        assert len(dt.anns) == len(res)
        for name in metrics[iou_type]:
            a, b = metrics[iou_type][name], metrics["reference"][iou_type][name]
            assert abs(a - b) <= 0.002, f"{iou_type} {name}: {a} vs torchvision {b}"
    ref = metrics["reference"]
    assert ref["detections"] >= 150
    assert ref["matched_fraction"] >= 0.99, ref
    assert "diff" in printed.out


def test_cli_errors(tmp_path, capsys):
    cli = _eval_cli()
    assert cli.main(["--weights", "w", "--images", str(tmp_path)]) == 1
    assert "together" in capsys.readouterr().err
    d = _mini_dataset()
    del d["categories"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    rc = cli.main(["--weights", str(tmp_path / "w"), "--images", str(tmp_path),
                   "--annotations", str(tmp_path / "bad.json")])
    assert rc == 1 and "missing the top-level field 'categories'" in capsys.readouterr().err
    (tmp_path / "ok.json").write_text(json.dumps(_mini_dataset()))
    (tmp_path / "w").write_bytes(b"weights")
    rc = cli.main(["--weights", str(tmp_path / "w"), "--images", str(tmp_path),
                   "--annotations", str(tmp_path / "ok.json")])
    assert rc == 1 and "is --images the right folder?" in capsys.readouterr().err
    assert not (tmp_path / "eval_results").exists()


def test_evaluation_leaves_inputs_intact(gt):
    """pycocotools mutates what it is given (RLEs replace polygons, results gain fields);
    evaluate() works on copies, so the same ground truth and results can be used again."""
    before_gt = json.dumps(gt.dataset, sort_keys=True)
    names, ids = torchvision_coco_classes()
    bbox, segm = _results(gt, category_mapping(names, ids, gt), np.random.default_rng(1))
    before_res = json.dumps(segm, sort_keys=True)
    first = evaluate(gt, segm, "segm")[0]
    assert json.dumps(gt.dataset, sort_keys=True) == before_gt
    assert json.dumps(segm, sort_keys=True) == before_res
    assert evaluate(gt, segm, "segm")[0] == first
    assert evaluate(gt, [], "bbox")[0][0] == 0.0  # an empty result set scores 0, no crash


# ---------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------
def test_record_round_trip_equals_coco_results():
    rng = np.random.default_rng(0)
    boxes = np.array([[1.0, 2.0, 9.5, 7.25], [0.0, 0.0, 4.0, 4.0], [3, 3, 5, 6]])
    masks = rng.random((3, 10, 12)) > 0.5
    cls = np.array([1, 3, 12])  # 12 is not in the map: dropped
    cat_map = {1: 1, 3: 3}
    rec = image_record(5, boxes, [0.9, 0.5, 0.4], cls, masks, cat_map, file_name="x.png")
    assert rec["file_name"] == "x.png" and rec["category_ids"] == [1, 3]
    assert json.loads(json.dumps(rec)) == rec  # JSON-ready
    assert records_to_results([rec]) == to_coco_results(5, boxes, [0.9, 0.5, 0.4], cls, masks,
                                                        cat_map)
    d = record_detections(rec)
    np.testing.assert_allclose(d["boxes"], boxes[:2], atol=1e-3)
    assert list(d["labels"]) == [1, 3]


def test_torn_last_line_is_dropped_and_damage_refused(tmp_path):
    path = tmp_path / "results.jsonl"
    with open(path, "a") as f:
        for i in (1, 2):
            append_record(f, {"image_id": i, "error": "x"})
    whole = path.read_bytes()
    assert read_records(path) == ({1: {"image_id": 1, "error": "x"},
                                   2: {"image_id": 2, "error": "x"}}, None)
    for torn in (b'{"image_id": 3, "boxes_xy', b'{"image_id": 3}'):  # cut mid-line / before \n
        path.write_bytes(whole + torn)
        records, note = read_records(path)
        assert sorted(records) == [1, 2] and "torn last line" in note
        assert path.read_bytes() == whole  # cut back to the last complete line
        assert (tmp_path / "results.jsonl.torn").read_bytes().endswith(torn)  # kept
    path.write_bytes(b'{"image_id": 1}\nnot json\n{"image_id": 2}\n')
    with pytest.raises(ResultsFileError, match="line 2 is damaged.*not the last line"):
        read_records(path)
    assert read_records(tmp_path / "none.jsonl") == ({}, None)


# ---------------------------------------------------------------------------------------------
# eval/coco.py: streaming, resume, unreadable images, run folders (a stand-in detector)
# ---------------------------------------------------------------------------------------------
class FakeDetector:
    """Stands in for jaxmrcnn.Detector: each image's detections are its ground truth,
    perturbed with a seed of its own (so AP is not trivial and the same on every run).
    `kill_after`: raise KeyboardInterrupt (a kill) once that many images are done.
    `check_file`: before each image, the results file must hold one line per image done
    (detections are written as produced). `stream=True` gives it a `stream` method."""

    def __init__(self, gt, img_dir, *, kill_after=None, check_file=None):
        from jaxmrcnn.detector import Detections

        self.batch_size, self.seen, self.kill_after, self.check_file = 1, [], kill_after, check_file
        self.by_pixels = {}
        for iid, info in gt.imgs.items():
            path = img_dir / info["file_name"]
            if not path.is_file():
                continue
            try:
                key = read_image(path).tobytes()
            except ImageReadError:
                continue
            b, s, c, m = _gt_as_detections(gt, iid, np.random.default_rng(iid))
            self.by_pixels[key] = (iid, Detections(
                boxes=b.astype(np.float32), scores=s.astype(np.float32), labels=c, masks=m,
                class_index=c, names=[str(x) for x in c]))

    def _one(self, image):
        if self.check_file is not None:
            assert len(self.check_file.read_text().splitlines()) == len(self.seen)
        if self.kill_after is not None and len(self.seen) >= self.kill_after:
            raise KeyboardInterrupt
        iid, d = self.by_pixels[image.tobytes()]
        self.seen.append(iid)
        return d

    def __call__(self, images):
        return [self._one(a) for a in images]


class FakeStreamDetector(FakeDetector):
    def stream(self, images):
        for a in images:
            yield self._one(a)


@pytest.fixture
def shapes(tmp_path):
    from jaxmrcnn.shapes import generate

    img_dir, ann = generate(tmp_path / "data", n_images=6, size_hw=(150, 200))
    (tmp_path / "w.msgpack").write_bytes(b"stand-in weights")  # hashed, never loaded
    return img_dir, ann, load_dataset(ann), tmp_path / "w.msgpack"


@pytest.fixture
def cli(monkeypatch):
    from jaxmrcnn.checkpoint import Checkpoint
    from jaxmrcnn.config import torchvision_maskrcnn_r50_fpn

    mod = _eval_cli()
    names, ids = torchvision_coco_classes()
    ckpt = Checkpoint(torchvision_maskrcnn_r50_fpn(), {}, names, ids, {})
    monkeypatch.setattr(mod, "load_weights", lambda path: ckpt)
    mod.detectors = []  # the stand-ins made, in order

    def use(factory):
        def make(ckpt, **kw):
            mod.detectors.append(factory())
            return mod.detectors[-1]
        monkeypatch.setattr(mod, "make_detector", make)

    mod.use = use
    return mod


def _args(shapes, *extra):
    img_dir, ann, _, weights = shapes
    return ["--weights", str(weights), "--images", str(img_dir), "--annotations", str(ann),
            "--min-size", "40", "--max-size", "56", *map(str, extra)]


def test_detections_stream_to_the_results_file(cli, shapes, tmp_path, capsys):
    img_dir, ann, gt, _ = shapes
    out = tmp_path / "run"
    cli.use(lambda: FakeDetector(gt, img_dir, check_file=out / "results.jsonl"))
    assert cli.main(_args(shapes, "--out", out)) == 0, capsys.readouterr().err
    assert cli.detectors[0].seen == sorted(gt.imgs)  # one at a time, each line written first
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6
    from pycocotools import mask as mask_utils

    for line, iid in zip(lines, sorted(gt.imgs), strict=True):
        rec = json.loads(line)
        assert rec["image_id"] == iid and rec["file_name"] == gt.imgs[iid]["file_name"]
        n = len(rec["scores"])
        assert n > 0
        assert len(rec["boxes_xywh"]) == len(rec["category_ids"]) == len(rec["masks"]) == n
        assert mask_utils.decode(rec["masks"][0]).shape == (150, 200)
    params = json.loads((out / "run.json").read_text())
    assert params["min_size"] == 40 and params["annotations_sha256"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["images_skipped"] == 0
    assert 0.1 < metrics["segm"]["AP"] < 0.99  # perturbed ground truth: a real score
    assert len(json.loads((out / "results_bbox.json").read_text())) == sum(
        len(json.loads(x)["scores"]) for x in lines)


@pytest.mark.parametrize("factory", [FakeDetector, FakeStreamDetector])
def test_resume_after_a_kill_equals_one_shot(cli, shapes, tmp_path, capsys, factory):
    img_dir, ann, gt, _ = shapes
    cli.use(lambda: factory(gt, img_dir))
    assert cli.main(_args(shapes, "--out", tmp_path / "one")) == 0
    one_shot = json.loads((tmp_path / "one" / "metrics.json").read_text())

    run = tmp_path / "killed"
    cli.use(lambda: factory(gt, img_dir, kill_after=3))
    assert cli.main(_args(shapes, "--out", run)) == 130
    assert f"--resume {run}" in capsys.readouterr().err
    results = run / "results.jsonl"
    assert len(results.read_text().splitlines()) == 3 and not (run / "metrics.json").exists()
    with open(results, "a") as f:  # killed while writing the 4th image's line
        f.write('{"image_id": 4, "file_name": "shape_0003.png", "boxes_xywh": [[1.0, 2')

    cli.use(lambda: factory(gt, img_dir))
    assert cli.main(["--resume", str(run)]) == 0, capsys.readouterr().err
    assert "torn last line" in capsys.readouterr().err
    assert cli.detectors[-1].seen == sorted(gt.imgs)[3:]  # only the images not done
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["bbox"] == one_shot["bbox"] and resumed["segm"] == one_shot["segm"]
    assert resumed["images"] == 6 and resumed["images_done_before"] == 3
    for name in ("results_bbox.json", "results_segm.json"):
        assert (run / name).read_text() == (tmp_path / "one" / name).read_text()

    cli.use(lambda: factory(gt, img_dir))  # resuming a finished run recomputes, runs nothing
    assert cli.main(["--resume", str(run)]) == 0
    assert cli.detectors[-1].seen == []
    assert json.loads((run / "metrics.json").read_text())["segm"] == one_shot["segm"]


def test_resume_with_other_parameters_is_refused(cli, shapes, tmp_path, capsys):
    img_dir, ann, gt, weights = shapes
    run = tmp_path / "run"
    cli.use(lambda: FakeDetector(gt, img_dir, kill_after=2))
    assert cli.main(_args(shapes, "--out", run)) == 130
    before = (run / "results.jsonl").read_bytes()
    capsys.readouterr()
    other_weights = tmp_path / "other.msgpack"
    other_weights.write_bytes(b"other weights")
    other_ann = tmp_path / "ann.json"
    other_ann.write_text(json.dumps(dict(gt.dataset, annotations=gt.dataset["annotations"][1:])))
    for extra, message in [
        (["--min-size", "48"], "min_size: 48 given, 40 recorded"),
        (["--max-images", "4"], "max_images: 4 given, None recorded"),
        (["--weights", other_weights], "weights: .*other.msgpack differs in content"),
        (["--annotations", other_ann], "annotations: .*ann.json differs in content"),
        (["--reference", "torchvision"], "reference: 'torchvision' given, None recorded"),
    ]:
        assert cli.main(["--resume", str(run), *map(str, extra)]) == 1
        err = capsys.readouterr().err
        assert re.search(message, err) and "never mixed" in err, err
    assert cli.main(["--resume", str(run), "--out", str(tmp_path / "x")]) == 1
    assert "without --out" in capsys.readouterr().err
    assert cli.main(["--resume", str(tmp_path)]) == 1
    assert "not an evaluation run folder" in capsys.readouterr().err
    assert (run / "results.jsonl").read_bytes() == before  # nothing was touched
    assert len(cli.detectors) == 1  # and nothing was run
    same = weights.with_name("copy.msgpack")  # the same weights elsewhere are the same run
    same.write_bytes(weights.read_bytes())
    cli.use(lambda: FakeDetector(gt, img_dir))
    assert cli.main(["--resume", str(run), "--weights", str(same), "--min-size", "40"]) == 0


def test_unreadable_images_are_skipped_and_counted(cli, shapes, tmp_path, capsys):
    img_dir, ann, gt, _ = shapes
    names = [gt.imgs[i]["file_name"] for i in sorted(gt.imgs)]
    cli.use(lambda: FakeStreamDetector(gt, img_dir))
    assert cli.main(_args(shapes, "--out", tmp_path / "clean")) == 0
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())

    data = (img_dir / names[1]).read_bytes()
    (img_dir / names[1]).write_bytes(data[: len(data) // 2])  # truncated
    (img_dir / names[3]).write_text("not an image")
    (img_dir / names[4]).unlink()  # missing
    for strict, rc in ((False, 0), (True, 1)):
        run = tmp_path / f"strict{strict}"
        args = _args(shapes, "--out", run) + (["--strict"] if strict else [])
        assert cli.main(args) == rc
        err = capsys.readouterr().err
        for k in (1, 3, 4):
            assert re.search(rf"skipped image {k + 1} \({names[k]}\): .*{names[k]}", err), err
        assert ("--strict: 3 images could not be read" in err) == strict
        metrics = json.loads((run / "metrics.json").read_text())  # written either way
        assert metrics["images"] == 3 and metrics["images_listed"] == 6
        assert metrics["images_skipped"] == 3
        assert [s["file_name"] for s in metrics["skipped"]] == [names[1], names[3], names[4]]
        assert "no such file" in metrics["skipped"][2]["error"]
        assert sorted(cli.detectors[-1].seen) == [1, 3, 6]  # never given the bad ones
        assert metrics["segm"] != clean["segm"]  # evaluated on the 3 readable images only
        assert len((run / "results.jsonl").read_text().splitlines()) == 6


def test_every_run_gets_its_own_folder(cli, shapes, tmp_path, capsys, monkeypatch):
    img_dir, ann, gt, _ = shapes
    monkeypatch.chdir(tmp_path)
    cli.use(lambda: FakeDetector(gt, img_dir))
    assert cli.main(_args(shapes)) == 0
    assert cli.main(_args(shapes)) == 0
    runs = sorted((tmp_path / "eval_results").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("run-") for r in runs)
    assert all((r / "metrics.json").is_file() for r in runs)

    out = runs[0]
    keep = out / "notes.txt"
    keep.write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli.main(_args(shapes, "--out", out, "--max-images", 2)) == 1
    err = capsys.readouterr().err
    assert "already holds files" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert cli.main(_args(shapes, "--out", out, "--max-images", 2, "--overwrite")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and json.loads((out / "run.json").read_text())["max_images"] == 2
    assert keep.read_text() == "mine"  # only the run's own files were replaced
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


class BrokenModel:
    """A torchvision stand-in that fails on its second image."""

    def __init__(self, fail=True):
        self.n, self.fail = 0, fail

    def __call__(self, xs):
        import torch

        self.n += 1
        if self.fail and self.n == 2:
            raise RuntimeError("out of memory in the reference")
        h, w = xs[0].shape[1:]
        return [dict(boxes=torch.zeros((0, 4)), scores=torch.zeros(0),
                     labels=torch.zeros(0, dtype=torch.int64), masks=torch.zeros((0, 1, h, w)))]


def test_failed_reference_leaves_no_stale_metrics(cli, shapes, tmp_path, capsys, monkeypatch):
    img_dir, ann, gt, _ = shapes
    run = tmp_path / "run"
    cli.use(lambda: FakeDetector(gt, img_dir))
    assert cli.main(_args(shapes, "--out", run, "--max-images", 3)) == 0
    old = json.loads((run / "metrics.json").read_text())
    assert old["images"] == 3

    monkeypatch.setattr(cli, "make_reference", lambda ckpt: BrokenModel())
    assert cli.main(_args(shapes, "--out", run, "--overwrite", "--reference", "torchvision")) == 1
    err = capsys.readouterr().err
    assert "reference run failed (RuntimeError: out of memory" in err and "--resume" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 6  # this run's numbers, not the previous run's
    assert metrics["reference"] == {"framework": "torchvision",
                                    "error": "RuntimeError: out of memory in the reference"}
    assert not (run / "reference_results_bbox.json").exists()
    assert len((run / "reference_results.jsonl").read_text().splitlines()) == 1

    # A resume that is killed leaves no metrics.json at all; one that succeeds retries the
    # reference from where it stopped.
    monkeypatch.setattr(
        cli, "make_reference", lambda ckpt: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    assert cli.main(["--resume", str(run)]) == 130
    assert not (run / "metrics.json").exists()
    model = BrokenModel(fail=False)
    monkeypatch.setattr(cli, "make_reference", lambda ckpt: model)
    assert cli.main(["--resume", str(run)]) == 0
    assert model.n == 5
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["reference"]["images"] == 6 and metrics["reference"]["bbox"]["AP"] == 0.0
