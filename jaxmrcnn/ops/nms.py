"""Exact greedy non-maximum suppression with static shapes.

Contract (same as torchvision.ops.nms / batched_nms followed by `keep[:max_output]`):

    sort the valid boxes by score, descending; ties keep the lower index first (stable)
    for each box j in that order: keep j unless an earlier *kept* box i of the same class
        has IoU(i, j) > iou_threshold (strict, float32 IoU without epsilon, computed as
        torchvision's CPU kernel does)
    return the first `max_output` kept indices, padded: `(indices [K], valid [K])`

Padded slots hold index 0 and `valid=False`; always read `valid`.

Algorithm (tiled greedy with a kept buffer and early exit):

    order = stable argsort of (-score); boxes visited in tiles of T
    kept = []                                  # at most K boxes, a static buffer
    for tile in tiles, while len(kept) < K and the tile holds a valid box:
        alive = valid & not suppressed by any box in `kept`         # [T, K] IoU
        A[i, j] = IoU(tile_i, tile_j) > thr & i < j & same class    # [T, T]
        keep = fixed point of keep_j = alive_j & not any_i (A[i, j] & keep_i)
        append kept tile boxes to `kept` (up to K)

Large inputs (N > 2 * C, C = `prefilter`, default max(4096, 8 K)) first take the C best
valid boxes with `lax.top_k` (which is stable, like the sort) and run the loop on those: the
result is provably the same whenever all valid boxes fit in C or K boxes were kept among
them, and otherwise (checked at run time) the full sort runs instead, so it is always exact.
For the box head's 1000 x 80 candidates this replaces an 80k-element sort by a top-k.

The fixed point is reached in at most T iterations (after k sweeps the first k entries are
final) and equals the greedy result, so the output is exactly torchvision's. The IoU
threshold is compared the way the CPU kernel compares a float IoU with a double threshold:
`iou > t` with t the largest float32 <= thr.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmrcnn.ops._checks import (
    check_boxes,
    check_non_negative_int,
    check_positive_int,
    check_shape_prefix,
)


def float32_threshold(thr: float) -> np.float32:
    """The largest float32 t <= thr, so that `iou > t` in float32 == `iou > thr` in float64."""
    thr = float(thr)
    t = np.float32(thr)
    if float(t) > thr:
        t = np.nextafter(t, np.float32(-np.inf))
    return t


def _pairwise_iou(a, b, one):
    """torchvision nms_kernel.cpp IoU: `a [T, 4]`, `b [K, 4]` -> `[T, K]`."""
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    xx1 = jnp.maximum(a[:, None, 0], b[None, :, 0])
    yy1 = jnp.maximum(a[:, None, 1], b[None, :, 1])
    xx2 = jnp.minimum(a[:, None, 2], b[None, :, 2])
    yy2 = jnp.minimum(a[:, None, 3], b[None, :, 3])
    w = jnp.maximum(xx2 - xx1 + one, 0.0)
    h = jnp.maximum(yy2 - yy1 + one, 0.0)
    inter = w * h
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _nms_single(boxes, scores, valid, classes, *, thr, max_output, tile, legacy, ge):
    """Core on one set: boxes [N, 4], scores/valid/classes [N] -> (idx [K], valid [K])."""
    n = boxes.shape[0]
    k = max_output
    t = min(tile, max(n, 1))
    n_tiles = -(-n // t) if n else 0
    npad = n_tiles * t
    one = 1.0 if legacy else 0.0

    # Valid boxes first (also those scored -inf or NaN, which the early exit below relies on),
    # then by descending score, ties by lower index (lexsort is stable).
    order = jnp.lexsort((-scores, ~valid)).astype(jnp.int32)  # [N]
    pad = npad - n
    bs = jnp.pad(boxes[order], ((0, pad), (0, 0)))  # [Np, 4]
    vs = jnp.pad(valid[order], (0, pad))  # [Np]
    cs = jnp.pad(classes[order], (0, pad))  # [Np]
    n_valid = jnp.sum(valid.astype(jnp.int32))

    def over(iou):
        return iou >= thr if ge else iou > thr

    ar_t = jnp.arange(t)
    upper = ar_t[:, None] < ar_t[None, :]  # [T, T] i < j
    ar_k = jnp.arange(k)

    def cond(state):
        ti, n_kept = state[0], state[1]
        return (ti < n_tiles) & (n_kept < k) & (ti * t < n_valid)

    def body(state):
        ti, n_kept, kept_pos, kept_boxes, kept_cls = state
        start = ti * t
        tb = jax.lax.dynamic_slice_in_dim(bs, start, t)  # [T, 4]
        tv = jax.lax.dynamic_slice_in_dim(vs, start, t)  # [T]
        tc = jax.lax.dynamic_slice_in_dim(cs, start, t)  # [T]
        # Suppression by boxes kept in earlier tiles.
        iou_k = _pairwise_iou(tb, kept_boxes, one)  # [T, K]
        hit_k = over(iou_k) & (ar_k < n_kept)[None, :] & (tc[:, None] == kept_cls[None, :])
        alive = tv & ~jnp.any(hit_k, axis=1)
        # Greedy within the tile, as a fixed point.
        a = over(_pairwise_iou(tb, tb, one)) & upper & (tc[:, None] == tc[None, :])  # [T, T]
        a_f = a.astype(jnp.float32)

        def fp_cond(s):
            return s[1]

        def fp_body(s):
            keep = s[0]
            sup = jnp.dot(keep.astype(jnp.float32), a_f) > 0  # [T]
            new = alive & ~sup
            return new, jnp.any(new != keep)

        keep, _ = jax.lax.while_loop(fp_cond, fp_body, (alive, jnp.array(True)))
        csum = jnp.cumsum(keep.astype(jnp.int32))
        keep = keep & (n_kept + csum <= k)
        slot = jnp.where(keep, n_kept + csum - 1, k)  # k = dropped
        kept_pos = kept_pos.at[slot].set(start + ar_t.astype(jnp.int32), mode="drop")
        kept_boxes = kept_boxes.at[slot].set(tb, mode="drop")
        kept_cls = kept_cls.at[slot].set(tc, mode="drop")
        n_kept = n_kept + jnp.sum(keep.astype(jnp.int32))
        return ti + 1, n_kept, kept_pos, kept_boxes, kept_cls

    state = (
        jnp.array(0, jnp.int32),
        jnp.array(0, jnp.int32),
        jnp.zeros((k,), jnp.int32),
        jnp.zeros((k, 4), boxes.dtype),
        jnp.zeros((k,), classes.dtype),
    )
    if n_tiles:
        state = jax.lax.while_loop(cond, body, state)
    _, n_kept, kept_pos, _, _ = state
    out_valid = ar_k < n_kept
    idx = jnp.where(out_valid, order[jnp.minimum(kept_pos, max(n - 1, 0))] if n else 0, 0)
    return idx.astype(jnp.int32), out_valid


def nms(
    boxes,
    scores,
    iou_threshold: float,
    max_output: int,
    *,
    valid=None,
    classes=None,
    tile: int = 128,
    legacy: bool = False,
    suppress_equal: bool = False,
    prefilter: int | None = None,
):
    """Greedy NMS with a fixed output size.

    boxes:   `[..., N, 4]` float (x1, y1, x2, y2); leading dimensions are batched.
    scores:  `[..., N]`.
    valid:   `[..., N]` bool, boxes that take part (default: all).
    classes: `[..., N]` int; when given, only boxes of the same class suppress each other
             (class-aware / batched NMS).
    iou_threshold: a Python float (static).
    max_output: K, the static number of output slots.
    legacy:  +1 box sizes (maskrcnn-benchmark / Detectron).
    suppress_equal: suppress when IoU >= float32(threshold) (maskrcnn-benchmark's CPU kernel).
    prefilter: C, candidates taken by top-k before the loop for large N (see the module
             docstring; a speed knob, results do not depend on it); 0 disables it.

    Returns `(indices [..., K] int32, valid [..., K] bool)`, kept boxes in descending score
    order (ties: lower index first).
    """
    check_boxes("boxes", boxes)
    if boxes.ndim < 2:
        raise ValueError(f"boxes must have shape [..., N, 4], got {tuple(boxes.shape)}")
    lead = boxes.shape[:-1]
    check_shape_prefix("scores", scores, lead, "boxes [..., N]")
    if scores.ndim != boxes.ndim - 1:
        raise ValueError(f"scores must have shape {lead}, got {tuple(scores.shape)}")
    check_positive_int("max_output", max_output)
    check_positive_int("tile", tile)
    if not isinstance(iou_threshold, (int, float, np.floating)):
        raise ValueError(
            f"iou_threshold must be a Python float, got {type(iou_threshold).__name__}"
        )
    if valid is None:
        valid = jnp.ones(lead, bool)
    elif tuple(valid.shape) != tuple(lead):
        raise ValueError(f"valid must have shape {lead}, got {tuple(valid.shape)}")
    if classes is None:
        classes = jnp.zeros(lead, jnp.int32)
    elif tuple(classes.shape) != tuple(lead):
        raise ValueError(f"classes must have shape {lead}, got {tuple(classes.shape)}")

    # `>`: torchvision compares the float IoU with a double threshold; `>=`: maskrcnn-benchmark's
    # CPU kernel compares it with a C float (csrc/nms.h), i.e. with float32(thr).
    thr = np.float32(iou_threshold) if suppress_equal else float32_threshold(iou_threshold)
    def core(b, s, v, c):  # one set: [N, 4], [N], [N], [N]
        return _nms_single(
            b, s, v.astype(bool), c, thr=thr, max_output=max_output, tile=tile,
            legacy=legacy, ge=suppress_equal,
        )

    fn = core
    n = boxes.shape[-2]
    cand = max(4096, 8 * max_output) if prefilter is None else prefilter
    check_non_negative_int("prefilter", cand)

    def fast(b, s, v, c):  # the loop on the `cand` best valid boxes, and whether it is exact
        regular = jnp.all(~v | (s > -jnp.inf))  # no NaN or -inf among the valid scores
        _, top = jax.lax.top_k(jnp.where(v & regular, s, -jnp.inf), cand)  # [C]
        idx, ok = core(b[top], s[top], v[top], c[top])
        n_valid = jnp.sum(v.astype(jnp.int32))
        exact = regular & ((n_valid <= cand) | (jnp.sum(ok.astype(jnp.int32)) == max_output))
        return top[idx], ok, exact

    for _ in range(boxes.ndim - 2):
        fn = jax.vmap(fn)
        fast = jax.vmap(fast)
    args = (boxes, scores.astype(boxes.dtype), valid, classes)
    if not 0 < cand or n <= 2 * cand:
        return fn(*args)
    idx, ok, exact = fast(*args)
    return jax.lax.cond(jnp.all(exact), lambda: (idx, ok), lambda: fn(*args))


def batched_nms(boxes, scores, classes, iou_threshold: float, max_output: int, **kwargs):
    """Class-aware NMS: boxes of different `classes [..., N]` never suppress each other."""
    return nms(boxes, scores, iou_threshold, max_output, classes=classes, **kwargs)


def torchvision_offset_boxes(boxes, classes, valid, *, max_boxes: int = 1000):
    """The boxes torchvision's `batched_nms` actually compares, for bit-exact emulation.

    torchvision (CPU) runs the per-class loop when it gets more than `max_boxes` boxes and
    otherwise the "coordinate trick": boxes + class * (max coordinate + 1), whose IoUs differ
    from the unshifted ones in the last bits. Given `boxes [..., N, 4]`, `classes [..., N]` and
    the `valid [..., N]` boxes that torchvision would have been passed, this returns the
    shifted boxes where torchvision shifts them and `boxes` unchanged otherwise.
    """
    check_boxes("boxes", boxes)
    n_valid = jnp.sum(valid, axis=-1, keepdims=True)  # [..., 1]
    max_coord = jnp.max(jnp.where(valid[..., None], boxes, -jnp.inf), axis=(-2, -1))
    max_coord = max_coord[..., None]  # [..., 1]
    offsets = classes.astype(boxes.dtype) * (max_coord + 1.0)  # [..., N]
    use_trick = (n_valid <= max_boxes) & (n_valid > 0)
    return jnp.where(use_trick[..., None], boxes + offsets[..., None], boxes)
