"""Deterministic, resumable, fixed-shape training batches with a background prefetch thread.

Order: epoch e visits the records in np.random.default_rng((seed, e)).permutation; batch j
of the epoch is positions [j B, (j + 1) B) (the last partial batch is dropped, and an epoch
has at least one batch: small datasets wrap around). Example augmentation (the shortest-edge
size chosen among `min_sizes`, the horizontal flip) uses default_rng((seed, e, position)),
so a batch depends only on (seed, epoch, batch index): the iterator state is those three
numbers (`state()` / `Loader(..., state=...)`), saved in the training checkpoint.

Each example: flip (uint8 image, masks, boxes) -> the model's resize rule
(preprocess.prepare with min_size = the chosen size) -> masks resized by nearest neighbour
(torchvision's training transform) and boxes scaled -> padded into the smallest canvas
bucket that holds the whole batch, with ground truth padded to `max_gt` (extra instances
beyond max_gt are dropped and counted).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading

import numpy as np

from jaxmrcnn import preprocess
from jaxmrcnn.config import InputConfig
from jaxmrcnn.data.coco import Dataset, load_example
from jaxmrcnn.train.targets import pad_ground_truth

STEP_KEYS = ("images", "image_hw", "padded_hw", "gt_boxes", "gt_classes", "gt_masks", "gt_valid")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    batch_size: int
    min_sizes: tuple[int, ...]  # shortest edge, one chosen per example
    max_size: int
    buckets: tuple[tuple[int, int], ...]  # canvas (h, w) choices, multiples of 32
    max_gt: int = 32
    flip_prob: float = 0.5
    seed: int = 0
    workers: int = 2  # threads preparing examples
    prefetch: int = 2  # batches made ahead


def resize_masks_nearest(masks: np.ndarray, out_hw) -> np.ndarray:
    """`[n, H, W]` -> `[n, h, w]` by torch's F.interpolate(mode="nearest"):
    src = floor(dst * H / h)."""
    (h, w), (sh, sw) = out_hw, masks.shape[1:]
    ys = np.minimum(np.floor(np.arange(h) * (sh / h)).astype(np.int64), sh - 1)
    xs = np.minimum(np.floor(np.arange(w) * (sw / w)).astype(np.int64), sw - 1)
    return masks[:, ys][:, :, xs]


def hflip(rgb, boxes, masks):
    w = rgb.shape[1]
    boxes = boxes.copy()
    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    return rgb[:, ::-1], boxes, masks[:, :, ::-1]


def prepare_example(rgb, boxes, classes, masks, input_cfg: InputConfig, min_size: int,
                    max_size: int, flip: bool):
    """One augmented, resized example: (preprocess.Prepared, instances dict)."""
    if flip:
        rgb, boxes, masks = hflip(rgb, boxes, masks)
    cfg = dataclasses.replace(input_cfg, min_size=min_size, max_size=max_size)
    p = preprocess.prepare(np.ascontiguousarray(rgb), cfg)
    (h, w), (rh, rw) = rgb.shape[:2], p.image_hw
    boxes = boxes * np.asarray([rw / w, rh / h, rw / w, rh / h], np.float32)
    masks = resize_masks_nearest(masks, (rh, rw))
    keep = masks.reshape(len(masks), -1).any(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (
        boxes[:, 3] > boxes[:, 1])
    return p, dict(boxes=boxes[keep], classes=classes[keep], masks=masks[keep]), int((~keep).sum())


def pick_bucket(padded_hws, buckets) -> tuple[int, int]:
    """The smallest-area bucket holding every (h, w); ValueError if none does."""
    need_h = max(h for h, _ in padded_hws)
    need_w = max(w for _, w in padded_hws)
    fits = [b for b in buckets if b[0] >= need_h and b[1] >= need_w]
    if not fits:
        raise ValueError(f"no canvas bucket holds {need_h}x{need_w}; buckets: {list(buckets)}")
    return min(fits, key=lambda b: (b[0] * b[1], b))


class Loader:
    """Iterator of batch dicts (STEP_KEYS + "image_id", "index"); see the module docstring.
    `skipped` counts what was dropped (reader's counts + empty masks, truncated, ...)."""

    def __init__(self, dataset: Dataset, input_cfg: InputConfig, lcfg: LoaderConfig,
                 state: dict | None = None):
        if not dataset.records:
            raise ValueError("the dataset has no usable image")
        self.ds, self.input_cfg, self.cfg = dataset, input_cfg, lcfg
        self.class_index = dataset.class_index()
        self.skipped = collections.Counter(dataset.skipped)
        state = state or dict(epoch=0, batch=0, seed=lcfg.seed)
        if int(state["seed"]) != lcfg.seed:
            raise ValueError(f"loader state has seed {state['seed']}, config {lcfg.seed}")
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, lcfg.workers))

    # ------------------------------------------------------------------ order and state
    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.ds.records) // self.cfg.batch_size)

    def state(self) -> dict:
        """The position of the next batch this iterator will yield."""
        return dict(epoch=self._epoch, batch=self._batch, seed=self.cfg.seed)

    def _positions(self, epoch: int, batch: int) -> np.ndarray:
        n, bsz = len(self.ds.records), self.cfg.batch_size
        perm = np.random.default_rng((self.cfg.seed, epoch)).permutation(n)
        pos = np.arange(batch * bsz, (batch + 1) * bsz)
        return perm[pos % n]

    def make_batch(self, epoch: int, batch: int) -> dict:
        """Batch `batch` of epoch `epoch` (pure: the same numbers give the same arrays)."""
        c = self.cfg
        idx = self._positions(epoch, batch)
        first = batch * c.batch_size

        def one(j):
            rec = self.ds.records[int(idx[j])]
            rng = np.random.default_rng((c.seed, epoch, first + j))
            size = int(c.min_sizes[rng.integers(len(c.min_sizes))])
            flip = bool(rng.random() < c.flip_prob)
            local: collections.Counter = collections.Counter()
            rgb, boxes, classes, masks = load_example(rec, self.class_index, local)
            p, inst, dropped = prepare_example(rgb, boxes, classes, masks, self.input_cfg,
                                               size, c.max_size, flip)
            local["empty_after_resize"] += dropped
            if len(inst["boxes"]) > c.max_gt:
                local["truncated_instances"] += len(inst["boxes"]) - c.max_gt
                inst = {k: v[: c.max_gt] for k, v in inst.items()}
            return rec.image_id, p, inst, local

        results = list(self._pool.map(one, range(c.batch_size)))
        prepared = [r[1] for r in results]
        canvas = pick_bucket([p.padded_hw for p in prepared], c.buckets)
        images, info, _ = preprocess.batch(prepared, canvas)
        gt = pad_ground_truth([r[2] for r in results], c.max_gt, canvas)
        with self._lock:
            for r in results:
                self.skipped.update(r[3])
        return dict(images=images, image_hw=info["image_hw"], padded_hw=info["padded_hw"],
                    gt_boxes=gt["boxes"], gt_classes=gt["classes"], gt_masks=gt["masks"],
                    gt_valid=gt["valid"], image_id=np.asarray([r[0] for r in results]),
                    index=np.asarray(idx))

    def _advance(self, epoch: int, batch: int) -> tuple[int, int]:
        batch += 1
        return (epoch + 1, 0) if batch >= self.batches_per_epoch else (epoch, batch)

    # ------------------------------------------------------------------ background thread
    def _produce(self, epoch: int, batch: int) -> None:
        while not self._stop.is_set():
            try:
                item = (epoch, batch, self.make_batch(epoch, batch), None)
            except Exception as e:  # hand the error to the consumer
                item = (epoch, batch, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[3] is not None:
                return
            epoch, batch = self._advance(epoch, batch)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            self._queue = queue.Queue(max(1, self.cfg.prefetch))
            self._thread = threading.Thread(target=self._produce, args=(self._epoch, self._batch),
                                            daemon=True, name="jaxmrcnn-loader")
            self._thread.start()
        epoch, batch, item, err = self._queue.get()
        assert (epoch, batch) == (self._epoch, self._batch)
        if err is not None:
            raise err
        self._epoch, self._batch = self._advance(epoch, batch)
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
