"""Training targets against torchvision's own classes (Matcher, BalancedPositiveNegativeSampler,
BoxCoder, project_masks_on_boxes) on shared inputs, and the differentiable ROIAlign against
ops.roi_align (values) and torchvision's roi_align (gradients).

Matching is compared for exact equality of matched indices (low-quality matches and ties
included) on the same IoU matrix. Sampling cannot be compared draw for draw (the RNGs
differ): the counts must equal torchvision's, every choice must be valid (distinct, of the
right label), and the draws must be spread uniformly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.roi_heads import project_masks_on_boxes
from torchvision.ops import box_iou as tv_box_iou
from torchvision.ops import roi_align as tv_roi_align

from jaxmrcnn import ops
from jaxmrcnn.train import targets as T
from jaxmrcnn.train.roi_align import roi_align_train


def random_boxes(rng, n, size=128.0, integer=False):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(4, size * 0.5, (n, 2))
    b = np.concatenate([xy, xy + wh], axis=1)
    return (np.round(b) if integer else b).astype(np.float32)


def tv_match(iou, high, low, allow):
    matcher = tv_utils.Matcher(high, low, allow_low_quality_matches=allow)
    return matcher(torch.from_numpy(iou)).numpy()


@pytest.mark.parametrize("high,low,allow", [(0.7, 0.3, True), (0.5, 0.5, False)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matcher_equals_torchvision(high, low, allow, seed):
    """Same IoU matrix -> identical matches; padded gt rows (filled with junk) change nothing."""
    rng = np.random.default_rng(seed)
    gt = random_boxes(rng, 6)
    preds = random_boxes(rng, 400)
    preds[50:60] = preds[40:50]  # exact duplicates: ties for the low-quality rule
    preds[100] = gt[2]  # a perfect match
    iou = tv_box_iou(torch.from_numpy(gt), torch.from_numpy(preds)).numpy()  # [6, 400]
    want = tv_match(iou, high, low, allow)
    # Ours: batch of one, two padded gt rows holding high IoUs that must be ignored.
    q = np.concatenate([iou, np.full((2, 400), 0.95, np.float32)])[None]
    gt_valid = np.array([[True] * 6 + [False] * 2])
    got = T.match(jnp.asarray(q), high=high, low=low, allow_low_quality=allow,
                  gt_valid=jnp.asarray(gt_valid))
    np.testing.assert_array_equal(np.asarray(got[0]), want)
    if allow:  # the low-quality rule really acted
        plain = tv_match(iou, high, low, False)
        assert (plain != want).any()


def test_matcher_on_our_iou_with_integer_boxes():
    """With integer boxes our box_iou equals torchvision's bit for bit, so the whole
    anchor assignment matches."""
    rng = np.random.default_rng(3)
    gt = random_boxes(rng, 5, integer=True)
    anchors = random_boxes(rng, 1000, integer=True)
    iou_tv = tv_box_iou(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
    iou_ours = np.asarray(ops.box_iou(jnp.asarray(gt), jnp.asarray(anchors)))
    np.testing.assert_array_equal(iou_ours, iou_tv)
    gtd = dict(boxes=jnp.asarray(gt)[None], valid=jnp.ones((1, 5), bool))
    labels, matched = T.anchor_targets(jnp.asarray(anchors)[None], jnp.ones((1, 1000), bool), gtd,
                                       high=0.7, low=0.3, allow_low_quality=True)
    m = tv_match(iou_tv, 0.7, 0.3, True)
    want_labels = np.where(m >= 0, 1, np.where(m == -1, 0, -1))
    np.testing.assert_array_equal(np.asarray(labels[0]), want_labels)
    np.testing.assert_array_equal(np.asarray(matched[0]), np.maximum(m, 0))


def test_matcher_invalid_predictions_and_empty_gt():
    rng = np.random.default_rng(4)
    gt = random_boxes(rng, 3)
    preds = random_boxes(rng, 50)
    preds[7] = gt[0]
    iou = np.asarray(ops.box_iou(jnp.asarray(gt), jnp.asarray(preds)))[None]
    pred_valid = np.ones((1, 50), bool)
    pred_valid[0, 7] = False  # the best prediction of gt 0 is padding
    got = np.asarray(T.match(jnp.asarray(iou), high=0.7, low=0.3, allow_low_quality=True,
                             pred_valid=jnp.asarray(pred_valid)))[0]
    assert got[7] == T.BETWEEN_THRESHOLDS  # ignored
    want = tv_match(np.delete(iou[0], 7, axis=1), 0.7, 0.3, True)
    np.testing.assert_array_equal(np.delete(got, 7), want)
    # No valid gt: every valid prediction is a negative (torchvision's background image).
    none = np.asarray(T.match(jnp.asarray(iou), high=0.7, low=0.3, allow_low_quality=True,
                              gt_valid=jnp.zeros((1, 3), bool), pred_valid=jnp.asarray(pred_valid)))
    assert (none[0][pred_valid[0]] == -1).all() and none[0, 7] == -2


@pytest.mark.parametrize("n_pos,n_neg,batch,frac", [
    (3, 1000, 256, 0.5),  # few positives: filled with negatives
    (500, 1000, 256, 0.5),  # many of both: 128 + 128
    (500, 20, 256, 0.5),  # few negatives: 128 + 20 (torchvision does not top up positives)
    (0, 50, 512, 0.25),  # no positives
    (0, 0, 512, 0.25),  # nothing to sample
    (40, 300, 512, 0.25),
])
def test_sampler_counts_and_validity(n_pos, n_neg, batch, frac):
    n = 1200
    rng = np.random.default_rng(n_pos + n_neg)
    labels = np.full(n, -1, np.int32)
    perm = rng.permutation(n)
    labels[perm[:n_pos]] = 1
    labels[perm[n_pos:n_pos + n_neg]] = 0
    # torchvision's counts.
    pos_m, neg_m = tv_utils.BalancedPositiveNegativeSampler(batch, frac)([torch.from_numpy(labels)])
    want_pos, want_neg = int(pos_m[0].sum()), int(neg_m[0].sum())
    labels_b = jnp.asarray(np.stack([labels, labels]))
    fn = jax.jit(lambda k, lab: T.sample_balanced(k, lab, batch, frac))
    for seed in range(3):
        idx, is_pos, valid = (np.asarray(a) for a in fn(jax.random.PRNGKey(seed), labels_b))
        for b in range(2):
            sel = idx[b][valid[b]]
            pos = idx[b][valid[b] & is_pos[b]]
            neg = idx[b][valid[b] & ~is_pos[b]]
            assert len(pos) == want_pos and len(neg) == want_neg
            assert len(set(sel.tolist())) == len(sel), "an element was drawn twice"
            assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
            # Layout: positives first, then negatives, then padding.
            assert is_pos[b][:want_pos].all() and not is_pos[b][want_pos:].any()
            assert valid[b][:want_pos + want_neg].all() and not valid[b][want_pos + want_neg:].any()
        # The two images of the batch draw independently.
        if want_pos + want_neg and want_neg < n_neg:
            assert not np.array_equal(idx[0], idx[1])


def test_sampler_is_uniform():
    """Each of 40 positives is drawn with probability 10 / 40: over 2000 draws every count
    lies within 5 sigma of 500."""
    labels = np.full(100, -1, np.int32)
    labels[:40] = 1
    keys = jax.random.split(jax.random.PRNGKey(0), 2000)
    fn = jax.jit(jax.vmap(lambda k: T.sample_balanced(k, jnp.asarray(labels)[None], 20, 0.5)))
    idx, is_pos, valid = (np.asarray(a) for a in fn(keys))
    assert (is_pos.sum(axis=(1, 2)) == 10).all()
    counts = np.bincount(idx[is_pos], minlength=100)[:40]
    sigma = np.sqrt(2000 * 0.25 * 0.75)
    assert np.abs(counts - 500).max() < 5 * sigma, counts


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_equals_torchvision_boxcoder(weights):
    rng = np.random.default_rng(5)
    ref = random_boxes(rng, 300)
    tgt = random_boxes(rng, 300)
    coder = tv_utils.BoxCoder(weights)
    want = coder.encode_single(torch.from_numpy(tgt), torch.from_numpy(ref)).numpy()
    got = np.asarray(T.encode_targets(jnp.asarray(tgt), jnp.asarray(ref), weights))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_mask_targets_equal_project_masks_on_boxes():
    rng = np.random.default_rng(6)
    h, w, g = 96, 120, 4
    yy, xx = np.mgrid[:h, :w]
    masks = np.stack([((yy - rng.uniform(20, 70)) ** 2 / rng.uniform(50, 400)
                       + (xx - rng.uniform(20, 100)) ** 2 / rng.uniform(50, 600) < 1)
                      for _ in range(g)]).astype(np.uint8)
    rois = random_boxes(rng, 30, size=110.0)
    rois[0] = [0, 0, 300, 3]  # long, thin, partly outside: many adaptive samples along x
    matched = rng.integers(0, g, 30)
    want = project_masks_on_boxes(torch.from_numpy(masks), torch.from_numpy(rois),
                                  torch.from_numpy(matched), 28).numpy()
    # Ours: padded onto a bigger canvas with an extra (padding) gt slot.
    canvas = np.zeros((1, g + 1, 128, 128), np.uint8)
    canvas[0, :g, :h, :w] = masks
    got = T.mask_targets(jnp.asarray(canvas), jnp.asarray(rois)[None], jnp.asarray(matched)[None],
                         jnp.asarray([[h, w]], jnp.int32), 28)
    np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-5)


def test_add_gt_proposals():
    props = jnp.arange(24, dtype=jnp.float32).reshape(1, 6, 4)
    pv = jnp.array([[True] * 4 + [False] * 2])
    gt = dict(boxes=jnp.ones((1, 3, 4)), valid=jnp.array([[True, True, False]]))
    boxes, valid = T.add_gt_proposals(props, pv, gt)
    assert boxes.shape == (1, 9, 4)
    np.testing.assert_array_equal(np.asarray(valid[0]), [1, 1, 1, 1, 0, 0, 1, 1, 0])


def test_proposal_targets_classes_and_ignore():
    gt = dict(boxes=jnp.asarray([[[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 0, 0]]], jnp.float32),
              classes=jnp.asarray([[5, 9, 0]]), valid=jnp.asarray([[True, True, False]]))
    props = jnp.asarray([[[0, 0, 10, 10], [21, 21, 40, 40], [0, 0, 30, 30], [60, 60, 70, 70]]],
                        jnp.float32)
    labels, classes, matched = T.proposal_targets(props, jnp.ones((1, 4), bool), gt,
                                                  high=0.5, low=0.5)
    np.testing.assert_array_equal(np.asarray(labels[0]), [1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(classes[0]), [5, 9, 0, 0])
    np.testing.assert_array_equal(np.asarray(matched[0])[:2], [0, 1])


def _pyramid(seed, b=2, c=3):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    feats = [jax.random.normal(k[i], (b, 64 // 2 ** i, 48 // 2 ** i, c)) for i in range(4)]
    xy = jax.random.uniform(k[4], (b, 40, 2)) * 180
    wh = jax.random.uniform(k[5], (b, 40, 2)) * 150 + 1
    return feats, jnp.concatenate([xy, xy + wh], -1)


def test_train_roi_align_equals_inference_roi_align():
    feats, rois = _pyramid(0)
    vh = jnp.asarray([[[64 // 2 ** i, 48 // 2 ** i] for i in range(4)],
                      [[60 // 2 ** i, 40 // 2 ** i] for i in range(4)]])
    kw = dict(output_size=7, spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=2,
              aligned=False, valid_hw=vh, level_rule="torchvision")
    want, _ = ops.roi_align(feats, rois, **kw)
    got = jax.jit(lambda f, r: roi_align_train(f, r, chunk=16, **kw))(feats, rois)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_train_roi_align_gradient_equals_torch():
    """Single level, torchvision roi_align(sampling_ratio=2, aligned=False) autograd."""
    feats, rois = _pyramid(1, b=1)
    f = feats[0]  # [1, 64, 48, 3]
    cot = jax.random.normal(jax.random.PRNGKey(9), (1, 40, 7, 7, 3))
    g = jax.grad(lambda x: jnp.sum(roi_align_train([x], rois, output_size=7, spatial_scales=[0.25],
                                                   sampling_ratio=2, aligned=False,
                                                   level_rule="torchvision") * cot))(f)
    ft = torch.from_numpy(np.asarray(f).transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    rt = torch.cat([torch.zeros(40, 1), torch.from_numpy(np.array(rois[0]))], 1)
    out = tv_roi_align(ft, rt, (7, 7), 0.25, 2, False)  # [40, 3, 7, 7]
    (out * torch.from_numpy(np.asarray(cot[0]).transpose(0, 3, 1, 2).copy())).sum().backward()
    want = ft.grad.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)


def test_training_roi_align_refuses_adaptive_sampling():
    feats, rois = _pyramid(2, b=1)
    with pytest.raises(NotImplementedError, match="sampling_ratio"):
        roi_align_train(feats, rois, output_size=7, spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
                        sampling_ratio=0, aligned=True, level_rule="detectron2")
