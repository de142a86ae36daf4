"""Bad arguments give a ValueError that names the argument, at trace time (also under jit)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmrcnn.ops import (
    BoxCoder,
    assign_levels,
    box_area,
    box_iou,
    cell_anchors,
    clip_boxes,
    grid_anchors,
    nms,
    paste_masks,
    roi_align,
    small_box_mask,
)

B4 = jnp.zeros((5, 4), jnp.float32)
S5 = jnp.zeros((5,), jnp.float32)
FEAT = jnp.zeros((1, 8, 8, 3), jnp.float32)
ROIS = jnp.zeros((1, 5, 4), jnp.float32)
MASKS = jnp.zeros((5, 28, 28), jnp.float32)


def _ra(**kw):
    args = dict(output_size=7, spatial_scales=[0.25], sampling_ratio=2, aligned=False)
    args.update(kw)
    feats = args.pop("features", [FEAT])
    rois = args.pop("rois", ROIS)
    return roi_align(feats, rois, **args)


CASES = {
    # wrong last dimension
    "iou-last-dim": (lambda: box_iou(jnp.zeros((5, 3)), B4), "boxes1"),
    "area-last-dim": (lambda: box_area(jnp.zeros((5, 5))), "boxes"),
    "nms-last-dim": (lambda: nms(jnp.zeros((5, 2)), S5, 0.5, 3), "boxes"),
    "decode-deltas-last-dim": (lambda: BoxCoder().decode(jnp.zeros((5, 3)), B4), "deltas"),
    # wrong rank
    "nms-rank": (lambda: nms(jnp.zeros((4,)), S5, 0.5, 3), "boxes"),
    "nms-scores-rank": (lambda: nms(B4, jnp.zeros((5, 1)), 0.5, 3), "scores"),
    "roi-align-feature-rank": (lambda: _ra(features=[jnp.zeros((8, 8, 3))]), r"features\[0\]"),
    "roi-align-rois-rank": (lambda: _ra(rois=B4), "rois"),
    "paste-masks-rank": (lambda: paste_masks(jnp.zeros((5, 28)), B4, (10, 10)), "masks"),
    "paste-boxes-rank": (lambda: paste_masks(MASKS, ROIS, (10, 10)), "boxes"),
    # non-float boxes
    "iou-int": (lambda: box_iou(B4.astype(jnp.int32), B4), "boxes1.*floating"),
    "clip-int": (lambda: clip_boxes(B4.astype(jnp.int32), 10, 10), "boxes.*floating"),
    "small-int": (lambda: small_box_mask(B4.astype(jnp.int32), 1.0), "boxes.*floating"),
    "nms-int": (lambda: nms(B4.astype(jnp.int32), S5, 0.5, 3), "boxes.*floating"),
    "roi-align-int": (lambda: _ra(rois=ROIS.astype(jnp.int32)), "rois.*floating"),
    "paste-int": (lambda: paste_masks(MASKS, B4.astype(jnp.int32), (10, 10)), "boxes.*floating"),
    # negative / zero sizes and counts
    "roi-align-negative-output": (lambda: _ra(output_size=-7), "output_size"),
    "roi-align-zero-output": (lambda: _ra(output_size=(7, 0)), "output_size"),
    "roi-align-negative-sr": (lambda: _ra(sampling_ratio=-1), "sampling_ratio"),
    "roi-align-max-samples": (lambda: _ra(sampling_ratio=0, max_samples=0), "max_samples"),
    "paste-negative-out": (lambda: paste_masks(MASKS, B4, (-10, 10)), "out_hw"),
    "nms-max-output": (lambda: nms(B4, S5, 0.5, 0), "max_output"),
    "nms-tile": (lambda: nms(B4, S5, 0.5, 3, tile=-2), "tile"),
    "anchor-size": (lambda: cell_anchors(-32, (0.5, 1.0, 2.0), flavour="torchvision"), "size"),
    "grid-negative": (
        lambda: grid_anchors(cell_anchors(32, (1.0,), flavour="torchvision"), (-2, 3), 4),
        "grid_hw",
    ),
    # unknown rule / style / method
    "level-rule": (lambda: assign_levels(B4, rule="fancy"), "level rule"),
    "roi-align-level-rule": (
        lambda: _ra(features=[FEAT, FEAT[:, ::2, ::2]], spatial_scales=[0.25, 0.125],
                    level_rule="fancy"),
        "level rule",
    ),
    "coder-style": (lambda: BoxCoder(style="yolo"), "box coder style"),
    "paste-method": (lambda: paste_masks(MASKS, B4, (10, 10), method="nearest"), "paste method"),
    "anchor-flavour": (lambda: cell_anchors(32, (1.0,), flavour="tf"), "anchor flavour"),
    # mismatched shapes
    "nms-valid-shape": (lambda: nms(B4, S5, 0.5, 3, valid=jnp.ones((4,), bool)), "valid"),
    "nms-classes-shape": (
        lambda: nms(B4, S5, 0.5, 3, classes=jnp.ones((6,), jnp.int32)),
        "classes",
    ),
    "roi-align-scales": (lambda: _ra(spatial_scales=[0.25, 0.125]), "spatial_scales"),
    "roi-align-batch": (lambda: _ra(rois=jnp.zeros((2, 5, 4))), "rois has batch"),
    "paste-count": (lambda: paste_masks(MASKS[:3], B4, (10, 10)), "masks has 3"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_argument_raises_named_value_error(name):
    fn, pattern = CASES[name]
    with pytest.raises(ValueError, match=pattern):
        fn()


def test_checks_run_at_trace_time_under_jit():
    """The same errors come out of jit (they only look at static shapes and dtypes)."""
    with pytest.raises(ValueError, match="boxes.*floating"):
        jax.jit(lambda b, s: nms(b, s, 0.5, 3))(B4.astype(jnp.int32), S5)
    with pytest.raises(ValueError, match="rois"):
        jax.jit(lambda f, r: _ra(features=[f], rois=r))(FEAT, jnp.zeros((1, 5, 3)))


def test_good_arguments_do_not_raise():
    """The cases above differ from valid calls only in the bad argument."""
    idx, ok = nms(B4, S5, 0.5, 3)
    assert idx.shape == (3,) and ok.shape == (3,)
    out, overflow = _ra()
    assert out.shape == (1, 5, 7, 7, 3) and int(overflow) == 0
    assert paste_masks(MASKS, B4, (10, 10)).shape == (5, 10, 10)
    assert np.asarray(box_iou(B4, B4)).shape == (5, 5)
