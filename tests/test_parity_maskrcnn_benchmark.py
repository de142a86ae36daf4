"""Model parity with maskrcnn-benchmark (e2e_mask_rcnn_R_50_FPN_1x and
e2e_mask_rcnn_X_101_32x8d_FPN_1x) on real coco-mini images, against RECORDED outputs of the real
maskrcnn-benchmark (MB).

MB is not installable from the package registry, so CI cannot run it. The goldens in
tests/golden/maskrcnn_benchmark_<arch>/ (see tests/golden_maskrcnn_benchmark.py) hold what the
real MB computed on a checkpoint that numpy rebuilds bit for bit (a seeded synthetic state dict
with MB's anchors plus a small calibration record, checked by sha256), loaded by MB's own
DetectronCheckpointer from the `model_final.pth` a DDP training run writes, in PyTorch's legacy
serialization like MB's model-zoo files. Here that checkpoint is written again, legacy (converted
by `python converters/from_torch.py FILE`, no flags) and zip (converted in-process), and our
model is compared with the goldens stage by stage. The goldens are non-trivial (asserted: >= 50
detections of distinct scores, masks mostly non-empty, proposals spread), so these tests cannot
pass on degenerate outputs. They need only coco-mini, numpy and torch: they never skip for want
of MB. Live tests (marker `live`: `JAXMRCNN_MASKRCNN_BENCHMARK_SRC=... pytest -m live`;
deselected otherwise, and failing without the variable) rerun MB itself: the synthetic
keys/shapes/order/anchors and the file's container are a real model's and
MB's Checkpointer's, a fresh run on the rebuilt checkpoint equals the golden exactly (a stale
golden fails), the converted config equals what MB's config states, and the class mapping is
MB's COCODataset's.

Tolerances:
  input          sampled values of the normalised padded tensor: |diff| <= 1e-5 * (1 + |x|)
                 (the same uint8 Pillow resize; x * 255 - mean in float32, both exact).
  FPN features   sampled max |ours - ref| <= 1e-3 * max |ref| of the level. Observed <= 3e-5
                 (R_50), 7e-5 (X_101_32x8d): float32 sums in a different order through
                 50-100+ layers.
  proposals      the same set: >= 99.8% of the reference's 1000 boxes have a box of ours
                 within 0.05 px on every coordinate (a proposal can only differ where two
                 objectness values, or an IoU and the 0.7 threshold, are within float noise);
                 matched ones' objectness probabilities (MB sorts by the sigmoid) within 1e-4.
  detections     >= 99% of the reference's matched one to one (same class: MB's label 1..80
                 is our class index, so the same COCO category; box IoU >= 0.99, |score diff|
                 <= 1e-3), IN MB'S ORDER (by class, then proposal index; ours with
                 result_order "class"): the matched pairs keep their relative order, and the
                 i-th detection of MB is our i-th wherever everything before it matched; the
                 matched boxes' coordinates within BOX_TOL_PX = 0.05 px in original-image
                 pixels. Float noise moves a box by ~1e-3 px (rel. ~1e-5 on deltas of boxes up
                 to ~640 px; observed <= 7e-3 px for R_50, 2.1e-2 px for X_101_32x8d, whose
                 features carry 2x the noise). A +1 slip breaks it (scratch runs of
                 R_50 with one preset field flipped): the box coder without +1 (roi_heads
                 coder_style "torchvision") moves matched boxes by 0.67-0.80 px and only
                 42-58% match; roi_heads box_plus_one False (clip to W, not W - 1; NMS IoU
                 without +1) moves the boxes clipped at the right/bottom border by 1.3 px on
                 000000072258 (98% match: fails; 000000000790 has no such box and passes);
                 the RPN's box_plus_one False changes 2.5-8% of the proposals, its coder all.
  mask probs     28x28 probabilities of matched detections (the golden keeps them for its top
                 20 detections by score, as float16: rounding <= 2.5e-4) within 3e-3. A
                 convention slip (aligned ROIAlign, a wrong class channel, a flipped deconv)
                 changes them by ~0.1 or more. Observed <= 6e-4 (R_50), 1.4e-3 (X_101_32x8d).
  paste          MB's own recorded 28x28 probabilities at its own boxes, pasted by our paste
                 (MB's Masker: padding 1, int-truncated expanded box, bilinear, > 0.5), give
                 its masks except where the pasted probability is within 5e-4 (the float16
                 rounding) of the 0.5 threshold. Observed: identical.
  masks          pasted at the original size by the Detector, on matched pairs: IoU >= 0.98,
                 or every differing pixel has our pasted probability within 3e-3 (the mask
                 probabilities' tolerance; pasting interpolates, adding no error) of the 0.5
                 threshold, or the integer paste box moved by one pixel because an expanded
                 box coordinate within float noise of an integer truncated the other way
                 (observed: x2 489.9969 for MB, 490.0038 for us, on a 440 px wide box: IoU
                 0.967) and our 28x28 probabilities pasted at MB's own box give its mask up to
                 that tolerance: float noise, not a method error; mean IoU >= 0.995.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import golden_maskrcnn_benchmark as G
import jax
import numpy as np
import pytest
import reference_maskrcnn_benchmark as R
import torch
from conftest import PARITY_IMAGES, SMALL, require_source
from parity import mask_iou, match_detections, matched_box_error

from jaxmrcnn import ops, preprocess
from jaxmrcnn.checkpoint import load_checkpoint
from jaxmrcnn.config import PRESETS
from jaxmrcnn.converters.from_torch import convert_file
from jaxmrcnn.detector import Detector, resolve_compiler_options
from jaxmrcnn.model import MaskRCNN, flatten_tree

ROOT = Path(__file__).resolve().parent.parent
ARCHS = [pytest.param("R_50", id="R_50"),
         pytest.param("X_101_32x8d", id="X_101_32x8d", marks=pytest.mark.slow)]


def needs_mb(test):
    """A live test (marker `live`, deselected unless `-m live`): it runs maskrcnn-benchmark's own
    source, named by $JAXMRCNN_MASKRCNN_BENCHMARK_SRC (a checkout holding the
    `maskrcnn_benchmark` package and `configs/`), and fails without it; the goldens cover CI."""
    return pytest.mark.live(pytest.mark.usefixtures("mb_source")(test))


@pytest.fixture
def mb_source():
    return require_source(R, "maskrcnn-benchmark")


BOX_TOL_PX = 0.05
MASK_PROB_TOL = 3e-3
FLOAT16_PROB_TOL = 5e-4  # the golden's float16 probabilities: rounding <= 2.5e-4, pasted too

# MB's contiguous label 1..80 -> COCO category id: the 80 ids of the COCO 2017 annotations in
# increasing order (COCODataset: `{v: i + 1 for i, v in enumerate(coco.getCatIds())}`; checked
# against the annotation file below and against MB's COCODataset when its source is present).
COCO_CATEGORY_IDS = np.array([
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
])  # fmt: skip


def mb_to_coco(labels) -> np.ndarray:
    return COCO_CATEGORY_IDS[np.asarray(labels, np.int64) - 1]


class Case:
    """One architecture: the rebuilt checkpoint as legacy and zip `model_final.pth`, both
    converted, and the goldens."""

    def __init__(self, arch: str, tmp: Path):
        self.arch = arch
        sd = G.reconstruct(arch)  # raises GoldenError if the sha256 differs
        self.golden, self.meta = G.load_outputs(arch)
        (tmp / "legacy").mkdir()
        (tmp / "zip").mkdir()
        self.legacy = G.save_mb_checkpoint(arch, sd, tmp / "legacy" / "model_final.pth",
                                           legacy=True)
        self.zip = G.save_mb_checkpoint(arch, sd, tmp / "zip" / "model_final.pth", legacy=False)
        del sd
        proc = subprocess.run(
            [sys.executable, str(ROOT / "converters" / "from_torch.py"), str(self.legacy)],
            capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stderr
        self.legacy_summary = proc.stdout
        self.legacy_checkpoint = load_checkpoint(self.legacy.with_suffix(".jaxmrcnn.msgpack"))
        ckpt, self.summary = convert_file(self.zip)
        self.converted_config = ckpt.config  # before the test size is set
        ckpt.config = ckpt.config.replace(input=SMALL)
        self.checkpoint = ckpt
        # One canvas holding every image's padded size, as the Detector's buckets do: one
        # program for the three images; the model computes each image's padded area as if it
        # were padded exactly (MB's padding to a multiple of 32), which the comparisons check.
        self.canvas = tuple(int(max(g["input_hw"][d] for g in self.golden)) for d in (0, 1))
        self._cache: dict = {}

    def fn(self):
        if "fn" not in self._cache:
            model = MaskRCNN(self.checkpoint.config)
            self._cache["fn"] = jax.jit(  # compiled as the Detector compiles it
                lambda p, im, info: model.apply({"params": p}, im, info, return_aux=True),
                compiler_options=resolve_compiler_options(),
            )
        return self._cache["fn"]

    def paste_soft(self, masks, boxes, out_hw):
        """Our pasted probabilities (no threshold) of `masks [N, 28, 28]` at `boxes`."""
        if "paste" not in self._cache:
            pc = self.checkpoint.config.paste
            self._cache["paste"] = jax.jit(
                lambda m, b, out_hw: ops.paste_masks(m, b, out_hw, method=pc.method,
                                                     threshold=None, padding=pc.padding),
                static_argnames=("out_hw",),
            )
        return np.asarray(self._cache["paste"](masks, boxes, tuple(out_hw)))

    def threshold(self, soft):
        pc = self.checkpoint.config.paste
        return soft > pc.threshold if pc.strict else soft >= pc.threshold

    def detector(self) -> Detector:
        if "detector" not in self._cache:
            self._cache["detector"] = Detector(self.checkpoint, compilation_cache=False)
        return self._cache["detector"]


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(f"mb_{request.param}"))


# ---------------------------------------------------------------------------------------------
# The checkpoint and its conversion


def test_legacy_and_zip_files_convert_to_identical_checkpoints(case):
    assert not zipfile.is_zipfile(case.legacy) and zipfile.is_zipfile(case.zip)
    data = torch.load(case.legacy, map_location="cpu", weights_only=True)
    assert set(data) == {"model", "optimizer", "scheduler", "iteration"}
    assert all(k.startswith("module.") for k in data["model"])
    a, b = case.legacy_checkpoint, case.checkpoint
    assert a.config == case.converted_config
    assert a.classes == b.classes and list(a.category_ids) == list(b.category_ids)
    fa, fb = dict(flatten_tree(a.params)), dict(flatten_tree(b.params))
    assert fa.keys() == fb.keys()
    differ = [k for k in fa if not np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]))]
    assert not differ, f"{len(differ)} params differ between legacy and zip, e.g. {differ[:3]}"


def test_converter_reads_the_architecture_off_the_file(case):
    preset = PRESETS[f"maskrcnn_benchmark/{G.ARCHS[case.arch][0]}"]()
    assert case.converted_config == preset
    assert case.converted_config.roi_heads.result_order == "class"
    fmt = "detected format: maskrcnn_benchmark ({'model': ...}, 'module.' prefix stripped)"
    assert case.summary[0].startswith(fmt), case.summary[0]
    assert fmt in case.legacy_summary
    name = "ResNet-50" if case.arch == "R_50" else "ResNeXt-101 32x8d"
    assert f"{name}, 80 classes + background (COCO)" in case.summary[1]
    assert "(5 stored anchor levels checked)" in case.summary[2]
    assert "(5 stored anchor levels checked)" in case.legacy_summary


def test_mb_labels_map_to_coco_category_ids(case, coco_mini):
    """MB reports labels 1..80 (0 = background), which are our class indices; ours report
    COCO category ids (Detections.labels) and the class index (Detections.class_index).
    Label l is category COCO_CATEGORY_IDS[l - 1]: label 1 is 'person', id 1."""
    ann = json.loads((coco_mini / "annotations" / "instances_train2017.json").read_text())
    cats = sorted(ann["categories"], key=lambda c: c["id"])
    assert [c["id"] for c in cats] == COCO_CATEGORY_IDS.tolist()
    ckpt = case.checkpoint
    assert ckpt.category_ids[0] == -1 and ckpt.classes[0] == "__background__"
    assert list(ckpt.category_ids[1:]) == COCO_CATEGORY_IDS.tolist()
    assert ckpt.classes[1:] == [c["name"] for c in cats]
    assert mb_to_coco([1])[0] == 1 and ckpt.classes[1] == "person"
    assert mb_to_coco([80])[0] == 90 and ckpt.classes[80] == "toothbrush"


def test_golden_check_cli(capsys):
    assert G.main(["check", "--arch", "R_50"]) == 0
    assert "R_50: 312 tensors reconstructed, sha256 matches" in capsys.readouterr().out


def test_golden_record_checks_its_sha256(tmp_path):
    """A changed calibration record (or generator) is caught, with the way out named."""
    arch = "R_50"
    shutil.copytree(G.golden_dir(arch), G.golden_dir(arch, tmp_path))
    rec = G.load_calibration(arch, tmp_path)
    rec["bn_mean"] = rec["bn_mean"].copy()
    rec["bn_mean"][0] = np.float16(rec["bn_mean"][0] + np.float16(1))
    np.savez_compressed(G.golden_dir(arch, tmp_path) / "calibration.npz", **rec)
    with pytest.raises(G.GoldenError,
                       match="regenerate with python tests/golden_maskrcnn_benchmark.py"):
        G.reconstruct(arch, root=tmp_path)


# ---------------------------------------------------------------------------------------------
# Parity with the goldens


def check_reference_is_nontrivial(g):
    assert len(g["scores"]) >= 50, "reference has too few detections for a meaningful test"
    assert len(np.unique(g["scores"])) == len(g["scores"]), "reference scores are not distinct"
    assert g["masks"].any(axis=(1, 2)).mean() > 0.5, "reference masks mostly empty"
    assert len(np.unique(g["labels"])) >= 10, "reference detections are of few classes"
    assert np.all(np.diff(g["labels"]) >= 0), "reference detections are not in MB's class order"
    p = g["proposals"]
    assert len(p) == 1000
    assert len(np.unique(g["proposal_scores"])) == len(p), "proposal objectness ties"
    centres = (p[:, :2] + p[:, 2:]) / 2
    assert centres.std(axis=0).min() > 20, "proposals are not spread over the image"


def run_ours(case, image):
    cfg = case.checkpoint.config
    prep = preprocess.prepare(image, cfg.input)
    images, info, _ = preprocess.batch([prep], case.canvas)
    det, aux = jax.device_get(case.fn()(case.checkpoint.params, images, info))
    return prep, images, det, aux


def nearest_boxes(ref, ours, tol):
    """For each reference box, the index of a box of ours within `tol` px on every
    coordinate (one to one, greedy in reference order), or -1."""
    d = np.abs(ref[:, None, :].astype(np.float64) - ours[None, :, :]).max(-1)
    used = np.zeros(len(ours), bool)
    out = np.full(len(ref), -1)
    for i in range(len(ref)):
        cand = np.where((d[i] <= tol) & ~used)[0]
        if len(cand):
            j = cand[np.argmin(d[i, cand])]
            used[j] = True
            out[i] = j
    return out


def check_image(case, index, image):
    g = case.golden[index]
    info = case.meta["images"][index]
    assert info["name"] == PARITY_IMAGES[index]
    assert G.image_sha256(image) == info["pixels_sha256"], (
        f"{info['name']} decodes to other pixels than when the golden was recorded")
    check_reference_is_nontrivial(g)
    prep, images, det, aux = run_ours(case, image)
    stats = {}

    # Preprocessing: same resized and padded sizes, same normalised values.
    assert prep.image_hw == tuple(g["image_size"])
    assert prep.padded_hw == tuple(g["input_hw"])
    hp, wp = prep.padded_hw
    got = images[0][:hp, :wp].ravel()[g["input_idx"]]
    np.testing.assert_allclose(got, g["input_values"], rtol=1e-5, atol=1e-5)

    # Features, level by level (a fixed sample of each).
    errs = []
    for name in G.LEVELS:
        h, w, c = g[f"{name}_shape"]
        stride = 2 ** int(name[1])
        assert (-(-hp // stride), -(-wp // stride)) == (h, w), name
        ours = aux[name][0][:h, :w]
        assert ours.shape == (h, w, c), name
        diff = np.abs(ours.ravel()[g[f"{name}_idx"]] - g[f"{name}_values"]).max()
        err = diff / g[f"{name}_absmax"]
        assert err <= 1e-3, f"{name}: relative error {err:.2e}"
        errs.append(err)
    stats["features_rel_err"] = float(max(errs))

    # Proposals as sets, with their objectness (MB's field: the sigmoid probability).
    valid = aux["proposal_valid"][0]
    ours_p = aux["proposals"][0][valid]
    assert len(ours_p) == len(g["proposals"]) == 1000
    j = nearest_boxes(g["proposals"], ours_p, 0.05)
    stats["proposals_matched"] = float((j >= 0).mean())
    assert (j >= 0).mean() >= 0.998, f"{(j < 0).sum()} proposals differ"
    prob_diff = np.abs(aux["proposal_scores"][0][valid][j[j >= 0]] - g["proposal_scores"][j >= 0])
    assert prob_diff.max() <= 1e-4, f"objectness differs by up to {prob_diff.max():.2e}"

    # Detections one to one, in COCO category ids (the Detector's labels).
    raw = {k: v[0] for k, v in det.items()}
    dets = case.detector().to_detections(raw, image.shape[:2])
    assert np.array_equal(dets.class_index, raw["class_index"][raw["valid"]])
    ref = dict(boxes=g["boxes"], scores=g["scores"], labels=mb_to_coco(g["labels"]))
    assert abs(len(dets) - len(ref["scores"])) <= max(1, len(ref["scores"]) // 100)
    pairs, frac = match_detections(ref, dets)
    stats["detections_matched"] = frac
    assert frac >= 0.99, f"only {frac:.3f} of the reference's detections matched"
    assert all(g["labels"][i] == dets.class_index[k] for i, k in pairs)

    # The same ORDER as MB (by class, then proposal index).
    pairs_in_ref_order = sorted(pairs)
    ours_order = [k for _, k in pairs_in_ref_order]
    assert ours_order == sorted(ours_order), "matched detections are in another order than MB's"
    first_miss = min((i for i in range(len(g["scores"])) if i not in dict(pairs)),
                     default=len(g["scores"]))
    assert all(i == k for i, k in pairs_in_ref_order if i < first_miss), "shifted order"
    stats["same_position"] = f"{sum(i == k for i, k in pairs)}/{len(g['scores'])}"
    assert np.all(np.diff(dets.class_index) >= 0), "ours are not ordered by class"

    box_diff = matched_box_error(ref, dets, pairs)
    stats["pairs"] = len(pairs)
    stats["max_box_diff_px"] = float(box_diff)
    assert box_diff <= BOX_TOL_PX, f"matched boxes differ by up to {box_diff:.3f} px"
    # The same detections before BoxList.resize, in resized-image coordinates.
    j = nearest_boxes(g["raw_boxes"], aux["boxes_resized"][0], BOX_TOL_PX)
    assert (j >= 0).mean() >= 0.99, f"{(j < 0).sum()} raw (resized) boxes differ"
    ours_probs = raw["masks"][raw["valid"]]
    to_ours = dict(pairs)
    kept = [(r, to_ours[int(i)]) for r, i in enumerate(g["mask_probs_index"]) if int(i) in to_ours]
    assert len(kept) >= 0.9 * len(g["mask_probs_index"])
    prob_diff = max(np.abs(g["mask_probs"][r].astype(np.float32) - ours_probs[k]).max()
                    for r, k in kept)
    stats["mask_prob_diff"] = float(prob_diff)
    assert prob_diff <= MASK_PROB_TOL, f"28x28 mask probabilities differ by up to {prob_diff:.2e}"
    return g, raw, dets, pairs, stats


def _masker_box(box) -> np.ndarray:
    """MB's Masker box for padding 1 (28 -> 30): expanded about the centre by 30/28 in
    float32, before its `.to(torch.int32)` (mask_head/inference.py:91-105,127)."""
    b = np.asarray(box, np.float32)
    scale = np.float32(30.0 / 28.0)
    half = np.float32(0.5)
    w_half, h_half = (b[2] - b[0]) * half * scale, (b[3] - b[1]) * half * scale
    x_c, y_c = (b[2] + b[0]) * half, (b[3] + b[1]) * half
    return np.array([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], np.float32)


def box_truncated_the_other_way(ref_box, our_box) -> bool:
    """The integer paste boxes differ, and only where MB's expanded coordinate is within
    1e-2 px of an integer: box float noise (~1e-3 px) truncated to the other side of it."""
    e = _masker_box(ref_box)
    moved = e.astype(np.int32) != _masker_box(our_box).astype(np.int32)
    return bool(moved.any()) and bool((np.abs(e - np.round(e))[moved] <= 1e-2).all())


def check_masks(case, image, g, raw, dets, pairs, stats):
    """Masks pasted at the original size by the Detector vs MB's (its Masker)."""
    hw = image.shape[:2]
    assert dets.masks.shape[1:] == hw
    # The paste alone: MB's own 28x28 probabilities at its own boxes, pasted by us, give its
    # masks (up to the float16 rounding of the recorded probabilities).
    idx = g["mask_probs_index"]
    soft = case.paste_soft(g["mask_probs"].astype(np.float32), g["boxes"][idx], hw)
    for r, i in enumerate(idx):
        diff = case.threshold(soft[r]) != g["masks"][i]
        assert (np.abs(soft[r][diff] - 0.5) <= FLOAT16_PROB_TOL).all(), f"paste of mask {i}"

    # Ours end to end, on matched pairs.
    valid = raw["valid"]
    ours_probs = raw["masks"][valid]
    soft = case.paste_soft(ours_probs, raw["boxes"][valid], hw)
    assert np.array_equal(case.threshold(soft), dets.masks)  # the Detector's paste
    ious, explained, moved_boxes = [], 0, 0
    for i, k in pairs:
        want = g["masks"][i]
        iou = mask_iou(want, dets.masks[k])
        if iou < 0.98:
            # Small masks: one pixel costs more than 2% IoU. Every differing pixel must be
            # one where our pasted probability is within the 28x28 probabilities' float-noise
            # tolerance of the 0.5 threshold (pasting interpolates, so it adds no error), or
            # the integer paste box moved because an expanded coordinate within float noise
            # of an integer truncated the other way.
            diff = want != dets.masks[k]
            marginal = bool((np.abs(soft[k][diff] - 0.5) <= MASK_PROB_TOL).all())
            if not marginal:
                moved = box_truncated_the_other_way(g["boxes"][i], dets.boxes[k])
                # ... and then our 28x28 probabilities pasted at MB's own box give its mask.
                at_ref = case.paste_soft(ours_probs[k][None], g["boxes"][i][None], hw)[0]
                diff = want != case.threshold(at_ref)
                same = bool((np.abs(at_ref[diff] - 0.5) <= MASK_PROB_TOL).all())
                assert moved and same, f"mask {i}: IoU {iou:.3f}, not explained by float noise"
                moved_boxes += 1
            explained += 1
            continue
        ious.append(iou)
    stats.update(mask_iou_min=float(min(ious)), mask_iou_mean=float(np.mean(ious)),
                 masks_explained=explained, masks_explained_by_box_move=moved_boxes)
    assert np.mean(ious) >= 0.995


@pytest.mark.parametrize("index", [0, 1, 2])
def test_parity_with_maskrcnn_benchmark_golden(case, parity_images, index):
    image = parity_images[index]
    g, raw, dets, pairs, stats = check_image(case, index, image)
    check_masks(case, image, g, raw, dets, pairs, stats)
    print(f"\n{case.arch} {PARITY_IMAGES[index]}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))


# ---------------------------------------------------------------------------------------------
# With maskrcnn-benchmark's source: the goldens and the synthetic checkpoint are MB's own


@needs_mb
@pytest.mark.parametrize("arch", ARCHS)
def test_synthetic_state_dict_has_mbs_keys_shapes_order_and_anchors(arch):
    model = R.build(G.ARCHS[arch][0])
    msd = model.state_dict()
    sd = G.synthetic_state_dict(arch)
    assert list(sd) == list(msd)  # MB's order, as its Checkpointer writes it
    want = {k: (tuple(v.shape), str(v.dtype)) for k, v in msd.items()}
    got = {k: (tuple(v.shape), "torch." + str(v.dtype)) for k, v in sd.items()}
    assert got == want
    for i in range(5):
        key = f"rpn.anchor_generator.cell_anchors.{i}"
        assert np.array_equal(sd[key], msd[key].numpy()), key
    assert [n for n, _ in model.named_parameters()] == [k for k in sd if G._is_parameter(k)]


@needs_mb
@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_file_is_what_mbs_checkpointer_writes(arch, tmp_path):
    """Our `model_final.pth` (no MB code) vs the harness's, written by MB's own
    DetectronCheckpointer on the DDP-wrapped model with MB's make_optimizer/make_lr_scheduler:
    the same container, keys in the same order, the same optimizer state and the scheduler's
    fields; the legacy file loads through DetectronCheckpointer to exactly the state dict."""
    model = R.build(G.ARCHS[arch][0])
    real = torch.load(R.save(model, tmp_path / "real" / "model_final.pth", legacy=True),
                      map_location="cpu", weights_only=True)
    sd = G.synthetic_state_dict(arch)
    path = G.save_mb_checkpoint(arch, sd, tmp_path / "model_final.pth", legacy=True)
    ours = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ours) == set(real)
    assert list(ours["model"]) == list(real["model"])
    assert ours["optimizer"] == real["optimizer"]
    assert all(real["scheduler"][k] == v for k, v in ours["scheduler"].items())
    solver = model.cfg.SOLVER
    assert ours["iteration"] == solver.MAX_ITER
    assert G.SCHEDULES[arch] == dict(BASE_LR=solver.BASE_LR, STEPS=tuple(solver.STEPS),
                                     MAX_ITER=solver.MAX_ITER)
    loaded = R.load(G.ARCHS[arch][0], path, **SMALL).state_dict()
    assert list(loaded) == list(sd)
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in sd.items())


@needs_mb
def test_golden_is_what_mb_computes_now(case):
    """MB, run afresh on the rebuilt checkpoint (loaded from the legacy file by its
    DetectronCheckpointer), reproduces every recorded array exactly: a golden that no longer
    matches the code (or was edited) fails here."""
    src = G.mb_source_sha256()
    assert src == case.meta["maskrcnn_benchmark_source_sha256"], (
        f"the golden was recorded with another maskrcnn-benchmark source; {G.REGENERATE}")
    images = [R.load_image(p) for p in G.parity_image_paths()]
    _, outs = G.mb_outputs(case.arch, case.legacy, images)
    for i, out in enumerate(outs):
        fresh = G.compact(out, i)
        for key, value in fresh.items():
            assert np.array_equal(value, case.golden[i][key]), (
                f"image {i}: {key} differs from the golden; {G.REGENERATE}")
        assert np.array_equal(out["masks"], case.golden[i]["masks"])


@needs_mb
def test_converted_config_states_what_mbs_config_states(case):
    """Every field of the converted config that MB's yaml (over config/defaults.py) states,
    equal to it."""
    R.import_maskrcnn_benchmark()
    from maskrcnn_benchmark.config import cfg as defaults

    mb = defaults.clone()
    mb.merge_from_file(str(R.config_file(G.ARCHS[case.arch][0])))
    cfg = case.converted_config
    m, i = mb.MODEL, cfg.input
    assert (mb.INPUT.MIN_SIZE_TEST, mb.INPUT.MAX_SIZE_TEST) == (i.min_size, i.max_size)
    assert tuple(mb.INPUT.PIXEL_MEAN) == i.mean and tuple(mb.INPUT.PIXEL_STD) == i.std
    assert mb.INPUT.TO_BGR255 and i.channel_order == "BGR" and i.pixel_scale == 255.0
    assert mb.DATALOADER.SIZE_DIVISIBILITY == i.size_divisible
    assert m.META_ARCHITECTURE == "GeneralizedRCNN" and m.MASK_ON
    rn, b = m.RESNETS, cfg.backbone
    depth = int(m.BACKBONE.CONV_BODY.split("-")[1])
    assert m.BACKBONE.CONV_BODY == f"R-{depth}-FPN" and depth == b.depth
    assert (rn.STRIDE_IN_1X1, rn.NUM_GROUPS, rn.WIDTH_PER_GROUP) == (
        b.stride_in_1x1, b.groups, b.width_per_group)
    assert rn.TRANS_FUNC == "BottleneckWithFixedBatchNorm" and b.norm == "frozen_bn"
    assert rn.STEM_FUNC == "StemWithFixedBatchNorm" and b.norm_eps == 0.0
    assert rn.RES2_OUT_CHANNELS == 256 and rn.STEM_OUT_CHANNELS == 64 and rn.RES5_DILATION == 1
    assert tuple(rn.STAGE_WITH_DCN) == (False,) * 4
    assert rn.BACKBONE_OUT_CHANNELS == cfg.fpn.out_channels and cfg.fpn.norm is None
    assert not m.FPN.USE_GN and not m.FPN.USE_RELU
    rp, r, a = m.RPN, cfg.rpn, cfg.anchors
    assert rp.USE_FPN and rp.RPN_HEAD == "SingleConvRPNHead" and r.num_convs == 1
    assert tuple(rp.ANCHOR_SIZES) == a.sizes == G.ANCHOR_SIZES
    assert tuple(rp.ASPECT_RATIOS) == a.aspect_ratios == G.ASPECT_RATIOS
    assert tuple(rp.ANCHOR_STRIDE) == G.ANCHOR_STRIDES
    assert a.flavour == "legacy" and a.offset == 0.0 and a.stride_rule == "nominal"
    assert rp.PRE_NMS_TOP_N_TEST == r.pre_nms_top_n
    # POST_NMS_TOP_N_TEST caps each level after its NMS: a no-op when it is not below the
    # per-level PRE_NMS_TOP_N_TEST (we have no such cap); FPN_POST_NMS_TOP_N_TEST is the
    # per-image top-k of the merged levels.
    assert rp.POST_NMS_TOP_N_TEST >= rp.PRE_NMS_TOP_N_TEST
    assert rp.FPN_POST_NMS_TOP_N_TEST == r.post_nms_top_n
    assert rp.NMS_THRESH == r.nms_thresh and rp.MIN_SIZE == r.min_size
    assert not r.min_size_strict and r.box_plus_one and r.coder_style == "legacy"
    assert r.box_weights == (1.0, 1.0, 1.0, 1.0)  # rpn.py: BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    bh, mh, p, h = m.ROI_BOX_HEAD, m.ROI_MASK_HEAD, cfg.pooler, cfg.roi_heads
    for head, size in ((bh, p.box_output_size), (mh, p.mask_output_size)):
        assert head.POOLER_SAMPLING_RATIO == p.sampling_ratio
        assert head.POOLER_RESOLUTION == size
        assert tuple(head.POOLER_SCALES) == (0.25, 0.125, 0.0625, 0.03125)
    assert not p.aligned and p.level_rule == "legacy"
    assert bh.FEATURE_EXTRACTOR == "FPN2MLPFeatureExtractor" and h.box_head == "2fc"
    assert bh.PREDICTOR == "FPNPredictor" and bh.MLP_HEAD_DIM == h.fc_dim and not bh.USE_GN
    assert bh.NUM_CLASSES == h.num_classes and h.background_index == 0
    assert h.box_reg == "per_class" and not m.CLS_AGNOSTIC_BBOX_REG
    rh = m.ROI_HEADS
    assert tuple(rh.BBOX_REG_WEIGHTS) == h.box_weights
    assert rh.SCORE_THRESH == h.score_thresh and rh.NMS == h.nms_thresh
    assert rh.DETECTIONS_PER_IMG == h.detections_per_img
    assert h.box_plus_one and h.coder_style == "legacy" and h.nms_suppress_equal
    assert h.result_order == "class" and not h.clip_to_original and h.min_box_size is None
    assert mh.FEATURE_EXTRACTOR == "MaskRCNNFPNFeatureExtractor"
    assert mh.PREDICTOR == "MaskRCNNC4Predictor" and not mh.USE_GN
    assert tuple(mh.CONV_LAYERS) == (h.conv_dim,) * h.mask_head_convs and mh.RESOLUTION == 28
    assert not mh.POSTPROCESS_MASKS and not mh.SHARE_BOX_FEATURE_EXTRACTOR
    pc = cfg.paste  # coco_eval's Masker(threshold=0.5, padding=1), mask > threshold
    assert (pc.method, pc.threshold, pc.strict, pc.padding) == ("torchvision", 0.5, True, 1)
    assert case.checkpoint.params["mask_head"]["logits_kernel"].shape[-1] == bh.NUM_CLASSES


@needs_mb
def test_coco_category_ids_are_mbs_coco_dataset_mapping(case, coco_mini):
    """MB's COCODataset maps label l to the l-th COCO category id (its
    contiguous_category_id_to_json_id), built here on coco-mini's annotations."""
    R.import_maskrcnn_benchmark()
    from maskrcnn_benchmark.data.datasets.coco import COCODataset

    ds = COCODataset(str(coco_mini / "annotations" / "instances_train2017.json"),
                     str(coco_mini / "train2017"), remove_images_without_annotations=False)
    mapping = ds.contiguous_category_id_to_json_id
    assert sorted(mapping) == list(range(1, 81))
    assert [mapping[label] for label in range(1, 81)] == COCO_CATEGORY_IDS.tolist()
    assert [mapping[label] for label in range(1, 81)] == list(case.checkpoint.category_ids[1:])
