"""The Matterport family's Mask R-CNN inference (pytorch-mask-rcnn's MaskRCNN.detect up to the
network outputs), static shapes, one jit.

images `[B, S, S, 3]` (the square canvas, mean subtracted: preprocess.py) and windows
`[B, 4]` (y1, x1, y2, x2 of the image inside the canvas) -> per image `max_instances` slots:
boxes `[B, D, 4]` (y1, x1, y2, x2 rounded canvas pixels), scores, class_index, masks
`[B, D, 28, 28]` (the predicted class's sigmoid) and valid `[B, D]`, in descending score
order. Host-side post-processing (postprocess.py) maps them to the original image.

Variable-length stages of the port are fixed-size here with a validity mask: proposals
(<= post_nms_rois) and detections (<= max_instances). Every per-ROI computation is
independent, so padding ROIs never reach a real output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmrcnn import ops as common_ops
from jaxmrcnn.layers.common import FrozenNorm
from jaxmrcnn.matterport import ops
from jaxmrcnn.matterport.config import DEPTHS, MatterportConfig


def same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' padding of a size-n axis (SamePad2d, model.py:94-119): floor(total / 2) before,
    the rest after."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def conv(features, kernel, stride=1, pad=0, name=None):
    """Conv2d with bias (every conv of the port), symmetric `pad`."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), name=name)


class Bottleneck(nn.Module):
    """Stride on the first 1x1 (model.py:199-236); a 3x3 'SAME' (1, 1) conv; biases."""

    planes: int
    stride: int
    downsample: bool
    eps: float

    @nn.compact
    def __call__(self, x):  # [B, H, W, C]
        out = nn.relu(FrozenNorm(self.eps, name="bn1")(conv(self.planes, 1, self.stride,
                                                            name="conv1")(x)))
        out = nn.relu(FrozenNorm(self.eps, name="bn2")(conv(self.planes, 3, 1, 1,
                                                            name="conv2")(out)))
        out = FrozenNorm(self.eps, name="bn3")(conv(4 * self.planes, 1, name="conv3")(out))
        if self.downsample:
            x = conv(4 * self.planes, 1, self.stride, name="downsample_conv")(x)
            x = FrozenNorm(self.eps, name="downsample_bn")(x)
        return nn.relu(out + x)


class Backbone(nn.Module):
    """ResNet C1..C5 and the FPN (model.py:138-290) -> [P2, P3, P4, P5, P6]."""

    cfg: MatterportConfig

    @nn.compact
    def __call__(self, x):  # [B, S, S, 3]
        cfg = self.cfg
        x = conv(cfg.base_channels, 7, 2, 3, name="C1_conv")(x)
        x = nn.relu(FrozenNorm(cfg.norm_eps, name="C1_bn")(x))
        # SamePad2d(3, 2) (zeros: x >= 0 after the ReLU) + MaxPool2d(3, 2).
        ph, pw = same_pads(x.shape[1], 3, 2), same_pads(x.shape[2], 3, 2)
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), ph, pw, (0, 0)))
        cs = []
        for stage, n in enumerate(DEPTHS[cfg.depth]):
            for b in range(n):
                x = Bottleneck(cfg.base_channels * 2**stage, 2 if (b == 0 and stage) else 1,
                               b == 0, cfg.norm_eps, name=f"C{stage + 2}_{b}")(x)
            cs.append(x)
        c2, c3, c4, c5 = cs
        f = cfg.fpn_channels

        def up2(p):  # nearest, scale 2
            return jnp.repeat(jnp.repeat(p, 2, axis=1), 2, axis=2)

        p5 = conv(f, 1, name="P5_conv1")(c5)
        p4 = conv(f, 1, name="P4_conv1")(c4) + up2(p5)
        p3 = conv(f, 1, name="P3_conv1")(c3) + up2(p4)
        p2 = conv(f, 1, name="P2_conv1")(c2) + up2(p3)
        ps = [conv(f, 3, 1, 1, name=f"P{i}_conv2")(p) for i, p in zip((2, 3, 4, 5),
                                                                     (p2, p3, p4, p5),
                                                                     strict=True)]
        return ps + [ps[3][:, ::2, ::2]]  # P6 = MaxPool2d(1, 2)(P5)


class RPN(nn.Module):
    """One head shared over the levels (model.py:850-901): logits `[B, A, 2]` (bg, fg) and
    deltas `[B, A, 4]` (dy, dx, log dh, log dw), anchors flattened (level, y, x, ratio)."""

    channels: int
    anchors_per_location: int

    @nn.compact
    def __call__(self, levels):
        a = self.anchors_per_location
        shared = conv(self.channels, 3, 1, 1, name="conv_shared")
        cls = conv(2 * a, 1, name="conv_class")
        box = conv(4 * a, 1, name="conv_bbox")
        logits, deltas = [], []
        for p in levels:
            x = nn.relu(shared(p))
            b = x.shape[0]
            logits.append(cls(x).reshape(b, -1, 2))
            deltas.append(box(x).reshape(b, -1, 4))
        return jnp.concatenate(logits, 1), jnp.concatenate(deltas, 1)


class Classifier(nn.Module):
    """conv1 = 7x7 'valid' conv (an FC layer on the crop), BN, ReLU, 1x1 conv, BN, ReLU, then
    class logits and per-class deltas (model.py:908-942). x `[R, 7, 7, C]`."""

    fc_dim: int
    num_classes: int
    eps: float

    @nn.compact
    def __call__(self, x):
        x = nn.relu(FrozenNorm(self.eps, name="bn1")(nn.Conv(
            self.fc_dim, x.shape[1:3], padding="VALID", name="conv1")(x)))
        x = nn.relu(FrozenNorm(self.eps, name="bn2")(conv(self.fc_dim, 1, name="conv2")(x)))
        x = x.reshape(x.shape[0], self.fc_dim)
        logits = nn.Dense(self.num_classes, name="linear_class")(x)
        deltas = nn.Dense(4 * self.num_classes, name="linear_bbox")(x)
        return logits, deltas.reshape(-1, self.num_classes, 4)


class MaskHead(nn.Module):
    """4 x (3x3 conv, BN, ReLU), 2x2 stride-2 deconv, ReLU, 1x1 conv, sigmoid
    (model.py:944-984); only the predicted class's channel is computed. x `[D, 14, 14, C]`,
    labels `[D]` -> probabilities `[D, 28, 28]`."""

    channels: int
    num_classes: int
    eps: float

    @nn.compact
    def __call__(self, x, labels):
        for i in range(1, 5):
            x = conv(self.channels, 3, 1, 1, name=f"conv{i}")(x)
            x = nn.relu(FrozenNorm(self.eps, name=f"bn{i}")(x))
        c = self.channels
        # ConvTranspose2d(k=2, s=2): out[2i+a, 2j+b, o] = bias[o] + sum_c x[i, j, c] W[a, b, c, o]
        w = self.param("deconv_kernel", nn.initializers.lecun_normal(), (2, 2, c, c))
        bias = self.param("deconv_bias", nn.initializers.zeros, (c,))
        d, h, wd = x.shape[:3]
        y = jnp.einsum("nijc,abco->niajbo", x, w).reshape(d, 2 * h, 2 * wd, c) + bias
        y = nn.relu(y)
        k5 = self.param("conv5_kernel", nn.initializers.lecun_normal(), (c, self.num_classes))
        b5 = self.param("conv5_bias", nn.initializers.zeros, (self.num_classes,))
        logits = jnp.einsum("nhwc,cn->nhw", y, k5[:, labels]) + b5[labels][:, None, None]
        return jax.nn.sigmoid(logits)


def _nms(boxes, scores, valid, thr, k, ge, classes=None):
    """The port's compiled NMS (nms.c: +1 areas, greedy by score; ge: suppress at IoU >= thr,
    the CPU kernel) on (y1, x1, y2, x2) boxes: IoU is symmetric in the axes, so the boxes go
    to ops.nms as they are."""
    return common_ops.nms(boxes, scores, thr, k, valid=valid, classes=classes, legacy=True,
                          suppress_equal=ge)


class MatterportMaskRCNN(nn.Module):
    cfg: MatterportConfig

    def setup(self):
        cfg = self.cfg
        self.backbone = Backbone(cfg)
        self.rpn = RPN(cfg.rpn_channels, len(cfg.anchor_ratios))
        self.classifier = Classifier(cfg.fc_dim, cfg.num_classes, cfg.norm_eps)
        self.mask = MaskHead(cfg.mask_channels, cfg.num_classes, cfg.norm_eps)

    def __call__(self, images, windows, return_aux: bool = False, proposals=None):
        """images `[B, S, S, 3]`, windows `[B, 4]` float32 -> (detections, aux).
        `proposals`: (boxes `[B, K, 4]` normalised, valid `[B, K]`) given instead of the RPN's
        (tests: the heads from another implementation's exact proposals)."""
        cfg = self.cfg
        s = cfg.max_dim
        if images.shape[1:3] != (s, s):
            raise ValueError(f"images must be [B, {s}, {s}, 3] canvases (preprocess.py), got "
                             f"{tuple(images.shape)}")
        levels = self.backbone(images)
        logits, deltas = self.rpn(levels)
        probs = jax.nn.softmax(logits, axis=-1)[..., 1]  # [B, A] fg
        anchors = jnp.asarray(ops.anchors(cfg))  # [A, 4] pixels
        if proposals is None:
            proposals, prop_valid = jax.vmap(lambda p, d: self._proposals(p, d, anchors))(
                probs, deltas)  # [B, K, 4] normalised
        else:
            proposals, prop_valid = proposals
        heads = levels[:4]
        crops = jax.vmap(lambda *a: ops.pyramid_crop_and_resize(
            a[:4], a[4], s, cfg.pool_size, cfg.round_half_away))(*heads, proposals)
        b, k = proposals.shape[:2]
        class_logits, box_deltas = self.classifier(crops.reshape((b * k,) + crops.shape[2:]))
        class_probs = jax.nn.softmax(class_logits, axis=-1).reshape(b, k, -1)
        box_deltas = box_deltas.reshape(b, k, cfg.num_classes, 4)
        det = jax.vmap(self._detections)(proposals, prop_valid, class_probs, box_deltas, windows)
        boxes, scores, labels, valid = det
        d = boxes.shape[1]
        mcrops = jax.vmap(lambda *a: ops.pyramid_crop_and_resize(
            a[:4], a[4], s, cfg.mask_pool_size, cfg.round_half_away))(
                *heads, boxes / jnp.float32(s))
        masks = self.mask(mcrops.reshape((b * d,) + mcrops.shape[2:]), labels.reshape(-1))
        detections = dict(boxes=boxes, scores=scores, class_index=labels,
                          masks=masks.reshape((b, d) + masks.shape[1:]), valid=valid)
        aux = {}
        if return_aux:
            aux = dict(levels=levels, rpn_logits=logits, rpn_deltas=deltas,
                       proposals=proposals, proposal_valid=prop_valid,
                       class_probs=class_probs, box_deltas=box_deltas)
        return detections, aux

    def _proposals(self, fg, deltas, anchors):
        """The proposal layer (model.py:332-396) on one image: fg `[A]`, deltas `[A, 4]` ->
        (normalised boxes `[K, 4]`, valid `[K]`), by descending RPN score."""
        cfg = self.cfg
        s = jnp.float32(cfg.max_dim)
        n = min(cfg.pre_nms_limit, fg.shape[0])
        scores, order = jax.lax.top_k(fg, n)  # ties: lower index first
        d = deltas[order] * jnp.asarray(cfg.rpn_bbox_std, jnp.float32)
        boxes = jnp.clip(ops.apply_box_deltas(anchors[order], d), 0.0, s)
        keep, valid = _nms(boxes, scores, None, cfg.rpn_nms_threshold, cfg.post_nms_rois,
                           cfg.nms_suppress_equal)
        return boxes[keep] / s, valid

    def _detections(self, rois, roi_valid, probs, deltas, window):
        """refine_detections (model.py:732-825) on one image: rois `[K, 4]` normalised, probs
        `[K, N]`, deltas `[K, N, 4]`, window `[4]` -> boxes `[D, 4]` (rounded canvas pixels),
        scores, class index, valid `[D]`, by descending score."""
        cfg = self.cfg
        s = jnp.float32(cfg.max_dim)
        cls = jnp.argmax(probs, axis=-1)  # background included
        score = jnp.take_along_axis(probs, cls[:, None], 1)[:, 0]
        d = jnp.take_along_axis(deltas, cls[:, None, None], 1)[:, 0]
        boxes = ops.apply_box_deltas(rois, d * jnp.asarray(cfg.rpn_bbox_std, jnp.float32)) * s
        lo = jnp.stack([window[0], window[1], window[0], window[1]])
        hi = jnp.stack([window[2], window[3], window[2], window[3]])
        boxes = ops.round_half(jnp.clip(boxes, lo, hi), cfg.round_half_away)
        keep = roi_valid & (cls > 0)
        if cfg.min_confidence:  # the port's `if config.DETECTION_MIN_CONFIDENCE:`
            keep &= score >= np.float32(cfg.min_confidence)
        idx, valid = _nms(boxes, score, keep, cfg.detection_nms_threshold, cfg.max_instances,
                          cfg.nms_suppress_equal, classes=cls.astype(jnp.int32))
        return boxes[idx], jnp.where(valid, score[idx], 0.0), jnp.where(valid, cls[idx], 0), valid


def dummy_inputs(cfg: MatterportConfig, batch: int = 1):
    s = cfg.max_dim
    window = jnp.tile(jnp.array([[0, 0, s, s]], jnp.float32), (batch, 1))
    return jnp.zeros((batch, s, s, 3), jnp.float32), window


def param_shapes(cfg: MatterportConfig) -> dict:
    """The params tree `cfg` expects, as ShapeDtypeStructs (no allocation)."""
    images, window = dummy_inputs(cfg)
    tree = jax.eval_shape(lambda: MatterportMaskRCNN(cfg).init(jax.random.PRNGKey(0), images,
                                                               window))
    return tree["params"]
