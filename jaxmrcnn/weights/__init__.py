"""The trained model that ships with jaxmrcnn: the default of `eval/coco.py` and the demo.

`shapes_r26_fpn.msgpack` is a Mask R-CNN (torchvision's graph with a narrow ResNet-26-FPN:
base_channels 16, FPN 64 channels) trained here from scratch with
`python train/train.py --preset shapes --synth 1000` on the generated five-class shapes of
jaxmrcnn/data/synth.py (circle, square, triangle, ellipse, star; overlapping, occluded,
random colours and sizes). `validation_set()` generates the held-out split it is evaluated
on (a seed no training image uses), so a new user sees real AP and real masks without
downloading anything.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES_MODEL = HERE / "shapes_r26_fpn.msgpack"
# The validation split: synth.generate(seed=VAL_SEED): train/train.py --synth uses
# seed --seed (0) for training images and --seed + 10_000 for its own validation split.
VAL_SEED = 10_000
VAL_IMAGES = 64
VAL_SIZE = 256


def default_checkpoint_path() -> Path:
    """The shipped shapes model; FileNotFoundError naming the fix if it is missing."""
    if not SHAPES_MODEL.is_file():
        raise FileNotFoundError(
            f"the shipped model {SHAPES_MODEL} is missing: reinstall jaxmrcnn from a full "
            "checkout, or train it with `python train/train.py --preset shapes --synth 1000 "
            "--out runs/shapes` and pass --weights runs/shapes/model.msgpack")
    return SHAPES_MODEL


def validation_set(cache_dir=None, n_images: int = VAL_IMAGES) -> tuple[Path, Path]:
    """(images folder, annotations.json) of the shipped model's held-out split, generated
    once into `cache_dir` (default ~/.cache/jaxmrcnn) and reused (--resume finds it)."""
    from jaxmrcnn.data.synth import generate

    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "jaxmrcnn"
    folder = cache / f"synth-val-{n_images}-seed{VAL_SEED}-{VAL_SIZE}px"
    if not (folder / "annotations.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".synth-val-", dir=cache))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        generate(tmp, n_images, seed=VAL_SEED, size_hw=(VAL_SIZE, VAL_SIZE))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it meanwhile
            pass
    return folder / "images", folder / "annotations.json"
