"""Box head (2fc, or 4conv1fc with norm) and the class / box predictor."""

from __future__ import annotations

import flax.linen as nn

from jaxmrcnn.layers.fpn import ConvNorm


class BoxHead(nn.Module):
    """Pooled ROI features `[N, 7, 7, C]` -> `[N, fc_dim]`.

    The flatten is NHWC (y, x, c); the converter permutes fc weights from PyTorch's (c, y, x).
    """

    kind: str = "2fc"  # "2fc" (fc6, fc7) | "4conv1fc" (4 x conv3x3 + norm, fc)
    fc_dim: int = 1024
    conv_dim: int = 256
    norm: str | None = None
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        if self.kind == "2fc":
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(self.fc_dim, name="fc6")(x))
            return nn.relu(nn.Dense(self.fc_dim, name="fc7")(x))
        if self.kind == "4conv1fc":
            for i in range(4):
                x = ConvNorm(self.conv_dim, 3, self.norm, self.eps, relu=True, name=f"conv_{i}")(x)
            x = x.reshape(x.shape[0], -1)
            return nn.relu(nn.Dense(self.fc_dim, name="fc")(x))
        raise ValueError(f"box head kind must be '2fc' or '4conv1fc', got {self.kind!r}")


class BoxPredictor(nn.Module):
    num_classes: int  # including background

    @nn.compact
    def __call__(self, x):
        """`[N, D]` -> class logits `[N, K]`, deltas `[N, K, 4]` (class-major rows)."""
        logits = nn.Dense(self.num_classes, name="cls_score")(x)
        deltas = nn.Dense(self.num_classes * 4, name="bbox_pred")(x)
        return logits, deltas.reshape(x.shape[0], self.num_classes, 4)
