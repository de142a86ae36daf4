"""Training data: COCO-format reading (coco.py), deterministic resumable fixed-shape batches
with background preparation (loader.py), a harder generated shapes dataset (synth.py)."""

from jaxmrcnn.data.coco import Dataset, read_coco
from jaxmrcnn.data.loader import STEP_KEYS, Loader, LoaderConfig

__all__ = ["STEP_KEYS", "Dataset", "Loader", "LoaderConfig", "read_coco"]
