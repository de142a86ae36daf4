"""A PyTorch reference of pytorch-mask-rcnn's inference (multimodallearning/pytorch-mask-rcnn
@809abba5, Matterport's Mask R-CNN ported from Keras), for the Matterport family's parity tests.

The port cannot be imported (torch 0.3 code: `Variable(volatile=True)`, old-style autograd
Functions, compiled `torch.utils.ffi` extensions), so this rewrites its inference with the
same module tree (a state dict with the port's exact key names: `fpn.C1.0.weight`,
`fpn.C2.0.downsample.0.weight`, `classifier.conv1.weight`, `mask.deconv.weight`, ...) and its
formulas, file and line of the port cited, using current torch / numpy / Pillow in place of
its compiled extensions:

- `nms` is a float32 greedy loop with nms.c's formulas (+1 areas, suppress at IoU >= thr: the
  CPU kernel) and pth_nms.py's descending score sort;
- `crop_and_resize` is crop_and_resize.c's gather + lerp (align-corners (H - 1) scaling, one
  sample per cell, 0 outside [0, H - 1]) in the same float32 expression order;
- `scipy.misc.imresize` (removed in SciPy 1.3) is its bytescale (SciPy 1.x) + Pillow BILINEAR.

Where current torch differs from 0.3 the port's semantics are kept: `round` is half away from
zero (C round(), torch 0.3's) for the pyramid levels and the detection boxes, and `-inf`
levels (zero-area boxes) are clamped in float before the int cast (INT_MIN -> level 2 in the
port). Sorts are stable (the port's unstable sorts order exactly tied scores arbitrarily).

Widths are parameters (the port hard-codes 64 / 256 / 512 / 1024 / 256) so that tests can use a
small model; `RefConfig()` is the port's COCO inference config.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


@dataclasses.dataclass
class RefConfig:
    """The port's config.py names (CocoConfig, demo.py's InferenceConfig)."""

    BACKBONE_DEPTH: int = 101
    NUM_CLASSES: int = 81
    IMAGE_MIN_DIM: int = 800
    IMAGE_MAX_DIM: int = 1024
    MEAN_PIXEL: tuple = (123.7, 116.8, 103.9)
    RPN_ANCHOR_SCALES: tuple = (32, 64, 128, 256, 512)
    RPN_ANCHOR_RATIOS: tuple = (0.5, 1, 2)
    BACKBONE_STRIDES: tuple = (4, 8, 16, 32, 64)
    RPN_ANCHOR_STRIDE: int = 1
    RPN_BBOX_STD_DEV: tuple = (0.1, 0.1, 0.2, 0.2)
    RPN_NMS_THRESHOLD: float = 0.7
    POST_NMS_ROIS_INFERENCE: int = 1000
    POOL_SIZE: int = 7
    MASK_POOL_SIZE: int = 14
    DETECTION_MIN_CONFIDENCE: float = 0.7
    DETECTION_NMS_THRESHOLD: float = 0.3
    DETECTION_MAX_INSTANCES: int = 100
    # Widths (hard-coded in the port).
    BASE: int = 64
    FPN: int = 256
    RPN_CHANNELS: int = 512
    FC: int = 1024
    MASK: int = 256


# ----------------------------------------------------------------------------- modules
# model.py:94-119, 138-290, 850-984.


class SamePad2d(nn.Module):
    """TF 'SAME' padding, with the port's swap of the H / W computations (harmless on the
    square tensors it sees)."""

    def __init__(self, kernel_size, stride):
        super().__init__()
        self.k, self.s = kernel_size, stride

    def forward(self, x):
        in_w, in_h = x.size(2), x.size(3)
        out_w, out_h = math.ceil(in_w / self.s), math.ceil(in_h / self.s)
        pw = (out_w - 1) * self.s + self.k - in_w
        ph = (out_h - 1) * self.s + self.k - in_h
        left, top = pw // 2, ph // 2
        return F.pad(x, (left, pw - left, top, ph - top), "constant", 0)


def bn(c, momentum=0.01):
    return nn.BatchNorm2d(c, eps=0.001, momentum=momentum)


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride)
        self.bn1 = bn(planes)
        self.padding2 = SamePad2d(3, 1)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3)
        self.bn2 = bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1)
        self.bn3 = bn(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(self.padding2(out))))
        out = self.bn3(self.conv3(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + residual)


def make_stages(depth, base):
    blocks = [3, 4, {50: 6, 101: 23}[depth], 3]
    c1 = nn.Sequential(
        nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3), bn(base), nn.ReLU(inplace=True),
        SamePad2d(3, 2), nn.MaxPool2d(kernel_size=3, stride=2))
    inplanes, stages = base, [c1]
    for i, n in enumerate(blocks):
        planes, stride = base * 2**i, 1 if i == 0 else 2
        ds = None
        if stride != 1 or inplanes != planes * 4:
            ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, kernel_size=1, stride=stride),
                               bn(planes * 4))
        layers = [Bottleneck(inplanes, planes, stride, ds)]
        inplanes = planes * 4
        layers += [Bottleneck(inplanes, planes) for _ in range(1, n)]
        stages.append(nn.Sequential(*layers))
    return stages


class FPN(nn.Module):
    def __init__(self, stages, base, out):
        super().__init__()
        self.C1, self.C2, self.C3, self.C4, self.C5 = stages
        self.P6 = nn.MaxPool2d(kernel_size=1, stride=2)
        for i, c in zip((5, 4, 3, 2), (32, 16, 8, 4), strict=True):
            setattr(self, f"P{i}_conv1", nn.Conv2d(base * c, out, kernel_size=1))
            setattr(self, f"P{i}_conv2", nn.Sequential(SamePad2d(3, 1),
                                                       nn.Conv2d(out, out, kernel_size=3)))

    def forward(self, x):
        c2 = self.C2(self.C1(x))
        c3 = self.C3(c2)
        c4 = self.C4(c3)
        c5 = self.C5(c4)
        up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
        p5 = self.P5_conv1(c5)
        p4 = self.P4_conv1(c4) + up(p5)
        p3 = self.P3_conv1(c3) + up(p4)
        p2 = self.P2_conv1(c2) + up(p3)
        p5, p4, p3, p2 = (self.P5_conv2(p5), self.P4_conv2(p4), self.P3_conv2(p3),
                          self.P2_conv2(p2))
        return [p2, p3, p4, p5, self.P6(p5)]


class RPN(nn.Module):
    def __init__(self, anchors_per_location, depth, channels):
        super().__init__()
        self.padding = SamePad2d(3, 1)
        self.conv_shared = nn.Conv2d(depth, channels, kernel_size=3)
        self.conv_class = nn.Conv2d(channels, 2 * anchors_per_location, kernel_size=1)
        self.conv_bbox = nn.Conv2d(channels, 4 * anchors_per_location, kernel_size=1)

    def forward(self, x):
        x = F.relu(self.conv_shared(self.padding(x)))
        logits = self.conv_class(x).permute(0, 2, 3, 1).contiguous().view(x.size(0), -1, 2)
        probs = F.softmax(logits, dim=2)
        bbox = self.conv_bbox(x).permute(0, 2, 3, 1).contiguous().view(x.size(0), -1, 4)
        return logits, probs, bbox


class Classifier(nn.Module):
    def __init__(self, depth, pool_size, num_classes, fc):
        super().__init__()
        self.fc = fc
        self.conv1 = nn.Conv2d(depth, fc, kernel_size=pool_size)
        self.bn1 = bn(fc)
        self.conv2 = nn.Conv2d(fc, fc, kernel_size=1)
        self.bn2 = bn(fc)
        self.linear_class = nn.Linear(fc, num_classes)
        self.linear_bbox = nn.Linear(fc, num_classes * 4)

    def forward(self, crops):  # [N, C, 7, 7]
        x = F.relu(self.bn1(self.conv1(crops)))
        x = F.relu(self.bn2(self.conv2(x))).view(-1, self.fc)
        logits = self.linear_class(x)
        bbox = self.linear_bbox(x)
        return logits, F.softmax(logits, dim=1), bbox.view(bbox.size(0), -1, 4)


class Mask(nn.Module):
    def __init__(self, depth, num_classes, channels):
        super().__init__()
        self.padding = SamePad2d(3, 1)
        self.conv1 = nn.Conv2d(depth, channels, kernel_size=3)
        self.bn1 = nn.BatchNorm2d(channels, eps=0.001)
        for i in (2, 3, 4):
            setattr(self, f"conv{i}", nn.Conv2d(channels, channels, kernel_size=3))
            setattr(self, f"bn{i}", nn.BatchNorm2d(channels, eps=0.001))
        self.deconv = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.conv5 = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, crops):  # [N, C, 14, 14]
        x = crops
        for i in (1, 2, 3, 4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(self.padding(x))))
        return torch.sigmoid(self.conv5(F.relu(self.deconv(x))))


class MaskRCNN(nn.Module):
    """The port's MaskRCNN.build module tree (model.py:1420-1466): fpn, rpn, classifier,
    mask (anchors are not in the state dict)."""

    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.config = cfg
        self.fpn = FPN(make_stages(cfg.BACKBONE_DEPTH, cfg.BASE), cfg.BASE, cfg.FPN)
        self.rpn = RPN(len(cfg.RPN_ANCHOR_RATIOS), cfg.FPN, cfg.RPN_CHANNELS)
        self.classifier = Classifier(cfg.FPN, cfg.POOL_SIZE, cfg.NUM_CLASSES, cfg.FC)
        self.mask = Mask(cfg.FPN, cfg.NUM_CLASSES, cfg.MASK)


def build(cfg: RefConfig, seed: int = 0) -> MaskRCNN:
    torch.manual_seed(seed)
    return MaskRCNN(cfg).eval()


# ----------------------------------------------------------------------------- the port's ops


def mold_image(image: np.ndarray, cfg: RefConfig):
    """utils.resize_image (utils.py:270-318) + mold_image: (canvas float32 [S, S, 3], window
    (y1, x1, y2, x2) ints)."""
    h, w = image.shape[:2]
    scale = max(1, cfg.IMAGE_MIN_DIM / min(h, w))
    if round(max(h, w) * scale) > cfg.IMAGE_MAX_DIM:
        scale = cfg.IMAGE_MAX_DIM / max(h, w)
    if scale != 1:  # scipy.misc.imresize on uint8 RGB: Pillow bilinear, no bytescale
        image = np.array(Image.fromarray(image).resize(
            (round(w * scale), round(h * scale)), Image.BILINEAR))
    h, w = image.shape[:2]
    s = cfg.IMAGE_MAX_DIM
    top, left = (s - h) // 2, (s - w) // 2
    image = np.pad(image, [(top, s - h - top), (left, s - w - left), (0, 0)])
    molded = image.astype(np.float32) - np.array(cfg.MEAN_PIXEL)  # float64, as the port
    return molded.astype(np.float32), (top, left, h + top, w + left)


def generate_pyramid_anchors(cfg: RefConfig) -> torch.Tensor:
    """utils.generate_anchors / generate_pyramid_anchors (utils.py:400-456), float64 -> f32."""
    out = []
    for scale, stride in zip(cfg.RPN_ANCHOR_SCALES, cfg.BACKBONE_STRIDES, strict=True):
        shape = math.ceil(cfg.IMAGE_MAX_DIM / stride)
        scales, ratios = np.meshgrid(np.array(scale), np.array(cfg.RPN_ANCHOR_RATIOS))
        scales, ratios = scales.flatten(), ratios.flatten()
        heights = scales / np.sqrt(ratios)
        widths = scales * np.sqrt(ratios)
        shifts_y = np.arange(0, shape, cfg.RPN_ANCHOR_STRIDE) * stride
        shifts_x = np.arange(0, shape, cfg.RPN_ANCHOR_STRIDE) * stride
        shifts_x, shifts_y = np.meshgrid(shifts_x, shifts_y)
        box_widths, box_centers_x = np.meshgrid(widths, shifts_x)
        box_heights, box_centers_y = np.meshgrid(heights, shifts_y)
        centers = np.stack([box_centers_y, box_centers_x], axis=2).reshape([-1, 2])
        sizes = np.stack([box_heights, box_widths], axis=2).reshape([-1, 2])
        out.append(np.concatenate([centers - 0.5 * sizes, centers + 0.5 * sizes], axis=1))
    return torch.from_numpy(np.concatenate(out, axis=0)).float()


def apply_box_deltas(boxes, deltas):
    """model.py:297-318."""
    height = boxes[:, 2] - boxes[:, 0]
    width = boxes[:, 3] - boxes[:, 1]
    center_y = boxes[:, 0] + 0.5 * height
    center_x = boxes[:, 1] + 0.5 * width
    center_y = center_y + deltas[:, 0] * height
    center_x = center_x + deltas[:, 1] * width
    height = height * torch.exp(deltas[:, 2])
    width = width * torch.exp(deltas[:, 3])
    y1 = center_y - 0.5 * height
    x1 = center_x - 0.5 * width
    return torch.stack([y1, x1, y1 + height, x1 + width], dim=1)


def nms(dets: torch.Tensor, thresh: float) -> torch.Tensor:
    """pth_nms.py CPU path + nms.c: dets [N, 5] (y1, x1, y2, x2, score) -> kept indices, in
    descending score order. float32 (NumPy): areas (x2 - x1 + 1) * (y2 - y1 + 1),
    intersection max(0, xx2 - xx1 + 1) * max(0, yy2 - yy1 + 1), suppress when
    ovr >= float(thresh)."""
    d = dets.numpy().astype(np.float32)
    if not len(d):
        return torch.zeros(0, dtype=torch.long)
    x1, y1, x2, y2 = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
    one = np.float32(1)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = torch.sort(dets[:, 4], descending=True, stable=True)[1].numpy()
    thr = np.float32(thresh)
    suppressed = np.zeros(len(d), bool)
    keep = []
    for _i, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[_i + 1:]
        rest = rest[~suppressed[rest]]
        xx1 = np.maximum(x1[i], x1[rest])
        yy1 = np.maximum(y1[i], y1[rest])
        xx2 = np.minimum(x2[i], x2[rest])
        yy2 = np.minimum(y2[i], y2[rest])
        w = np.maximum(np.float32(0), xx2 - xx1 + one)
        h = np.maximum(np.float32(0), yy2 - yy1 + one)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr >= thr]] = True
    return torch.from_numpy(np.asarray(keep, np.int64))


def crop_and_resize(image: torch.Tensor, boxes: torch.Tensor, crop: int) -> torch.Tensor:
    """crop_and_resize.c:44-106 (extrapolation 0, box_ind 0): image [C, H, W], boxes [N, 4]
    normalised (y1, x1, y2, x2) -> [N, C, crop, crop]."""
    c, ih, iw = image.shape
    n = boxes.shape[0]
    y1, x1, y2, x2 = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]
    hs = (y2 - y1) * (ih - 1) / (crop - 1)  # [N, 1] float32
    ws = (x2 - x1) * (iw - 1) / (crop - 1)
    steps = torch.arange(crop, dtype=torch.float32)[None, :]
    in_y = y1 * (ih - 1) + steps * hs  # [N, crop]
    in_x = x1 * (iw - 1) + steps * ws
    ok = ((in_y >= 0) & (in_y <= ih - 1))[:, :, None] & ((in_x >= 0) & (in_x <= iw - 1))[:, None]
    top = torch.floor(in_y).clamp(0, ih - 1).long()
    bot = torch.ceil(in_y).clamp(0, ih - 1).long()
    left = torch.floor(in_x).clamp(0, iw - 1).long()
    right = torch.ceil(in_x).clamp(0, iw - 1).long()
    y_lerp = (in_y - torch.floor(in_y))[:, None, :, None]  # [N, 1, crop, 1]
    x_lerp = (in_x - torch.floor(in_x))[:, None, None, :]
    flat = image.reshape(c, ih * iw)

    def g(r, cc):  # [N, crop], [N, crop] -> [N, C, crop, crop]
        idx = (r[:, :, None] * iw + cc[:, None, :]).reshape(n, -1)
        return flat[:, idx].permute(1, 0, 2).reshape(n, c, crop, crop)

    tl, tr, bl, br = g(top, left), g(top, right), g(bot, left), g(bot, right)
    t = tl + (tr - tl) * x_lerp
    b = bl + (br - bl) * x_lerp
    out = t + (b - t) * y_lerp
    return torch.where(ok[:, None], out, torch.zeros((), dtype=out.dtype))


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """torch 0.3's round (C round(): halves away from zero)."""
    t = torch.trunc(x)
    return torch.where((x - t).abs() == 0.5, t + torch.sign(x), torch.round(x))


def pyramid_roi_align(boxes, feature_maps, pool_size, image_shape):
    """model.py:403-492: boxes [N, 4] normalised, maps [P2..P5] each [1, C, H, W]."""
    y1, x1, y2, x2 = boxes.chunk(4, dim=1)
    h, w = y2 - y1, x2 - x1
    image_area = torch.tensor([float(image_shape[0] * image_shape[1])])
    ln2 = torch.log(torch.tensor([2.0]))
    roi_level = 4 + torch.log(torch.sqrt(h * w) / (224.0 / torch.sqrt(image_area))) / ln2
    roi_level = round_half_away(roi_level).clamp(2, 5).int()[:, 0]
    pooled, box_to_level = [], []
    for i, level in enumerate(range(2, 6)):
        ix = torch.nonzero(roi_level == level)[:, 0]
        if not len(ix):
            continue
        box_to_level.append(ix)
        pooled.append(crop_and_resize(feature_maps[i][0], boxes[ix], pool_size))
    pooled = torch.cat(pooled, 0)
    order = torch.sort(torch.cat(box_to_level, 0), stable=True)[1]
    return pooled[order]


def proposal_layer(probs, deltas, anchors, cfg: RefConfig):
    """model.py:332-396: probs [A, 2], deltas [A, 4] -> normalised proposals [N, 4]."""
    scores = probs[:, 1]
    deltas = deltas * torch.tensor(cfg.RPN_BBOX_STD_DEV, dtype=torch.float32)[None]
    pre = min(6000, anchors.shape[0])
    scores, order = scores.sort(descending=True, stable=True)
    order, scores = order[:pre], scores[:pre]
    boxes = apply_box_deltas(anchors[order], deltas[order])
    s = float(cfg.IMAGE_MAX_DIM)
    boxes = torch.stack([boxes[:, 0].clamp(0.0, s), boxes[:, 1].clamp(0.0, s),
                         boxes[:, 2].clamp(0.0, s), boxes[:, 3].clamp(0.0, s)], 1)
    keep = nms(torch.cat((boxes, scores.unsqueeze(1)), 1), cfg.RPN_NMS_THRESHOLD)
    keep = keep[:cfg.POST_NMS_ROIS_INFERENCE]
    return boxes[keep] / torch.tensor([s, s, s, s])


def refine_detections(rois, probs, deltas, window, cfg: RefConfig):
    """model.py:732-825 -> [n, 6] (y1, x1, y2, x2, class_id, score) in canvas pixels."""
    class_scores, class_ids = torch.max(probs, dim=1)
    idx = torch.arange(class_ids.size(0))
    class_scores = probs[idx, class_ids]
    deltas_specific = deltas[idx, class_ids]
    std = torch.tensor(cfg.RPN_BBOX_STD_DEV, dtype=torch.float32)[None]
    s = float(cfg.IMAGE_MAX_DIM)
    refined = apply_box_deltas(rois, deltas_specific * std) * torch.tensor([s, s, s, s])
    wy1, wx1, wy2, wx2 = (float(v) for v in window)
    refined = torch.stack([refined[:, 0].clamp(wy1, wy2), refined[:, 1].clamp(wx1, wx2),
                           refined[:, 2].clamp(wy1, wy2), refined[:, 3].clamp(wx1, wx2)], 1)
    refined = round_half_away(refined)
    keep_bool = class_ids > 0
    if cfg.DETECTION_MIN_CONFIDENCE:
        keep_bool = keep_bool & (class_scores >= cfg.DETECTION_MIN_CONFIDENCE)
    keep = torch.nonzero(keep_bool)[:, 0]
    if not len(keep):  # the port raises here (nms_keep unbound)
        raise RuntimeError("no detection survives the score filter (the port raises too)")
    pre_ids, pre_scores, pre_rois = class_ids[keep], class_scores[keep], refined[keep]
    nms_keep = []
    for class_id in torch.unique(pre_ids):
        ixs = torch.nonzero(pre_ids == class_id)[:, 0]
        ix_scores, order = pre_scores[ixs].sort(descending=True, stable=True)
        ix_rois = pre_rois[ixs][order]
        class_keep = nms(torch.cat((ix_rois, ix_scores.unsqueeze(1)), 1),
                         cfg.DETECTION_NMS_THRESHOLD)
        nms_keep.append(keep[ixs[order[class_keep]]])
    nms_keep = torch.unique(torch.cat(nms_keep))
    keep = keep[torch.isin(keep, nms_keep)]  # intersect1d: ascending ROI indices
    top = class_scores[keep].sort(descending=True, stable=True)[1][:cfg.DETECTION_MAX_INSTANCES]
    keep = keep[top]
    return torch.cat((refined[keep], class_ids[keep].unsqueeze(1).float(),
                      class_scores[keep].unsqueeze(1)), 1)


def bytescale(data: np.ndarray) -> np.ndarray:
    """scipy.misc.bytescale, SciPy 1.x (pilutil.py): min -> 0, max -> 255."""
    cmin, cmax = data.min(), data.max()
    cscale = cmax - cmin
    if cscale == 0:
        cscale = 1
    scale = float(255 - 0) / cscale
    bytedata = (data - cmin) * scale + 0
    return (bytedata.clip(0, 255) + 0.5).astype(np.uint8)


def unmold_detections(detections, mrcnn_mask, image_shape, window):
    """model.py:2003-2062 + utils.unmold_mask -> (rois int32, class_ids, scores, masks
    [N, H, W] bool)."""
    n = detections.shape[0]
    boxes = detections[:n, :4]
    class_ids = detections[:n, 4].astype(np.int32)
    scores = detections[:n, 5]
    masks = mrcnn_mask[np.arange(n), :, :, class_ids]
    h_scale = image_shape[0] / (window[2] - window[0])
    w_scale = image_shape[1] / (window[3] - window[1])
    scale = min(h_scale, w_scale)
    shifts = np.array([window[0], window[1], window[0], window[1]])
    boxes = np.multiply(boxes - shifts, np.array([scale] * 4)).astype(np.int32)
    exclude = np.where((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) <= 0)[0]
    boxes, class_ids, scores, masks = (np.delete(a, exclude, axis=0)
                                       for a in (boxes, class_ids, scores, masks))
    full = []
    for m, (y1, x1, y2, x2) in zip(masks, boxes, strict=True):
        small = np.array(Image.fromarray(bytescale(m)).resize((x2 - x1, y2 - y1),
                                                              Image.BILINEAR))
        small = np.where(small.astype(np.float32) / 255.0 >= 0.5, 1, 0).astype(np.uint8)
        fm = np.zeros(image_shape[:2], np.uint8)
        fm[y1:y2, x1:x2] = small
        full.append(fm.astype(bool))
    full = np.stack(full) if full else np.zeros((0,) + tuple(image_shape[:2]), bool)
    return boxes, class_ids, scores, full


# ----------------------------------------------------------------------------- inference


class Reference:
    """The port's `MaskRCNN.detect` on one image, with intermediates."""

    def __init__(self, model: MaskRCNN):
        self.model = model
        self.cfg = model.config
        self.anchors = generate_pyramid_anchors(self.cfg)

    @torch.no_grad()
    def features(self, molded: np.ndarray):
        x = torch.from_numpy(molded.transpose(2, 0, 1)[None].copy())
        return self.model.fpn(x)

    @torch.no_grad()
    def proposals(self, maps):
        outs = [self.model.rpn(p) for p in maps]
        probs = torch.cat([o[1] for o in outs], 1)[0]
        deltas = torch.cat([o[2] for o in outs], 1)[0]
        return proposal_layer(probs, deltas, self.anchors, self.cfg)

    @torch.no_grad()
    def classify(self, maps, rois):
        s = self.cfg.IMAGE_MAX_DIM
        crops = pyramid_roi_align(rois, maps[:4], self.cfg.POOL_SIZE, (s, s))
        return self.model.classifier(crops)

    @torch.no_grad()
    def masks(self, maps, detections):
        s = float(self.cfg.IMAGE_MAX_DIM)
        boxes = detections[:, :4] / torch.tensor([s, s, s, s])
        crops = pyramid_roi_align(boxes, maps[:4], self.cfg.MASK_POOL_SIZE, (s, s))
        return self.model.mask(crops)

    def __call__(self, image: np.ndarray) -> dict:
        molded, window = mold_image(image, self.cfg)
        maps = self.features(molded)
        rois = self.proposals(maps)
        _, probs, deltas = self.classify(maps, rois)
        det = refine_detections(rois, probs, deltas, window, self.cfg)
        masks = self.masks(maps, det).permute(0, 2, 3, 1).numpy()  # [n, 28, 28, K]
        boxes, cls, scores, full = unmold_detections(det.numpy(), masks, image.shape, window)
        return dict(rois=boxes, class_ids=cls, scores=scores, masks=full, window=window,
                    proposals=rois.numpy(), detections=det.numpy(), molded=molded,
                    # xyxy views for jaxmrcnn.compare
                    boxes=boxes[:, [1, 0, 3, 2]].astype(np.float32), labels=cls)


@torch.no_grad()
def calibrate(model: MaskRCNN, images, *, seed: int = 0) -> None:
    """Seeded random weights made non-degenerate on `images` (as tests/torch_reference.py
    does for torchvision): every BatchNorm's running statistics set to its input's batch
    statistics (random affine), the RPN and class logits widened so that RPN scores spread
    and many ROIs pass the 0.7 score filter, box deltas kept small."""
    g = torch.Generator().manual_seed(seed + 1)
    ref = Reference(model)

    def set_stats(mod, inputs):
        x = inputs[0]
        mod.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        mod.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-2)
        mod.weight.copy_(0.6 + 0.8 * torch.rand(mod.weight.shape, generator=g))
        mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))

    def with_norms(module, run):
        hs = [m.register_forward_pre_hook(set_stats) for m in module.modules()
              if isinstance(m, nn.BatchNorm2d)]
        out = run()
        for h in hs:
            h.remove()
        return out

    def scale(layer, out, std, mean=0.0):
        f = std / out.std().clamp_min(1e-12)
        layer.weight.mul_(f)
        layer.bias.mul_(f).add_(mean - out.mean() * f)

    molded = [mold_image(im, model.config) for im in images]
    maps = [with_norms(model.fpn, lambda m=m: ref.features(m[0])) for m in molded]
    rpn = model.rpn
    for layer, std, mean in ((rpn.conv_class, 2.5, -1.0), (rpn.conv_bbox, 0.3, 0.0)):
        outs = torch.cat([layer(F.relu(rpn.conv_shared(rpn.padding(p)))).flatten()
                          for mp in maps for p in mp])
        scale(layer, outs, std, mean)
    rois = [ref.proposals(mp) for mp in maps]
    cls = model.classifier
    s = model.config.IMAGE_MAX_DIM
    crops = torch.cat([pyramid_roi_align(r, mp[:4], model.config.POOL_SIZE, (s, s))
                       for r, mp in zip(rois, maps, strict=True)])
    with_norms(cls, lambda: cls(crops))
    x = F.relu(cls.bn2(cls.conv2(F.relu(cls.bn1(cls.conv1(crops)))))).flatten(1)
    scale(cls.linear_class, cls.linear_class(x), 4.0)
    scale(cls.linear_bbox, cls.linear_bbox(x), 1.0)
    conf = model.config.DETECTION_MIN_CONFIDENCE
    model.config.DETECTION_MIN_CONFIDENCE = 0.0
    try:
        dets = [refine_detections(r, *ref.classify(mp, r)[1:], m[1], model.config)
                for r, mp, m in zip(rois, maps, molded, strict=True)]
    finally:
        model.config.DETECTION_MIN_CONFIDENCE = conf
    mcrops = torch.cat([pyramid_roi_align(d[:, :4] / float(s), mp[:4],
                                          model.config.MASK_POOL_SIZE, (s, s))
                        for d, mp in zip(dets, maps, strict=True)])
    mk = model.mask
    with_norms(mk, lambda: mk(mcrops))
    x = mcrops
    for i in (1, 2, 3, 4):
        x = F.relu(getattr(mk, f"bn{i}")(getattr(mk, f"conv{i}")(mk.padding(x))))
    scale(mk.conv5, mk.conv5(F.relu(mk.deconv(x))), 3.0)
