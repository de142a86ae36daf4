"""Comparison helpers for parity tests: detections and proposals matched as sets."""

from __future__ import annotations

import numpy as np

from jaxmrcnn.compare import (  # noqa: F401  (re-exported)
    iou_matrix,
    match_detections,
    matched_box_error,
)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def match_boxes(ref: np.ndarray, ours: np.ndarray, *, tol: float = 0.05):
    """For each reference box, whether some box of ours has every coordinate within `tol`
    px (one-to-one, greedy in reference order). Returns a bool array over `ref`."""
    matched = np.zeros(len(ref), bool)
    if len(ref) == 0 or len(ours) == 0:
        return matched
    d = np.abs(ref[:, None, :].astype(np.float64) - ours[None, :, :]).max(-1)  # [N, M]
    used = np.zeros(len(ours), bool)
    for i in range(len(ref)):
        cand = np.where((d[i] <= tol) & ~used)[0]
        if len(cand):
            j = cand[np.argmin(d[i, cand])]
            used[j] = True
            matched[i] = True
    return matched
