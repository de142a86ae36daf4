"""Layer-by-layer parity: each Flax module with converted weights against the torchvision
module it replaces, on random inputs. Localizes a failure of the end-to-end parity tests.

Tolerance: max |ours - ref| <= 1e-4 * max |ref| (float32, different summation order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmrcnn.model import MaskRCNN

RTOL = 1e-4


def close(got, want, name):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)
    assert err <= RTOL, f"{name}: relative error {err:.2e}"


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def apply(ref, method, *args):
    model = MaskRCNN(ref.checkpoint.config)
    return model.apply({"params": ref.checkpoint.params}, *args, method=method)


@pytest.fixture(params=["v1", "v2"])
def ref(request):
    return request.getfixturevalue(f"tv_{request.param}")


def test_backbone_and_fpn(ref):
    x = np.random.default_rng(0).normal(size=(1, 128, 160, 3)).astype(np.float32)
    with torch.no_grad():
        body = ref.model.backbone.body(nchw(x))
        fpn = ref.model.backbone.fpn(body)
    feats, pyr = apply(ref, lambda m, im: m.pyramid(im, None), jnp.asarray(x))
    for i, k in enumerate(["0", "1", "2", "3"]):
        close(feats[f"c{i + 2}"], nhwc(body[k]), f"c{i + 2}")
    for k, name in zip(["0", "1", "2", "3", "pool"], ["p2", "p3", "p4", "p5", "p6"], strict=True):
        close(pyr[name], nhwc(fpn[k]), name)


def test_rpn_head(ref):
    rng = np.random.default_rng(1)
    levels = [rng.normal(size=(1, s, s + 2, 256)).astype(np.float32) for s in (16, 8, 4, 2, 1)]
    with torch.no_grad():
        logits, deltas = ref.model.rpn.head([nchw(x) for x in levels])
    ours_l, ours_d = apply(
        ref,
        lambda m, lv: m.rpn_head(lv, [4, 8, 16, 32, 64], None),
        [jnp.asarray(x) for x in levels],
    )
    for lt, dt, lo, do in zip(logits, deltas, ours_l, ours_d, strict=True):
        n, a, h, w = lt.shape
        close(lo, lt.permute(0, 2, 3, 1).reshape(n, -1).numpy(), "rpn logits")
        ref_d = dt.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4).numpy()
        close(do, ref_d, "rpn deltas")


def test_box_head_and_predictor(ref):
    x = np.random.default_rng(2).normal(size=(6, 7, 7, 256)).astype(np.float32)
    with torch.no_grad():
        feat = ref.model.roi_heads.box_head(nchw(x))
        logits, deltas = ref.model.roi_heads.box_predictor(feat)
    ours_l, ours_d = apply(ref, lambda m, v: m.box_predictor(m.box_head(v)), jnp.asarray(x))
    close(ours_l, logits.numpy(), "class logits")
    close(ours_d, deltas.numpy().reshape(6, -1, 4), "box deltas")


def test_mask_head_selects_the_label_channel(ref):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 14, 14, 256)).astype(np.float32)
    labels = np.array([1, 7, 90, 45, 3])
    with torch.no_grad():
        logits = ref.model.roi_heads.mask_predictor(ref.model.roi_heads.mask_head(nchw(x)))
    want = logits[torch.arange(5), torch.from_numpy(labels)].numpy()
    got = apply(ref, lambda m, v, lab: m.mask_head(v, lab), jnp.asarray(x), jnp.asarray(labels))
    close(got, want, "mask logits")


def test_spatial_masks_make_a_larger_canvas_exact(ref):
    """An image zero-padded into a bigger canvas, with its own size passed, gives the same
    features inside its region as the image alone."""
    x = np.random.default_rng(4).normal(size=(1, 96, 128, 3)).astype(np.float32)
    big = np.zeros((1, 160, 192, 3), np.float32)
    big[:, :96, :128] = x
    _, alone = apply(ref, lambda m, im: m.pyramid(im, None), jnp.asarray(x))
    hw = jnp.array([[96, 128]], jnp.int32)
    _, inside = apply(ref, lambda m, im, v: m.pyramid(im, v), jnp.asarray(big), hw)
    for name, s in zip(["p2", "p3", "p4", "p5", "p6"], [4, 8, 16, 32, 64], strict=True):
        h, w = -(-96 // s), -(-128 // s)
        close(inside[name][:, :h, :w], alone[name], name)
    jax.block_until_ready(inside)
