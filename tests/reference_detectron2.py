"""The Detectron2 reference for parity tests: the REAL Detectron2 code (its model zoo configs,
`build_model`, `DetectionCheckpointer`, the `DefaultPredictor` preprocessing) with seeded random
weights, calibrated so that every stage produces non-trivial outputs. Nothing of Detectron2 is
copied here; it is imported from its source folder (see `source_dir`). Its compiled `_C` is not
needed: ROIAlign and NMS already call `torchvision.ops`, so inference runs on the CPU.

    python tests/reference_detectron2.py --config mask_rcnn_R_50_FPN_3x \\
        --image ../shared/data/coco-mini/train2017/000000000790.jpg --out /tmp/d2ref

builds, calibrates on the image, writes `model.pth` (DetectionCheckpointer's container) and
`model.pkl` (the model zoo's), reloads each through `DetectionCheckpointer.load`, checks that
both reproduce the calibrated model bit for bit, and writes the outputs to `outputs.npz`.

Detectron2 inference facts, verified in its source
===================================================
Paths are inside the `detectron2` package (source snapshot at /work/refsrc/detectron2, no git
metadata); `configs/` is the repository's config folder. The three supported configs are
`configs/COCO-InstanceSegmentation/mask_rcnn_{R_50,R_101,X_101_32x8d}_FPN_3x.yaml`, all on top
of `configs/Base-RCNN-FPN.yaml`.

Input (engine/defaults.py:284-352, `DefaultPredictor`)
- `__call__` takes an HWC uint8 **BGR** image; `cfg.INPUT.FORMAT` is "BGR"
  (config/defaults.py:84), so no channel flip (only "RGB" flips, engine/defaults.py:341-343).
- Resize: `T.ResizeShortestEdge([MIN_SIZE_TEST, MIN_SIZE_TEST], MAX_SIZE_TEST)`
  (engine/defaults.py:322-324; defaults 800/1333, config/defaults.py:63,65), interpolation
  `Image.BILINEAR` (data/transforms/augmentation_impl.py:144). Output size
  (augmentation_impl.py:187-200): `scale = short / min(h, w)`; the short side becomes exactly
  `short`, the other `scale * side`; if the longer of the two exceeds MAX, both are multiplied
  by `MAX / longer`; then `neww = int(neww + 0.5)`, `newh = int(newh + 0.5)` (round half up).
- `ResizeTransform.apply_image` on uint8: `PIL.Image.fromarray(img).resize((new_w, new_h),
  BILINEAR)` (data/transforms/transform.py:117-123), i.e. Pillow's resampling on the uint8
  image (antialiased when shrinking, Pillow's own 8-bit fixed-point filter; a Pillow fact, not
  Detectron2's). Then `torch.as_tensor(image.astype("float32").transpose(2, 0, 1))`: 0-255
  float, no /255 (engine/defaults.py:346); `inputs = {"image", "height", "width"}` with the
  ORIGINAL height/width (:344,349).
- Normalisation: `(x - pixel_mean) / pixel_std` (modeling/meta_arch/rcnn.py:228), BGR order;
  PIXEL_MEAN [103.530, 116.280, 123.675] (config/defaults.py:42), PIXEL_STD [1, 1, 1] (:46) for
  R50/R101; X101-32x8d sets PIXEL_STD [57.375, 57.120, 58.395]
  (configs/COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml:5). Both are float32
  tensors (so std 57.12 is float32 57.119998931884766) and a true division, not a multiply by
  1/std; non-persistent buffers from the config, never read from checkpoints (rcnn.py:65-66).
- Padding: `ImageList.from_tensors(images, backbone.size_divisibility)` (rcnn.py:229-233);
  FPN's size_divisibility is its largest stride, 32 (modeling/backbone/fpn.py:113); H and W
  are rounded up to a multiple of 32 (structures/image_list.py:99-102) and padded on the
  bottom/right (`F.pad(..., [0, u0, 0, u1])`, :115-122) with 0 (pad_value default 0.0, :63)
  AFTER normalisation. `image_sizes` keeps the unpadded resized (h, w) (:88).

Backbone
- Stem: conv 7x7/2 pad 3 (no bias) + norm + ReLU + max_pool 3/2 pad 1
  (modeling/backbone/resnet.py:344-358).
- Norm "FrozenBN" (config/defaults.py:491) = `FrozenBatchNorm2d(C)` with **eps 1e-5**
  (layers/batch_norm.py:35,188); inference is `F.batch_norm(x, rm, rv, w, b, training=False,
  eps)` (:58-66): y = (x - rm) / sqrt(rv + 1e-5) * w + b. A state dict without running stats
  (old versions) gets rm=0, rv=1 (:80-86).
- Bottleneck: `stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)`
  (resnet.py:147); STRIDE_IN_1X1 True by default (config/defaults.py:499) for R50/R101, False for
  X101-32x8d (its yaml:7). conv1 1x1, conv2 3x3 pad 1 `groups=num_groups`, conv3 1x1, all
  without bias, each with norm; ReLU after conv1, conv2 and after the residual sum
  (resnet.py:149-209). Shortcut 1x1 (+norm) carrying the stride only when in != out channels,
  i.e. the first block of each stage (:132-142). Stage blocks 3,4,6,3 (R50) / 3,4,23,3
  (R101, X101) (:646-652); first stride 1 in res2, 2 in res3-5 (:667). Bottleneck width
  `NUM_GROUPS * WIDTH_PER_GROUP` (:635): 1x64 for R50/R101, 32x8 = 256 for X101
  (yaml:8-9), doubled per stage (:692).
- FPN (fpn.py:72-93,139-167,225-244): lateral 1x1 and output 3x3 pad 1 convs WITH bias (FPN
  NORM "" -> use_bias, :72); top-down `F.interpolate(prev, scale_factor=2.0, mode="nearest")`
  + lateral (:153-155, fuse "sum"); P6 = `F.max_pool2d(p5, kernel_size=1, stride=2)` on the
  FPN OUTPUT p5 (LastLevelMaxPool, :197-200). Strides p2..p6 = 4, 8, 16, 32, 64 (:105-109).

RPN (modeling/proposal_generator/rpn.py, proposal_utils.py)
- Head: shared 3x3 conv + ReLU, 1x1 objectness (A=3 channels), 1x1 anchor_deltas (4A
  channels) (rpn.py:102,116-118,126-134). Flattening: logits (N,A,H,W) -> (N,H,W,A) ->
  (N,HWA); deltas viewed (N,A,4,H,W) -> (N,H,W,A,4) (rpn.py:456-467): anchor-major channels.
- Anchors (modeling/anchor_generator.py): OFFSET 0.0 (config/defaults.py:195); sizes 32..512,
  one per level, aspect ratios (h/w) 0.5, 1, 2 (configs/Base-RCNN-FPN.yaml:10-11); cell
  anchors UNROUNDED `w = sqrt(size^2 / ar)`, `h = ar * w`, (-w/2, -h/2, w/2, h/2) computed in
  Python doubles then `torch.tensor` -> float32 (anchor_generator.py:203-216), e.g. P2 ratio
  0.5: (-22.627, -11.314, 22.627, 11.314); shifts `arange(0, W*stride, stride)` in float32
  (:44-50), anchor = shift + cell anchor in float32, order (H, W, A) (:174-177); strides from
  the feature strides 4..64 (:132). Cell anchors are non-persistent buffers (:30).
- Box coder (modeling/box_regression.py:78-116): decode in float32 (:88); w = x2 - x1,
  cx = x1 + 0.5 w (no +1); dx/wx, dy/wy, dw/ww, dh/wh; dw, dh clamped at MAX only to
  log(1000/16) (:14,103-104); x1 = cx' - 0.5 w', x2 = cx' + 0.5 w'. RPN weights (1,1,1,1)
  (config/defaults.py:228).
- Selection (proposal_utils.py:22-135): per level and image, `logits.topk(min(HWA,
  PRE_NMS_TOPK_TEST))` on the LOGITS (:79; PRE_NMS_TOPK_TEST 1000 per level in
  Base-RCNN-FPN.yaml:15, overriding 6000 in config/defaults.py:235); concatenate levels
  (:94-96); drop non-finite (:105-113); clip x to [0, W], y to [0, H] of the unpadded resized
  image (:114, structures/boxes.py:191-197); keep `w > MIN_SIZE and h > MIN_SIZE` STRICT with
  MIN_SIZE 0 (:117, boxes.py:199-213, config/defaults.py:167); `batched_nms(boxes, logits,
  level_id, 0.7)` (:121; NMS_THRESH config/defaults.py:245) = per-level NMS; then `keep[:1000]`
  (:129; POST_NMS_TOPK_TEST 1000, Base-RCNN-FPN.yaml:20), sorted by logit descending. The
  proposals keep their raw logits in `objectness_logits` (:133).
- NMS: `detectron2.layers.batched_nms` = `torchvision.ops.boxes.batched_nms(boxes.float(),
  ...)` (layers/nms.py:11-22): IoU without +1, suppress IoU > thr; keep indices sorted by
  decreasing score. On CPU it loops per class/level when boxes.numel() > 4000 (more than 1000
  boxes), otherwise it offsets boxes by idx * (max_coord + 1) (torchvision/ops/boxes.py:86-126).

Box head (modeling/roi_heads/roi_heads.py, poolers.py, fast_rcnn.py)
- ROI features from p2..p5 (Base-RCNN-FPN.yaml:23) with `ROIAlignV2` (config/defaults.py:308,
  361) = `torchvision.ops.roi_align(..., aligned=True)` (modeling/poolers.py:170-176,
  layers/roi_align.py:58-65): box coords * 1/stride then -0.5, no minimum roi size;
  POOLER_SAMPLING_RATIO 0 = adaptive ceil(roi_size / output) samples per bin
  (config/defaults.py:306,352); box 7x7 (Base-RCNN-FPN.yaml:27), mask 14x14 (:31).
- Level: `floor(4 + log2(sqrt(w * h) / 224 + 1e-8))` clamped to [2, 5] (poolers.py:51-59,
  canonical 224/level 4 at :126-127; area = w * h, boxes.py:180); pooled in input order
  (poolers.py:257-261).
- FastRCNNConvFCHead: flatten (C,7,7) C-major -> fc1 1024 + ReLU -> fc2 1024 + ReLU
  (modeling/roi_heads/box_head.py:67-74; NUM_FC 2, Base-RCNN-FPN.yaml:26; FC_DIM 1024,
  config/defaults.py:312).
- Predictor (fast_rcnn.py:236-239): `cls_score` Linear(1024, 81): 80 classes + background
  LAST (index 80); `bbox_pred` Linear(1024, 320) = 80 x 4, class-major rows, no background.
  Softmax over the 81 logits (:568). Boxes decoded from the proposals with weights
  (10, 10, 5, 5) (config/defaults.py:302), same coder/clamp as above (:543-546).
- `fast_rcnn_inference_single_image` (fast_rcnn.py:118-171): drop non-finite rows (:137-140);
  drop the background column (:142); clip all class boxes to the resized image (:145-146);
  keep `scores > 0.05` STRICT (:151; SCORE_THRESH_TEST config/defaults.py:280), candidates in
  row-major (proposal, class) order (:154); `batched_nms(boxes, scores, class, 0.5)` (:162;
  NMS_THRESH_TEST config/defaults.py:283); `keep[:100]` (:163-164; DETECTIONS_PER_IMAGE
  config/defaults.py:614). Classes are contiguous 0..79 (:170).

Mask head (modeling/roi_heads/mask_head.py)
- ROIs are the final boxes in resized-image coordinates (roi_heads.py:842-843), 14x14 ROIAlignV2.
- 4 x (conv 3x3 pad 1 + bias + ReLU) (mask_head.py:241-254; NUM_CONV 4, Base-RCNN-FPN.yaml:30)
  -> ConvTranspose2d 2x2 stride 2 + ReLU (:256-259) -> 1x1 conv to 80 class logits (:262),
  28x28. The predicted class's channel is taken and sigmoided (:151).

Postprocess (modeling/postprocessing.py:9-74, `detector_postprocess`)
- `scale_x = width / resized_w`, `scale_y = height / resized_h` SEPARATELY (:41-44), boxes
  multiplied in place (structures/boxes.py:271-276), clipped to the ORIGINAL (height, width)
  (:56), then instances with `w > 0 and h > 0` kept, strict (:58, `nonempty()` threshold 0).
- Masks: `paste_masks_in_image` with the scaled boxes, threshold 0.5 (:66-68;
  layers/mask_ops.py:74-147): per pixel centre (i + 0.5), `(c - x0) / (x1 - x0) * 2 - 1` in
  float32 (mask_ops.py:51-54), `F.grid_sample(mask, grid, align_corners=False)` (bilinear,
  zeros padding) (:64), binarised with `>= 0.5` (:138). On CPU each mask is pasted alone
  (:116-119) over [floor(min x0) - 1 clamp 0, ceil(max x1) + 1 clamp W) (same for y); pixels
  outside that window stay False (:38-43,146).
- Order of the returned instances: box-head NMS order, i.e. decreasing score (batched_nms
  keep order, fast_rcnn.py:162-165); the empty-box filter keeps that order
  (structures/instances.py:124-142). `GeneralizedRCNN.inference` = preprocess_image ->
  backbone -> proposal_generator -> roi_heads (box head, then masks on the kept boxes) ->
  `_postprocess` -> detector_postprocess(height, width) (rcnn.py:201-250).

Checkpoints (checkpoint/detection_checkpoint.py; fvcore/common/checkpoint.py)
- `DetectionCheckpointer.save(name)` writes `{"model": model.state_dict()}` with `torch.save`
  to `save_dir/name.pth` (and tags `save_dir/last_checkpoint`) (fvcore checkpoint.py:104-127).
- A `.pkl` holding both "model" and "__author__" is taken as Detectron2 format as is
  (detection_checkpoint.py:70-77); otherwise it is treated as a Caffe2 file. With
  "matching_heuristics" the numpy arrays are converted and keys matched by complete dotted
  suffix (`align_and_update_state_dicts`, c2_conversion only when __author__ == "Caffe2")
  (detection_checkpoint.py:116-124; checkpoint/c2_model_loading.py:208-328); loading is
  non-strict and only logs missing/unexpected keys (fvcore checkpoint.py:326).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONFIGS = ("mask_rcnn_R_50_FPN_3x", "mask_rcnn_R_101_FPN_3x", "mask_rcnn_X_101_32x8d_FPN_3x")
ENV_VAR = "JAXMRCNN_DETECTRON2_SRC"
DEFAULT_SRC = Path("/work/refsrc/d2path")


# ---------------------------------------------------------------------------------------------
# Finding and importing Detectron2


def source_dir() -> Path | None:
    """The folder to put on sys.path to import Detectron2 (it contains the `detectron2`
    package): $JAXMRCNN_DETECTRON2_SRC if set, else None (the live
    tests then skip; the goldens still run). Its dependencies are the user's to install.
    A set but invalid $JAXMRCNN_DETECTRON2_SRC gives None rather than a silent fallback."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        return path if (path / "detectron2" / "__init__.py").is_file() else None
    return None  # only where asked for: its own dependencies are not part of the set-up


def import_detectron2():
    """Puts `source_dir()` on sys.path and imports `detectron2` (returned)."""
    src = source_dir()
    if src is not None and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    try:
        import detectron2
    except ImportError as e:
        raise ImportError(
            f"Detectron2's source was not found: set {ENV_VAR} to a folder containing the "
            f"`detectron2` package (e.g. a checkout of github:facebookresearch/detectron2); "
            f"e.g. {DEFAULT_SRC}. Its deps: fvcore, iopath, yacs, omegaconf, "
            f"hydra-core, pycocotools, opencv-python-headless. ({e})"
        ) from e
    return detectron2


def config_file(config: str) -> Path:
    """The model-zoo yaml for `config`: a name from CONFIGS (with or without `.yaml`), looked up
    under the repository's `configs/COCO-InstanceSegmentation/`, or a path to a yaml file."""
    if Path(config).is_file():
        return Path(config)
    pkg = Path(import_detectron2().__file__).resolve().parent
    name = config if config.endswith(".yaml") else config + ".yaml"
    # The package folder may hold `configs` itself, an installed `model_zoo/configs`, or sit in
    # a repository checkout next to `configs`.
    for root in (pkg / "configs", pkg / "model_zoo" / "configs", pkg.parent / "configs"):
        path = root / "COCO-InstanceSegmentation" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"no COCO-InstanceSegmentation/{name} in Detectron2's configs")


# ---------------------------------------------------------------------------------------------
# Building, saving and loading


def build(config: str, *, seed: int = 0, min_size: int = 800, max_size: int = 1333):
    """A real Detectron2 `GeneralizedRCNN` (eval, CPU) from the model-zoo yaml, with seeded
    random weights (Detectron2's own initialisers under `torch.manual_seed(seed)`).
    The config is kept as `model.cfg` (test sizes, input format) for `run`."""
    import_detectron2()
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(config_file(config)))
    cfg.merge_from_list(
        ["INPUT.MIN_SIZE_TEST", min_size, "INPUT.MAX_SIZE_TEST", max_size, "MODEL.DEVICE", "cpu"]
    )
    cfg.MODEL.WEIGHTS = ""  # never fetch the zoo's ImageNet weights
    cfg.freeze()
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    model.cfg = cfg
    return model


def save_pth(model, path) -> Path:
    """`{"model": state_dict}` written by `DetectionCheckpointer(model, save_dir).save(name)`
    (which also writes `last_checkpoint` next to it). `path` must end in `.pth`."""
    from detectron2.checkpoint import DetectionCheckpointer

    path = Path(path)
    if path.suffix != ".pth":
        raise ValueError(f"DetectionCheckpointer writes <name>.pth; got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    DetectionCheckpointer(model, save_dir=str(path.parent)).save(path.stem)
    return path


def save_pkl(model, path) -> Path:
    """The model-zoo `.pkl` container: a pickle of `{"model": {name: np.ndarray}, "__author__",
    "matching_heuristics": True}`. "model" + "__author__" make DetectionCheckpointer read it as a
    Detectron2 file (not Caffe2); "matching_heuristics" sends it through the suffix matcher."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    data = {"model": weights, "__author__": "jaxmrcnn tests", "matching_heuristics": True}
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def load(config: str, path, **size):
    """A fresh model (`build(config, **size)`) loaded with the real loader,
    `DetectionCheckpointer(model).load(path)`, in eval mode."""
    from detectron2.checkpoint import DetectionCheckpointer

    model = build(config, **size)
    DetectionCheckpointer(model).load(str(path))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Inference, stage by stage


def load_image(path) -> np.ndarray:
    """An RGB uint8 image read by Detectron2's own `read_image` (Pillow, EXIF orientation)."""
    import_detectron2()
    from detectron2.data.detection_utils import read_image

    return read_image(str(path), format="RGB")


def predictor_inputs(model, image_rgb: np.ndarray) -> dict:
    """The model input that `DefaultPredictor.__call__` builds for this image: it takes BGR, so
    the RGB image is flipped first; then ResizeShortestEdge (PIL bilinear on uint8), float32 CHW,
    and the original height/width."""
    from detectron2.data import transforms as T

    cfg = model.cfg
    image = np.ascontiguousarray(np.asarray(image_rgb, dtype=np.uint8)[:, :, ::-1])  # BGR
    if cfg.INPUT.FORMAT == "RGB":  # as DefaultPredictor does
        image = image[:, :, ::-1]
    height, width = image.shape[:2]
    short = cfg.INPUT.MIN_SIZE_TEST
    aug = T.ResizeShortestEdge([short, short], cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(image).apply_image(image)
    tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
    return {"image": tensor, "height": height, "width": width}


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).contiguous().numpy()


@torch.no_grad()
def run(model, image_rgb: np.ndarray) -> dict:
    """One uint8 RGB image through the model exactly as `DefaultPredictor.__call__`, calling the
    stages of `GeneralizedRCNN.inference` one by one to expose intermediates (numpy):

    input [Hp, Wp, 3] float32 (normalised, padded: what the backbone sees); image_size (h, w)
    after resizing; features {"p2".."p6": [H, W, C]}; proposals [N, 4] (resized coords) and
    proposal_logits [N]; boxes [N, 4] (original pixels), scores, classes (0..79), masks
    [N, H, W] bool (original size). Extras, before detector_postprocess: raw_boxes [M, 4]
    (resized coords), raw_scores, raw_classes, mask_probs [M, 28, 28] (sigmoid of the class's
    logits).

    Asserts that the final outputs equal a plain `model([inputs])` call bit for bit."""
    from detectron2.modeling.postprocessing import detector_postprocess

    inputs = predictor_inputs(model, image_rgb)
    images = model.preprocess_image([inputs])
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    proposal_boxes = proposals[0].proposal_boxes.tensor.numpy().copy()
    proposal_logits = proposals[0].objectness_logits.numpy().copy()
    results, _ = model.roi_heads(images, features, proposals, None)
    raw = results[0]
    out = {
        "input": _hwc(images.tensor[0]),
        "image_size": np.array(images.image_sizes[0], np.int64),
        "features": {k: _hwc(v[0]) for k, v in features.items()},
        "proposals": proposal_boxes,
        "proposal_logits": proposal_logits,
        # copies: detector_postprocess scales the boxes in place
        "raw_boxes": raw.pred_boxes.tensor.numpy().copy(),
        "raw_scores": raw.scores.numpy().copy(),
        "raw_classes": raw.pred_classes.numpy().copy(),
        "mask_probs": raw.pred_masks[:, 0].numpy().copy(),
    }
    final = detector_postprocess(raw, inputs["height"], inputs["width"])

    reference = model([inputs])[0]["instances"]
    for name in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = final.get(name), reference.get(name)
        a, b = getattr(a, "tensor", a), getattr(b, "tensor", b)
        assert torch.equal(a, b), f"stage-by-stage {name} differs from model([inputs])"

    out.update(
        boxes=final.pred_boxes.tensor.numpy().copy(),
        scores=final.scores.numpy().copy(),
        classes=final.pred_classes.numpy().copy(),
        masks=final.pred_masks.numpy().astype(bool),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Calibration of random weights


def _norm_modules(module: nn.Module) -> list[nn.Module]:
    from detectron2.layers import FrozenBatchNorm2d

    return [m for m in module.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))]


@torch.no_grad()
def calibrate(model, images_rgb, *, seed: int = 0):
    """Makes a randomly initialised model produce non-trivial outputs on these images (uint8
    RGB arrays, or one array), in place, stage by stage, deterministically for a seed:

    - every FrozenBatchNorm gets, in execution order (forward pre-hooks), the mean and variance
      of its actual input as running stats, and random affine weight/bias;
    - the RPN conv, objectness and anchor-delta layers are rescaled so that logits spread
      (std 2.5 around -1) and deltas move anchors moderately (std 0.3);
    - box head fc1/fc2 to unit std, cls_score to std 1.5 with every class logit centred on
      its own mean (scores spread over the 0.05 threshold and over many classes), bbox_pred
      to std 1 around 0;
    - mask convs/deconv to unit std and the mask predictor to logits of std 3 with every
      class channel centred (masks neither empty nor full).

    The inputs go through the model's own preprocessing (`predictor_inputs`, then
    `model.preprocess_image`), so the statistics are those inference sees."""
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
        """All outputs of `layer` during `run_fn()` as [channels, values] (post-activation for
        Detectron2's Conv2d wrapper, which applies its norm and activation inside)."""
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

    inputs = [predictor_inputs(model, im) for im in images_rgb]
    images = model.preprocess_image(inputs)
    calibrate_norms(model.backbone, lambda: model.backbone(images.tensor))
    features = model.backbone(images.tensor)

    rpn = model.proposal_generator
    head = rpn.rpn_head
    rpn_in = [features[f] for f in rpn.in_features]
    run_rpn = lambda: head(rpn_in)  # noqa: E731
    for conv in [m for m in head.conv.modules() if isinstance(m, nn.Conv2d)]:
        scale_layer(conv, run_rpn, 1.0)
    scale_layer(head.objectness_logits, run_rpn, 2.5, -1.0)
    scale_layer(head.anchor_deltas, run_rpn, 0.3, 0.0)
    proposals, _ = rpn(images, features, None)

    rh = model.roi_heads
    box_in = [features[f] for f in rh.box_in_features]
    pooled = rh.box_pooler(box_in, [p.proposal_boxes for p in proposals])
    run_box = lambda: rh.box_predictor(rh.box_head(pooled))  # noqa: E731
    calibrate_norms(rh.box_head, run_box)
    for fc in [m for m in rh.box_head.modules() if isinstance(m, nn.Linear)]:
        scale_layer(fc, run_box, 1.0)
    scale_layer(rh.box_predictor.cls_score, run_box, 1.5, center_channels=True)
    scale_layer(rh.box_predictor.bbox_pred, run_box, 1.0, 0.0)
    detections, _ = rh.box_predictor.inference(run_box(), proposals)

    mask_in = [features[f] for f in rh.mask_in_features]
    mpooled = rh.mask_pooler(mask_in, [d.pred_boxes for d in detections])
    run_mask = lambda: rh.mask_head.layers(mpooled)  # noqa: E731
    calibrate_norms(rh.mask_head, run_mask)
    mh = rh.mask_head
    for name, layer in mh.named_children():
        if name.startswith("mask_fcn") or name == "deconv":
            scale_layer(layer, run_mask, 1.0)
    scale_layer(mh.predictor, run_mask, 3.0, 0.0, center_channels=True)
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
        inside = m[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))]
        fill.append(inside.mean() if inside.size else 0.0)
    return {
        "proposals": len(out["proposals"]),
        "proposal_cells_8x8": len(cells),
        "detections": len(scores),
        "distinct_scores": len(np.unique(scores)),
        "score_min": float(scores.min()) if len(scores) else None,
        "score_max": float(scores.max()) if len(scores) else None,
        "score_median": float(np.median(scores)) if len(scores) else None,
        "classes": len(np.unique(out["classes"])),
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


def flat(out: dict) -> dict:
    """`run` output flattened for np.savez (features as `features/p2`, ...)."""
    res = {k: v for k, v in out.items() if not isinstance(v, dict)}
    res.update({f"features/{k}": v for k, v in out["features"].items()})
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mask_rcnn_R_50_FPN_3x")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=384)
    p.add_argument("--max-size", type=int, default=640)
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
    step("ran the calibrated model (stage by stage == model([inputs]))")
    s = summary(ref)
    print(s)
    check_nontrivial(s)

    pth = save_pth(model, out_dir / "model.pth")
    pkl = save_pkl(model, out_dir / "model.pkl")
    step(f"saved {pth} ({pth.stat().st_size >> 20} MiB), {pkl} ({pkl.stat().st_size >> 20} MiB)")
    sd = model.state_dict()
    for path in (pth, pkl):
        loaded = load(a.config, path, seed=a.seed + 1000, **size)  # different random init
        lsd = loaded.state_dict()
        assert lsd.keys() == sd.keys(), f"{path.name}: keys differ"
        bad = [k for k in sd if not torch.equal(sd[k], lsd[k])]
        assert not bad, f"{path.name}: {len(bad)} tensors not restored, e.g. {bad[:3]}"
        assert_same_outputs(ref, run(loaded, image), path.name)
        step(f"reloaded {path.name} through DetectionCheckpointer: identical weights and outputs")
        del loaded

    np.savez(out_dir / "outputs.npz", original_image=image, **flat(ref))
    step(f"wrote {out_dir / 'outputs.npz'}")


if __name__ == "__main__":
    main()
