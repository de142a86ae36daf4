"""Mask R-CNN losses, normalised exactly as torchvision's (rpn.py compute_loss,
roi_heads.py fastrcnn_loss and maskrcnn_loss), on the static-shape samples of forward.py.

torchvision concatenates the samples of all images before reducing, so every mean below is
over the whole batch (sum over images / total count), not a mean of per-image means:
  loss_objectness   BCE-with-logits, mean over sampled anchors
  loss_rpn_box_reg  smooth-L1 (beta 1/9) summed over positive anchors / sampled anchors
  loss_classifier   cross-entropy, mean over sampled ROIs
  loss_box_reg      smooth-L1 (beta 1/9) of the gt class' deltas, summed over positive
                    ROIs / sampled ROIs
  loss_mask         BCE-with-logits on the gt class channel, mean over positive ROIs x M x M
Where torchvision would divide by zero (no samples at all), the term is 0 here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmrcnn.config import ModelConfig
from jaxmrcnn.model import MaskRCNN
from jaxmrcnn.train.config import TrainConfig
from jaxmrcnn.train.forward import training_forward


def smooth_l1(x, beta: float):
    """torch.nn.functional.smooth_l1_loss elementwise on x = input - target."""
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def bce_with_logits(logits, targets):
    """Elementwise binary_cross_entropy_with_logits: max(x, 0) - x z + log(1 + exp(-|x|))."""
    return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _masked_sum(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0))


def _safe_div(a, n):
    return a / jnp.maximum(n, 1).astype(a.dtype)


def rpn_losses(out, beta: float = 1.0 / 9):
    """out: rpn_logits, rpn_labels, rpn_deltas, rpn_targets `[B, S(, 4)]`, rpn_pos, rpn_valid."""
    valid, pos = out["rpn_valid"], out["rpn_pos"]
    n = jnp.sum(valid)
    bce = bce_with_logits(out["rpn_logits"], out["rpn_labels"])  # [B, S]
    box = jnp.sum(smooth_l1(out["rpn_deltas"] - out["rpn_targets"], beta), axis=-1)  # [B, S]
    return dict(
        loss_objectness=_safe_div(_masked_sum(bce, valid), n),
        loss_rpn_box_reg=_safe_div(_masked_sum(box, pos), n),
    )


def fastrcnn_losses(out, beta: float = 1.0 / 9):
    """out: class_logits `[B, S, K]`, roi_classes `[B, S]`, roi_deltas / roi_targets
    `[B, S, 4]` (deltas of the target class), roi_pos, roi_valid `[B, S]`."""
    valid, pos = out["roi_valid"], out["roi_pos"]
    n = jnp.sum(valid)
    logp = jax.nn.log_softmax(out["class_logits"], axis=-1)
    ce = -jnp.take_along_axis(logp, out["roi_classes"][..., None], axis=-1)[..., 0]  # [B, S]
    box = jnp.sum(smooth_l1(out["roi_deltas"] - out["roi_targets"], beta), axis=-1)
    return dict(
        loss_classifier=_safe_div(_masked_sum(ce, valid), n),
        loss_box_reg=_safe_div(_masked_sum(box, pos), n),
    )


def mask_loss(out):
    """out: mask_logits / mask_targets `[B, S, M, M]`, mask_valid `[B, S]`."""
    valid = out["mask_valid"]
    logits = out["mask_logits"]
    per_roi = jnp.sum(bce_with_logits(logits, out["mask_targets"]), axis=(-2, -1))  # [B, S]
    n = jnp.sum(valid) * logits.shape[-1] * logits.shape[-2]
    return dict(loss_mask=_safe_div(_masked_sum(per_roi, valid), n))


def maskrcnn_losses(params, images, info, gt, key, cfg: ModelConfig,
                    tcfg: TrainConfig | None = None, *, model: MaskRCNN | None = None):
    """The Mask R-CNN training losses of a batch -> (losses, out).

    params: the MaskRCNN params tree (a converted checkpoint's fits as is); images
    `[B, H, W, 3]` normalized and padded; info: image_hw, padded_hw `[B, 2]`; gt: boxes
    `[B, G, 4]`, classes `[B, G]`, masks `[B, G, H, W]`, valid `[B, G]`
    (targets.pad_ground_truth); key: PRNG key of the samplers.
    losses: the five torchvision terms and their sum "loss"; out: training_forward's dict
    (sampled indices, targets, logits). Pure and shape-static: wrap in jax.jit with `cfg`,
    `tcfg` static (they are hashable frozen dataclasses).
    """
    tcfg = TrainConfig() if tcfg is None else tcfg
    model = MaskRCNN(cfg) if model is None else model
    out = model.apply({"params": params}, images, info, gt, key, tcfg, method=training_forward)
    losses = {}
    losses.update(rpn_losses(out, tcfg.rpn_box_beta))
    losses.update(fastrcnn_losses(out, tcfg.roi_box_beta))
    losses.update(mask_loss(out))
    losses["loss"] = sum(losses[k] for k in
                         ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                          "loss_mask"))
    return losses, out
