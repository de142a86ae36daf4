"""Matching two sets of detections, e.g. ours and the source framework's on the same image
(used by the parity tests and by `eval/coco.py --reference`)."""

from __future__ import annotations

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 IoU `[N, M]` of xyxy boxes."""
    a = a.astype(np.float64)[:, None]
    b = b.astype(np.float64)[None]
    lt = np.maximum(a[..., :2], b[..., :2])
    rb = np.minimum(a[..., 2:], b[..., 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[..., 2:] - x[..., :2], axis=-1)  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), (union == 0) * 1.0)


def match_detections(ref, ours, *, iou=0.99, score_tol=1e-3, labels=True):
    """Greedy one-to-one matching of reference detections (dicts with boxes [N, 4], scores
    [N], labels [N]) to ours: same label, box IoU >= `iou`, |score diff| <= score_tol.
    Returns (pairs [(i_ref, i_ours)], fraction of the reference matched)."""
    ref, ours = _as_dict(ref), _as_dict(ours)
    rb, ob = np.asarray(ref["boxes"]), np.asarray(ours["boxes"])
    if len(rb) == 0:
        return [], 1.0 if len(ob) == 0 else 0.0
    if len(ob) == 0:
        return [], 0.0
    m = iou_matrix(rb, ob)
    ok = m >= iou
    ok &= np.abs(np.asarray(ref["scores"])[:, None] - np.asarray(ours["scores"])[None]) <= score_tol
    if labels:
        ok &= np.asarray(ref["labels"])[:, None] == np.asarray(ours["labels"])[None]
    used = np.zeros(len(ob), bool)
    pairs = []
    for i in np.argsort(-np.asarray(ref["scores"]), kind="stable"):
        cand = np.where(ok[i] & ~used)[0]
        if len(cand):
            j = cand[np.argmax(m[i, cand])]
            used[j] = True
            pairs.append((int(i), int(j)))
    return pairs, len(pairs) / len(rb)


def _as_dict(d):
    if isinstance(d, dict):
        return d
    return {"boxes": d.boxes, "scores": d.scores, "labels": d.labels}


def matched_box_error(ref, ours, pairs) -> float:
    """Max |ours - ref| in pixels over every coordinate of the matched pairs
    `[(i_ref, i_ours)]` of `match_detections` (0.0 when nothing matched). IoU >= 0.99 alone
    lets a large box move by a pixel or more; this bounds the coordinates themselves, so a
    half-pixel or +1 convention slip shows."""
    rb, ob = np.asarray(_as_dict(ref)["boxes"]), np.asarray(_as_dict(ours)["boxes"])
    if not len(pairs):
        return 0.0
    i, j = np.asarray(pairs, np.int64).T
    return float(np.abs(rb[i].astype(np.float64) - ob[j].astype(np.float64)).max())
