"""The Matterport family's results in the original image (unmold_detections, model.py:2003-2062;
utils.unmold_mask, utils.py:376-393), in NumPy + Pillow on the host.

Boxes: ((box - (wy1, wx1)) * min(H0 / wh, W0 / ww)).astype(int32) (truncation); boxes of
non-positive area after that are dropped. Masks: scipy.misc.imresize of the float 28x28 mask,
i.e. bytescale (the mask's own min -> 0, max -> 255: a threshold relative to its range, not
sigmoid 0.5), Pillow BILINEAR to the int box size (antialiased below 28 px), >= 128, pasted.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def bytescale(mask: np.ndarray) -> np.ndarray:
    """scipy.misc.bytescale (SciPy 1.0-1.2, the last with imresize) of a float mask: uint8."""
    cmin, cmax = mask.min(), mask.max()
    cscale = cmax - cmin
    if cscale == 0:
        cscale = 1
    scale = 255.0 / cscale
    data = (mask - cmin) * scale
    return (data.clip(0, 255) + 0.5).astype(np.uint8)


def unmold_mask(mask: np.ndarray, box, image_hw) -> np.ndarray:
    """mask `[M, M]` float, box (y1, x1, y2, x2) int -> `[H0, W0]` bool."""
    y1, x1, y2, x2 = (int(v) for v in box)
    small = Image.fromarray(bytescale(mask)).resize((x2 - x1, y2 - y1), Image.BILINEAR)
    full = np.zeros(image_hw, bool)
    full[y1:y2, x1:x2] = np.asarray(small) >= 128
    return full


def unmold_detections(boxes, scores, class_index, masks, valid, window, image_hw):
    """One image's network outputs (model.py: `[D, 4]` canvas boxes, `[D]`, `[D]`,
    `[D, M, M]`, `[D]` valid; window `[4]`) -> (boxes `[N, 4]` int32 (y1, x1, y2, x2) exclusive
    ends, scores `[N]` float32, class_index `[N]` int32, masks `[N, H0, W0]` bool)."""
    valid = np.asarray(valid, bool)
    boxes = np.asarray(boxes)[valid]
    scores = np.asarray(scores, np.float32)[valid]
    cls = np.asarray(class_index, np.int32)[valid]
    masks = np.asarray(masks)[valid]
    window = np.asarray(window).astype(np.int64)
    h0, w0 = image_hw
    scale = min(h0 / (window[2] - window[0]), w0 / (window[3] - window[1]))
    shift = np.array([window[0], window[1], window[0], window[1]])
    boxes = ((boxes - shift) * np.array([scale] * 4)).astype(np.int32)
    keep = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0
    boxes, scores, cls, masks = boxes[keep], scores[keep], cls[keep], masks[keep]
    full = np.stack([unmold_mask(m, b, (h0, w0)) for m, b in zip(masks, boxes, strict=True)]) \
        if len(boxes) else np.zeros((0, h0, w0), bool)
    return boxes, scores, cls, full
