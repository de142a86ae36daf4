"""Running a Matterport-family checkpoint: host preprocessing, one jitted model call per batch
(the canvas is fixed, so one compiled program), host post-processing into the Detections the
rest of jaxmrcnn uses (xyxy boxes, dataset category ids, full-size masks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmrcnn.matterport.config import MatterportConfig
from jaxmrcnn.matterport.model import MatterportMaskRCNN
from jaxmrcnn.matterport.postprocess import unmold_detections
from jaxmrcnn.matterport.preprocess import mold_image


def forward_fn(cfg: MatterportConfig, precision: str = "float32"):
    """jit(params, images [B, S, S, 3], windows [B, 4]) -> detections (model.py)."""
    from jaxmrcnn.model import matmul_precision

    model = MatterportMaskRCNN(cfg)

    def run(params, images, windows):
        with matmul_precision(precision):
            return model.apply({"params": params}, images, windows)[0]

    return jax.jit(run)


class MatterportDetector:
    """`det(images)` -> one Detections per HxWx3 uint8 RGB image (the port's detect())."""

    def __init__(self, checkpoint, *, batch_size: int = 1, precision: str = "float32"):
        self.checkpoint = checkpoint
        self.config: MatterportConfig = checkpoint.config
        self.params = jax.tree_util.tree_map(jnp.asarray, checkpoint.params)
        self.classes = list(checkpoint.classes)
        self.category_ids = np.asarray(checkpoint.category_ids)
        self.batch_size = batch_size
        self._fn = forward_fn(self.config, precision)

    def raw(self, images: list[np.ndarray]):
        """Network outputs for a list of images (batched by batch_size, padded with empty
        canvases to a full batch): (list of per-image numpy dicts, windows)."""
        molded = [mold_image(_rgb(im), self.config) for im in images]
        outs = []
        bs = self.batch_size
        for start in range(0, len(molded), bs):
            chunk = molded[start:start + bs]
            x = np.stack([m for m, _ in chunk] + [chunk[0][0]] * (bs - len(chunk)))
            w = np.stack([w for _, w in chunk] + [chunk[0][1]] * (bs - len(chunk)))
            det = jax.device_get(self._fn(self.params, x, w))
            outs += [{k: v[i] for k, v in det.items()} for i in range(len(chunk))]
        return outs, [w for _, w in molded]

    def __call__(self, images):
        from jaxmrcnn.detector import Detections

        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        images = [_rgb(im) for im in images]
        outs, windows = self.raw(images)
        results = []
        for im, o, w in zip(images, outs, windows, strict=True):
            boxes, scores, cls, masks = unmold_detections(
                o["boxes"], o["scores"], o["class_index"], o["masks"], o["valid"], w,
                im.shape[:2])
            results.append(Detections(
                boxes=boxes[:, [1, 0, 3, 2]].astype(np.float32), scores=scores,
                labels=self.category_ids[cls], masks=masks, class_index=cls,
                names=[self.classes[c] for c in cls]))
        return results


def _rgb(image) -> np.ndarray:
    """HxWx3 uint8 RGB (gray and RGBA converted, as the other families' Detector)."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8 RGB arrays, got dtype {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"images must be HxWx3 (RGB), HxWx4 or HxW, got shape {a.shape}")
    return np.ascontiguousarray(a[:, :, :3])
