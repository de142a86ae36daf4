"""The grouped 3x3 convolution of ResNeXt bottlenecks (jaxmrcnn.layers.common.grouped_conv3x3,
GroupedConv3x3) against torch.nn.functional.conv2d(groups=...), and the backbone's params tree.

Tolerance: max |ours - torch| <= 1e-5 * max |torch| (relative to the output's scale). Every
output is a float32 sum of 9 * C/G products taken in another order than torch's (9 taps x
channels of multiply-adds, convs of one or a few groups with block-diagonal kernels, or
XLA's grouped conv); with unit-scale inputs
and weights of std 1/sqrt(9 C/G), the rounding differences observed are <= 6e-7 of the output
scale (gradients <= 4e-7), while any indexing slip (a tap, a stride phase, a group's channel
range, the padding) changes outputs by O(1) of it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxmrcnn.config import PRESETS
from jaxmrcnn.layers import resnet
from jaxmrcnn.layers.common import GroupedConv3x3, conv, grouped_conv3x3, groups_per_step
from jaxmrcnn.model import flatten_tree, param_shapes

RTOL = 1e-5
# "scan" with its default groups per step (k = 4 for Cg 4, 1 from Cg 8), and with k forced
METHODS = [("scan", None), ("scan", 1), ("scan", 2), ("taps", None), ("xla", None)]
# (groups, channels in = out, stride, H, W): ResNeXt's Cg of 4 / 8 / 16 / 32, odd and even
# sizes, stride 1 and 2 (a stride-2 conv on an odd size reads the bottom/right padding).
CASES = [
    (32, 128, 1, 12, 10),  # Cg 4 (32x4d / 64x4d stage 1)
    (64, 256, 2, 11, 13),  # Cg 4, stride 2, odd sizes
    (32, 256, 1, 9, 7),  # Cg 8, odd
    (32, 256, 2, 10, 14),  # Cg 8, stride 2, even
    (16, 256, 2, 9, 8),  # Cg 16, stride 2, odd x even
    (8, 256, 1, 6, 5),  # Cg 32
    (3, 24, 2, 7, 7),  # few groups, odd count (the scan's unroll of 2 leaves a remainder)
    (4, 4, 1, 5, 6),  # depthwise (Cg 1)
]


def torch_conv(x, kernel, stride, groups):
    """x NHWC, kernel HWIO [3, 3, C/G, O] -> NHWC, by PyTorch (OIHW weight)."""
    xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
    wt = torch.from_numpy(np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1))))
    with torch.no_grad():
        y = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1, groups=groups)
    return y.numpy().transpose(0, 2, 3, 1)


def data(groups, c, h, w, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, h, w, c)).astype(np.float32)
    k = (rng.standard_normal((3, 3, c // groups, c)) / np.sqrt(9 * c / groups)).astype(np.float32)
    return x, k


def rel_err(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)


# every (method, per_step) on every case where per_step divides the group count
MATCH_CASES = [
    (*case, method, per_step)
    for case in CASES
    for method, per_step in METHODS
    if per_step is None or case[0] % per_step == 0
]


@pytest.mark.parametrize("groups,c,stride,h,w,method,per_step", MATCH_CASES)
def test_matches_torch(groups, c, stride, h, w, method, per_step):
    x, k = data(groups, c, h, w)
    want = torch_conv(x, k, stride, groups)
    fn = jax.jit(lambda x, k: grouped_conv3x3(x, k, stride, groups, method, per_step))
    got = fn(jnp.asarray(x), jnp.asarray(k))  # a batch of 2 under jit
    assert rel_err(got, want) <= RTOL
    # each image of the batch alone gives the same result
    one = fn(jnp.asarray(x[1:]), jnp.asarray(k))
    assert rel_err(one, want[1:]) <= RTOL


@pytest.mark.parametrize("method,per_step", [("scan", None), ("scan", 1), ("taps", None)])
@pytest.mark.parametrize("groups,c,stride,h,w", [CASES[1], CASES[3], CASES[6], CASES[7]])
def test_gradients_match_torch(groups, c, stride, h, w, method, per_step):
    """d/dx and d/dkernel of <conv(x, k), r> against torch autograd (the scan's custom VJP is
    itself a scan of each step's VJP: this checks its slicing, the block-diagonal kernel's
    gradient and the transposes back)."""
    x, k = data(groups, c, h, w)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    r = np.random.default_rng(1).standard_normal((2, ho, wo, c)).astype(np.float32)

    def loss(x, k):
        return jnp.sum(grouped_conv3x3(x, k, stride, groups, method, per_step) * r)

    gx, gk = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(k))
    xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).requires_grad_()
    wt = torch.from_numpy(np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))).requires_grad_()
    y = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1, groups=groups)
    (y * torch.from_numpy(np.ascontiguousarray(np.transpose(r, (0, 3, 1, 2))))).sum().backward()
    # gradients are sums over more terms (all output positions): 1e-5 of their scale still
    # holds with margin (observed <= 4e-7)
    assert rel_err(gx, xt.grad.numpy().transpose(0, 2, 3, 1)) <= RTOL
    assert rel_err(gk, wt.grad.numpy().transpose(2, 3, 1, 0)) <= RTOL


def test_vmap_under_jit():
    groups, c = 32, 256
    x, k = data(groups, c, 8, 8, batch=3)
    ys = jax.jit(jax.vmap(lambda a: grouped_conv3x3(a[None], k, 1, groups)[0]))(jnp.asarray(x))
    assert rel_err(ys, torch_conv(x, k, 1, groups)) <= RTOL


def test_bad_shapes():
    x = jnp.zeros((1, 8, 8, 96))
    with pytest.raises(ValueError, match="groups"):
        grouped_conv3x3(x, jnp.zeros((3, 3, 4, 96)), 1, 32)  # 96 / 32 = 3 per group, not 4
    with pytest.raises(ValueError, match="method"):
        grouped_conv3x3(x, jnp.zeros((3, 3, 3, 96)), 1, 32, "im2col")
    with pytest.raises(ValueError, match="per_step"):
        grouped_conv3x3(x, jnp.zeros((3, 3, 3, 96)), 1, 32, "scan", 3)
    with pytest.raises(ValueError, match="groups"):
        GroupedConv3x3(64, 1, 32).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 48)))


def test_module_same_param_as_nn_conv():
    """GroupedConv3x3 has nn.Conv(feature_group_count)'s parameter: same name, shape and
    initial values for the same key, and each runs on the other's params."""
    x, _ = data(32, 256, 9, 9, batch=1)
    for stride in (1, 2):
        ours = GroupedConv3x3(256, stride, 32)
        ref = conv(256, 3, stride, bias=False, groups=32)
        p_ours = ours.init(jax.random.PRNGKey(3), x)
        p_ref = ref.init(jax.random.PRNGKey(3), x)
        assert jax.tree_util.tree_structure(p_ours) == jax.tree_util.tree_structure(p_ref)
        assert p_ours["params"]["kernel"].shape == (3, 3, 8, 256)
        np.testing.assert_array_equal(p_ours["params"]["kernel"], p_ref["params"]["kernel"])
        assert rel_err(ours.apply(p_ref, x), ref.apply(p_ref, x)) <= RTOL


def _old_grouped_conv(features, stride, groups, name):
    """The Bottleneck's conv2 before GroupedConv3x3: nn.Conv with feature_group_count."""
    return conv(features, 3, stride, bias=False, groups=groups, name=name)


@pytest.mark.parametrize(
    "preset",
    [
        "detectron2/mask_rcnn_X_101_32x8d_FPN_3x",
        "mmdet/mask-rcnn_x101-64x4d_fpn_1x_coco",
        "mmdet/mask-rcnn_x101-32x4d_fpn_1x_coco",
    ],
)
def test_resnext_params_tree_unchanged(preset, monkeypatch):
    """The whole model's params tree (names and shapes) with GroupedConv3x3 equals the tree
    with nn.Conv(feature_group_count) (converted checkpoints keep loading)."""
    cfg = PRESETS[preset]()
    assert cfg.backbone.groups > 1
    new = dict(flatten_tree(param_shapes(cfg)))
    monkeypatch.setattr(resnet, "GroupedConv3x3", _old_grouped_conv)
    old = dict(flatten_tree(param_shapes(cfg)))
    assert new == old
    b = cfg.backbone
    width = b.width_per_group * b.groups  # stage 1 (planes 64)
    conv2 = [k for k in new if k.endswith("conv2/kernel") and "layer1_0" in k]
    assert len(conv2) == 1 and new[conv2[0]] == (3, 3, b.width_per_group, width)


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_resnext_backbone_same_outputs(stride_in_1x1, monkeypatch):
    """A small ResNeXt-50 (32x4d) backbone, with a spatial mask (two images of different
    valid sizes in one canvas), gives the same C2..C5 with GroupedConv3x3 as with nn.Conv."""
    cfg = PRESETS["mmdet/mask-rcnn_x101-32x4d_fpn_1x_coco"]().backbone
    cfg = dataclasses.replace(cfg, depth=50, stride_in_1x1=stride_in_1x1)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 96, 128, 3)), jnp.float32)
    valid = jnp.array([[96, 128], [64, 96]])
    model = resnet.ResNet(cfg)
    params = model.init(jax.random.PRNGKey(0), x, valid)
    new = jax.jit(model.apply)(params, x, valid)
    monkeypatch.setattr(resnet, "GroupedConv3x3", _old_grouped_conv)
    old = jax.jit(resnet.ResNet(cfg).apply)(params, x, valid)
    for name in ("c2", "c3", "c4", "c5"):
        # ~50 layers of float32 in another order: 1e-4 of the scale, as tests/test_layers.py
        assert rel_err(new[name], old[name]) <= 1e-4, name


def test_groups_per_step():
    assert groups_per_step(4, 64) == 4 and groups_per_step(4, 32) == 4
    assert groups_per_step(8, 32) == 1 and groups_per_step(64, 32) == 1
    assert groups_per_step(1, 4) == 4  # 16 lowered to a divisor of the group count
    assert groups_per_step(2, 3) == 3 and groups_per_step(4, 3) == 3
