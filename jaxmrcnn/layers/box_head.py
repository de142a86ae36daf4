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


def box_reg_rows(box_reg: str, num_classes: int) -> int:
    """Classes the box regressor predicts deltas for (see ROIHeadsConfig.box_reg)."""
    rows = {"per_class": num_classes, "per_foreground_class": num_classes - 1, "agnostic": 1}
    if box_reg not in rows:
        raise ValueError(f"box_reg must be one of {sorted(rows)}, got {box_reg!r}")
    return rows[box_reg]


class BoxPredictor(nn.Module):
    num_classes: int  # including background
    box_reg: str = "per_class"

    @nn.compact
    def __call__(self, x):
        """`[N, D]` -> class logits `[N, K]`, deltas `[N, G, 4]` (class-major rows; G per
        `box_reg_rows`)."""
        g = box_reg_rows(self.box_reg, self.num_classes)
        logits = nn.Dense(self.num_classes, name="cls_score")(x)
        deltas = nn.Dense(g * 4, name="bbox_pred")(x)
        return logits, deltas.reshape(x.shape[0], g, 4)
