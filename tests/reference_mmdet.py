"""The mmdetection reference for parity tests: the real mmdet 3.3.0 Mask R-CNN (built and run by
mmdet's own `init_detector` / `inference_detector`), with seeded random weights calibrated so that
every stage produces non-trivial outputs, saved in mmdet v2 and v3 checkpoint containers.

Install with `pip install --no-deps -r tests/requirements-mmdet.txt` (see that file). mmcv-lite
has no compiled `mmcv._ext`; `install_mmcv_ext_shim()` stands in the two kernels Mask R-CNN
inference uses (nms, roi_align_forward) with torchvision's, which compute the same thing (below).

Usage:  python tests/reference_mmdet.py --config mask-rcnn_r50_fpn_1x_coco --image IMG --out DIR

FACTS (verified in the installed mmdet 3.3.0 / mmcv-lite 2.1.0 / mmengine 0.10.7 source; paths
relative to site-packages, MMDET = mmdet/, MMCV = mmcv/, ME = mmengine/)

Configs. MMDET/.mim/configs/mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py =
  _base_/models/mask-rcnn_r50_fpn.py + _base_/datasets/coco_instance.py (+ schedule, runtime).
  r50-caffe: data_preprocessor mean [103.530, 116.280, 123.675], std [1, 1, 1], bgr_to_rgb=False,
  backbone style='caffe' (mask-rcnn_r50-caffe_fpn_1x_coco.py:4-12). r101: depth=101. x101-32x4d /
  x101-64x4d: ResNeXt, groups 32 / 64, base_width 4, style 'pytorch'
  (mask-rcnn_x101-*_fpn_1x_coco.py). test_cfg (mask-rcnn_r50_fpn.py:117-127): rpn nms_pre=1000,
  max_per_img=1000, nms iou 0.7, min_bbox_size=0; rcnn score_thr=0.05, nms iou 0.5,
  max_per_img=100, mask_thr_binary=0.5.

Loading. `inference_detector` (MMDET/apis/inference.py:151-189) replaces the first test-pipeline
  step by LoadImageFromNDArray for arrays and runs Compose(test pipeline) then `model.test_step`
  (ME/model/base_model/base_model.py:144-145: data_preprocessor(data, False), then
  `forward(mode='predict')`). LoadImageFromNDArray (MMDET/datasets/transforms/loading.py:56-64)
  takes the array as is (no channel swap, uint8 stays uint8): callers pass BGR as cv2 reads it.
  LoadImageFromFile decodes with mmcv.imfrombytes(flag='color', backend='cv2') -> BGR uint8
  (MMCV/transforms/loading.py:53-56,101-102). The test pipeline is LoadImage, Resize(scale=(1333,
  800), keep_ratio=True), LoadAnnotations (no-op without annotations), PackDetInputs
  (_base_/datasets/coco_instance.py:27-36). PackDetInputs makes a uint8 CHW tensor
  (MMDET/datasets/transforms/formatting.py:80-84). `init_detector` with cfg_options=None sets
  backbone.init_cfg = None (no pretrained download) and builds the model WITHOUT calling
  init_weights (MMDET/apis/inference.py:57-66).

Resize (keep_ratio=True). mmdet's Resize (MMDET/datasets/transforms/transforms.py:135,215-236)
  inherits `_resize_img` from mmcv's Resize (MMCV/transforms/processing.py:167-194; defaults
  backend='cv2', interpolation='bilinear', :138-139): mmcv.imrescale -> rescale_size: factor s =
  min(max(scale) / max(h, w), min(scale) / min(h, w)) in Python float64, new size (int(w * s +
  0.5), int(h * s + 0.5)) (MMCV/image/geometric.py:17-33 `_scale_size`, :236-255, :281-284).
  (mmdet's own truncating imrescale, transforms.py:42-133, serves only FixScaleResize, :250-280.)
  Pixels: cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR) on the uint8 BGR image
  (MMCV/image/geometric.py:115-117), i.e. OpenCV's fixed-point uint8 bilinear with half-pixel
  centres (checked: identical to a direct cv2.resize call). scale_factor = (new_w / w, new_h / h),
  the ACTUAL per-axis ratios as Python floats, not s (processing.py:180-193); img_shape = (new_h,
  new_w). E.g. a 333x500 (w x h) image at scale (640, 384): s = 384/333, img_shape (577, 384),
  scale_factor (1.15315..., 1.154).

Data preprocessor (DetDataPreprocessor -> ImgDataPreprocessor.forward,
  ME/model/base_model/data_preprocessor.py:255-279; list-of-tensors path): per image, (1) channel
  swap [2, 1, 0] if bgr_to_rgb (pytorch style: BGR -> RGB; caffe style: stays BGR) on uint8, (2)
  .float(), (3) (x - mean) / std with float32 mean/std buffers [3, 1, 1] (pytorch style mean
  [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375] in RGB order; caffe [103.530, 116.280,
  123.675] / 1 in BGR order; mask-rcnn_r50_fpn.py:4-10), (4) pad bottom/right to a multiple of 32
  with pad_value 0 (after normalisation, so padding is 0 in normalised space) via stack_batch
  (ME/model/utils.py:43-66; pad_size_divisor=32, DetDataPreprocessor pad_value default 0).
  batch_input_shape and pad_shape go into the metainfo (MMDET/models/data_preprocessors/
  data_preprocessor.py:91-104).

Backbone. ResNet stem conv 7x7/2 pad 3 (no bias), BN, ReLU, maxpool 3x3/2 pad 1
  (MMDET/models/backbones/resnet.py:598-611,633-639); stage strides (1, 2, 2, 2) (:375); outputs
  C2..C5 (out_indices 0..3). Bottleneck stride placement: 'pytorch' -> conv1 (1x1) stride 1, conv2
  (3x3) stride s; 'caffe' -> conv1 stride s, conv2 stride 1 (resnet.py:154-159). Downsample = 1x1
  conv stride s (no bias) + BN on the first block of each stage
  (MMDET/models/layers/res_layer.py:44-66). ResNeXt width = floor(planes * base_width / 64) *
  groups, grouped 3x3 (MMDET/models/backbones/resnext.py:29-33). BN = nn.BatchNorm2d
  (MMCV/cnn/bricks/norm.py:11) with eps 1e-5 (norm.py:118); norm_eval=True keeps it in eval mode
  (running statistics; resnet.py:648-656).
FPN (MMDET/models/necks/fpn.py:161-221): laterals 1x1 conv (bias; no norm, no activation), top-down
  laterals[i-1] + F.interpolate(laterals[i], size=laterals[i-1].shape, mode='nearest') (:188-191),
  3x3 output convs (bias), P6 = F.max_pool2d(P5_out, kernel 1, stride 2) (:202-204; add_extra_convs
  False) -> P6[i, j] = P5[2i, 2j].
Anchors (MMDET/models/task_modules/prior_generators/anchor_generator.py): base_size = stride
  (:94-95), center_offset 0 (:78), h_ratio = sqrt(r), w_ratio = 1 / h_ratio, scale_major, w =
  stride * w_ratio * 8, box (-w/2, -h/2, w/2, h/2) in float32 torch, NO rounding (:180-203); ratios
  [0.5, 1, 2], scales [8], strides [4, 8, 16, 32, 64] (mask-rcnn_r50_fpn.py:30-34). Grid shift x =
  j * stride (no half-pixel), order (y, x, anchor) (:281-296, _meshgrid :207-230).
RPN head (MMDET/models/dense_heads/rpn_head.py): 3x3 conv + ReLU (:71-72,93-94), 1x1 cls (3 ch,
  sigmoid) and 1x1 reg (12 ch); predictions reshaped permute(1, 2, 0) -> (y, x, anchor) order. Per
  level (:188-222): sigmoid scores; if the level has MORE than nms_pre=1000 anchors, full
  descending sort (torch sort, not stable) and keep the first 1000; otherwise keep all in anchor
  order. Decode all kept levels at once, clipped to img_shape (:226). Post-process (:276-289):
  min_bbox_size=0 keeps w > 0 AND h > 0 (strict); batched_nms by level id (iou 0.7); scores = NMS
  output (sorted descending); first max_per_img=1000. Proposals stay in resized coordinates
  (TwoStageDetector.predict calls rpn_head.predict(rescale=False),
  MMDET/models/detectors/two_stage.py:231-232).
batched_nms (MMCV/ops/nms.py:216-330): class/level-aware by offsetting boxes by idx * (boxes.max()
  + 1) (max over ALL coordinates of all boxes) (:291-294) and running one nms when fewer than
  split_thr=10000 boxes (:300-309); with >= 10000 boxes it runs nms per id and re-sorts the union
  by score (:310-329). nms (MMCV/ops/csrc/pytorch/cpu/nms.cpp:5-52): areas
  (x2-x1+offset)*(y2-y1+offset), offset 0 here; order = scores.sort(descending) (not stable);
  suppress when IoU > thr (strict); returns indices in score order. torchvision's CPU nms is the
  same computation with a stable sort, so the shim hands it the boxes pre-sorted by mmcv's order.
DeltaXYWHBBoxCoder (MMDET/models/task_modules/coders/delta_xywh_bbox_coder.py:326-361): deltas *
  stds + means (RPN stds 1,1,1,1; RCNN stds 0.1,0.1,0.2,0.2: MULTIPLIED, not divided by 10/5); pxy
  = (x1 + x2) * 0.5, pwh = x2 - x1 (no +1); dxy_wh = pwh * dxy; dw, dh clamped to [-|log(16/1000)|,
  +|log(16/1000)|] = +-4.1351665 (both sides; add_ctr_clamp False, :40,345-350); gxy = pxy +
  dxy_wh; gwh = pwh * exp(dwh); x1y1 = gxy - gwh * 0.5, x2y2 = gxy + gwh * 0.5; clip (clip_border
  True) inside decode: x to [0, img_shape[1]], y to [0, img_shape[0]] (:357-359).
RoI extractor (MMDET/models/roi_heads/roi_extractors/single_level_roi_extractor.py:35,59-63): level
  = floor(log2(sqrt((x2-x1)*(y2-y1)) / 56 + 1e-6)) clamped to [0, 3] -> P2..P5 (P6 unused);
  RoIAlign(output 7 box / 14 mask, sampling_ratio=0, aligned=True, avg) with spatial_scale 1/stride
  (base_roi_extractor.py:67; MMCV/ops/roi_align.py:174-180). mmcv's CPU kernel
  (MMCV/ops/csrc/pytorch/cpu/roi_align.cpp) == torchvision's: roi * scale - 0.5, bins of roi/size,
  adaptive grid ceil(roi_h / 7), sample outside [-1, H] -> 0, clamp at 0 and H-1.
Bbox head (Shared2FCBBoxHead; MMDET/models/roi_heads/bbox_heads/convfc_bbox_head.py:185-192,
  bbox_head.py:77-92): flatten (C, 7, 7) -> fc 1024 + ReLU -> fc 1024 + ReLU; fc_cls 81 outputs (80
  classes, background LAST, index 80); fc_reg 320 = 80 * 4 (class-specific, no background row).
  Post-processing (bbox_head.py:523-571): softmax over 81; decode each RoI with each class's deltas
  (roi.repeat_interleave(80)), clipped to img_shape; with a mask head NO rescale here
  (MMDET/models/roi_heads/base_roi_head.py:117). multiclass_nms (MMDET/models/layers/
  bbox_nms.py:45-105): drop the background column, candidates score > 0.05 (STRICT), in (roi,
  class) row-major order, batched_nms by class (iou 0.5) in RESIZED coordinates, first
  max_per_img=100; result sorted by score descending; labels 0..79.
Mask head (FCNMaskHead; MMDET/models/roi_heads/mask_heads/fcn_mask_head.py:134-150): 4 x (3x3 conv
  + ReLU), ConvTranspose 2x2/2 + ReLU, 1x1 conv_logits -> 80 x 28 x 28. Mask RoIs are the final
  boxes in resized coordinates (standard_roi_head.py:395-418). Paste (fcn_mask_head.py:330-392):
  sigmoid of the label's channel; boxes rescaled IN PLACE `bboxes /= scale_factor` (float32 [w_s,
  h_s, w_s, h_s]; these are the returned boxes: original pixels, not clipped again) (:330-342);
  `_do_paste_mask` (:400-472): pixel centres (i + 0.5) mapped to (c - x0) / (x1 - x0) * 2 - 1,
  F.grid_sample(bilinear, zeros padding, align_corners=False) of the 28x28 PROBABILITIES, then >=
  0.5 (mask_thr_binary; :380 label channel, :391 threshold) into a bool [N, H_orig, W_orig]. On CPU
  each mask is pasted alone over [floor(min x0) - 1, ceil(x1) + 1) (clamped; skip_empty) and is
  False outside: for threshold 0.5 this equals pasting everywhere.
Returned (MMDET/models/detectors/two_stage.py:226-243; inference_detector): pred_instances with
  bboxes [N, 4] (original pixels), scores, labels (0..79, contiguous), masks bool [N, H, W],
  ordered by descending score (multiclass_nms order).
Checkpoints. mmengine load_checkpoint (ME/runner/checkpoint.py:347) calls torch.load WITHOUT a
  weights_only argument, so under torch >= 2.6 it loads weights_only=True; it takes
  ckpt['state_dict'] if present, strips '^module.', loads non-strict (:585-616). init_detector
  reads classes from meta['dataset_meta']['classes'] (v3) or meta['CLASSES'] (v2), else COCO with a
  warning (MMDET/apis/inference.py:73-93). Runner.save_checkpoint (ME/runner/runner.py:2213-2271)
  writes meta (epoch, iter, cfg text, seed, experiment_name, time, mmengine_version, dataset_meta),
  state_dict, message_hub (MessageHub.state_dict: log_scalars hold HistoryBuffer objects with numpy
  arrays, ME/logging/message_hub.py:349-380), optimizer, param_schedulers. HistoryBuffer is not
  readable with weights_only=True (checked: mmengine's own load_checkpoint fails on such a file
  under this torch); save_v3 writes message_hub with empty log_scalars (see save_v3).
"""

from __future__ import annotations

import argparse
import copy
import importlib.machinery
import importlib.util
import os
import sys
import time
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

# The config files ship inside the mmdet wheel (found without importing mmdet).
_MMDET_DIR = Path(importlib.util.find_spec("mmdet").submodule_search_locations[0])
CONFIG_DIR = _MMDET_DIR / ".mim" / "configs" / "mask_rcnn"
CONFIGS = {
    name: CONFIG_DIR / f"{name}.py"
    for name in (
        "mask-rcnn_r50_fpn_1x_coco",  # ResNet-50, pytorch style (stride on the 3x3), RGB
        "mask-rcnn_r50-caffe_fpn_1x_coco",  # ResNet-50, caffe style (stride on the 1x1), BGR
        "mask-rcnn_r101_fpn_1x_coco",
        "mask-rcnn_x101-32x4d_fpn_1x_coco",
        "mask-rcnn_x101-64x4d_fpn_1x_coco",
    )
}
SMALL_SCALE = (640, 384)  # long side <= 640, short side <= 384 (the fast test size)


# --------------------------------------------------------------------------- mmcv._ext stand-in


def _ext_nms(bboxes, scores, iou_threshold, offset):
    """mmcv `nms_cpu` (mmcv/ops/csrc/pytorch/cpu/nms.cpp): indices kept, in score order.

    mmcv orders by `scores.sort(0, descending=True)` (not stable); torchvision's kernel sorts
    stably, so handing it the boxes already in mmcv's order reproduces mmcv's tie order too."""
    order = scores.sort(0, descending=True)[1]
    if offset == 0:
        return order[torchvision.ops.nms(bboxes[order], scores[order], float(iou_threshold))]
    # offset 1 (legacy +1 boxes; not used by Mask R-CNN): the kernel's loop, vectorised per box.
    b = bboxes[order]
    areas = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    keep = torch.ones(len(b), dtype=torch.bool)
    for i in range(len(b)):
        if keep[i]:
            w = (
                torch.minimum(b[i, 2], b[i + 1 :, 2])
                - torch.maximum(b[i, 0], b[i + 1 :, 0])
                + offset
            ).clamp(min=0)
            h = (
                torch.minimum(b[i, 3], b[i + 1 :, 3])
                - torch.maximum(b[i, 1], b[i + 1 :, 1])
                + offset
            ).clamp(min=0)
            inter = w * h
            keep[i + 1 :] &= ~(inter / (areas[i] + areas[i + 1 :] - inter) > iou_threshold)
    return order[keep]


def _ext_roi_align_forward(
    input,
    rois,
    output,
    argmax_y,
    argmax_x,
    *,
    aligned_height,
    aligned_width,
    spatial_scale,
    sampling_ratio,
    pool_mode,
    aligned,
):
    """mmcv `roi_align_forward` (avg mode): writes into `output` as the C++ op does."""
    if pool_mode != 1:
        raise NotImplementedError("mmcv._ext stand-in: only avg-pool RoIAlign")
    output.copy_(
        torchvision.ops.roi_align(
            input,
            rois,
            (aligned_height, aligned_width),
            spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
    )


def install_mmcv_ext_shim() -> types.ModuleType:
    """Registers `sys.modules['mmcv._ext']` (idempotent); call before importing mmcv.ops/mmdet.

    mmcv.ops modules assert at import that every kernel they name exists
    (mmcv/utils/ext_loader.py:12-16), so other names resolve to stubs that raise when called.
    The module has a `__spec__` because mmengine probes it with pkgutil.find_loader; its loader
    is None, so `mmcv_full_available()` stays False (only SyncBN handling looks at it)."""
    mod = sys.modules.get("mmcv._ext")
    if mod is not None:
        return mod
    mod = types.ModuleType("mmcv._ext", "Stand-in for mmcv's compiled ops (torchvision kernels).")
    mod.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
    mod.nms = _ext_nms
    mod.roi_align_forward = _ext_roi_align_forward

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def stub(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is not available (mmcv-lite stand-in)")

        return stub

    mod.__getattr__ = missing
    sys.modules["mmcv._ext"] = mod
    return mod


# --------------------------------------------------------------------------- building / loading


def _config(config: str, scale):
    """The mmengine Config of a CONFIGS name (or a path), with test Resize scale and no
    pretrained init_cfg anywhere."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(CONFIGS.get(config, config)))

    def strip_pretrained(node):
        if isinstance(node, dict):
            init = node.get("init_cfg")
            if isinstance(init, dict) and init.get("type") == "Pretrained":
                node["init_cfg"] = None
            for v in node.values():
                strip_pretrained(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                strip_pretrained(v)

    strip_pretrained(cfg.model)
    for step in cfg.test_dataloader.dataset.pipeline:
        if step["type"] == "Resize":
            step["scale"] = tuple(int(s) for s in scale)
    return cfg


def build(config: str, *, seed: int = 0, scale=(1333, 800)):
    """The real mmdet model (`init_detector(cfg, checkpoint=None, device='cpu')`) with mmdet's
    own weight initialisation (`init_weights`) under `torch.manual_seed(seed)`; eval mode."""
    install_mmcv_ext_shim()
    from mmdet.apis import init_detector
    from mmengine.logging import MMLogger

    torch.manual_seed(seed)
    model = init_detector(_config(config, scale), checkpoint=None, device="cpu")
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel("WARNING")  # init_weights logs every parameter's initialiser
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model.eval()


def load(config: str, path, *, scale=(1333, 800)):
    """A fresh model from a checkpoint file through mmdet's own loader (`init_detector`)."""
    install_mmcv_ext_shim()
    from mmdet.apis import init_detector

    return init_detector(_config(config, scale), str(path), device="cpu").eval()


# --------------------------------------------------------------------------- preprocessing


def _test_pipeline(model):
    """The test pipeline as `inference_detector` builds it for an ndarray input."""
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    steps = copy.deepcopy(get_test_pipeline_cfg(model.cfg))
    steps[0].type = "mmdet.LoadImageFromNDArray"
    return Compose(steps)


def _bgr(image_rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image_rgb)[..., ::-1])


def preprocess(model, images_rgb):
    """(inputs [B, 3, H, W] float32, data_samples): pipeline + data_preprocessor, as inference."""
    pipeline = _test_pipeline(model)
    packed = [pipeline(dict(img=_bgr(im), img_id=0)) for im in images_rgb]
    data = dict(
        inputs=[p["inputs"] for p in packed], data_samples=[p["data_samples"] for p in packed]
    )
    data = model.data_preprocessor(data, False)
    return data["inputs"], data["data_samples"]


# --------------------------------------------------------------------------- calibration


@torch.no_grad()
def calibrate(model, images_rgb, *, seed: int = 0):
    """Makes a randomly initialised model produce non-trivial outputs on `images_rgb` (uint8 RGB).

    Stage by stage, on the model's own preprocessed batch: every backbone BatchNorm gets the
    statistics of its actual input (forward pre-hooks, execution order) and a random affine;
    then the RPN, box-head and mask-head layers are rescaled to target output spreads.
    Deterministic for a seed and images. Modifies the model in place and returns it."""
    from mmdet.structures.bbox import bbox2roi

    g = torch.Generator().manual_seed(seed + 1)

    def set_stats(mod, inputs):
        x = inputs[0]
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-2)
        mod.weight.copy_(0.6 + 0.8 * torch.rand(mod.weight.shape, generator=g))
        mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))

    def calibrate_norms(module, run):
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        handles = [m.register_forward_pre_hook(set_stats) for m in norms]
        run()
        for h in handles:
            h.remove()

    def outputs(module, run):
        """All outputs of `module` during `run()`, flattened and concatenated."""
        seen = []
        h = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().reshape(-1)))
        run()
        h.remove()
        return torch.cat(seen)

    def scale_layer(layer, run, target_std, target_mean=None):
        std = outputs(layer, run).std().clamp_min(1e-12)
        layer.weight.mul_(target_std / std)
        if layer.bias is not None:
            layer.bias.mul_(target_std / std)
            if target_mean is not None:
                layer.bias.add_(target_mean - outputs(layer, run).mean())

    inputs, samples = preprocess(model, images_rgb)
    metas = [s.metainfo for s in samples]
    calibrate_norms(model.backbone, lambda: model.backbone(inputs))
    feats = model.extract_feat(inputs)

    head = model.rpn_head
    run_rpn = lambda: head(feats)  # noqa: E731
    scale_layer(head.rpn_conv, run_rpn, 1.0)
    # Sigmoid scores are sorted (not stably) before top-k: keep the kept ones well below 1.0,
    # where float32 sigmoids would tie.
    scale_layer(head.rpn_cls, run_rpn, 1.5, -3.5)
    scale_layer(head.rpn_reg, run_rpn, 0.3, 0.0)
    proposals = head.predict(feats, samples, rescale=False)

    rh = model.roi_head
    box_ex, mask_ex = rh.bbox_roi_extractor, rh.mask_roi_extractor
    # A quarter of the proposals is plenty for statistics.
    pooled = box_ex(feats[: box_ex.num_inputs], bbox2roi([p.bboxes[::4] for p in proposals]))
    run_box = lambda: rh.bbox_head(pooled)  # noqa: E731
    for fc in rh.bbox_head.shared_fcs:
        scale_layer(fc, run_box, 1.0)
    scale_layer(rh.bbox_head.fc_cls, run_box, 1.5)
    scale_layer(rh.bbox_head.fc_reg, run_box, 1.0, 0.0)

    dets = rh.predict_bbox(feats, metas, proposals, rcnn_test_cfg=rh.test_cfg, rescale=False)
    mpooled = mask_ex(feats[: mask_ex.num_inputs], bbox2roi([d.bboxes for d in dets]))
    run_mask = lambda: rh.mask_head(mpooled)  # noqa: E731
    for conv in rh.mask_head.convs:
        scale_layer(conv.conv, run_mask, 1.0)
    scale_layer(rh.mask_head.upsample, run_mask, 1.0)
    scale_layer(rh.mask_head.conv_logits, run_mask, 3.0, 0.0)
    return model


# --------------------------------------------------------------------------- checkpoint files


def _state_dict(model):
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in model.state_dict().items())


def save_v2(model, path, classes) -> None:
    """An mmdet 2.x file as the v2 model zoo publishes them: {'meta', 'state_dict'} with the
    class names in meta['CLASSES'] (optimizer removed by publish_model.py). Mask R-CNN's state-dict
    keys are the same in 2.x and 3.x."""
    meta = dict(
        env_info="sys.platform: linux\nPyTorch: 1.12.1",
        config=model.cfg.pretty_text,
        seed=0,
        exp_name=Path(str(model.cfg.filename)).name,
        mmdet_version="2.28.2",
        CLASSES=tuple(classes),
        epoch=12,
        iter=87960,
        mmcv_version="1.7.1",
        time="Mon Jan  1 00:00:00 2024",
    )
    torch.save({"meta": meta, "state_dict": _state_dict(model)}, path)


def save_v3(model, path, classes) -> None:
    """An mmdet 3.x file as mmengine's Runner.save_checkpoint writes it: meta (with
    dataset_meta.classes), state_dict, message_hub, optimizer, param_schedulers.

    Everything is readable with torch.load(weights_only=True). The one deviation: a real Runner's
    message_hub['log_scalars'] holds mmengine HistoryBuffer objects (numpy arrays inside), which
    weights_only cannot unpickle; here log_scalars is empty. The optimizer is a real SGD state
    dict (no steps taken: no momentum buffers) and the schedulers are real mmengine schedulers'."""
    import mmengine
    from mmengine.optim import LinearLR, MultiStepLR, OptimWrapper

    dataset_meta = dict(classes=tuple(classes))
    palette = getattr(model, "dataset_meta", {}).get("palette")
    if isinstance(palette, list):
        dataset_meta["palette"] = [tuple(int(c) for c in p) for p in palette]
    meta = dict(
        epoch=12,
        iter=87960,
        cfg=model.cfg.pretty_text,
        seed=0,
        experiment_name="mask-rcnn_20240101_000000",
        time="20240101_000000",
        mmengine_version=mmengine.__version__,
        dataset_meta=dataset_meta,
    )
    optim = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    )
    schedulers = [
        LinearLR(optim, start_factor=0.001, by_epoch=False, begin=0, end=500),
        MultiStepLR(optim, begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1),
    ]
    runtime_info = OrderedDict(
        epoch=12,
        iter=87960,
        max_epochs=12,
        max_iters=87960,
        dataset_meta=dataset_meta,
        last_ckpt=str(path),
    )
    message_hub = dict(
        log_scalars=OrderedDict(),
        runtime_info=runtime_info,
        resumed_keys=OrderedDict((k, True) for k in runtime_info),
    )
    torch.save(
        {
            "meta": meta,
            "state_dict": _state_dict(model),
            "message_hub": message_hub,
            "optimizer": optim.state_dict(),
            "param_schedulers": [s.state_dict() for s in schedulers],
        },
        path,
    )


def save_without_meta(model, path) -> None:
    """{'state_dict': sd} only (a converted / stripped file): init_detector falls back to COCO."""
    torch.save({"state_dict": _state_dict(model)}, path)


# --------------------------------------------------------------------------- inference


def _np(t):
    return t.detach().cpu().numpy()


@torch.no_grad()
def run(model, image_rgb: np.ndarray, *, check: bool = True) -> dict:
    """mmdet inference on one uint8 RGB image (fed as BGR, as inference_detector expects), with
    intermediates, by calling the submodules as TwoStageDetector.predict does. With `check`, the
    final output is asserted identical to `mmdet.apis.inference_detector`'s."""
    inputs, samples = preprocess(model, [image_rgb])
    meta = samples[0].metainfo
    feats = model.extract_feat(inputs)
    rpn = model.rpn_head.predict(feats, samples, rescale=False)
    proposals, proposal_scores = rpn[0].bboxes.clone(), rpn[0].scores.clone()
    results = model.roi_head.predict(feats, rpn, samples, rescale=True)
    pred = model.add_pred_to_datasample(samples, results)[0].pred_instances

    if check:
        from mmdet.apis import inference_detector

        ref = inference_detector(model, _bgr(image_rgb)).pred_instances
        for key in ("bboxes", "scores", "labels", "masks"):
            a, b = getattr(pred, key), getattr(ref, key)
            assert a.shape == b.shape and torch.equal(a, b), (
                f"{key} differs from inference_detector"
            )

    return dict(
        input=_np(inputs[0].permute(1, 2, 0)),
        image_size=tuple(int(s) for s in meta["img_shape"]),
        scale_factor=tuple(float(s) for s in meta["scale_factor"]),
        ori_shape=tuple(int(s) for s in meta["ori_shape"]),
        features={f"p{i + 2}": _np(f[0].permute(1, 2, 0)) for i, f in enumerate(feats)},
        proposals=_np(proposals),
        proposal_scores=_np(proposal_scores),
        boxes=_np(pred.bboxes),
        scores=_np(pred.scores),
        labels=_np(pred.labels),
        masks=_np(pred.masks).astype(bool),
    )


def load_image(path) -> np.ndarray:
    """uint8 RGB [H, W, 3] (PIL decode, as tests/torch_reference.load_image)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def summary(out: dict) -> str:
    """One line: proposal spread, detection count, score spread, mask coverage of the boxes."""
    p, ps, s = out["proposals"], out["proposal_scores"], out["scores"]
    line = (
        f"img_shape {out['image_size']} "
        f"scale_factor {tuple(round(x, 6) for x in out['scale_factor'])}; "
        f"{len(p)} proposals (x {p[:, 0].min():.0f}..{p[:, 2].max():.0f}, y {p[:, 1].min():.0f}.."
        f"{p[:, 3].max():.0f}; scores {ps.min():.4f}..{ps.max():.4f}, "
        f"{len(np.unique(ps))} distinct); "
    )
    if len(s) == 0:
        return line + "0 detections"
    b = out["boxes"]
    area = np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 1e-6)
    cover = out["masks"].reshape(len(s), -1).sum(1) / area
    return line + (
        f"{len(s)} detections, scores {s.min():.4f}..{s.max():.4f} ({len(np.unique(s))} distinct), "
        f"{len(np.unique(out['labels']))} classes; mask pixels / box area {cover.min():.2f}.."
        f"{np.median(cover):.2f}..{cover.max():.2f} (empty {int((cover == 0).sum())}, >= 0.95: "
        f"{int((cover >= 0.95).sum())})"
    )


def _save_npz(path, out: dict) -> None:
    flat = {k: v for k, v in out.items() if k != "features"}
    flat.update({f"features_{k}": v for k, v in out["features"].items()})
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in flat.items()})


def _same(a: dict, b: dict) -> bool:
    keys = [k for k in a if k != "features"]
    same = all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in keys)
    return same and all(np.array_equal(a["features"][k], b["features"][k]) for k in a["features"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--config", default="mask-rcnn_r50_fpn_1x_coco", help=f"one of {list(CONFIGS)} or a path"
    )
    ap.add_argument("--image", required=True, help="calibration and test image")
    ap.add_argument("--out", required=True, help="output folder (checkpoints are 170-520 MB)")
    ap.add_argument("--scale", type=int, nargs=2, default=SMALL_SCALE, metavar=("LONG", "SHORT"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = load_image(args.image)
    scale = tuple(args.scale)
    t = time.perf_counter()

    def lap(msg):
        nonlocal t
        now = time.perf_counter()
        print(f"[{now - t:7.1f}s] {msg}", flush=True)
        t = now

    model = build(args.config, seed=args.seed, scale=scale)
    lap(f"built {args.config} (scale {scale})")
    calibrate(model, [image], seed=args.seed)
    lap("calibrated")
    ref = run(model, image)
    lap("ran (intermediates == inference_detector)")
    print("  " + summary(ref))
    _save_npz(out_dir / "outputs.npz", ref)

    classes = tuple(model.dataset_meta["classes"])
    files = {
        "v2": out_dir / "model_v2.pth",
        "v3": out_dir / "model_v3.pth",
        "nometa": out_dir / "model_nometa.pth",
    }
    save_v2(model, files["v2"], classes)
    save_v3(model, files["v3"], classes)
    save_without_meta(model, files["nometa"])
    for f in files.values():
        torch.load(f, map_location="cpu", weights_only=True)  # what the converter does
    lap(f"saved {', '.join(str(f) for f in files.values())} (all load with weights_only=True)")

    ok = True
    for kind, f in files.items():
        reloaded = load(args.config, f, scale=scale)
        out = run(reloaded, image)
        same = _same(ref, out)
        ok &= same and tuple(reloaded.dataset_meta["classes"]) == classes
        lap(f"reloaded {kind} through init_detector: outputs {'identical' if same else 'DIFFER'}")
        _save_npz(out_dir / f"outputs_{kind}.npz", out)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
