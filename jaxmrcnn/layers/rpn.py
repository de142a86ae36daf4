"""RPN head: shared 3x3 conv(s) + ReLU, then 1x1 objectness (A) and 1x1 deltas (4A)."""

from __future__ import annotations

import flax.linen as nn

from jaxmrcnn.layers.common import apply_mask, conv, spatial_mask


class RPNHead(nn.Module):
    num_anchors: int
    num_convs: int = 1

    @nn.compact
    def __call__(self, feats, strides, valid_hw=None):
        """feats: list of `[B, H, W, C]` -> lists of logits `[B, H*W*A]`, deltas `[B, H*W*A, 4]`.

        The flatten order is (H, W, A), A fastest; delta channels are anchor-major
        (channel = a * 4 + k), as in every framework's checkpoint.
        """
        c = feats[0].shape[-1]
        convs = [conv(c, 3, name=f"conv_{i}") for i in range(self.num_convs)]
        cls = conv(self.num_anchors, 1, name="cls_logits")
        reg = conv(4 * self.num_anchors, 1, name="bbox_pred")
        logits, deltas = [], []
        for x, s in zip(feats, strides, strict=True):
            m = spatial_mask(valid_hw, x.shape[1:3], s)
            for cv in convs:
                x = nn.relu(cv(apply_mask(x, m)))
            b, h, w, _ = x.shape
            logits.append(cls(x).reshape(b, h * w * self.num_anchors))
            deltas.append(reg(x).reshape(b, h * w * self.num_anchors, 4))
        return logits, deltas
