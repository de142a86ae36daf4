"""Mask R-CNN inference: backbone -> FPN -> RPN -> ROIAlign -> box head -> NMS -> mask head.

Static shapes throughout: a batch `[B, H, W, 3]` of images padded into one canvas, with
per-image sizes in `info`, gives fixed-size padded outputs with a `valid` mask. Each image is
computed exactly as the source framework computes it alone (padded to its own multiple of
32), whatever canvas it shares: see the spatial masks in layers/resnet.py.

`info` (all `[B, 2]` int32 as (h, w)):
    image_hw:  the resized image size (clipping of boxes).
    padded_hw: the image's own padded size, a multiple of 32, <= canvas.
    orig_hw:   the original image size (boxes are scaled back to it).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmrcnn import ops
from jaxmrcnn.box_postprocess import box_detections
from jaxmrcnn.config import ModelConfig
from jaxmrcnn.layers.box_head import BoxHead, BoxPredictor
from jaxmrcnn.layers.fpn import FPN
from jaxmrcnn.layers.mask_head import MaskHead
from jaxmrcnn.layers.resnet import ResNet
from jaxmrcnn.layers.rpn import RPNHead
from jaxmrcnn.proposals import anchors_for_canvas, level_strides, select_proposals


def mask_num_classes(cfg: ModelConfig) -> int:
    """Mask predictor channels: no background channel when background is the last class
    (Detectron2, mmdet); one per class otherwise (torchvision, maskrcnn-benchmark)."""
    rh = cfg.roi_heads
    return rh.num_classes - 1 if rh.background_index == rh.num_classes - 1 else rh.num_classes


# Matmul/convolution precision, named as jax.default_matmul_precision names them. "float32"
# (the default) makes every dot and convolution of the program carry precision HIGHEST, so a
# GPU (whose default is TF32) or a TPU (bfloat16 passes) computes what a CPU computes;
# "tensorfloat32" and "bfloat16" are faster where a user accepts less; "default" leaves the
# precision unset (the backend's default, or the user's jax_default_matmul_precision).
PRECISIONS = ("float32", "tensorfloat32", "bfloat16", "default")


def matmul_precision(precision: str):
    """A trace-time context giving every dot/convolution traced inside it `precision` (one of
    PRECISIONS). It changes no global setting: only the program traced within it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "default":
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


# Compute dtypes of the network (backbone, FPN, RPN head, box and mask heads): their
# activations and params. "float32" (the default) is the reference computation; "bfloat16"
# and "float16" halve the memory traffic where the hardware has fast half-precision units.
# Box decoding, NMS, score thresholds, ROIAlign's sampling and the mask paste stay float32
# whatever the dtype: the heads' outputs are cast up before any of them.
DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(dtype: str):
    """The jnp dtype of a DTYPES name; ValueError naming the choices otherwise."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return jnp.dtype(dtype)


# FrozenNorm statistics stay float32 when params are cast (folded into scale and shift in
# float32, then cast: a variance can exceed float16's range, 65504).
KEEP_FLOAT32 = ("mean", "var")


def cast_params(params, dtype: str):
    """`params` for a model of compute dtype `dtype`: every floating leaf cast to it (done once,
    e.g. by the Detector when it loads a checkpoint), except the frozen norms' statistics
    (KEEP_FLOAT32). For "float32" the tree is returned as it is."""
    dt = compute_dtype(dtype)
    if dt == jnp.float32:
        return params

    def cast(path, x):
        name = getattr(path[-1], "key", None)
        if name in KEEP_FLOAT32 or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, params)


class MaskRCNN(nn.Module):
    cfg: ModelConfig
    precision: str = "float32"  # of matmuls and convolutions: one of PRECISIONS
    # compute dtype of the network's activations (params: `cast_params`): one of DTYPES
    dtype: str = "float32"

    def setup(self):
        cfg = self.cfg
        rh = cfg.roi_heads
        self.backbone = ResNet(cfg.backbone)
        self.fpn = FPN(cfg.fpn)
        self.rpn_head = RPNHead(len(cfg.anchors.aspect_ratios), cfg.rpn.num_convs)
        self.box_head = BoxHead(rh.box_head, rh.fc_dim, rh.conv_dim, rh.box_head_norm, rh.norm_eps)
        self.box_predictor = BoxPredictor(rh.num_classes, rh.box_reg)
        self.mask_head = MaskHead(
            mask_num_classes(cfg), rh.mask_head_convs, rh.conv_dim, rh.mask_head_norm, rh.norm_eps
        )

    def pyramid(self, images, padded_hw):
        with matmul_precision(self.precision):
            feats = self.backbone(images, padded_hw)
            return feats, self.fpn(feats, padded_hw)

    def __call__(self, images, info, return_aux: bool = False):
        """The model (see `_forward`), every dot and convolution at `self.precision`, the
        network computed in `self.dtype` (DTYPES: the params should be `cast_params`'s)."""
        with matmul_precision(self.precision):
            return self._forward(images, info, return_aux)

    def _forward(self, images, info, return_aux: bool = False):
        """images `[B, H, W, 3]` (normalized, zero-padded) -> (detections, aux).

        detections: boxes `[B, D, 4]` in original-image pixels, scores `[B, D]`, class_index
        `[B, D]` (the model's class index, not a dataset category id), masks `[B, D, M, M]`
        probabilities of the predicted class, valid `[B, D]`. aux holds named intermediates when
        `return_aux`.
        """
        cfg = self.cfg
        image_hw = info["image_hw"]
        padded_hw = info["padded_hw"]
        b = images.shape[0]
        # The network in `dt`; everything that decodes, selects or samples in float32 (for
        # float32 these casts are no-ops: the program is the float32 model's exactly).
        dt, f32 = compute_dtype(self.dtype), jnp.float32
        feats, pyr = self.pyramid(images.astype(dt), padded_hw)
        levels = [pyr[f"p{i}"] for i in range(2, 7)]
        strides = level_strides(len(levels))

        # RPN.
        logits, deltas = self.rpn_head(levels, strides, padded_hw)
        logits = [x.astype(f32) for x in logits]
        deltas = [x.astype(f32) for x in deltas]
        anchors, anchor_valid = anchors_for_canvas(
            cfg.anchors, [lv.shape[1:3] for lv in levels], padded_hw
        )
        proposals, prop_scores, prop_valid = select_proposals(
            cfg.rpn, logits, deltas, anchors, anchor_valid, image_hw
        )

        # Box head.
        # P2..P5; ROIAlign samples float32 maps (its sample coordinates are in the maps'
        # dtype, and bfloat16 has 8 bits of mantissa: pixels lost on large images)
        pool_levels = [lv.astype(f32) for lv in levels[:4]]
        scales = [1.0 / s for s in strides[:4]]
        level_hw = jnp.stack([-(-padded_hw // s) for s in strides[:4]], axis=1)  # [B, 4, 2]
        pc = cfg.pooler
        pool = dict(
            spatial_scales=scales,
            sampling_ratio=pc.sampling_ratio,
            aligned=pc.aligned,
            level_rule=pc.level_rule,
            valid_hw=level_hw,
            max_samples=pc.max_samples,
        )
        box_feats, box_overflow = ops.roi_align(
            pool_levels, proposals, output_size=pc.box_output_size, **pool
        )  # [B, R, 7, 7, C]
        r = proposals.shape[1]
        x = self.box_head(box_feats.reshape((b * r,) + box_feats.shape[2:]).astype(dt))
        class_logits, box_deltas = self.box_predictor(x)
        class_logits = class_logits.reshape(b, r, -1).astype(f32)
        box_deltas = box_deltas.reshape(b, r, -1, 4).astype(f32)  # [B, R, G, 4]
        det_boxes, det_scores, det_labels, det_valid, det_rois = box_detections(
            cfg.roi_heads, class_logits, box_deltas, proposals, prop_valid, image_hw
        )

        # Mask head on the final boxes (resized-image coordinates).
        mask_feats, mask_overflow = ops.roi_align(
            pool_levels, det_boxes, output_size=pc.mask_output_size, **pool
        )  # [B, D, 14, 14, C]
        d = det_boxes.shape[1]
        mask_labels = det_labels
        if mask_num_classes(cfg) != cfg.roi_heads.num_classes:  # no background channel
            mask_labels = jnp.where(
                det_labels > cfg.roi_heads.background_index, det_labels - 1, det_labels
            )
        mask_logits = self.mask_head(
            mask_feats.reshape((b * d,) + mask_feats.shape[2:]).astype(dt), mask_labels.reshape(-1)
        ).astype(f32)
        masks = jax.nn.sigmoid(mask_logits).reshape((b, d) + mask_logits.shape[1:])

        # Back to original-image pixels, x and y scaled separately.
        orig_f, image_f = info["orig_hw"].astype(jnp.float32), image_hw.astype(jnp.float32)
        if cfg.roi_heads.rescale == "multiply":
            ratio = orig_f / image_f  # [B, 2]
        elif cfg.roi_heads.rescale == "divide":
            ratio = image_f / orig_f  # mmdet's scale_factor
        else:
            raise ValueError(
                f"rescale must be 'multiply' or 'divide', got {cfg.roi_heads.rescale!r}"
            )
        scale = jnp.stack([ratio[:, 1], ratio[:, 0], ratio[:, 1], ratio[:, 0]], axis=-1)
        if cfg.roi_heads.rescale == "multiply":
            out_boxes = det_boxes * scale[:, None, :]
        else:
            out_boxes = det_boxes / scale[:, None, :]
        out_valid = det_valid
        if cfg.roi_heads.clip_to_original:  # Detectron2's detector_postprocess
            oh, ow = info["orig_hw"][:, None, 0], info["orig_hw"][:, None, 1]
            out_boxes = ops.clip_boxes(out_boxes, oh, ow)
            out_valid = det_valid & ops.small_box_mask(out_boxes, 0.0, strict=True)

        detections = dict(
            boxes=out_boxes, scores=det_scores, class_index=det_labels, masks=masks, valid=out_valid
        )
        if cfg.roi_heads.result_order not in ("score", "class"):
            raise ValueError(f"result_order must be 'score' or 'class', got "
                             f"{cfg.roi_heads.result_order!r}")
        if cfg.roi_heads.clip_to_original or cfg.roi_heads.result_order == "class":
            # Valid detections first; for "class", by class index, then by proposal index (the
            # order maskrcnn-benchmark's per-class CPU NMS returns); else the score order kept.
            if cfg.roi_heads.result_order == "class":
                key = det_labels * (proposals.shape[1] + 1) + det_rois
            else:
                key = jnp.zeros_like(det_labels)
            key = jnp.where(out_valid, key, jnp.iinfo(jnp.int32).max)
            order = jnp.argsort(key, axis=1, stable=True)  # [B, D]
            detections = {
                k: jnp.take_along_axis(v, order.reshape(order.shape + (1,) * (v.ndim - 2)), axis=1)
                for k, v in detections.items()
            }
        aux = {}
        if return_aux:
            aux = dict(feats)
            aux.update(pyr)
            aux.update(
                rpn_logits=logits,
                rpn_deltas=deltas,
                anchors=anchors,
                proposals=proposals,
                proposal_scores=prop_scores,
                proposal_valid=prop_valid,
                class_logits=class_logits,
                box_deltas=box_deltas,
                boxes_resized=det_boxes,
                mask_logits=mask_logits.reshape((b, d) + mask_logits.shape[1:]),
                roi_align_overflow=box_overflow + mask_overflow,
            )
        return detections, aux


def dummy_inputs(batch: int = 1, canvas_hw: tuple[int, int] = (64, 64)):
    h, w = canvas_hw
    hw = jnp.tile(jnp.array([[h, w]], jnp.int32), (batch, 1))
    return jnp.zeros((batch, h, w, 3), jnp.float32), dict(image_hw=hw, padded_hw=hw, orig_hw=hw)


def init_params(cfg: ModelConfig, rng=None):
    """Randomly initialized params (Flax defaults) for `cfg`."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    images, info = dummy_inputs()
    return MaskRCNN(cfg).init(rng, images, info)["params"]


def param_shapes(cfg: ModelConfig) -> dict:
    """The params tree `cfg` expects, as shapes, computed without allocating weights."""
    images, info = dummy_inputs()
    tree = jax.eval_shape(lambda: MaskRCNN(cfg).init(jax.random.PRNGKey(0), images, info))
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), tree["params"])


def check_params(cfg: ModelConfig, params: dict, shapes: dict | None = None) -> None:
    """Raises ValueError listing missing, unexpected and mis-shaped params (`shapes`: the
    result of `param_shapes(cfg)`, if the caller already has it)."""
    want = dict(flatten_tree(param_shapes(cfg) if shapes is None else shapes))
    got = {k: tuple(v.shape) for k, v in flatten_tree(params)}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    bad = sorted(
        f"{k}: {got[k]} vs expected {want[k]}" for k in set(want) & set(got) if got[k] != want[k]
    )
    if missing or unexpected or bad:
        parts = []
        sections = (("missing", missing), ("unexpected", unexpected), ("shape mismatches", bad))
        for title, items in sections:
            if items:
                parts.append(f"{title} ({len(items)}): " + "; ".join(items[:20]))
        raise ValueError(f"params do not fit {cfg.name}:\n  " + "\n  ".join(parts))


def flatten_tree(tree, prefix=""):
    """Yields ("a/b/c", leaf) for every leaf of a nested dict of params (or shapes)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flatten_tree(v, f"{prefix}/{k}" if prefix else k)
    else:
        yield prefix, tree
