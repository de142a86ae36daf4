"""The Matterport family (pytorch-mask-rcnn) against tests/reference_matterport.py, a PyTorch
rewrite of the port's inference: converter (the port's exact key names, no flags), the ops
whose formulas differ from torchvision's (TF crop_and_resize, +1 NMS with >=, pixel anchors),
and whole-model parity on coco-mini.

The small case is a ResNet-50 with narrow widths (16 / 32 / 64, as the port's model with its
hard-coded widths replaced; the key names and shapes' layout are unchanged) on a 256 canvas
(IMAGE_MIN_DIM 200, IMAGE_MAX_DIM 256: the port takes any multiple of 64) with 300
proposals, so that the suite stays fast; the full-size ResNet-101 at 1024 is the slow test.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import reference_matterport as R
import torch

from jaxmrcnn.compare import match_detections, matched_box_error

SMALL = dict(BACKBONE_DEPTH=50, IMAGE_MIN_DIM=200, IMAGE_MAX_DIM=256,
             POST_NMS_ROIS_INFERENCE=300, BASE=16, FPN=32, RPN_CHANNELS=64, FC=64, MASK=32)


def runtime(cfg: R.RefConfig) -> dict:
    """The reference config's runtime fields (not in the state dict) as MatterportConfig's."""
    return dict(min_dim=cfg.IMAGE_MIN_DIM, max_dim=cfg.IMAGE_MAX_DIM,
                post_nms_rois=cfg.POST_NMS_ROIS_INFERENCE)


def mask_iou(a, b) -> float:
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


def check_parity(ref_out: dict, ours, *, min_detections: int):
    """>= 99% of the reference's detections matched (IoU >= 0.99, same class, |score diff| <=
    1e-3), matched boxes within 1 px (integer boxes: a rounding flip), mask IoU >= 0.98."""
    assert len(ref_out["scores"]) >= min_detections  # the calibrated model detects
    got = dict(boxes=ours.boxes, scores=ours.scores, labels=ours.class_index)
    pairs, frac = match_detections(ref_out, got)
    assert frac >= 0.99, (frac, len(ref_out["scores"]), len(ours))
    assert matched_box_error(ref_out, got, pairs) <= 1.0
    ious = [mask_iou(ref_out["masks"][i], ours.masks[j]) for i, j in pairs]
    assert min(ious) >= 0.98, min(ious)
    return frac, min(ious)


@pytest.fixture(scope="module")
def small(parity_images, tmp_path_factory):
    """(reference, Detector, conversion summary) of the small calibrated ResNet-50."""
    from jaxmrcnn.converters.from_torch import convert_file
    from jaxmrcnn.matterport.detector import MatterportDetector

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = R.RefConfig(**SMALL)
    model = R.build(cfg)
    R.calibrate(model, parity_images[:2])
    path = tmp_path_factory.mktemp("matterport") / "mask_rcnn_small.pth"
    torch.save(model.state_dict(), path)
    ckpt, summary = convert_file(path)  # no flags: detected by its key names
    ckpt.config = ckpt.config.replace(**runtime(cfg))
    return R.Reference(model), MatterportDetector(ckpt), summary, ckpt


def heads_from(det, ref_out, image):
    """Our model's heads and post-processing on the reference's exact proposals."""
    import jax.numpy as jnp

    from jaxmrcnn.matterport.model import MatterportMaskRCNN
    from jaxmrcnn.matterport.postprocess import unmold_detections
    from jaxmrcnn.matterport.preprocess import mold_image

    cfg = det.config
    x, w = mold_image(image, cfg)
    props = ref_out["proposals"]
    k = cfg.post_nms_rois
    boxes = np.zeros((1, k, 4), np.float32)
    boxes[0, :len(props)] = props
    valid = (np.arange(k) < len(props))[None]
    out, _ = MatterportMaskRCNN(cfg).apply({"params": det.params}, x[None], w[None],
                                           proposals=(jnp.asarray(boxes), jnp.asarray(valid)))
    o = {key: np.asarray(v[0]) for key, v in out.items()}
    b, s, c, m = unmold_detections(o["boxes"], o["scores"], o["class_index"], o["masks"],
                                   o["valid"], w, image.shape[:2])
    return dict(boxes=b[:, [1, 0, 3, 2]].astype(np.float32), scores=s, labels=c, masks=m)


def test_small_r50_parity_on_coco_mini(small, parity_images):
    """Proposals agree to 1e-4 (normalised); from the reference's exact proposals our heads
    and post-processing give the reference's detections (>= 99%, masks IoU >= 0.98); end to
    end >= 90% (reason below)."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from jaxmrcnn.matterport.model import MatterportMaskRCNN
    from jaxmrcnn.matterport.preprocess import mold_image

    ref, det, summary, ckpt = small
    assert summary[0].startswith("framework:       pytorch-mask-rcnn")
    assert ckpt.config.depth == 50 and ckpt.config.base_channels == 16
    assert ckpt.category_ids[:3] == [-1, 1, 2] and ckpt.category_ids[-1] == 90  # COCO ids
    outs = det(parity_images[:2])
    for image, ours in zip(parity_images[:2], outs, strict=True):
        r = ref(image)
        x, w = mold_image(image, det.config)
        _, aux = MatterportMaskRCNN(det.config).apply(
            {"params": det.params}, jnp.asarray(x[None]), jnp.asarray(w[None]), return_aux=True)
        props = np.asarray(aux["proposals"][0])[np.asarray(aux["proposal_valid"][0])]
        # As sets: >= 99% of the reference's proposals have one of ours within 1e-4 (an RPN
        # NMS decision at IoU ~0.7 or a score tie can swap one; measured: 299/300).
        assert props.shape == r["proposals"].shape
        close = np.abs(r["proposals"][:, None] - props[None]).max(-1) <= 1e-4
        assert close.any(1).mean() >= 0.99, close.any(1).mean()
        h = heads_from(det, r, image)
        check_parity(r, SimpleNamespace(boxes=h["boxes"], scores=h["scores"],
                                        class_index=h["labels"], masks=h["masks"]),
                     min_detections=20)
        # End to end, a proposal whose far edge is clipped to the canvas (normalised 1.0)
        # puts its last crop_and_resize sample within an ulp of H - 1, where the port's strict
        # range test zeroes the whole row or not: proposals that differ from the reference's
        # in the last bit (conv sums, exp) flip that coin. Measured here: 29/31 and 48/48
        # detections matched (the 2 misses: one such ROI, then per-class NMS).
        got = dict(boxes=ours.boxes, scores=ours.scores, labels=ours.class_index)
        _, frac = match_detections(r, got)
        assert frac >= 0.9, frac
        assert set(ours.labels) <= set(ckpt.category_ids[1:])


def test_converter_reads_the_ports_r101_file(tmp_path):
    """The port's MaskRCNN module tree at its COCO config: 690 tensors, 64,158,584 elements
    (CONVENTIONS_MATTERPORT.md §2), key names and shapes as the port writes them."""
    from jaxmrcnn.converters.from_torch import convert_file

    model = R.MaskRCNN(R.RefConfig())
    sd = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(sd) == 690 and sum(v.numel() for v in sd.values()) == 64_158_584
    shapes = {"fpn.C1.0.weight": (64, 3, 7, 7), "fpn.C4.22.conv3.weight": (1024, 256, 1, 1),
              "fpn.C5.0.downsample.0.weight": (2048, 1024, 1, 1),
              "fpn.P3_conv2.1.weight": (256, 256, 3, 3), "rpn.conv_class.weight": (6, 512, 1, 1),
              "classifier.conv1.weight": (1024, 256, 7, 7),
              "classifier.linear_bbox.weight": (324, 1024),
              "mask.deconv.weight": (256, 256, 2, 2), "mask.conv5.weight": (81, 256, 1, 1)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s and sd[k].dtype == torch.float32, k
    torch.save(sd, tmp_path / "mask_rcnn_coco.pth")
    ckpt, summary = convert_file(tmp_path / "mask_rcnn_coco.pth")
    cfg = ckpt.config
    assert (cfg.name, cfg.depth, cfg.num_classes, cfg.max_dim) == (
        "matterport_maskrcnn_r101_fpn", 101, 81, 1024)
    assert ckpt.classes[0] == "__background__" and ckpt.classes[1] == "person"
    k = ckpt.params["mask"]["deconv_kernel"]
    np.testing.assert_array_equal(k, sd["mask.deconv.weight"].numpy().transpose(2, 3, 0, 1))


def c_crop_and_resize(image, boxes, crop):
    """A line-by-line transliteration of crop_and_resize.c (float32 scalars)."""
    f = np.float32
    c, ih, iw = image.shape
    out = np.zeros((len(boxes), c, crop, crop), np.float32)
    for b, (y1, x1, y2, x2) in enumerate(boxes.astype(np.float32)):
        hs = (y2 - y1) * f(ih - 1) / f(crop - 1)
        ws = (x2 - x1) * f(iw - 1) / f(crop - 1)
        for y in range(crop):
            in_y = y1 * f(ih - 1) + f(y) * hs
            if in_y < 0 or in_y > ih - 1:
                continue
            top, bot = int(np.floor(in_y)), int(np.ceil(in_y))
            yl = in_y - f(top)
            for x in range(crop):
                in_x = x1 * f(iw - 1) + f(x) * ws
                if in_x < 0 or in_x > iw - 1:
                    continue
                left, right = int(np.floor(in_x)), int(np.ceil(in_x))
                xl = in_x - f(left)
                for d in range(c):
                    tl, tr = image[d, top, left], image[d, top, right]
                    bl, br = image[d, bot, left], image[d, bot, right]
                    t = tl + (tr - tl) * xl
                    bo = bl + (br - bl) * xl
                    out[b, d, y, x] = t + (bo - t) * yl
    return out


def test_crop_and_resize_matches_the_c_kernel():
    """The reference equals the C kernel bit for bit, ours to 1e-5, boxes at the edges included (a
    sample a hair past H - 1 is 0, not clamped as torchvision's roi_align would)."""
    import jax.numpy as jnp

    from jaxmrcnn.matterport import ops

    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 9, 11)).astype(np.float32)
    boxes = np.concatenate([np.sort(rng.uniform(-0.2, 1.2, (12, 2, 2)), axis=1)
                            .transpose(0, 2, 1).reshape(12, 4)[:, [0, 2, 1, 3]],
                            [[0, 0, 1, 1], [0.3, 0.1, 1.0, 0.9], [0.5, 0.5, 0.5, 0.5]]])
    boxes = boxes.astype(np.float32)  # (y1, x1, y2, x2)
    want = c_crop_and_resize(image, boxes, 7)
    ref = R.crop_and_resize(torch.from_numpy(image), torch.from_numpy(boxes), 7).numpy()
    np.testing.assert_array_equal(ref, want)
    table = jnp.asarray(image.transpose(1, 2, 0).reshape(-1, 3))
    n = len(boxes)
    ours = ops.crop_and_resize(table, jnp.asarray(boxes), jnp.zeros(n, jnp.int32),
                               jnp.tile(jnp.array([[9, 11]], jnp.int32), (n, 1)), 7)
    # Ours: the same zeroed rows / columns exactly, values within 1e-5 (measured 2.8e-6: XLA's
    # float32 sample positions differ from the C expression in the last bit; not yet traced).
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ours == 0, want == 0)
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5)
    assert (want == 0).any() and (want != 0).any()


def test_nms_plus_one_and_ge_as_the_c_kernel():
    """+1 areas and suppression at IoU == thr (nms.c's >=), which torchvision's nms (no +1,
    >) does not do; reference and ours keep the same boxes."""
    import jax.numpy as jnp
    import torchvision

    from jaxmrcnn.matterport.model import _nms

    # IoU with +1 exactly 0.5: boxes 0..9 and 0..4 (areas 100 and 50, intersection 50).
    dets = torch.tensor([[0, 0, 9, 9, 0.9], [0, 0, 9, 4, 0.8]], dtype=torch.float32)
    assert R.nms(dets, 0.5).tolist() == [0]
    assert torchvision.ops.nms(dets[:, [1, 0, 3, 2]], dets[:, 4], 0.5).tolist() == [0, 1]
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 60, (300, 2)).astype(np.float32)
    wh = rng.integers(1, 30, (300, 2)).astype(np.float32)
    boxes = np.round(np.concatenate([xy, xy + wh], 1))
    scores = rng.uniform(size=300).astype(np.float32)
    for thr in (0.3, 0.7):
        keep = R.nms(torch.from_numpy(np.c_[boxes, scores]), thr).numpy()
        idx, ok = _nms(jnp.asarray(boxes), jnp.asarray(scores), None, thr, 300, True)
        np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], keep)


def test_anchors_and_levels_match_the_reference():
    import jax.numpy as jnp

    from jaxmrcnn.matterport import matterport_maskrcnn_r101_fpn, ops

    cfg = matterport_maskrcnn_r101_fpn()
    a = ops.anchors(cfg)
    assert a.shape == (261_888, 4)
    np.testing.assert_array_equal(a, R.generate_pyramid_anchors(R.RefConfig()).numpy())
    # Levels: 224 px maps to P4; a box whose level is exactly x.5 rounds away from zero.
    side = np.float32(224 * 2**0.5 / 1024)  # level near 4.5: the rounding rule shows
    boxes = np.array([[0, 0, 224 / 1024, 224 / 1024], [0, 0, side, side], [0.5, 0.5, 0.5, 0.5],
                      [0, 0, 1, 1], [0, 0, 0.01, 0.01]], np.float32)
    ours = np.asarray(ops.roi_levels(jnp.asarray(boxes), 1024))
    y1, x1, y2, x2 = torch.from_numpy(boxes).chunk(4, dim=1)
    lv = 4 + torch.log(torch.sqrt((y2 - y1) * (x2 - x1)) / (224.0 / torch.sqrt(
        torch.tensor([1024.0 * 1024])))) / torch.log(torch.tensor([2.0]))
    want = R.round_half_away(lv).clamp(2, 5).int()[:, 0].numpy()
    np.testing.assert_array_equal(ours, want)
    assert ours[0] == 4 and ours[2] == 2 and ours[3] == 5


@pytest.mark.slow
@pytest.mark.skip(reason="never run in its final form (issue #13 open): run it before enabling")
def test_r101_full_size_parity_on_coco_mini(parity_images):
    """The port's COCO model at its own sizes (ResNet-101, 1024 canvas, 1000 proposals), seeded
    and calibrated on one image."""
    from jaxmrcnn.converters.from_torch import convert_file
    from jaxmrcnn.matterport.detector import MatterportDetector

    cfg = R.RefConfig()
    model = R.build(cfg)
    R.calibrate(model, parity_images[:1])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        torch.save(model.state_dict(), Path(d) / "mask_rcnn_coco.pth")
        ckpt, _ = convert_file(Path(d) / "mask_rcnn_coco.pth")
    from types import SimpleNamespace

    det = MatterportDetector(ckpt)
    r = R.Reference(model)(parity_images[0])
    h = heads_from(det, r, parity_images[0])
    check_parity(r, SimpleNamespace(boxes=h["boxes"], scores=h["scores"],
                                    class_index=h["labels"], masks=h["masks"]),
                 min_detections=20)
    (ours,) = det(parity_images[:1])  # end to end: see the small test (measured 97/100)
    got = dict(boxes=ours.boxes, scores=ours.scores, labels=ours.class_index)
    assert match_detections(r, got)[1] >= 0.9
