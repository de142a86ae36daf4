"""COCO box and mask AP of in-training params on a validation set (periodic evaluation).

The params are wrapped in a `Checkpoint` and run by the inference `Detector`, exactly as the
final model will be after `jaxmrcnn.load`; the results go through pycocotools' COCOeval
(jaxmrcnn.coco.evaluate). The Detector's compiled programs are reused between evaluations
(same config, new params) through its on-disk caches, so only the first evaluation compiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxmrcnn.checkpoint import Checkpoint
from jaxmrcnn.coco import category_mapping, evaluate, load_dataset, to_coco_results
from jaxmrcnn.config import ModelConfig
from jaxmrcnn.images import read_image

STATS = ("AP", "AP50", "AP75")  # the first three of COCOeval's 12 stats


class Evaluator:
    """`Evaluator(ann, images_dir)(cfg, params, classes, category_ids)` ->
    {"bbox_AP": .., "bbox_AP50": .., "bbox_AP75": .., "segm_AP": .., ...}."""

    def __init__(self, annotations, images_dir, *, max_images: int | None = None):
        self.gt = load_dataset(annotations)
        self.images_dir = Path(images_dir)
        ids = sorted(self.gt.getImgIds())
        self.image_ids = ids[:max_images] if max_images else ids
        self._images = None  # decoded once, on first use

    def _read(self):
        if self._images is None:
            self._images = [read_image(self.images_dir / self.gt.imgs[i]["file_name"])
                            for i in self.image_ids]
        return self._images

    def __call__(self, cfg: ModelConfig, params, classes, category_ids) -> dict:
        from jaxmrcnn.detector import Detector

        ckpt = Checkpoint(config=cfg, params=params, classes=list(classes),
                          category_ids=list(category_ids), source={})
        # A new Detector per call: its traced-program and compilation caches (on disk) make
        # the second and later evaluations skip tracing and compiling.
        detector = Detector(ckpt, buckets="exact")
        cat_map = category_mapping(classes, category_ids, self.gt)
        bbox, segm = [], []
        for iid, det in zip(self.image_ids, detector(self._read()), strict=True):
            b, s = to_coco_results(iid, det.boxes, det.scores, det.class_index, det.masks,
                                   cat_map)
            bbox += b
            segm += s
        out = {}
        for iou_type, results in (("bbox", bbox), ("segm", segm)):
            stats, _, _ = evaluate(self.gt, results, iou_type, image_ids=self.image_ids)
            out.update({f"{iou_type}_{k}": float(np.round(v, 4))
                        for k, v in zip(STATS, stats, strict=False)})
        return out
