"""The maskrcnn-benchmark reference for parity tests: the REAL maskrcnn-benchmark code (its
configs, `build_detection_model`, `DetectronCheckpointer`, the test transforms and the COCO
evaluation's mask paste) with seeded random weights, calibrated so that every stage produces
non-trivial outputs. Nothing of maskrcnn-benchmark is copied here; it is imported from its
source folder (see `source_dir`). Its compiled `_C` and a few APIs removed since 2019 are stood
in before the import (`install_stand_ins`), so inference runs on the CPU with torch 2.x.

    python tests/reference_maskrcnn_benchmark.py --config e2e_mask_rcnn_R_50_FPN_1x \\
        --image ../shared/data/coco-mini/train2017/000000000790.jpg --out /tmp/mbref

builds, calibrates on the image, writes `model_final.pth` (what MB's `Checkpointer.save` writes
at the end of a DDP training run, zip serialisation) and `model_final_legacy.pth` (the same
dict in PyTorch's legacy pre-1.6 serialisation, as the MB model-zoo files are), reloads each
through `DetectronCheckpointer.load`, checks that both reproduce the calibrated model bit for
bit, and writes the outputs to `outputs.npz`.

Stand-ins (only compiled ops and APIs removed since 2019)
=========================================================
- `maskrcnn_benchmark._C.nms` = `nms_cpu` below, the CPU kernel csrc/cpu/nms_cpu.cpp ported
  operation by operation (NumPy float32, same expression order). It is NOT torchvision's NMS
  with x2 + 1, y2 + 1: (a) it suppresses at IoU `>=` thr (nms_cpu.cpp:60), torchvision at `>`;
  (b) `threshold` is a C++ float (csrc/nms.h:10-12) compared with a float IoU, torchvision
  compares with a double; (c) widths are `x2 - x1 + 1` (nms_cpu.cpp:22,56-57), not
  `(x2 + 1) - x1` (different fp32 rounding); (d) the kept indices come back in ASCENDING INDEX
  order (`at::nonzero(suppressed == 0)`, :64), not by score. The CUDA kernel also returns
  ascending indices (csrc/cuda/nms.cu:127-130) but suppresses at `>` (:60).
- `maskrcnn_benchmark._C.roi_align_forward(input, rois, spatial_scale, pooled_h, pooled_w,
  sampling_ratio)` (layers/roi_align.py:20-22) = `torchvision.ops.roi_align(input, rois,
  (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned=False)`: torchvision's CPU kernel
  is the same caffe2 code as csrc/cpu/ROIAlign_cpu.cpp (no -0.5 offset :146-149, roi w/h forced
  >= 1 :156-157, `sampling_ratio` samples per bin :162-165, bilinear pre-calc with the
  [-1, H] / clamp-at-0 / last-row rules :47-90, average :212). MB scales are powers of two.
- `apex.amp` (imported by layers/nms.py:5, roi_align.py:10, roi_pool.py:10): `float_function`,
  `half_function`, `promote_function` are the identity (fp32 inference; a real apex is used if
  installed). `torch._six` (utils/imports.py:4, c2_model_loading.py:135): `PY3 = True` etc.
  `torch.hub._download_url_to_file` (utils/model_zoo.py:6; missing since torch 1.x): refuses to
  download. `np.float` (anchor_generator.py:229-238; removed in NumPy 1.24) = `float`
  (float64). `cityscapesscripts` (imported by data/datasets/cityscapes.py:16 whenever
  `maskrcnn_benchmark.data` is): an empty stub; only the Cityscapes dataset uses it.

maskrcnn-benchmark inference facts, verified in its source
==========================================================
Paths are inside the `maskrcnn_benchmark` package of github:facebookresearch/maskrcnn-benchmark
at its last commit (57eec25, 2019-11; /work/refsrc/mb); `configs/` and `tools/` are the
repository's. Supported configs: `configs/e2e_mask_rcnn_{R_50,R_101,X_101_32x8d}_FPN_1x.yaml`
on top of config/defaults.py. X_101_32x8d changes only STRIDE_IN_1X1 False, NUM_GROUPS 32,
WIDTH_PER_GROUP 8 (its yaml:8-10) and the depth; its PIXEL_STD stays [1, 1, 1].

Input (tools/test_net.py:96-108 -> data/build.py:155,168-169 -> engine/inference.py:29)
- The COCO dataset reads `Image.open(path).convert("RGB")` (torchvision CocoDetection, which
  data/datasets/coco.py:39,69 subclasses): PIL RGB, NO EXIF orientation.
- Test transforms (data/transforms/build.py:15-23,36-45): ColorJitter(0,0,0,0) (no-op), Resize,
  flips with p=0, ToTensor, Normalize.
- Resize.get_size (transforms.py:35-55), (w, h) the original size, size = MIN_SIZE_TEST: if
  max/min * size > MAX_SIZE_TEST then `size = int(round(MAX * min / max))` (Python round, half
  to even, in float64; :42-43); if the short side already equals size: unchanged (:45-46); else
  short side = size, long side = `int(size * long / short)` (FLOOR, :48-53). E.g. 480x640 ->
  800x1066 at 800/1333, 384x512 at 384/640. Then `F.resize(pil, (oh, ow))` (:59) = Pillow
  BILINEAR on the uint8 image (antialiased when shrinking; the Pillow installed here).
- ToTensor (:104-106): `to_tensor` -> float32 `x / 255`; Normalize (:109-121) with TO_BGR255
  True (defaults.py:55): `image[[2, 1, 0]] * 255` (BGR; the float32 x / 255 * 255 round trip,
  each step correctly rounded, gives back all 256 integers exactly: checked), then
  `F.normalize(mean, std)` = (x - float32(mean)) / float32(std), mean [102.9801, 115.9465,
  122.7717], std [1, 1, 1] (defaults.py:51,53; no config overrides them).
- Padding: BatchCollator -> `to_image_list(images, SIZE_DIVISIBILITY=32)` (collate_batch.py:17,
  yaml `DATALOADER.SIZE_DIVISIBILITY: 32`): H, W rounded up to a multiple of 32 with
  `math.ceil(x / 32) * 32`, zero-filled AFTER normalisation, bottom/right; `image_sizes` keeps
  the unpadded resized (h, w) (structures/image_list.py:49-70). test_net batches
  TEST.IMS_PER_BATCH = 8 images (defaults.py:428) padded to the batch's largest: border
  features then depend on the companions. This harness runs one image per batch.

Backbone
- Stem (modeling/backbone/resnet.py:353-365): conv 7x7/2 pad 3 no bias, FrozenBN, ReLU,
  max_pool 3/2 pad 1.
- FrozenBatchNorm2d (layers/batch_norm.py:27-31): `scale = w * running_var.rsqrt()`,
  `bias = b - running_mean * scale`, `y = x * scale + bias`: NO eps, and computed as a
  multiply-add, not (x - rm) / sqrt(rv). All four are buffers (saved in checkpoints).
- Bottleneck (resnet.py:239-344): `stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else
  (1, stride)` (:275); STRIDE_IN_1X1 True by default (defaults.py:273; R50/R101), False for
  X101-32x8d. conv1 1x1, conv2 3x3 pad 1 groups=NUM_GROUPS, conv3 1x1, no biases, FrozenBN
  after each, ReLU after bn1, bn2 and the residual sum (:324-344). Shortcut `downsample` (1x1
  conv carrying the stride + FrozenBN) only when in != out channels (:255-263), i.e. block 0.
  Blocks 3,4,6,3 (R50) / 3,4,23,3 (R101, X101) (:66-74); first stride 1 in layer1, 2 after
  (:119); width NUM_GROUPS * WIDTH_PER_GROUP = 64 (R) or 256 (X101) doubled per stage (:101,108).
- FPN (modeling/backbone/fpn.py:43-79, backbone.py:26-45): lateral 1x1 `fpn_inner{1..4}` and
  output 3x3 pad 1 `fpn_layer{1..4}`, both with bias (make_layers.py:95-120, USE_GN False);
  top-down `F.interpolate(last_inner, scale_factor=2, mode="nearest")` + lateral (:59-64);
  P6 = `F.max_pool2d(P5_output, 1, 2, 0)` (LastLevelMaxPool, :70-72,77-79). Outputs P2..P6.

RPN (modeling/rpn/)
- Head (rpn.py:87-106): shared conv 3x3 + ReLU, `cls_logits` 1x1 (A = 3), `bbox_pred` 1x1
  (4A). Flattening `permute_and_flatten` (utils.py:10-14): (N, A*C, H, W) -> (N, H, W, A, C):
  index = (y * W + x) * A + a, deltas anchor-major (channel a*4 + k).
- Anchors (anchor_generator.py): per level `generate_anchors(stride, (size,), (0.5, 1, 2))`
  (:58-65) = the legacy Faster R-CNN generator in float64 then `.float()`: reference window
  (0, 0, stride-1, stride-1), centre (stride-1)/2, `ws = np.round(sqrt(stride^2 / ratio))`
  (half to even), `hs = np.round(ws * ratio)`, scaled by size/stride, corners ctr -+ 0.5(w-1)
  (:234-289). P2: (-22,-10,25,13), (-14,-14,17,17), (-10,-22,13,25). Shifts
  `arange(0, W*stride, stride)` float32, meshgrid, shift + cell anchor (:80-93): order
  (H, W, A). Cell anchors are persistent buffers `rpn.anchor_generator.cell_anchors.{0..4}`
  (BufferList, :11-31,67). Visibility (STRADDLE_THRESH 0, defaults.py:140) is computed
  (:97-110) but only the training loss reads it (rpn/loss.py:73-74): no effect at test.
- Box coder (modeling/box_coder.py:52-95), legacy +1: w = x2 - x1 + 1, ctr = x1 + 0.5 w;
  d / weights; dw, dh clamped at MAX only to log(1000/16) (:13,77-78); pred_ctr = d * w + ctr,
  pred_w = exp(dw) * w; x1 = ctr - 0.5 w', x2 = ctr + 0.5 w' - 1. RPN weights (1,1,1,1)
  (rpn.py:127).
- Selection per level and image (rpn/inference.py:76-123): objectness SIGMOID first (:88),
  then `topk(min(PRE_NMS_TOP_N_TEST = 1000, A*H*W), sorted=True)` on the probabilities (:94-95;
  1000 in the yaml, default 6000); decode (:104-106); `clip_to_image(remove_empty=False)`:
  x to [0, w - 1], y to [0, h - 1] of the unpadded resized image (:114;
  structures/bounding_box.py:214-224); `remove_small_boxes(MIN_SIZE = 0)`: keeps
  x2 - x1 + 1 >= 0 and y2 - y1 + 1 >= 0 (:115; boxlist_ops.py:34-48; defaults.py:164): all
  finite boxes; `boxlist_nms(0.7, max_proposals=POST_NMS_TOP_N_TEST = 1000)` (:116-121;
  boxlist_ops.py:9-31): per-level NMS, `keep[:1000]` in kept-index (= topk) order.
- Levels concatenated (:143), then at test PER IMAGE (`select_over_all_levels`, :154-181; the
  per-batch variant is training only, :161) `topk(min(FPN_POST_NMS_TOP_N_TEST = 1000, n),
  sorted=True)` (yaml; default 2000): proposals sorted by decreasing sigmoid objectness (ties in
  topk order), field "objectness" = the probability. e2e models do not re-sort
  (rpn.py:186-197).

NMS (layers/nms.py:8 -> csrc/nms.h -> csrc/cpu/nms_cpu.cpp): see the stand-in above: areas
  (x2-x1+1)(y2-y1+1) (:22), order = `scores.sort(0, descending=True)` (:24), inter with +1
  clamped at 0 (:56-57), ovr = inter / (iarea + areas[j] - inter) in float32 (:59), suppress
  `ovr >= threshold` (:60), return the surviving indices in ascending order (:64).

Box head (modeling/poolers.py, roi_heads/box_head/)
- Level mapper (poolers.py:37-42): s = sqrt(area) with area = (x2-x1+1)(y2-y1+1)
  (bounding_box.py:226-236); k = floor(4 + log2(s / 224 + 1e-6)) in float32, clamped to [2, 5]
  (k_min/k_max from the scales, :74-76). Only P2..P5 are pooled (4 poolers zipped with 5
  features, :116-119); results written back in input order.
- ROIAlign legacy (aligned=False) 7x7, sampling_ratio 2, scales 1/4..1/32 (yaml
  ROI_BOX_HEAD POOLER_*: R50 yaml:18-20), mask 14x14 sr 2 (yaml:24-28).
- FPN2MLPFeatureExtractor (roi_box_feature_extractors.py:74-81): flatten (C, 7, 7) C-major ->
  fc6 1024 + ReLU -> fc7 1024 + ReLU. FPNPredictor (roi_box_predictors.py:34-57): cls_score 81
  (background = 0), bbox_pred 324 = 81 x 4 (class-major, incl. background).
- PostProcessor (box_head/inference.py:45-149): softmax over 81 (:58); decode with
  (10, 10, 5, 5) (:67-69; defaults.py:188) from the proposals; clip ALL class boxes to
  [0, w-1] x [0, h-1], remove_empty=False (:83): no empty-box filter anywhere;
  `scores > 0.05` (:121; float32 compare with float32(0.05)); for j = 1..80 (:122): candidates
  of class j in PROPOSAL order (:123-125), `boxlist_nms(0.5)` (:128-130) -> ascending proposal
  order; labels = j (:131-134); concatenated class by class (:137). If more than 100
  (ROI_HEADS.DETECTIONS_PER_IMG, defaults.py:208): `kthvalue(scores, n - 100 + 1)` and keep
  `scores >= that` (:141-148) -> more than 100 on ties. OUTPUT ORDER: by class, then by
  proposal index; never sorted by score.

Mask head (roi_heads/mask_head/)
- ROIs: the final boxes in resized coords (roi_heads.py:39). MaskRCNNFPNFeatureExtractor
  (roi_mask_feature_extractors.py:59-65): 14x14 pooler -> 4 x (conv 3x3 pad 1 + bias + ReLU)
  (make_layers.py:44-77). MaskRCNNC4Predictor (roi_mask_predictors.py:29-31): ConvTranspose2d
  2x2/2 + ReLU -> 1x1 conv to 81 channels (bg = 0) -> 28x28 logits.
- MaskPostProcessor (inference.py:38-61): sigmoid of all, the label's channel kept;
  POSTPROCESS_MASKS False (defaults.py:239): the model returns "mask" [N, 1, 28, 28] probs.

COCO evaluation (data/datasets/evaluation/coco/coco_eval.py:104-155)
- `prediction.resize((img_w, img_h))` with the original size (:117-119). BoxList.resize
  (bounding_box.py:91-127): ratios `float(new) / float(old)` per axis (Python doubles); one
  multiply if equal, else x * ratio_w, y * ratio_h (float32 times the double scalar); no
  clipping, no +1 adjustment.
- `Masker(threshold=0.5, padding=1)` (:108,124; mask_head/inference.py:119-199): mask padded to
  30x30 (:108-116), box expanded about its centre by 30/28 in float32 (:91-105), cast
  `.to(torch.int32)` (TRUNCATION toward zero, :127); w = x1 - x0 + 1, h = y1 - y0 + 1, at least
  1 (:130-133); `F.interpolate(size=(h, w), mode="bilinear", align_corners=False)` (:140);
  `mask > 0.5` STRICT (:144); pasted into [max(y0, 0), min(y1 + 1, H)) x [max(x0, 0),
  min(x1 + 1, W)) (:150-158).
- Labels are contiguous 1..80 (0 = background), mapped to COCO category ids only when
  writing results (coco.py:59-64; coco_eval.py:142).

Checkpoints (utils/checkpoint.py, utils/model_serialization.py)
- `Checkpointer.save(name, **kwargs)` (checkpoint.py:32-50) writes `torch.save({"model":
  model.state_dict(), "optimizer": ..., "scheduler": ..., **kwargs}, save_dir/name.pth)` and
  tags `save_dir/last_checkpoint`; training ends with `save("model_final", iteration=MAX_ITER)`
  (engine/trainer.py:176) on the DDP-wrapped model (tools/train_net.py:50-53,62-64): every key
  gets "module.". Optimizer: SGD with one param group per trainable parameter
  (solver/build.py:7-20); scheduler WarmupMultiStepLR (solver/lr_scheduler.py).
- `load(f, use_latest)` (:52-71): with use_latest and a `last_checkpoint` in save_dir, f is
  replaced by it (:53-55; test_net passes use_latest=False with --ckpt). `_load_file`
  (:94-95,117-139): catalog:// and http(s) resolved/downloaded, `.pkl` -> Caffe2 loader, else
  `torch.load(f, map_location="cpu")` (torch >= 2.6: weights_only=True), wrapped as
  {"model": f} without a "model" key. `load_state_dict` (model_serialization.py:71-80): strips
  "module." only if ALL keys have it (:61-68), matches each model key to the longest loaded
  key that it ends with (plain `endswith`, :10-58), then a strict load of the model's own
  updated dict: unmatched model keys silently keep their current (random) values.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONFIGS = (
    "e2e_mask_rcnn_R_50_FPN_1x",
    "e2e_mask_rcnn_R_101_FPN_1x",
    "e2e_mask_rcnn_X_101_32x8d_FPN_1x",
)
ENV_VAR = "JAXMRCNN_MASKRCNN_BENCHMARK_SRC"
DEFAULT_SRC = Path("/work/refsrc/mb")
MAX_ITER = 90000  # the 1x schedule's SOLVER.MAX_ITER: the "iteration" of a model_final.pth


# ---------------------------------------------------------------------------------------------
# Stand-ins for the compiled `_C` and for APIs removed since 2019


def nms_cpu(dets: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """`maskrcnn_benchmark._C.nms` on CPU tensors, as csrc/cpu/nms_cpu.cpp computes it: legacy
    +1 areas, suppression at IoU >= threshold (a C++ float), every operation in the boxes' dtype
    in the kernel's order, kept indices returned in ascending index order (not by score).
    The inner loop is vectorised over the remaining boxes; this is exact, because whether box i
    suppresses box j does not depend on j's own suppression state."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    assert dets.dtype == scores.dtype, "dets should have the same type as scores"
    order = scores.sort(0, descending=True)[1].numpy()  # the kernel's own call
    d = dets.detach().cpu().numpy()
    t = d.dtype.type  # scalar_t
    one, zero = t(1), t(0)
    x1, y1, x2, y2 = (np.ascontiguousarray(d[:, k]) for k in range(4))
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    thr = t(np.float32(threshold))  # `const float threshold`, compared as scalar_t
    suppressed = np.zeros(len(d), dtype=bool)
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if rest.size == 0:
            break
        w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one)
        h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr >= thr]] = True
    return torch.from_numpy(np.flatnonzero(~suppressed).astype(np.int64))


def roi_align_forward(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio):
    """`maskrcnn_benchmark._C.roi_align_forward` (layers/roi_align.py:20-22): the legacy
    (aligned=False) caffe2 ROIAlign, which torchvision's CPU kernel implements line for line."""
    from torchvision.ops import roi_align

    return roi_align(
        input,
        rois,
        (int(pooled_height), int(pooled_width)),
        float(spatial_scale),
        int(sampling_ratio),
        aligned=False,
    )


def _c_module() -> types.ModuleType:
    mod = types.ModuleType("maskrcnn_benchmark._C")
    mod.__doc__ = "jaxmrcnn tests: CPU stand-in for maskrcnn-benchmark's compiled extension."
    mod.nms = nms_cpu
    mod.roi_align_forward = roi_align_forward

    def missing(name):
        raise AttributeError(
            f"maskrcnn_benchmark._C.{name} is not stood in (only nms and roi_align_forward, "
            f"all that Mask R-CNN inference calls)"
        )

    mod.__getattr__ = missing
    return mod


def _apex_module() -> types.ModuleType:
    identity = lambda fn: fn  # noqa: E731
    amp = types.ModuleType("apex.amp")
    amp.float_function = amp.half_function = amp.promote_function = identity
    apex = types.ModuleType("apex")
    apex.amp = amp
    return apex


def _refuse_download(url, dst, hash_prefix=None, progress=True):
    raise RuntimeError(f"jaxmrcnn tests never download weights ({url})")


def install_stand_ins() -> None:
    """Registers the stand-ins (idempotent): `maskrcnn_benchmark._C`, `apex.amp` (if apex is not
    installed), `torch._six`, `torch.hub._download_url_to_file`, `np.float` and an empty
    `cityscapesscripts` (if not installed). Call before importing maskrcnn_benchmark."""
    sys.modules.setdefault("maskrcnn_benchmark._C", _c_module())
    try:
        import apex.amp  # noqa: F401
    except ImportError:
        apex = _apex_module()
        sys.modules["apex"], sys.modules["apex.amp"] = apex, apex.amp
    if "torch._six" not in sys.modules:
        import collections.abc

        six = types.ModuleType("torch._six")
        six.PY2, six.PY3, six.PY37 = False, True, True
        six.string_classes, six.int_classes = (str, bytes), int
        six.container_abcs, six.inf, six.nan = collections.abc, math.inf, math.nan
        sys.modules["torch._six"] = six
        torch._six = six
    if not hasattr(torch.hub, "_download_url_to_file"):
        torch.hub._download_url_to_file = _refuse_download
    if "float" not in np.__dict__:
        np.float = float  # removed in NumPy 1.24; it was the builtin float (float64)
    try:
        import cityscapesscripts.helpers.csHelpers  # noqa: F401
    except ImportError:
        parent = None
        for name in ("cityscapesscripts", "helpers", "csHelpers"):
            mod = types.ModuleType(f"{parent.__name__}.{name}" if parent else name)
            sys.modules[mod.__name__] = mod
            if parent:
                setattr(parent, name, mod)
            parent = mod


# ---------------------------------------------------------------------------------------------
# Finding and importing maskrcnn-benchmark


def source_dir() -> Path | None:
    """The folder to put on sys.path to import maskrcnn-benchmark (the repository root, which
    contains the `maskrcnn_benchmark` package and `configs/`): $JAXMRCNN_MASKRCNN_BENCHMARK_SRC
    if set, else None (live tests skip; the goldens still run). A set but invalid variable gives
    None rather than a silent fallback."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        return path if (path / "maskrcnn_benchmark" / "__init__.py").is_file() else None
    return None  # only where asked for: its own dependencies are not part of the set-up


def import_maskrcnn_benchmark():
    """Installs the stand-ins, puts `source_dir()` on sys.path and imports `maskrcnn_benchmark`
    (returned)."""
    install_stand_ins()
    src = source_dir()
    if src is not None and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    try:
        import maskrcnn_benchmark
    except ImportError as e:
        raise ImportError(
            f"maskrcnn-benchmark's source was not found: set {ENV_VAR} to a checkout of "
            f"github:facebookresearch/maskrcnn-benchmark (the folder holding `maskrcnn_benchmark` "
            f"and `configs`), e.g. {DEFAULT_SRC}. Nothing needs compiling; its "
            f"deps: yacs, pycocotools, opencv-python-headless, tqdm. ({e})"
        ) from e
    maskrcnn_benchmark._C = sys.modules["maskrcnn_benchmark._C"]
    return maskrcnn_benchmark


def config_file(config: str) -> Path:
    """The yaml for `config`: a name from CONFIGS (with or without `.yaml`) in the repository's
    `configs/`, or a path to a yaml file."""
    if Path(config).is_file():
        return Path(config)
    repo = Path(import_maskrcnn_benchmark().__file__).resolve().parent.parent
    name = config if config.endswith(".yaml") else config + ".yaml"
    path = repo / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(f"no configs/{name} in maskrcnn-benchmark ({repo})")
    return path


# ---------------------------------------------------------------------------------------------
# Building, saving and loading


def build(config: str, *, seed: int = 0, min_size: int = 800, max_size: int = 1333):
    """A real maskrcnn-benchmark `GeneralizedRCNN` (eval, CPU) built by `build_detection_model`
    from the yaml, with seeded random weights (MB's own initialisers under
    `torch.manual_seed(seed)`), `MODEL.WEIGHT ""` (nothing is downloaded). The frozen config is
    kept as `model.cfg` (test sizes, normalisation, padding) for `run`, `save` and `load`."""
    import_maskrcnn_benchmark()
    from maskrcnn_benchmark.config import cfg as default_cfg
    from maskrcnn_benchmark.modeling.detector import build_detection_model

    cfg = default_cfg.clone()
    cfg.merge_from_file(str(config_file(config)))
    cfg.merge_from_list(
        [
            "INPUT.MIN_SIZE_TEST",
            min_size,
            "INPUT.MAX_SIZE_TEST",
            max_size,
            "MODEL.DEVICE",
            "cpu",
            "MODEL.WEIGHT",
            "",
        ]
    )
    cfg.freeze()
    torch.manual_seed(seed)
    model = build_detection_model(cfg).eval()
    model.cfg = cfg
    return model


class _DistributedWrapper(nn.Module):
    """Stands for `DistributedDataParallel(model)` (tools/train_net.py:50-53) in a checkpoint:
    its state dict is the model's with "module." on every key, in the same order."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def save(model, path, *, legacy: bool = False) -> Path:
    """A `model_final.pth` as a DDP training run of maskrcnn-benchmark leaves it:
    `DetectronCheckpointer(cfg, DDP(model), optimizer, scheduler, save_dir).save(name,
    iteration=90000)` -> `{"model": {"module." + k: v}, "optimizer", "scheduler", "iteration"}`,
    with MB's own SGD optimizer and WarmupMultiStepLR (fresh, so no momentum buffers; all
    loadable with `torch.load(weights_only=True)`). With `legacy`, the same dict is rewritten in
    PyTorch's legacy (pre-1.6, non-zip) serialisation, as the MB model-zoo files are. `path`
    must end in `.pth` (Checkpointer writes <name>.pth; it also writes `last_checkpoint`)."""
    import_maskrcnn_benchmark()
    from maskrcnn_benchmark.solver import make_lr_scheduler, make_optimizer
    from maskrcnn_benchmark.utils.checkpoint import DetectronCheckpointer

    path = Path(path)
    if path.suffix != ".pth":
        raise ValueError(f"Checkpointer writes <name>.pth; got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    optimizer = make_optimizer(cfg, model)
    scheduler = make_lr_scheduler(cfg, optimizer)
    checkpointer = DetectronCheckpointer(
        cfg, _DistributedWrapper(model), optimizer, scheduler, str(path.parent), save_to_disk=True
    )
    checkpointer.save(path.stem, iteration=MAX_ITER)
    if legacy:
        data = torch.load(path, map_location="cpu", weights_only=True)
        torch.save(data, path, _use_new_zipfile_serialization=False)
    return path


def load(config: str, path, **size):
    """A fresh model (`build(config, **size)`) loaded with the real loader,
    `DetectronCheckpointer(cfg, model).load(path, use_latest=False)` (as test_net with --ckpt),
    in eval mode."""
    import_maskrcnn_benchmark()
    from maskrcnn_benchmark.utils.checkpoint import DetectronCheckpointer

    model = build(config, **size)
    DetectronCheckpointer(model.cfg, model).load(str(path), use_latest=False)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Inference, stage by stage


def load_image(path) -> np.ndarray:
    """An RGB uint8 image read as MB's COCO dataset reads it (torchvision CocoDetection:
    `Image.open(path).convert("RGB")`, no EXIF orientation)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def preprocess(model, image_rgb: np.ndarray) -> torch.Tensor:
    """The normalised [3, h, w] float32 BGR tensor that MB's COCO test loader makes of this image:
    `build_transforms(cfg, is_train=False)` on the PIL RGB image with an empty target (the
    dataset always passes a BoxList target)."""
    from PIL import Image

    import_maskrcnn_benchmark()
    from maskrcnn_benchmark.data.transforms import build_transforms
    from maskrcnn_benchmark.structures.bounding_box import BoxList

    pil = Image.fromarray(np.asarray(image_rgb, dtype=np.uint8), "RGB")
    target = BoxList(torch.zeros((0, 4)), pil.size, mode="xyxy")
    image, _ = build_transforms(model.cfg, is_train=False)(pil, target)
    return image


def batch(model, images_rgb):
    """`BatchCollator`: the preprocessed images padded into one ImageList (size divisible by
    DATALOADER.SIZE_DIVISIBILITY = 32)."""
    import_maskrcnn_benchmark()
    from maskrcnn_benchmark.structures.image_list import to_image_list

    tensors = [preprocess(model, im) for im in images_rgb]
    return to_image_list(tensors, model.cfg.DATALOADER.SIZE_DIVISIBILITY)


def paste_masks(prediction, height: int, width: int):
    """What coco_eval.prepare_for_coco_segmentation does with one prediction: resize it to the
    original (width, height) and paste its 28x28 masks with `Masker(threshold=0.5, padding=1)`.
    Returns (resized BoxList, masks [N, height, width] bool)."""
    import_maskrcnn_benchmark()
    from maskrcnn_benchmark.modeling.roi_heads.mask_head.inference import Masker

    prediction = prediction.resize((width, height))
    masks = prediction.get_field("mask")
    if len(prediction) == 0:  # coco_eval skips empty predictions
        return prediction, torch.zeros((0, height, width), dtype=torch.bool)
    if list(masks.shape[-2:]) != [height, width]:
        masks = Masker(threshold=0.5, padding=1)(masks.expand(1, -1, -1, -1, -1), prediction)[0]
    return prediction, masks[:, 0]


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).contiguous().numpy()


@torch.no_grad()
def run(model, image_rgb: np.ndarray) -> dict:
    """One uint8 RGB image through the model exactly as MB's COCO evaluation (test_net.py ->
    engine/inference.py -> coco_eval.py), calling the stages of `GeneralizedRCNN.forward` one by
    one to expose intermediates (numpy):

    input [Hp, Wp, 3] float32 (normalised BGR, padded: what the backbone sees); image_size (h, w)
    after resizing; features {"p2".."p6": [H, W, C]}; proposals [N, 4] (resized coords) and
    proposal_scores [N] (sigmoid objectness, decreasing); raw_boxes [M, 4] (resized coords,
    before BoxList.resize); boxes [M, 4] (original pixels); scores [M]; labels [M] (1..80);
    mask_probs [M, 28, 28] (sigmoid of the label's channel); masks [M, H, W] bool (original
    size). Detections stay in MB's own order: by class, then proposal index.

    Asserts that the detections equal a plain `model(images)` call bit for bit."""
    height, width = image_rgb.shape[:2]
    images = batch(model, [image_rgb])
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features)
    _, detections, _ = model.roi_heads(features, proposals)
    raw = detections[0]

    reference = model(images)[0]
    assert torch.equal(raw.bbox, reference.bbox), "stage-by-stage boxes differ from model(images)"
    for name in ("scores", "labels", "mask"):
        assert torch.equal(raw.get_field(name), reference.get_field(name)), (
            f"stage-by-stage {name} differs from model(images)"
        )

    final, masks = paste_masks(raw, height, width)
    return {
        "input": _hwc(images.tensors[0]),
        "image_size": np.array(tuple(images.image_sizes[0]), np.int64),
        "features": {f"p{i + 2}": _hwc(f[0]) for i, f in enumerate(features)},
        "proposals": proposals[0].bbox.numpy().copy(),
        "proposal_scores": proposals[0].get_field("objectness").numpy().copy(),
        "raw_boxes": raw.bbox.numpy().copy(),
        "boxes": final.bbox.numpy().copy(),
        "scores": raw.get_field("scores").numpy().copy(),
        "labels": raw.get_field("labels").numpy().copy(),
        "mask_probs": raw.get_field("mask")[:, 0].numpy().copy(),
        "masks": masks.numpy().astype(bool),
    }


# ---------------------------------------------------------------------------------------------
# Calibration of random weights


def _norm_modules(module: nn.Module) -> list[nn.Module]:
    import_maskrcnn_benchmark()
    from maskrcnn_benchmark.layers import FrozenBatchNorm2d

    return [m for m in module.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))]


@torch.no_grad()
def calibrate(model, images_rgb, *, seed: int = 0):
    """Makes a randomly initialised model produce non-trivial outputs on these images (uint8
    RGB arrays, or one array), in place, stage by stage, deterministically for a seed:

    - every FrozenBatchNorm gets, in execution order (forward pre-hooks), the mean and variance
      (+ 1e-2: MB's FrozenBN has no eps) of its actual input as running stats, and random affine
      weight/bias;
    - the RPN conv, objectness and delta layers are rescaled so that logits spread (std 1
      around -3) and deltas move anchors moderately (std 0.3). MB takes the sigmoid BEFORE
      topk and sorts by it: a wider spread saturates float32 sigmoids near 1 and ties the
      proposals' order (std 2.5 gave objectness 1.0 and 4 tied proposal scores);
    - box head fc6/fc7 to unit std, cls_score to std 1.5 with every class logit (background
      included) centred on its own mean, bbox_pred to std 1 around 0;
    - mask convs/deconv to unit std and the mask logits to std 3 with every class channel
      centred (masks neither empty nor full).

    The inputs go through the model's own test transforms and padding (`batch`), so the
    statistics are those inference sees."""
    if isinstance(images_rgb, np.ndarray):
        images_rgb = [images_rgb]
    g = torch.Generator().manual_seed(seed + 1)

    def set_stats(mod, inputs):
        x = inputs[0]
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-2)
        mod.weight.copy_(0.6 + 0.8 * torch.rand(mod.weight.shape, generator=g))
        mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))

    def calibrate_norms(module, run_fn):
        handles = [m.register_forward_pre_hook(set_stats) for m in _norm_modules(module)]
        run_fn()
        for h in handles:
            h.remove()

    def outputs(layer, run_fn):
        """All outputs of `layer` during `run_fn()` as [channels, values]."""
        seen = []

        def hook(mod, inputs, out):
            seen.append(out.transpose(0, 1).reshape(out.shape[1], -1))

        h = layer.register_forward_hook(hook)
        run_fn()
        h.remove()
        return torch.cat(seen, dim=1)

    def scale_layer(layer, run_fn, target_std, target_mean=None, center_channels=False):
        """Rescales weight and bias so the outputs get std `target_std` and, if given, mean
        `target_mean`; with `center_channels` every output channel is first centred on its own
        mean (so per-class offsets do not decide the class or the mask)."""
        out = outputs(layer, run_fn)
        if center_channels:
            shift = out.mean(dim=1)
            std = (out - shift[:, None]).std()
        else:
            shift = out.mean() if target_mean is not None else None
            std = out.std()
        factor = target_std / std.clamp_min(1e-12)
        layer.weight.mul_(factor)
        if layer.bias is not None:
            if shift is not None:
                layer.bias.sub_(shift)
            layer.bias.mul_(factor)
            if target_mean is not None:
                layer.bias.add_(target_mean)

    images = batch(model, images_rgb)
    calibrate_norms(model.backbone, lambda: model.backbone(images.tensors))
    features = model.backbone(images.tensors)

    head = model.rpn.head
    run_rpn = lambda: head(features)  # noqa: E731
    scale_layer(head.conv, run_rpn, 1.0)
    scale_layer(head.cls_logits, run_rpn, 1.0, -3.0)
    scale_layer(head.bbox_pred, run_rpn, 0.3, 0.0)
    proposals, _ = model.rpn(images, features)

    box = model.roi_heads.box
    pooled = box.feature_extractor.pooler(features, proposals)
    fe = box.feature_extractor
    run_box = lambda: box.predictor(  # noqa: E731
        torch.relu(fe.fc7(torch.relu(fe.fc6(pooled.view(pooled.size(0), -1)))))
    )
    calibrate_norms(box, run_box)
    for fc in (fe.fc6, fe.fc7):
        scale_layer(fc, run_box, 1.0)
    scale_layer(box.predictor.cls_score, run_box, 1.5, center_channels=True)
    scale_layer(box.predictor.bbox_pred, run_box, 1.0, 0.0)
    _, detections, _ = box(features, proposals)

    mask = model.roi_heads.mask
    mfe = mask.feature_extractor
    mpooled = mfe.pooler(features, detections)

    def run_mask():
        x = mpooled
        for name in mfe.blocks:
            x = torch.relu(getattr(mfe, name)(x))
        return mask.predictor(x)

    calibrate_norms(mask, run_mask)
    for name in mfe.blocks:
        scale_layer(getattr(mfe, name), run_mask, 1.0)
    scale_layer(mask.predictor.conv5_mask, run_mask, 1.0)
    scale_layer(mask.predictor.mask_fcn_logits, run_mask, 3.0, 0.0, center_channels=True)
    return model


# ---------------------------------------------------------------------------------------------
# Checks and the command line


def summary(out: dict) -> dict:
    """Non-triviality statistics of one `run` output."""
    scores, boxes, masks = out["scores"], out["boxes"], out["masks"]
    h, w = out["image_size"]
    centers = (out["proposals"][:, :2] + out["proposals"][:, 2:]) / 2
    cells = {(int(8 * y / h), int(8 * x / w)) for x, y in centers}
    fill = []
    for m, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        inside = m[max(int(y0), 0) : int(np.ceil(y1)) + 1, max(int(x0), 0) : int(np.ceil(x1)) + 1]
        fill.append(inside.mean() if inside.size else 0.0)
    ps = out["proposal_scores"]
    return {
        "proposals": len(ps),
        "proposal_cells_8x8": len(cells),
        "proposal_score_ties": int(len(ps) - len(np.unique(ps))),
        "proposal_score_max": float(ps.max()) if len(ps) else None,
        "detections": len(scores),
        "distinct_scores": len(np.unique(scores)),
        "score_min": float(scores.min()) if len(scores) else None,
        "score_max": float(scores.max()) if len(scores) else None,
        "score_median": float(np.median(scores)) if len(scores) else None,
        "labels": len(np.unique(out["labels"])),
        "empty_masks": int(sum(not m.any() for m in masks)),
        "mask_box_fill_min": float(min(fill)) if fill else None,
        "mask_box_fill_median": float(np.median(fill)) if fill else None,
        "mask_box_fill_max": float(max(fill)) if fill else None,
    }


def check_nontrivial(s: dict) -> None:
    """The calibration targets: >= 50 detections, all scores distinct, proposals spread over
    the image, masks neither empty nor full (a degenerate box, e.g. 1 px tall at the image
    border, may legitimately paste an empty mask: a few are allowed)."""
    assert s["detections"] >= 50, s
    assert s["distinct_scores"] == s["detections"], s
    assert s["proposal_cells_8x8"] >= 32, s
    assert s["empty_masks"] <= s["detections"] // 20, s
    assert 0.2 <= s["mask_box_fill_median"] <= 0.8 and s["mask_box_fill_max"] < 1.0, s


def assert_same_outputs(a: dict, b: dict, what: str) -> None:
    for k, v in a.items():
        if isinstance(v, dict):
            assert v.keys() == b[k].keys(), (what, k)
            for kk in v:
                assert np.array_equal(v[kk], b[k][kk]), f"{what}: {k}/{kk} differ"
        else:
            assert np.array_equal(v, b[k]), f"{what}: {k} differs"


def check_checkpoint(path, model, *, legacy: bool) -> None:
    """The file is what MB writes (container keys, "module." on every key, the anchor buffers)
    in the expected serialisation, and loads with `torch.load(weights_only=True)`."""
    assert zipfile.is_zipfile(path) != legacy, f"{path}: wrong serialisation (legacy={legacy})"
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert set(data) == {"model", "optimizer", "scheduler", "iteration"}, set(data)
    assert data["iteration"] == MAX_ITER
    sd = model.state_dict()
    assert list(data["model"]) == ["module." + k for k in sd], f"{path}: keys differ"
    for i in range(5):
        key = f"rpn.anchor_generator.cell_anchors.{i}"
        assert torch.equal(data["model"]["module." + key], sd[key]), key


def flat(out: dict) -> dict:
    """`run` output flattened for np.savez (features as `features/p2`, ...)."""
    res = {k: v for k, v in out.items() if not isinstance(v, dict)}
    res.update({f"features/{k}": v for k, v in out["features"].items()})
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="e2e_mask_rcnn_R_50_FPN_1x")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=384)
    p.add_argument("--max-size", type=int, default=640)
    p.add_argument("--no-save", action="store_true", help="only build, calibrate and run")
    a = p.parse_args(argv)
    size = dict(min_size=a.min_size, max_size=a.max_size)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()

    def step(msg):
        nonlocal t
        now = time.perf_counter()
        print(f"[{now - t:7.1f}s] {msg}", flush=True)
        t = now

    image = load_image(a.image)
    model = build(a.config, seed=a.seed, **size)
    step(f"built {a.config} ({sum(v.numel() for v in model.state_dict().values())} values)")
    calibrate(model, [image], seed=a.seed)
    step("calibrated")
    ref = run(model, image)
    step("ran the calibrated model (stage by stage == model(images))")
    s = summary(ref)
    print(s)
    check_nontrivial(s)

    if not a.no_save:
        sd = model.state_dict()
        files = {False: out_dir / "model_final.pth", True: out_dir / "model_final_legacy.pth"}
        for legacy, path in files.items():
            save(model, path, legacy=legacy)
            check_checkpoint(path, model, legacy=legacy)
            step(f"saved {path} ({path.stat().st_size >> 20} MiB, {'legacy' if legacy else 'zip'})")
        for path in files.values():
            loaded = load(a.config, path, seed=a.seed + 1000, **size)  # different random init
            lsd = loaded.state_dict()
            assert lsd.keys() == sd.keys(), f"{path.name}: keys differ"
            bad = [k for k in sd if not torch.equal(sd[k], lsd[k])]
            assert not bad, f"{path.name}: {len(bad)} tensors not restored, e.g. {bad[:3]}"
            assert_same_outputs(ref, run(loaded, image), path.name)
            step(
                f"reloaded {path.name} through DetectronCheckpointer: identical weights and outputs"
            )
            del loaded

    np.savez(out_dir / "outputs.npz", original_image=image, **flat(ref))
    step(f"wrote {out_dir / 'outputs.npz'}")


if __name__ == "__main__":
    main()
