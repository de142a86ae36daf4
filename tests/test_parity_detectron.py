"""Detectron (Caffe2) `.pkl` checkpoints: conversion, and parity with Detectron weights as the
REAL maskrcnn-benchmark runs them (its configs/caffe2/*_caffe2.yaml and Caffe2 loader).

Parity (live tests, marker `live`: `JAXMRCNN_MASKRCNN_BENCHMARK_SRC=... pytest -m live`; they
need maskrcnn-benchmark's source, reference_maskrcnn_benchmark.source_dir(), and fail without
it; deselected by default): a maskrcnn-benchmark e2e_mask_rcnn_R_50_FPN_1x_caffe2 model with
seeded random weights, calibrated on the 3 parity images at 384/640, is written as a
Detectron `.pkl` (tests/reference_detectron.py: exact blob names and shapes, AffineChannel
norms, momentum blobs, ImageNet leftovers, pickled as Python 2 wrote the model zoo files) and
loaded back into a fresh model through maskrcnn-benchmark's own DetectronCheckpointer; that
model is the reference. The `.pkl` is converted with `python converters/from_torch.py FILE`
(no flags) and with `convert_file`, and our model is compared stage by stage.

Tolerances:
  input          the normalised padded tensor: |diff| <= 1e-4 (observed 0: the same uint8
                 Pillow resize and float32 arithmetic).
  FPN features   max |ours - ref| <= 1e-3 * max |ref| per level. Observed ~1e-5: float32
                 sums in a different order through 50+ layers.
  proposals      the same set: >= 99.8% of the reference's 1000 boxes have a box of ours
                 within 0.05 px on every coordinate (they can only differ where two scores, or
                 an IoU and the 0.7 threshold, are within float noise).
  detections     >= 99% of the reference's matched one to one (same label: maskrcnn-benchmark's
                 1..80 is our class index; box IoU >= 0.99; |score diff| <= 1e-3), matched
                 boxes within 0.1 px (original pixels; observed <= 0.03: float noise on
                 deltas of boxes up to 640 px, while a convention slip such as a +1 size, a
                 half-pixel offset or the resize rounding moves them by >= 0.5 px), and in
                 maskrcnn-benchmark's order (by class, then proposal).
  masks          pasted at the original size by the Detector, on matched pairs: IoU >= 0.98,
                 unless explained as float noise: maskrcnn-benchmark's Masker truncates the
                 expanded box to integers, so a box coordinate within float noise of an
                 integer moves the whole 28x28 grid by a pixel (then maskrcnn-benchmark's own
                 paste of OUR mask and box must equal ours), or every differing pixel has a
                 probability within 1e-3 of the 0.5 threshold. Mean IoU >= 0.995.

Golden (runs in CI, no maskrcnn-benchmark needed): tests/golden/detectron_R_50/ (see
tests/golden_detectron.py) holds what the real maskrcnn-benchmark computed, through its Caffe2
loader and configs/caffe2/e2e_mask_rcnn_R_50_FPN_1x_caffe2.yaml at 384/640, on a Detectron `.pkl`
that numpy rebuilds bit for bit (seeded blobs + a recorded calibration, sha256-checked). The
`.pkl` is rebuilt, converted with `convert_file`, and our model is compared with the golden by
the maskrcnn-benchmark golden test's own checks and tolerances (test_parity_maskrcnn_benchmark
.check_image / check_masks: matched boxes within 0.05 px there).

Fast tests (no reference): bad files (corrupt, code-executing, wrong architecture, class
count mismatch) each give one clear error and the CLI writes nothing.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import golden_detectron as GD
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_detectron as D
import reference_maskrcnn_benchmark as R
import test_parity_maskrcnn_benchmark as MBT
from conftest import PARITY_IMAGES, SMALL, require_source
from parity import mask_iou, match_boxes, match_detections, matched_box_error

from jaxmrcnn import ops, preprocess
from jaxmrcnn.checkpoint import load_checkpoint
from jaxmrcnn.config import PRESETS
from jaxmrcnn.converters import detectron
from jaxmrcnn.converters.common import ConversionError
from jaxmrcnn.converters.from_torch import PLANNED, convert_file, detect_format
from jaxmrcnn.converters.from_torch import main as cli_main
from jaxmrcnn.converters.load import CheckpointError
from jaxmrcnn.detector import Detector, resolve_compiler_options
from jaxmrcnn.model import MaskRCNN, flatten_tree, param_shapes

ROOT = Path(__file__).resolve().parent.parent
R50 = "detectron/e2e_mask_rcnn_R-50-FPN_1x"
INFO = {
    "R_50": dict(depth=50, groups=1, width_per_group=64, num_classes=81),
    "R_101": dict(depth=101, groups=1, width_per_group=64, num_classes=81),
    "X_101_32x8d": dict(depth=101, groups=32, width_per_group=8, num_classes=81),
}


def needs_mb(test):
    """A live test (marker `live`, deselected unless `-m live`): the Detectron parity reference
    runs maskrcnn-benchmark's own source, named by $JAXMRCNN_MASKRCNN_BENCHMARK_SRC (a checkout
    of github:facebookresearch/maskrcnn-benchmark); it fails without it."""
    return pytest.mark.live(pytest.mark.usefixtures("mb_source")(test))


@pytest.fixture(scope="module")
def mb_source():
    return require_source(R, "maskrcnn-benchmark")


LEVELS = ("p2", "p3", "p4", "p5", "p6")
BOX_TOL_PX = 0.1


# ---------------------------------------------------------------------------------------------
# Synthetic blob dicts (no reference needed)


def blob_shape(fn, ours: tuple) -> tuple:
    """The Detectron (Caffe2 NCHW / (out, in)) shape of a blob that `fn` maps to `ours`."""
    name = getattr(fn, "__qualname__", "")
    if name == "conv_hwio":
        h, w, i, o = ours
        return (o, i, h, w)
    if name == "conv1x1_io":
        return (ours[1], ours[0], 1, 1)
    if name == "linear" or "linear_from_chw" in name:
        return (ours[1], ours[0])
    if name == "deconv_abio":
        kh, kw, i, o = ours
        return (i, o, kh, kw)
    assert name == "same", name
    return ours


def synthetic_blobs(arch: str = "R_50", seed: int = 0) -> dict[str, np.ndarray]:
    info = INFO[arch]
    preset = {"R_50": R50, "R_101": "detectron/e2e_mask_rcnn_R-101-FPN_1x",
              "X_101_32x8d": "detectron/e2e_mask_rcnn_X-101-32x8d-FPN_1x"}[arch]
    shapes = dict(flatten_tree(param_shapes(PRESETS[preset]())))
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(blob_shape(fn, shapes["/".join(path)]), dtype=np.float32)
            for k, (path, fn) in sorted(detectron.key_map(info).items())}


def write(path: Path, obj, *, protocol: int | None = None) -> Path:
    """Pickles `obj` as Python 2 did (the Detectron model zoo files), or with this Python's
    `protocol`."""
    with open(path, "wb") as f:
        if protocol is None:
            D.Python2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.fixture(scope="module")
def blobs():
    return synthetic_blobs("R_50")


def test_format_is_detected_and_converted():
    assert "detectron" not in PLANNED
    assert detect_format({"conv1_w": np.zeros(1), "res2_0_branch2a_w": np.zeros(1)}) == "detectron"


def test_bare_blob_dict_converts(blobs, tmp_path):
    ckpt, summary = convert_file(write(tmp_path / "bare.pkl", blobs, protocol=4))
    assert ckpt.config == PRESETS[R50]()
    assert ckpt.config.backbone.norm == "affine" and ckpt.config.backbone.stride_in_1x1
    assert summary[0] == "detected format: detectron (bare blob dict)"
    assert "ResNet-50, 80 classes + background (COCO)" in summary[1]
    assert summary[2].startswith(f"tensors:         {len(blobs)} converted, 0 ignored")
    p = ckpt.params
    np.testing.assert_array_equal(p["backbone"]["bn1"]["weight"], blobs["res_conv1_bn_s"])
    np.testing.assert_array_equal(p["backbone"]["layer3_5"]["bn2"]["bias"],
                                  blobs["res4_5_branch2b_bn_b"])
    np.testing.assert_array_equal(p["backbone"]["layer1_0"]["conv2"]["kernel"],
                                  blobs["res2_0_branch2b_w"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["fpn"]["inner_3"]["conv"]["bias"],
                                  blobs["fpn_inner_res5_2_sum_b"])
    np.testing.assert_array_equal(p["fpn"]["inner_2"]["conv"]["bias"],
                                  blobs["fpn_inner_res4_5_sum_lateral_b"])
    np.testing.assert_array_equal(p["fpn"]["layer_0"]["conv"]["bias"], blobs["fpn_res2_2_sum_b"])
    # fc6 reads the C-major (256, 7, 7) flatten: input (c, y, x) -> our (y, x, c) row.
    fc6 = blobs["fc6_w"].reshape(1024, 256, 7, 7)
    ours = p["box_head"]["fc6"]["kernel"].reshape(7, 7, 256, 1024)
    assert ours[2, 5, 17, 3] == fc6[3, 17, 2, 5]
    # background first, class c at row c; regression rows 4c..4c+3.
    np.testing.assert_array_equal(p["box_predictor"]["cls_score"]["kernel"][:, 0],
                                  blobs["cls_score_w"][0])
    np.testing.assert_array_equal(p["box_predictor"]["bbox_pred"]["kernel"][:, 4 * 7 + 2],
                                  blobs["bbox_pred_w"][4 * 7 + 2])
    np.testing.assert_array_equal(p["mask_head"]["deconv_kernel"][1, 0, 5, 9],
                                  blobs["conv5_mask_w"][5, 9, 1, 0])
    assert ckpt.classes[0] == "__background__" and ckpt.category_ids[0] == -1
    assert ckpt.classes[1] == "person" and ckpt.category_ids[1] == 1
    assert ckpt.classes[80] == "toothbrush" and ckpt.category_ids[80] == 90


def test_detectron_container_drops_momentum_and_imagenet_leftovers(blobs, tmp_path):
    """A file as Detectron saves it: momentum for the trainable blobs (dropped) and the unused
    ImageNet blobs it preserves (ignored, as maskrcnn-benchmark and Detectron ignore them)."""
    full = dict(blobs)
    full.update({k + "_momentum": np.zeros_like(v) for k, v in blobs.items() if D.is_trainable(k)})
    full.update(fc1000_w=np.ones((1000, 2048), np.float32), fc1000_b=np.ones(1000, np.float32),
                conv1_b=np.ones(64, np.float32))
    n_mom = len(full) - len(blobs) - 3
    cfg = "MODEL:\n  NUM_CLASSES: 81\n"
    path = write(tmp_path / "model_final.pkl", {"blobs": full, "cfg": cfg})
    ckpt, summary = convert_file(path)
    bare, _ = convert_file(write(tmp_path / "bare.pkl", blobs))
    assert summary[0] == "detected format: detectron ({'blobs': ...}, with its training 'cfg')"
    assert summary[2] == (f"tensors:         {len(blobs)} converted, {n_mom + 3} ignored ({n_mom} "
                          "*_momentum; unused ImageNet blobs fc1000_w, fc1000_b, conv1_b)")
    fa, fb = dict(flatten_tree(ckpt.params)), dict(flatten_tree(bare.params))
    assert all(np.array_equal(fa[k], fb[k]) for k in fb) and fa.keys() == fb.keys()
    # The cfg text, when a caller passes it, is reported (informative only).
    text = "MODEL:\n  CONV_BODY: FPN.add_fpn_ResNet50_conv5_body\n  NUM_CLASSES: 81\n"
    out = detectron.convert(blobs, {"container": "{'blobs': ...}", "cfg": text})
    want = "training cfg:    CONV_BODY FPN.add_fpn_ResNet50_conv5_body, NUM_CLASSES 81"
    assert want in out.summary


def test_fpn_blob_names_embed_the_last_block_of_each_stage():
    r50, r101 = detectron.key_map(INFO["R_50"]), detectron.key_map(INFO["R_101"])
    for name in ("fpn_inner_res5_2_sum_w", "fpn_inner_res4_5_sum_lateral_w",
                 "fpn_inner_res3_3_sum_lateral_b", "fpn_inner_res2_2_sum_lateral_w",
                 "fpn_res5_2_sum_w", "fpn_res4_5_sum_b", "fpn_res2_2_sum_w"):
        assert name in r50, name
    assert "fpn_inner_res4_22_sum_lateral_w" in r101 and "fpn_res4_22_sum_b" in r101
    assert "res4_22_branch2c_bn_s" in r101 and "res4_23_branch2a_w" not in r101
    assert set(detectron.key_map(INFO["X_101_32x8d"])) == set(r101)


def test_classes_are_maskrcnn_benchmarks_coco_mapping(blobs, coco_mini, tmp_path):
    """maskrcnn-benchmark's COCO labels 1..80 are the annotation's category ids in increasing
    order (data/datasets/coco.py:59-64): our class index c has category id ids[c - 1]."""
    import json

    ann = json.loads((coco_mini / "annotations" / "instances_train2017.json").read_text())
    cats = sorted(ann["categories"], key=lambda c: c["id"])
    ckpt, _ = convert_file(write(tmp_path / "m.pkl", {"blobs": blobs}))
    assert list(ckpt.category_ids[1:]) == [c["id"] for c in cats]
    assert ckpt.classes[1:] == [c["name"] for c in cats]


def test_arch_flag_and_bn_eps(blobs, tmp_path):
    path = write(tmp_path / "m.pkl", {"blobs": blobs})
    ckpt, _ = convert_file(path, arch=R50)
    assert ckpt.config == PRESETS[R50]()
    with pytest.raises(ConversionError,
                       match="is ResNeXt-101 32x8d but the checkpoint holds a ResNet-50"):
        convert_file(path, arch="detectron/e2e_mask_rcnn_X-101-32x8d-FPN_1x")
    with pytest.raises(ConversionError, match="unknown Detectron --arch"):
        convert_file(path, arch="maskrcnn_benchmark/e2e_mask_rcnn_R_50_FPN_1x")
    with pytest.raises(ConversionError, match="--bn-eps does not apply"):
        convert_file(path, bn_eps=1e-5)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_file(kind: str, blobs: dict, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.pkl"
    b = dict(blobs)
    if kind == "garbage":
        path.write_bytes(b"\x80\x02}q\x00(X\x07\x00\x00\x00conv1_w" + os.urandom(64))
        return path
    if kind == "truncated":
        write(path, {"blobs": b})
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        return path
    if kind == "executes_code":
        evil = _Evil()
        evil.marker = tmp_path / "pwned"
        path.write_bytes(pickle.dumps({"blobs": {"conv1_w": evil}, "cfg": ""}, protocol=2))
        return path
    if kind == "no_mask_head":  # a Faster R-CNN
        mask_head = ("mask_fcn_logits", "_[mask]", "conv5_mask")
        b = {k: v for k, v in b.items() if not k.startswith(mask_head)}
    elif kind == "resnet152":  # 3, 8, 36, 3 blocks
        for stage, have, want in ((3, 4, 8), (4, 6, 36)):
            for i in range(have, want):
                for k in [k for k in blobs if k.startswith(f"res{stage}_1_")]:
                    b[k.replace(f"res{stage}_1_", f"res{stage}_{i}_")] = blobs[k]
    elif kind == "class_mismatch":  # classifier for 81 classes, box regressor for 91
        b["bbox_pred_w"] = np.zeros((4 * 91, 1024), np.float32)
        b["bbox_pred_b"] = np.zeros(4 * 91, np.float32)
    elif kind == "mask_classes":
        b["mask_fcn_logits_w"] = np.zeros((91, 256, 1, 1), np.float32)
    elif kind == "missing":
        del b["res4_3_branch2b_bn_s"]
    elif kind == "unexpected":  # a keypoint head
        b["kps_score_lowres_w"] = np.zeros((17, 512, 4, 4), np.float32)
    elif kind == "shape":
        b["fc7_w"] = np.zeros((1024, 2048), np.float32)
    else:
        raise AssertionError(kind)
    return write(path, {"blobs": b, "cfg": "MODEL: {}\n"})


BAD = {
    "garbage": r"not a readable pickle checkpoint",
    "truncated": r"not a readable pickle checkpoint",
    "executes_code": r"refusing to load: the pickle asks for posix.system|could run code",
    "no_mask_head": r"no mask head \(mask_fcn_logits_w\): it is a Faster R-CNN",
    "resnet152": r"unsupported Detectron ResNet with \(3, 8, 36, 3\) blocks per stage",
    "class_mismatch": r"bbox_pred_w has 364 rows for the 81 classes of cls_score_w",
    "mask_classes": r"mask_fcn_logits_w has 91 channels for the 81 classes",
    "missing": r"missing keys \(1\): res4_3_branch2b_bn_s",
    "unexpected": r"unexpected keys \(1\): kps_score_lowres_w",
    "shape": r"fc7_w: shape \(1024, 2048\) does not fit",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_file_gives_one_clear_error_and_writes_nothing(kind, blobs, tmp_path, capsys):
    path = bad_file(kind, blobs, tmp_path)
    with pytest.raises((ConversionError, CheckpointError), match=BAD[kind]):
        convert_file(path)
    before = set(tmp_path.iterdir())
    assert cli_main([str(path)]) == 1  # no flags: the default output next to the file
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.rstrip().endswith("nothing was written")
    assert re.search(BAD[kind], err)
    assert set(tmp_path.iterdir()) == before
    assert not (tmp_path / "pwned").exists()  # the pickle's payload never ran


def test_python3_written_detectron_file_converts(blobs, tmp_path):
    """Python 3's pickle protocol 2 (Detectron's save_object under Python 3) stores every
    array's bytes through _codecs.encode, which builds bytes and runs nothing else."""
    ckpt, _ = convert_file(write(tmp_path / "py3.pkl", {"blobs": blobs, "cfg": ""}, protocol=2))
    assert ckpt.config == PRESETS[R50]()


# ---------------------------------------------------------------------------------------------
# The blob names, checked against maskrcnn-benchmark's own Caffe2 renaming


@needs_mb
@pytest.mark.parametrize("arch", sorted(D.ARCHS))
def test_blob_names_are_what_maskrcnn_benchmark_loads(arch):
    """Every maskrcnn-benchmark key gets its value from the blob the writer names for it, under
    MB's rules (_rename_weights_for_resnet, then the longest loaded key that the model key ends
    with); the converter consumes exactly those blobs; the leftovers match no model key."""
    import torch

    torch.manual_seed(0)
    model = D.build(arch, min_size=384, max_size=640)
    depth = D.depth_of(model)
    keys = list(model.state_dict())
    names = {k: D.detectron_name(k, depth) for k in keys}
    blobs = sorted(n for n in names.values() if n is not None)
    assert set(blobs) == set(detectron.key_map(INFO[arch])), "converter and writer disagree"
    extra = ["fc1000_w", "fc1000_b", "conv1_b", "pred_w", "pred_b", "conv1_w_momentum"]
    renamed = D.mb_renamed(blobs + extra, depth)
    assert renamed["conv1_w_momentum"] is None  # MB skips momentum blobs
    loaded = [n for n in renamed.values() if n is not None]
    for key in keys:
        matches = [n for n in loaded if key.endswith(n)]
        best = max(matches, key=len) if matches else None
        want = names[key]
        got = next((b for b in blobs if renamed[b] == best), None)
        assert got == want, f"{key}: MB loads it from {got}, the writer stores it as {want}"
    for blob in extra[:-1]:
        assert not any(k.endswith(renamed[blob]) for k in keys), f"{blob} would be loaded by MB"


# ---------------------------------------------------------------------------------------------
# Parity with the reference


class Reference:
    """The calibrated model written as a Detectron .pkl, reloaded by maskrcnn-benchmark, its
    outputs on the parity images, and the .pkl converted (CLI and in process)."""

    def __init__(self, coco_mini: Path, tmp: Path):
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.timings = {}
        t = time.perf_counter()
        self.images = [R.load_image(coco_mini / "train2017" / n) for n in PARITY_IMAGES]
        writer = D.build("R_50", seed=0, **SMALL)
        R.calibrate(writer, self.images, seed=0)
        self.pkl = D.write_pkl(writer, tmp / "e2e_mask_rcnn_R-50-FPN_1x.pkl")
        self.timings["reference: build, calibrate, write"] = time.perf_counter() - t
        t = time.perf_counter()
        model = D.load("R_50", self.pkl, seed=1000, **SMALL)
        D.check_loaded(writer, model)  # the loaded model holds exactly the writer's weights
        del writer
        self.refs = [R.run(model, im) for im in self.images]
        self.timings["reference: load .pkl, run 3 images"] = time.perf_counter() - t
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "converters" / "from_torch.py"),
                               str(self.pkl)], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
        self.cli_summary = proc.stdout
        self.cli_checkpoint = load_checkpoint(tmp / "e2e_mask_rcnn_R-50-FPN_1x.jaxmrcnn.msgpack")
        ckpt, self.summary = convert_file(self.pkl)
        self.converted_config = ckpt.config
        ckpt.config = ckpt.config.replace(input=SMALL)
        self.checkpoint = ckpt
        self.timings["convert (CLI + in process)"] = time.perf_counter() - t
        model_ = MaskRCNN(ckpt.config)
        self.fn = jax.jit(  # compiled as the Detector compiles it
            lambda p, im, info: model_.apply({"params": p}, im, info, return_aux=True),
            compiler_options=resolve_compiler_options(),
        )
        self.detector = Detector(ckpt, compilation_cache=False)
        self.stats: dict = {}


@pytest.fixture(scope="module")
def ref(mb_source, coco_mini, tmp_path_factory):
    r = Reference(coco_mini, tmp_path_factory.mktemp("detectron"))
    yield r
    for k, v in r.timings.items():
        print(f"[timing] {k}: {v:.1f}s")
    for i, s in sorted(r.stats.items()):
        print(f"[agreement] {PARITY_IMAGES[i]}: " + ", ".join(f"{k} {v}" for k, v in s.items()))


@needs_mb
def test_cli_and_in_process_conversions_agree(ref):
    assert ref.cli_checkpoint.config == ref.converted_config == PRESETS[R50]()
    fa = dict(flatten_tree(ref.cli_checkpoint.params))
    fb = dict(flatten_tree(ref.checkpoint.params))
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)
    assert ref.cli_checkpoint.classes == ref.checkpoint.classes
    assert "detected format: detectron ({'blobs': ...}, with its training 'cfg')" in ref.cli_summary
    assert "ResNet-50, 80 classes + background (COCO)" in ref.cli_summary
    assert "unused ImageNet blobs fc1000_w, fc1000_b" in ref.cli_summary


def check_reference_is_nontrivial(r):
    s = R.summary(r)
    R.check_nontrivial(s)
    assert len(r["proposals"]) == 1000


def int_paste_box(box, m=28, padding=1) -> np.ndarray:
    """maskrcnn-benchmark's Masker box: expanded about its centre by (m + 2 padding) / m in
    float32, then `.to(torch.int32)` (truncation; mask_head/inference.py:91-105,127)."""
    box = np.asarray(box, np.float32)
    scale = np.float32((m + 2 * padding) / m)
    w_half = (box[2] - box[0]) * np.float32(0.5) * scale
    h_half = (box[3] - box[1]) * np.float32(0.5) * scale
    xc = (box[2] + box[0]) * np.float32(0.5)
    yc = (box[3] + box[1]) * np.float32(0.5)
    box = np.array([xc - w_half, yc - h_half, xc + w_half, yc + h_half], np.float32)
    return box.astype(np.int32)


def mb_paste(prob: np.ndarray, box: np.ndarray, hw) -> np.ndarray:
    """maskrcnn-benchmark's own Masker paste (threshold 0.5, padding 1) of one 28x28 mask."""
    import torch

    R.import_maskrcnn_benchmark()
    from maskrcnn_benchmark.modeling.roi_heads.mask_head.inference import paste_mask_in_image

    return paste_mask_in_image(torch.from_numpy(prob[None].copy()), torch.from_numpy(box.copy()),
                               int(hw[0]), int(hw[1]), 0.5, 1).numpy().astype(bool)


def soft_paste(prob: np.ndarray, box: np.ndarray, hw) -> np.ndarray:
    """Our torchvision-method paste (maskrcnn-benchmark's Masker: padding 1, truncated box)
    of one 28x28 mask, as probabilities."""
    out = ops.paste_masks(jnp.asarray(prob[None]), jnp.asarray(box[None]), (int(hw[0]), int(hw[1])),
                          method="torchvision", threshold=None, padding=1)
    return np.asarray(out)[0]


@needs_mb
@pytest.mark.parametrize("index", [0, 1, 2], ids=PARITY_IMAGES)
def test_parity(ref, index):
    image, r = ref.images[index], ref.refs[index]
    check_reference_is_nontrivial(r)
    cfg = ref.checkpoint.config
    t = time.perf_counter()
    prep = preprocess.prepare(image, cfg.input)
    images, info, _ = preprocess.batch([prep], prep.padded_hw)
    det, aux = jax.device_get(ref.fn(ref.checkpoint.params, images, info))
    stats = ref.stats.setdefault(index, {})
    stats["ours_s"] = round(time.perf_counter() - t, 1)

    # Input: same resized size, same padded normalised tensor.
    assert prep.image_hw == tuple(r["image_size"])
    assert images.shape[1:3] == r["input"].shape[:2]
    np.testing.assert_allclose(images[0], r["input"], rtol=0, atol=1e-4)

    # Features, level by level.
    errs = {}
    for name in LEVELS:
        want, got = r["features"][name], aux[name][0]
        assert got.shape == want.shape, name
        errs[name] = float(np.abs(got - want).max() / np.abs(want).max())
        assert errs[name] <= 1e-3, f"{name}: relative error {errs[name]:.2e}"
    stats["features_rel_err_max"] = f"{max(errs.values()):.1e}"

    # Proposals as sets.
    ours_p = aux["proposals"][0][aux["proposal_valid"][0]]
    assert len(ours_p) == len(r["proposals"])
    matched = match_boxes(r["proposals"], ours_p, tol=0.05)
    stats["proposals_matched"] = f"{matched.sum()}/{len(matched)}"
    assert matched.mean() >= 0.998, f"{(~matched).sum()} proposals differ"

    # Detections one to one, in maskrcnn-benchmark's order.
    valid = det["valid"][0]
    ours = dict(boxes=det["boxes"][0][valid], scores=det["scores"][0][valid],
                labels=det["class_index"][0][valid])
    assert abs(len(ours["scores"]) - len(r["scores"])) <= max(1, len(r["scores"]) // 100)
    pairs, frac = match_detections(r, ours)  # same label: MB's 1..80 == our class index
    stats["detections_matched"] = f"{len(pairs)}/{len(r['scores'])} (ours {len(ours['scores'])})"
    assert frac >= 0.99, f"only {frac:.3f} of the reference's detections matched"
    box_diff = matched_box_error(r, ours, pairs)
    stats["max_box_diff_px"] = f"{box_diff:.4f}"
    assert box_diff <= BOX_TOL_PX
    order = [j for _, j in sorted(pairs)]
    assert order == sorted(order), "detections are not in maskrcnn-benchmark's order"
    stats["same_position"] = sum(i == j for i, j in pairs)

    # Masks at the original size.
    raw = {k: v[0] for k, v in det.items()}
    masks = ref.detector.paste(raw, image.shape[:2])
    ours_small = raw["masks"][valid]
    ious, explained = [], 0
    for i, j in pairs:
        iou = mask_iou(r["masks"][i], masks[j])
        if iou < 0.98:
            jump = not np.array_equal(int_paste_box(r["boxes"][i]), int_paste_box(ours["boxes"][j]))
            if jump:  # MB's own paste of our mask and box is ours
                mb = mb_paste(ours_small[j], ours["boxes"][j], image.shape)
                assert mask_iou(mb, masks[j]) >= 0.98
            else:  # every differing pixel is within float noise of the threshold
                soft = soft_paste(r["mask_probs"][i], r["boxes"][i], image.shape)
                assert np.array_equal(soft > 0.5, r["masks"][i])  # our paste of MB's mask is MB's
                diff = r["masks"][i] != masks[j]
                near = np.abs(soft[diff] - 0.5) <= 1e-3
                assert near.all(), f"mask {i}: IoU {iou:.3f}, not explained by float noise"
            explained += 1
        ious.append(iou)
    stats["mask_iou_min"] = f"{min(ious):.4f}"
    stats["mask_iou_mean"] = f"{np.mean(ious):.4f}"
    stats["masks_below_0.98_explained"] = explained
    kept = [x for x in ious if x >= 0.98]
    assert np.mean(kept) >= 0.995


# ---------------------------------------------------------------------------------------------
# Parity with the recorded golden (runs in CI: no maskrcnn-benchmark needed)


class GoldenCase(MBT.Case):
    """The Detectron golden (tests/golden_detectron.py): the `.pkl` rebuilt by numpy (its blobs'
    sha256 checked), converted with `convert_file`, and what the real maskrcnn-benchmark
    computed on it; compared by the maskrcnn-benchmark golden test's own checks."""

    def __init__(self, tmp: Path):
        self.arch = GD.ARCH
        self.blobs = GD.reconstruct()  # raises GoldenError if the sha256 differs
        self.golden, self.meta = GD.load_outputs()
        self.pkl = GD.write_pkl(self.blobs, tmp / GD.PKL_NAME)
        ckpt, self.summary = convert_file(self.pkl)
        self.converted_config = ckpt.config
        ckpt.config = ckpt.config.replace(input=SMALL)
        self.checkpoint = ckpt
        self.canvas = tuple(int(max(g["input_hw"][d] for g in self.golden)) for d in (0, 1))
        self._cache: dict = {}


@pytest.fixture(scope="module")
def golden_case(tmp_path_factory):
    return GoldenCase(tmp_path_factory.mktemp("detectron_golden"))


def test_golden_pkl_converts_as_a_detectron_file(golden_case, tmp_path):
    c = golden_case
    assert c.meta["config"] == GD.CONFIG and c.meta["size"] == SMALL
    assert c.converted_config == PRESETS[R50]()
    assert c.summary[0] == "detected format: detectron ({'blobs': ...}, with its training 'cfg')"
    assert "unused ImageNet blobs fc1000_w, fc1000_b" in c.summary[2]
    # The bare blob dict converts to the same parameters.
    bare, summary = convert_file(GD.write_pkl(c.blobs, tmp_path / "bare.pkl", bare=True))
    assert summary[0] == "detected format: detectron (bare blob dict)"
    fa, fb = dict(flatten_tree(c.checkpoint.params)), dict(flatten_tree(bare.params))
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


@pytest.mark.parametrize("index", [0, 1, 2], ids=PARITY_IMAGES)
def test_parity_with_detectron_golden(golden_case, parity_images, index):
    """The maskrcnn-benchmark golden test's checks (test_parity_maskrcnn_benchmark.check_image
    and check_masks, same tolerances): input, FPN features, proposals, >= 99% of the detections
    matched one to one (same label, IoU >= 0.99, |score diff| <= 1e-3) in MB's order with
    matched_box_error <= 0.05 px, 28x28 mask probabilities, masks IoU >= 0.98 or explained as
    float noise, mean >= 0.995."""
    image = parity_images[index]
    g, raw, dets, pairs, stats = MBT.check_image(golden_case, index, image)
    MBT.check_masks(golden_case, image, g, raw, dets, pairs, stats)
    print(f"\ndetectron {GD.ARCH} {PARITY_IMAGES[index]}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
