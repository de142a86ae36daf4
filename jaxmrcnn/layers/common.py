"""Small building blocks shared by the layers: conv, frozen norm, spatial validity masks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class FrozenNorm(nn.Module):
    """Inference-time BatchNorm: y = x * scale + shift, scale = w / sqrt(var + eps),
    shift = b - mean * scale (torchvision FrozenBatchNorm2d / BatchNorm2d in eval mode;
    maskrcnn-benchmark with eps = 0). `affine=True` is Detectron's AffineChannel: y = x * w + b.

    Params: `weight`, `bias` and, unless affine, `mean`, `var` (all `[C]`).
    """

    eps: float = 0.0
    affine: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (c,))
        b = self.param("bias", nn.initializers.zeros, (c,))
        if self.affine:
            return x * w + b
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        scale = w * jax.lax.rsqrt(var + self.eps)
        shift = b - mean * scale
        return x * scale + shift


def conv(features, kernel, stride=1, *, bias=True, groups=1, name=None, dilation=1):
    """A PyTorch-style Conv2d: symmetric padding kernel // 2, NHWC, HWIO kernel."""
    pad = (kernel // 2) * dilation
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        feature_group_count=groups,
        kernel_dilation=(dilation, dilation),
        name=name,
    )


def spatial_mask(valid_hw, shape_hw, stride):
    """`[B, H, W, 1]` float mask of the valid region at a feature stride, or None.

    valid_hw: `[B, 2]` per-image valid (padded) size in input pixels, or None when every
    image fills its canvas. The valid feature size is ceil(valid / stride).
    """
    if valid_hw is None:
        return None
    h, w = shape_hw
    vh = -(-valid_hw[:, 0] // stride)
    vw = -(-valid_hw[:, 1] // stride)
    m = (jnp.arange(h)[None, :, None] < vh[:, None, None]) & (
        jnp.arange(w)[None, None, :] < vw[:, None, None]
    )
    return m[..., None].astype(jnp.float32)


def apply_mask(x, mask):
    return x if mask is None else x * mask.astype(x.dtype)
