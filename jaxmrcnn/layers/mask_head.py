"""Mask head: 4 x (conv3x3 [+ norm] + ReLU) -> 2x2 stride-2 transposed conv + ReLU -> 1x1
logits, evaluated only for each ROI's own class."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxmrcnn.layers.fpn import ConvNorm


class MaskHead(nn.Module):
    num_classes: int
    num_convs: int = 4
    conv_dim: int = 256
    norm: str | None = None
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, labels):
        """x: pooled `[N, 14, 14, C]`, labels: `[N]` class index -> mask logits `[N, 28, 28]`."""
        for i in range(self.num_convs):
            x = ConvNorm(self.conv_dim, 3, self.norm, self.eps, relu=True, name=f"fcn_{i}")(x)
        n, h, w, c = x.shape
        # ConvTranspose2d(k=2, s=2, p=0): out[2i + a, 2j + b] = sum_c x[i, j, c] K[a, b, c, o].
        # Kernel layout [a, b, in, out] (PyTorch's [in, out, a, b] transposed, no flip).
        k = self.param("deconv_kernel", nn.initializers.lecun_normal(), (2, 2, c, self.conv_dim))
        bias = self.param("deconv_bias", nn.initializers.zeros, (self.conv_dim,))
        y = jnp.einsum("nijc,abco->niajbo", x, k) + bias
        y = nn.relu(y.reshape(n, 2 * h, 2 * w, self.conv_dim))
        # 1x1 predictor, only for the ROI's class: [N, 2H, 2W, C] . [N, C] -> [N, 2H, 2W].
        wl = self.param(
            "logits_kernel", nn.initializers.lecun_normal(), (self.conv_dim, self.num_classes)
        )
        bl = self.param("logits_bias", nn.initializers.zeros, (self.num_classes,))
        w_sel = jnp.take(wl.T, labels, axis=0)  # [N, C]
        return jnp.einsum("nhwc,nc->nhw", y, w_sel) + jnp.take(bl, labels)[:, None, None]
