"""jaxmrcnn/data: COCO reading (polygons, RLE, crowd and bad annotations skipped and counted),
transforms (flip, nearest mask resize vs torch), canvas buckets, and the loader's
determinism and resumption (a loader restarted from a saved state yields the same arrays,
bit for bit, across an epoch boundary)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from jaxmrcnn.config import torchvision_maskrcnn_r50_fpn
from jaxmrcnn.data import Loader, LoaderConfig, read_coco, synth
from jaxmrcnn.data.coco import decode_mask, load_example
from jaxmrcnn.data.loader import hflip, pick_bucket, resize_masks_nearest

H, W = 48, 64


def _rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


@pytest.fixture
def messy(tmp_path):
    """Two images; every kind of annotation, good and bad."""
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(tmp_path / name)
    m = np.zeros((H, W), np.uint8)
    m[5:20, 30:50] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    good = [
        dict(id=1, image_id=1, category_id=1, bbox=[2, 3, 10, 12], iscrowd=0,
             segmentation=[_rect(2, 3, 12, 15)]),
        dict(id=2, image_id=1, category_id=2, bbox=[30, 5, 20, 15], iscrowd=0,
             segmentation=dict(size=[H, W], counts=rle["counts"].decode())),
        dict(id=3, image_id=1, category_id=2, bbox=[0, 30, 8, 8], iscrowd=0,  # uncompressed
             segmentation=dict(size=[H, W], counts=[30 * H] + [8, H - 8] * 7 + [8, 27 * H - 8])),
        dict(id=4, image_id=1, category_id=1, bbox=[40, 30, 10, 10], iscrowd=0,  # 2 parts
             segmentation=[_rect(40, 30, 45, 35), _rect(45, 35, 50, 40)]),
    ]
    bad = [
        dict(id=10, image_id=1, category_id=1, bbox=[0, 0, 5, 5], iscrowd=1,
             segmentation=dict(size=[H, W], counts=rle["counts"].decode())),  # crowd
        dict(id=11, image_id=1, category_id=1, bbox=[5, 5, 0, 4], iscrowd=0,
             segmentation=[_rect(5, 5, 5, 9)]),  # zero-width box
        dict(id=12, image_id=1, category_id=1, bbox=[1, 1, 4, 4], iscrowd=0,
             segmentation=[]),  # empty segmentation
        dict(id=13, image_id=1, category_id=1, bbox=[1, 1, 4, 4], iscrowd=0,
             segmentation=[[1, 1, 4, 4]]),  # polygon of 2 points
        dict(id=14, image_id=1, category_id=1, bbox=[60, 40, 20, 20], iscrowd=0,
             segmentation=[_rect(200, 200, 220, 220)]),  # polygon outside the image
        dict(id=15, image_id=1, category_id=99, bbox=[1, 1, 4, 4], iscrowd=0,
             segmentation=[_rect(1, 1, 5, 5)]),  # unknown category
        dict(id=16, image_id=1, category_id=1, bbox=None, iscrowd=0,
             segmentation=[_rect(1, 1, 5, 5)]),  # no box
        dict(id=17, image_id=2, category_id=1, bbox=[1, 1, 4, 4], iscrowd=1,
             segmentation=[_rect(1, 1, 5, 5)]),  # image 2: only a crowd region
    ]
    data = dict(images=[dict(id=1, file_name="a.png", height=H, width=W),
                        dict(id=2, file_name="b.png", height=H, width=W)],
                annotations=good + bad,
                categories=[dict(id=1, name="one"), dict(id=2, name="two")])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, tmp_path, m


def test_read_coco_skips_and_counts(messy):
    path, root, rle_mask = messy
    ds = read_coco(path, root)
    assert [r.image_id for r in ds.records] == [1]
    assert ds.num_classes == 3 and ds.classes() == (["__background__", "one", "two"], [-1, 1, 2])
    assert ds.skipped == {"crowd": 2, "degenerate_box": 2, "empty_segmentation": 1,
                          "degenerate_polygon": 1, "unknown_category": 1,
                          "image_without_annotations": 1}
    skipped = collections.Counter()
    rgb, boxes, classes, masks = load_example(ds.records[0], ds.class_index(), skipped)
    assert skipped == {"empty_mask": 1}  # the polygon outside the image (its box clamps)
    assert rgb.shape == (H, W, 3) and masks.shape == (4, H, W) and masks.dtype == np.uint8
    np.testing.assert_array_equal(classes, [1, 2, 2, 1])
    np.testing.assert_allclose(boxes[0], [2, 3, 12, 15])
    np.testing.assert_array_equal(masks[1], rle_mask)
    assert masks[2].sum() == 64 and masks[2][:8, 30:38].all()
    assert masks[3][30:35, 40:45].all() and masks[3][35:40, 45:50].all()
    assert masks[3][30:35, 46:50].sum() == 0


def test_mask_outside_image_is_skipped_at_load(tmp_path):
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "a.png")
    data = dict(images=[dict(id=1, file_name="a.png", height=H, width=W)],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[0, 0, 10, 10],
                                  iscrowd=0, segmentation=[_rect(100, 100, 120, 120)]),
                             dict(id=2, image_id=1, category_id=1, bbox=[0, 0, 10, 10],
                                  iscrowd=0, segmentation=[_rect(0, 0, 10, 10)])],
                categories=[dict(id=1, name="one")])
    (tmp_path / "a.json").write_text(json.dumps(data))
    ds = read_coco(tmp_path / "a.json", tmp_path)
    skipped = collections.Counter()
    _, boxes, _, masks = load_example(ds.records[0], ds.class_index(), skipped)
    assert skipped == {"empty_mask": 1} and len(boxes) == 1 and masks[0].sum() == 100


def test_decode_polygon_area():
    m = decode_mask([_rect(10, 10, 20, 30)], H, W)
    assert m.sum() == 10 * 20 and m[10:30, 10:20].all()


def test_resize_masks_nearest_matches_torch():
    rng = np.random.default_rng(0)
    m = (rng.random((3, 37, 53)) > 0.5).astype(np.uint8)
    for out in ((64, 91), (20, 29), (37, 53)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(m)[:, None].float(), size=out)
        np.testing.assert_array_equal(resize_masks_nearest(m, out), ref[:, 0].byte().numpy())


def test_hflip_boxes_follow_masks():
    m = np.zeros((1, H, W), np.uint8)
    m[0, 5:20, 3:11] = 1
    rgb = np.zeros((H, W, 3), np.uint8)
    _, boxes, masks = hflip(rgb, np.asarray([[3, 5, 11, 20]], np.float32), m)
    ys, xs = np.nonzero(masks[0])
    np.testing.assert_array_equal(boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_pick_bucket():
    buckets = ((128, 128), (96, 128), (128, 96), (256, 256))
    assert pick_bucket([(96, 128), (64, 96)], buckets) == (96, 128)
    assert pick_bucket([(96, 128), (128, 64)], buckets) == (128, 128)
    with pytest.raises(ValueError, match="no canvas bucket"):
        pick_bucket([(288, 32)], buckets)


@pytest.fixture(scope="module")
def synth_ds(tmp_path_factory):
    d, a = synth.generate(tmp_path_factory.mktemp("synth"), 7, seed=3, size_hw=(96, 128))
    return read_coco(a, d), a


def test_synth_annotations_are_visible_regions(synth_ds):
    ds, _ = synth_ds
    assert ds.names == ["circle", "square", "triangle", "ellipse", "star"] and not ds.skipped
    total = 0
    for rec in ds.records:
        _, boxes, _, masks = load_example(rec, ds.class_index())
        assert masks.sum(axis=0).max() <= 1  # occlusion: visible regions do not overlap
        for b, m in zip(boxes, masks, strict=True):
            ys, xs = np.nonzero(m)
            np.testing.assert_allclose(b, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        total += len(boxes)
    assert total >= len(ds.records)


def _loader(ds, state=None, workers=2):
    lcfg = LoaderConfig(batch_size=3, min_sizes=(64, 80, 96), max_size=128,
                        buckets=((96, 128), (128, 128)), max_gt=6, seed=5, workers=workers)
    return Loader(ds, torchvision_maskrcnn_r50_fpn().input, lcfg, state=state)


def test_loader_deterministic_and_resumable(synth_ds):
    ds, _ = synth_ds
    with _loader(ds) as a:
        assert a.batches_per_epoch == 2
        full = [next(a) for _ in range(5)]  # crosses two epoch boundaries
        assert a.state() == dict(epoch=2, batch=1, seed=5)
    with _loader(ds, workers=1) as b:
        first = [next(b) for _ in range(2)]
        saved = b.state()
    assert saved == dict(epoch=1, batch=0, seed=5)
    with _loader(ds, state=saved) as c:
        rest = [next(c) for _ in range(3)]
    for x, y in zip(full, first + rest, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    # fixed shapes, each epoch a permutation, augmentation used
    for bt in full:
        assert bt["images"].shape[0] == 3 and bt["gt_masks"].shape[1] == 6
        assert bt["gt_valid"].any(axis=1).all()
        v = bt["gt_valid"]
        bx = bt["gt_boxes"][v]
        assert (bx[:, 2] > bx[:, 0]).all() and (bx[:, 3] > bx[:, 1]).all()
        assert (bx[:, 2] <= bt["image_hw"][:, 1:2].repeat(6, 1)[v] + 1e-4).all()
    assert len(set(np.concatenate([full[0]["index"], full[1]["index"]]))) == 6
    sizes = {tuple(hw) for bt in full for hw in bt["image_hw"]}
    assert len(sizes) > 1
    with pytest.raises(ValueError, match="seed"):
        _loader(ds, state=dict(epoch=0, batch=0, seed=1))
