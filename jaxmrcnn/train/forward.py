"""Training-mode forward of MaskRCNN, with targets and sampling, under one jit.

Runs inside `MaskRCNN(cfg).apply(..., method=training_forward)`, so it uses the inference
model's own submodules and its params tree: a converted checkpoint fine-tunes as is.

    images -> backbone -> FPN -> RPN head on P2..P6 (all anchors)
      RPN targets: match anchors to gt (0.7 / 0.3, low-quality matches), sample 256
        (half positive), gather logits / deltas / targets of the sampled anchors
      proposals: training pre/post NMS top-n (2000 / 2000) from stop_gradient RPN outputs,
        gt appended (add_gt_proposals)
      ROI targets: match proposals to gt (0.5 / 0.5), sample 512 (a quarter positive),
        box head on the 512 sampled ROIs (differentiable ROIAlign)
      mask head on the first `pos cap` sampled slots (the positives come first), mask
        targets by ROIAlign of the matched gt masks

Static shapes: anchors `[B, A]`, proposals `[B, P + G]`, RPN samples `[B, 256]`, ROI
samples `[B, 512]`, mask ROIs `[B, 128]`; each with a `valid` mask. With B images, anchors
are those of each image's own padded size (as inference; torchvision would use the batch's
common padded size, which only matters for batches of differently-sized images).
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

from jaxmrcnn.layers.box_head import box_reg_rows
from jaxmrcnn.model import mask_num_classes
from jaxmrcnn.proposals import anchors_for_canvas, level_strides, select_proposals
from jaxmrcnn.train import targets as T
from jaxmrcnn.train.config import TrainConfig
from jaxmrcnn.train.roi_align import roi_align_train


def _precision(module):
    """The inference model's matmul precision context, where model.py defines one."""
    import jaxmrcnn.model as model_lib

    fn = getattr(model_lib, "matmul_precision", None)
    precision = getattr(module, "precision", None)
    return fn(precision) if fn is not None and precision is not None else contextlib.nullcontext()


def box_rows_for(labels, box_reg: str, num_classes: int, background_index: int):
    """Row of the box regressor predicting class `labels` (see layers/box_head.box_reg_rows)."""
    box_reg_rows(box_reg, num_classes)  # validates box_reg
    if box_reg == "agnostic":
        return jnp.zeros_like(labels)
    if box_reg == "per_foreground_class":
        return jnp.where(labels > background_index, labels - 1, labels)
    return labels


def training_forward(module, images, info, gt, key, tcfg: TrainConfig | None = None):
    """`module`: a bound MaskRCNN. images `[B, H, W, 3]` normalized; info as MaskRCNN's
    (image_hw, padded_hw); gt as targets.py; key a PRNG key.

    Returns a dict of everything the losses need (all static shapes) and the sampled
    indices (for tests and logging):
      rpn_logits [B, S1], rpn_labels [B, S1] (1/0), rpn_deltas / rpn_targets [B, S1, 4],
      rpn_pos / rpn_valid [B, S1]; rpn_index [B, S1] into the concatenated anchors
      class_logits [B, S2, K], roi_classes [B, S2], roi_deltas / roi_targets [B, S2, 4]
      (the deltas of the target class), roi_pos / roi_valid [B, S2]; roi_index [B, S2] into
      proposals + gt ([B, P + G]); proposals [B, P, 4], proposal_valid [B, P]
      mask_logits / mask_targets [B, S3, M, M], mask_valid [B, S3]
    """
    tcfg = TrainConfig() if tcfg is None else tcfg
    with _precision(module):
        return _forward(module, images, info, gt, key, tcfg)


def _forward(module, images, info, gt, key, tcfg):
    cfg = module.cfg
    rh = cfg.roi_heads
    image_hw, padded_hw = info["image_hw"], info["padded_hw"]
    b = images.shape[0]
    key_rpn, key_roi = jax.random.split(key)

    feats, pyr = module.pyramid(images, padded_hw)
    levels = [pyr[f"p{i}"] for i in range(2, 7)]
    strides = level_strides(len(levels))

    # ---------------------------------------------------------------- RPN
    logits, deltas = module.rpn_head(levels, strides, padded_hw)  # lists [B, n_l], [B, n_l, 4]
    # Head outputs in float32 whatever the compute dtype (bfloat16 runs: step.py).
    logits = [x.astype(jnp.float32) for x in logits]
    deltas = [x.astype(jnp.float32) for x in deltas]
    anchors, anchor_valid = anchors_for_canvas(
        cfg.anchors, [lv.shape[1:3] for lv in levels], padded_hw
    )
    all_logits = jnp.concatenate(logits, axis=1)  # [B, A]
    all_deltas = jnp.concatenate(deltas, axis=1)  # [B, A, 4]
    all_anchors = jnp.concatenate(anchors, axis=1)  # [B, A, 4]
    all_valid = jnp.concatenate(anchor_valid, axis=1)  # [B, A]
    anchor_labels, anchor_gt = T.anchor_targets(
        all_anchors, all_valid, gt, high=tcfg.rpn_fg_iou_thresh, low=tcfg.rpn_bg_iou_thresh,
        allow_low_quality=tcfg.rpn_allow_low_quality,
    )
    rpn_idx, rpn_pos, rpn_valid = T.sample_balanced(
        key_rpn, anchor_labels, tcfg.rpn_batch_size_per_image, tcfg.rpn_positive_fraction
    )  # [B, S1]
    s_anchors = T.gather(all_anchors, rpn_idx)
    s_gt_boxes = T.gather(gt["boxes"].astype(s_anchors.dtype), T.gather(anchor_gt, rpn_idx))
    rpn_targets = T.encode_targets(s_gt_boxes, s_anchors, cfg.rpn.box_weights,
                                   style=cfg.rpn.coder_style)
    rpn_targets = jnp.where(rpn_pos[..., None], rpn_targets, 0.0)  # no NaN from unused rows

    # Proposals: training top-n, no gradient (torchvision decodes detached deltas).
    rpn_cfg = dataclasses.replace(
        cfg.rpn, pre_nms_top_n=tcfg.rpn_pre_nms_top_n, post_nms_top_n=tcfg.rpn_post_nms_top_n
    )
    sg = jax.lax.stop_gradient
    proposals, _, prop_valid = select_proposals(
        rpn_cfg, [sg(x) for x in logits], [sg(x) for x in deltas], anchors, anchor_valid,
        image_hw,
    )  # [B, P, 4], [B, P]

    # ---------------------------------------------------------------- ROI targets
    rois, roi_valid_all = T.add_gt_proposals(proposals, prop_valid, gt)  # [B, P + G, ...]
    roi_labels, roi_classes_all, roi_gt = T.proposal_targets(
        rois, roi_valid_all, gt, high=tcfg.roi_fg_iou_thresh, low=tcfg.roi_bg_iou_thresh,
        background_index=rh.background_index,
    )
    roi_idx, roi_pos, roi_valid = T.sample_balanced(
        key_roi, roi_labels, tcfg.roi_batch_size_per_image, tcfg.roi_positive_fraction
    )  # [B, S2]
    s_rois = sg(T.gather(rois, roi_idx))  # [B, S2, 4]
    s_classes = jnp.where(roi_pos, T.gather(roi_classes_all, roi_idx), rh.background_index)
    s_gt = T.gather(roi_gt, roi_idx)  # [B, S2]
    roi_targets = T.encode_targets(T.gather(gt["boxes"].astype(s_rois.dtype), s_gt), s_rois,
                                   rh.box_weights, style=rh.coder_style)
    roi_targets = jnp.where(roi_pos[..., None], roi_targets, 0.0)

    # ---------------------------------------------------------------- box head
    pool_levels = levels[:4]  # P2..P5
    pc = cfg.pooler
    level_hw = jnp.stack([-(-padded_hw // s) for s in strides[:4]], axis=1)  # [B, 4, 2]
    pool = dict(
        spatial_scales=[1.0 / s for s in strides[:4]], sampling_ratio=pc.sampling_ratio,
        aligned=pc.aligned, level_rule=pc.level_rule, valid_hw=level_hw,
        chunk=tcfg.roi_align_chunk,
    )
    box_feats = roi_align_train(pool_levels, s_rois, output_size=pc.box_output_size, **pool)
    s2 = s_rois.shape[1]
    x = module.box_head(box_feats.reshape((b * s2,) + box_feats.shape[2:]))
    class_logits, box_deltas = module.box_predictor(x)
    class_logits, box_deltas = class_logits.astype(jnp.float32), box_deltas.astype(jnp.float32)
    class_logits = class_logits.reshape(b, s2, -1)  # [B, S2, K]
    box_deltas = box_deltas.reshape(b, s2, -1, 4)  # [B, S2, rows, 4]
    rows = box_rows_for(s_classes, rh.box_reg, rh.num_classes, rh.background_index)
    roi_deltas = jnp.take_along_axis(box_deltas, rows[:, :, None, None], axis=2)[:, :, 0]

    # ---------------------------------------------------------------- mask head
    # Positives occupy the first slots of the ROI sample: the mask head sees at most
    # int(512 * 0.25) = 128 of them per image.
    s3 = min(int(tcfg.roi_batch_size_per_image * tcfg.roi_positive_fraction), s2)
    m_rois, m_valid = s_rois[:, :s3], roi_pos[:, :s3]
    m_classes, m_gt = s_classes[:, :s3], s_gt[:, :s3]
    mask_feats = roi_align_train(pool_levels, m_rois, output_size=pc.mask_output_size, **pool)
    mask_labels = m_classes
    if mask_num_classes(cfg) != rh.num_classes:  # no background channel
        mask_labels = jnp.where(m_classes > rh.background_index, m_classes - 1, m_classes)
    mask_labels = jnp.clip(mask_labels, 0, mask_num_classes(cfg) - 1)
    mask_logits = module.mask_head(
        mask_feats.reshape((b * s3,) + mask_feats.shape[2:]), mask_labels.reshape(-1)
    )
    mask_logits = mask_logits.reshape((b, s3) + mask_logits.shape[1:]).astype(jnp.float32)
    # [B, S3, M, M]
    m_targets = T.mask_targets(gt["masks"], m_rois, m_gt, image_hw, mask_logits.shape[-1],
                               max_samples=tcfg.mask_target_max_samples)

    return dict(
        rpn_logits=T.gather(all_logits, rpn_idx),
        rpn_labels=rpn_pos.astype(all_logits.dtype),
        rpn_deltas=T.gather(all_deltas, rpn_idx),
        rpn_targets=rpn_targets,
        rpn_pos=rpn_pos,
        rpn_valid=rpn_valid,
        rpn_index=rpn_idx,
        class_logits=class_logits,
        roi_classes=s_classes,
        roi_deltas=roi_deltas,
        roi_targets=roi_targets,
        roi_pos=roi_pos,
        roi_valid=roi_valid,
        roi_index=roi_idx,
        proposals=proposals,
        proposal_valid=prop_valid,
        mask_logits=mask_logits,
        mask_targets=m_targets,
        mask_valid=m_valid,
    )
