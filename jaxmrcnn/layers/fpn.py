"""Feature pyramid network: lateral 1x1 + top-down nearest x2 + output 3x3; P6 = P5[::2, ::2]
(max-pool kernel 1 stride 2, as all five frameworks)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxmrcnn.config import FPNConfig
from jaxmrcnn.layers.common import FrozenNorm, apply_mask, conv, spatial_mask


def upsample_nearest(x, shape_hw):
    """PyTorch F.interpolate(mode="nearest", size=shape_hw): src = floor(dst * in / out)."""
    h, w = x.shape[1:3]
    oh, ow = shape_hw
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    iy = jnp.minimum(jnp.floor(jnp.arange(oh) * jnp.float32(h / oh)).astype(jnp.int32), h - 1)
    ix = jnp.minimum(jnp.floor(jnp.arange(ow) * jnp.float32(w / ow)).astype(jnp.int32), w - 1)
    return x[:, iy][:, :, ix]


class ConvNorm(nn.Module):
    """Conv (+ bias, or + frozen BatchNorm when `norm == "bn"`) (+ ReLU)."""

    features: int
    kernel: int
    norm: str | None = None
    eps: float = 1e-5
    relu: bool = False

    @nn.compact
    def __call__(self, x):
        x = conv(self.features, self.kernel, bias=self.norm is None, name="conv")(x)
        if self.norm == "bn":
            x = FrozenNorm(self.eps, name="bn")(x)
        elif self.norm is not None:
            raise ValueError(f"norm must be None or 'bn', got {self.norm!r}")
        return nn.relu(x) if self.relu else x


class FPN(nn.Module):
    cfg: FPNConfig

    @nn.compact
    def __call__(self, feats, valid_hw=None):
        """feats: {"c2".."c5"} -> {"p2".."p6"}, each `[B, H/s, W/s, out_channels]`."""
        cfg = self.cfg
        names = ["c2", "c3", "c4", "c5"]
        strides = [4, 8, 16, 32]
        lateral = [
            ConvNorm(cfg.out_channels, 1, cfg.norm, cfg.norm_eps, name=f"inner_{i}")
            for i in range(4)
        ]
        output = [
            ConvNorm(cfg.out_channels, 3, cfg.norm, cfg.norm_eps, name=f"layer_{i}")
            for i in range(4)
        ]
        results = [None] * 4
        last = lateral[3](feats[names[3]])
        results[3] = output[3](apply_mask(last, spatial_mask(valid_hw, last.shape[1:3], 32)))
        for i in (2, 1, 0):
            lat = lateral[i](feats[names[i]])
            last = lat + upsample_nearest(last, lat.shape[1:3])
            m = spatial_mask(valid_hw, last.shape[1:3], strides[i])
            results[i] = output[i](apply_mask(last, m))
        out = {f"p{i + 2}": r for i, r in enumerate(results)}
        out["p6"] = results[3][:, ::2, ::2]
        return out
