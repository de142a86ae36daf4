"""jaxmrcnn.flops: the backbone's FLOPs from XLA's cost analysis against a count by hand of
its convolutions' multiply-adds, computed here from the architecture alone; parameter counts
against the params tree and against torchvision's own count of maskrcnn_resnet50_fpn."""

from __future__ import annotations

import math

import pytest

from jaxmrcnn import flops
from jaxmrcnn.config import PRESETS, torchvision_maskrcnn_r50_fpn
from jaxmrcnn.model import flatten_tree, param_shapes

BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3)}  # bottlenecks per stage (He et al.; 26: ours)


def _conv(hw, cin, cout, k, s, groups=1):
    """Multiply-adds of a k x k conv, stride s, padding k // 2, over in-image taps only
    (XLA does not count taps on the zero padding), its output size and element count."""
    macs_per_channel, out_hw = 1, []
    for n in hw:
        out = (n + 2 * (k // 2) - k) // s + 1
        out_hw.append(out)
        macs_per_channel *= sum(1 for o in range(out) for j in range(k)
                                if 0 <= o * s - k // 2 + j < n)
    return macs_per_channel * (cin // groups) * cout, tuple(out_hw), out_hw[0] * out_hw[1] * cout


def resnet_by_hand(hw, depth, base):
    """(multiply-adds of every conv, conv output elements, max-pool output elements) of a
    torchvision-style bottleneck ResNet (stride on the 3x3) on one hw image."""
    macs, m, hw, outs = 0, *_conv(hw, 3, base, 7, 2)  # stem
    hw = ((hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1)  # max-pool 3x3 s2 p1
    pool, cin = hw[0] * hw[1] * base, base
    macs = m
    for stage, blocks in enumerate(BLOCKS[depth]):
        planes = base * 2**stage
        for b in range(blocks):
            stride = 2 if b == 0 and stage > 0 else 1
            m1, hw1, o1 = _conv(hw, cin, planes, 1, 1)
            m2, hw2, o2 = _conv(hw1, planes, planes, 3, stride)
            m3, _, o3 = _conv(hw2, planes, planes * 4, 1, 1)
            macs, outs = macs + m1 + m2 + m3, outs + o1 + o2 + o3
            if b == 0:
                md, _, od = _conv(hw, cin, planes * 4, 1, stride)
                macs, outs = macs + md, outs + od
            hw, cin = hw2, planes * 4
    return macs, outs, pool


TINY = torchvision_maskrcnn_r50_fpn(4).replace(
    backbone=dict(depth=26, base_channels=16), fpn=dict(out_channels=32),
    roi_heads=dict(fc_dim=64, conv_dim=32), input=dict(min_size=128, max_size=128))


def test_backbone_flops_equal_the_conv_count_by_hand():
    """XLA's FLOPs of the backbone compiled alone = 2 x the convs' multiply-adds, plus the
    element-wise work around them: frozen norm (multiply, add), ReLU, the padding masks and
    the residual adds (at most 6 per conv output element) and the 3x3 max-pool (9 per output
    element). Measured on this 64x96 tiny ResNet: XLA - convs = 4.8 per conv output element,
    2.8% of the conv FLOPs; a conv counted wrong (a missing one, or padding taps counted)
    moves the figure by more than the element-wise slack (0.8% of the conv FLOPs)."""
    report = flops.analyze(TINY, canvas_hw=(64, 96), stages=("backbone",), whole=False)
    (row,) = report.rows
    macs, conv_outputs, pool_outputs = resnet_by_hand((64, 96), 26, 16)
    assert 2 * macs <= row.flops <= 2 * macs + 6 * conv_outputs + 9 * pool_outputs, (
        row.flops, 2 * macs)
    assert row.flops / (2 * macs) - 1 < 0.035
    text = flops.format_report(report)
    assert f"| backbone | {row.params.total:,} | {row.flops / 1e9:,.2f} |" in text


def test_param_counts_are_the_tree_and_torchvisions():
    """The table's parameters are the params tree's sizes, split by stage with nothing left
    out; torchvision's R50-FPN counts (its weights' metadata, and a model built here) are the
    tree less what PyTorch keeps as buffers."""
    from torchvision.models.detection import (
        MaskRCNN_ResNet50_FPN_V2_Weights,
        MaskRCNN_ResNet50_FPN_Weights,
        maskrcnn_resnet50_fpn,
    )

    for name in ("torchvision_maskrcnn_r50_fpn", "torchvision_maskrcnn_r50_fpn_v2"):
        shapes = param_shapes(PRESETS[name]())
        count = flops.count_params(shapes)
        assert count.total == sum(math.prod(s) for _, s in flatten_tree(shapes))
        by_stage = [flops.count_params({k: shapes[k] for k in flops.STAGE_PARAMS[s]}).total
                    for s in flops.STAGES]
        assert sum(by_stage) == count.total
        if name.endswith("v2"):  # torchvision's figure for v2 counts BatchNorm2d's weight, bias
            v2 = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["num_params"]
            assert count.total - count.norm_stats == v2 == 46_359_409
        else:  # ... and for v1 FrozenBatchNorm2d's (all buffers)
            v1 = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["num_params"]
            assert count.total - count.frozen_norm == v1 == 44_401_393
            built = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)  # BatchNorm2d
            assert count.total - count.norm_stats == sum(p.numel() for p in built.parameters())


def test_cli_errors(capsys):
    assert flops.main(["no_such_model"]) == 1
    err = capsys.readouterr().err
    assert "neither a file nor a preset name" in err and "torchvision_maskrcnn_r50_fpn" in err
    with pytest.raises(SystemExit):
        flops.main(["torchvision_maskrcnn_r50_fpn", "--batch", "0"])
