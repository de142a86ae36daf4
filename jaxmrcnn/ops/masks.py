"""Paste M x M mask probabilities into full-image masks, with static shapes.

Both reference methods are separable bilinear resamplings, so each mask is pasted as two
small matmuls, `Wy [H, P] @ mask [P, P] @ Wx[W, P]^T`, with interpolation matrices built
per axis:

"torchvision" (torchvision `paste_masks_in_image`, maskrcnn-benchmark `Masker`, Detectron):
    pad the mask by 1 px of zeros (P = M + 2); expand the box about its centre by P / M;
    truncate the corners to integers (toward zero); resize the padded mask to
    (y2 - y1 + 1, x2 - x1 + 1) with bilinear, align_corners=False; place it at (x1, y1),
    clipped to the image. For image column X and j = X - x1, w = max(x2 - x1 + 1, 1):
        s = max((P / w) * (j + 0.5) - 0.5, 0); i0 = int(s); i1 = i0 + (i0 < P - 1)
        Wx[X, i0] += 1 - (s - i0); Wx[X, i1] += s - i0      (only for x1 <= X <= x2)
"detectron2" (detectron2 / mmdet `_do_paste_mask`): grid_sample with align_corners=False
    and zero padding at pixel centres: g = (X + 0.5 - x1) / (x2 - x1) * 2 - 1,
        s = (g + 1) * (M / 2) - 0.5 (torch CPU); i0 = floor(s)
        Wx[X, i0] += i0 + 1 - s; Wx[X, i0 + 1] += s - i0   (taps outside [0, M) dropped)

Masks are produced `chunk` at a time and thresholded inside the loop, so a full float
`[N, H, W]` array never exists unless `threshold=None` asks for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmrcnn.ops._checks import check_boxes, check_choice, check_positive_int, check_rank

PASTE_METHODS = ("torchvision", "detectron2")


def _torchvision_weights(lo, hi, size, length, padded):
    """Interpolation matrix `[N, length, padded]` along one axis (torchvision method)."""
    w = jnp.maximum(hi - lo + 1, 1)  # [N] int
    scale = padded / w.astype(jnp.float32)  # float32, as (float)in / out
    pos = jnp.arange(length, dtype=jnp.int32)  # image coordinate X
    j = (pos[None, :] - lo[:, None]).astype(jnp.float32)  # [N, L]
    s = jnp.maximum(scale[:, None] * (j + 0.5) - 0.5, 0.0)
    i0 = s.astype(jnp.int32)
    i1 = i0 + (i0 < padded - 1).astype(jnp.int32)
    l1 = s - i0.astype(jnp.float32)
    l0 = 1.0 - l1
    inside = (pos[None, :] >= lo[:, None]) & (pos[None, :] <= hi[:, None])
    inside = inside & (pos[None, :] < size[:, None])
    cols = jnp.arange(padded, dtype=jnp.int32)
    wmat = (cols == i0[..., None]) * l0[..., None] + (cols == i1[..., None]) * l1[..., None]
    return jnp.where(inside[..., None], wmat, 0.0)


def _detectron2_weights(lo, hi, size, length, m):
    """Interpolation matrix `[N, length, m]` along one axis (grid_sample method)."""
    pos = jnp.arange(length, dtype=jnp.float32) + 0.5
    g = (pos[None, :] - lo[:, None]) / (hi - lo)[:, None] * 2.0 - 1.0  # [N, L]
    s = (g + 1.0) * (m / 2.0) - 0.5
    i0f = jnp.floor(s)
    i0 = jnp.where(jnp.isfinite(i0f), jnp.clip(i0f, -2, m + 1), -2).astype(jnp.int32)
    w1 = s - i0f
    w0 = 1.0 - w1  # (i0 + 1) - s
    cols = jnp.arange(m, dtype=jnp.int32)
    wmat = (cols == i0[..., None]) * w0[..., None] + (cols == (i0 + 1)[..., None]) * w1[..., None]
    inside = jnp.arange(length)[None, :] < size[:, None]
    return jnp.where(inside[..., None] & jnp.isfinite(s)[..., None], wmat, 0.0)


def paste_masks(
    masks,
    boxes,
    out_hw: tuple[int, int],
    *,
    method: str = "torchvision",
    image_hw=None,
    threshold: float | None = 0.5,
    strict: bool = False,
    padding: int = 1,
    chunk: int = 10,
):
    """Pastes `masks [N, M, M]` (probabilities) at `boxes [N, 4]` into `[N, H, W]` images.

    out_hw:    static (H, W) canvas; pixels at or beyond `image_hw` are 0 (False).
    image_hw:  `[2]` actual image size (may be traced), default `out_hw`.
    threshold: None returns float probabilities; otherwise bool `p >= threshold`
               (`p > threshold` if `strict`). torchvision returns probabilities (users take
               `>= 0.5` or `> 0.5`), maskrcnn-benchmark and Detectron use `> 0.5`,
               detectron2 and mmdet `>= 0.5`.
    padding:   zero border added before resizing ("torchvision" method only).
    """
    check_choice("paste method", method, PASTE_METHODS)
    check_rank("masks", masks, 3)
    check_boxes("boxes", boxes, rank=2)
    if masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"masks has {masks.shape[0]} entries but boxes has {boxes.shape[0]}")
    if masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be square [N, M, M], got {tuple(masks.shape)}")
    if len(out_hw) != 2 or any(int(s) <= 0 for s in out_hw):
        raise ValueError(f"out_hw must be two positive ints, got {out_hw!r}")
    check_positive_int("chunk", chunk)
    h, w = int(out_hw[0]), int(out_hw[1])
    n, m = masks.shape[0], masks.shape[1]
    if image_hw is None:
        image_hw = jnp.array([h, w], jnp.int32)
    image_hw = jnp.asarray(image_hw, jnp.int32)
    masks = masks.astype(jnp.float32)
    boxes = boxes.astype(jnp.float32)

    if method == "torchvision":
        padded = m + 2 * padding
        scale = float(padded) / m
        w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
        h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
        x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
        y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
        ib = jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
        ib = jnp.clip(jnp.nan_to_num(ib), -(2.0**30), 2.0**30).astype(jnp.int32)  # trunc
        src = jnp.pad(masks, ((0, 0), (padding, padding), (padding, padding)))

        def weights(bx):
            wy = _torchvision_weights(bx[:, 1], bx[:, 3], image_hw[None, 0], h, padded)
            wx = _torchvision_weights(bx[:, 0], bx[:, 2], image_hw[None, 1], w, padded)
            return wy, wx

        wbox = ib
    else:
        src = masks

        def weights(bx):
            wy = _detectron2_weights(bx[:, 1], bx[:, 3], image_hw[None, 0], h, m)
            wx = _detectron2_weights(bx[:, 0], bx[:, 2], image_hw[None, 1], w, m)
            return wy, wx

        wbox = boxes

    n_pad = -(-n // chunk) * chunk

    def one_chunk(args):
        src_c, box_c = args  # [k, P, P], [k, 4]
        wy, wx = weights(box_c)  # [k, H, P], [k, W, P]
        rows = jnp.einsum("khp,kpq->khq", wy, src_c)
        out = jnp.einsum("khq,kwq->khw", rows, wx)
        if threshold is None:
            return out
        return out > threshold if strict else out >= threshold

    def padded_(x):
        return jnp.pad(x, [(0, n_pad - n)] + [(0, 0)] * (x.ndim - 1))

    args = (
        padded_(src).reshape((n_pad // chunk, chunk) + src.shape[1:]),
        padded_(wbox).reshape(n_pad // chunk, chunk, 4),
    )
    out = jax.lax.map(one_chunk, args)
    return out.reshape((n_pad, h, w))[:n]
