"""COCO evaluation: results conversion and COCOeval, bad inputs, and eval/coco.py end to end
(with the torchvision reference mode) on coco-mini."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jaxmrcnn.classes import torchvision_coco_classes
from jaxmrcnn.coco import (
    DatasetError,
    category_mapping,
    dataset_from_dict,
    evaluate,
    load_dataset,
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
        boxes = boxes + rng.normal(0, 0.08, boxes.shape) * (boxes[:, 2:] - boxes[:, :2]).repeat(2, 1)
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
    sub = dict(data, images=ims, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
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

    assert cli.main(base + ["--out", str(tmp_path / "o0")]) == 1
    err = capsys.readouterr().err
    assert f"1 of 4 images listed in {ann} are missing" in err and ims[0]["file_name"] in err
    assert "--skip-missing" in err and not (tmp_path / "o0" / "metrics.json").exists()

    out = tmp_path / "out"
    rc = cli.main(base + ["--out", str(out), "--skip-missing", "--reference", "torchvision",
                          "--per-category"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "skipping 1 missing images" in printed.out
    assert "jaxmrcnn" in printed.err and "torchvision" in printed.err  # progress bars
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 3 and "per_category_AP" in metrics
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
