"""ResNet / ResNeXt bottleneck backbone (torchvision, Detectron2, maskrcnn-benchmark layouts).

Returns the stage outputs C2..C5 (strides 4..32). Frozen norms throughout (inference and
fine-tuning with frozen statistics, as every Mask R-CNN framework does).

Spatial masks: images padded into a canvas larger than their own padded size are computed
exactly as if alone, by zeroing the region beyond each image's valid size at the input of
every convolution that looks at its neighbours (3x3 with stride 1). Strided 3x3 convs, the
stem and the max-pool never read past the valid region when sizes are multiples of 32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmrcnn.config import BackboneConfig
from jaxmrcnn.layers.common import FrozenNorm, GroupedConv3x3, apply_mask, conv, spatial_mask

BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def max_pool_3x3_s2(x):
    """PyTorch MaxPool2d(3, stride=2, padding=1): pads with -inf.  [B, H, W, C]"""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


class Bottleneck(nn.Module):
    planes: int  # output channels / 4
    width: int  # channels of the 3x3 conv
    stride: int
    groups: int
    stride_in_1x1: bool
    downsample: bool
    norm_eps: float
    affine: bool

    @nn.compact
    def __call__(self, x, valid_hw=None, in_stride=1):
        norm = lambda name: FrozenNorm(self.norm_eps, self.affine, name=name)  # noqa: E731
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        out = conv(self.width, 1, s1, bias=False, name="conv1")(x)
        out = nn.relu(norm("bn1")(out))
        if s3 == 1:
            out = apply_mask(out, spatial_mask(valid_hw, out.shape[1:3], in_stride * s1))
        if self.groups > 1:  # ResNeXt: XLA's grouped conv is slow on CPU (see GroupedConv3x3)
            out = GroupedConv3x3(self.width, s3, self.groups, name="conv2")(out)
        else:
            out = conv(self.width, 3, s3, bias=False, name="conv2")(out)
        out = nn.relu(norm("bn2")(out))
        out = conv(self.planes * 4, 1, bias=False, name="conv3")(out)
        out = norm("bn3")(out)
        if self.downsample:
            x = conv(self.planes * 4, 1, self.stride, bias=False, name="downsample_conv")(x)
            x = norm("downsample_bn")(x)
        return nn.relu(out + x)


class ResNet(nn.Module):
    cfg: BackboneConfig

    @nn.compact
    def __call__(self, x, valid_hw=None):
        """x: `[B, H, W, 3]` normalized, H and W multiples of 32 -> {"c2".."c5"}."""
        cfg = self.cfg
        if cfg.depth not in BLOCKS:
            raise ValueError(f"backbone depth must be one of {sorted(BLOCKS)}, got {cfg.depth}")
        if cfg.norm not in ("frozen_bn", "affine"):
            raise ValueError(f"backbone norm must be 'frozen_bn' or 'affine', got {cfg.norm!r}")
        affine = cfg.norm == "affine"
        x = conv(cfg.base_channels, 7, 2, bias=False, name="conv1")(x)
        x = nn.relu(FrozenNorm(cfg.norm_eps, affine, name="bn1")(x))
        x = max_pool_3x3_s2(x)
        outs = {}
        stride = 4
        for stage, n_blocks in enumerate(BLOCKS[cfg.depth]):
            planes = cfg.base_channels * 2**stage
            width = int(planes * (cfg.width_per_group / 64.0)) * cfg.groups
            for b in range(n_blocks):
                block_stride = 2 if (b == 0 and stage > 0) else 1
                x = Bottleneck(
                    planes=planes,
                    width=width,
                    stride=block_stride,
                    groups=cfg.groups,
                    stride_in_1x1=cfg.stride_in_1x1,
                    downsample=(b == 0),
                    norm_eps=cfg.norm_eps,
                    affine=affine,
                    name=f"layer{stage + 1}_{b}",
                )(x, valid_hw, stride)
                stride *= block_stride
            outs[f"c{stage + 2}"] = x
        return outs
