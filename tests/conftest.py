"""Shared fixtures: coco-mini images and calibrated torchvision reference models.

The torch reference (tests/torch_reference.py) is built once per session per version:
seeded random weights calibrated on the test images, saved with torch.save(state_dict())
exactly as users save torchvision models, then converted with converters/from_torch.py.
The test images are coco-mini's PARITY_IMAGES where coco-mini is present, else images of the
generated shapes dataset (jaxmrcnn/shapes.py), so the layer and Detector tests run everywhere;
the parity tests need the real images (`parity_images`).

Tests that need coco-mini skip without it, except in CI (CI=true), where they fail: CI must
run everything that can run on CPU. Live tests (marker `live`: they run Detectron2's or
maskrcnn-benchmark's own source, named by an environment variable) are deselected unless the
`-m` expression names `live`; run without their variable they fail, naming it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

COCO_MINI = Path(
    os.environ.get("JAXMRCNN_COCO_MINI", ROOT.parent / "shared" / "data" / "coco-mini")
)
# Small-size parity runs (the fast suite): short side 384, long side <= 640.
SMALL = dict(min_size=384, max_size=640)
# A fixed, varied subset: landscape and portrait images of different aspect ratios.
PARITY_IMAGES = ["000000000790.jpg", "000000069468.jpg", "000000072258.jpg"]


IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def have_coco_mini() -> bool:
    return (COCO_MINI / "annotations" / "instances_train2017.json").is_file()


def coco_mini_or_skip() -> Path:
    """coco-mini's folder; without it the test skips, or fails in CI (CI=true)."""
    if not have_coco_mini():
        message = (f"coco-mini not found at {COCO_MINI} (set JAXMRCNN_COCO_MINI to its folder); "
                   "these tests need the real COCO images")
        if IN_CI:
            pytest.fail(f"CI=true: {message}. CI must run them: provide coco-mini", pytrace=False)
        pytest.skip(message)
    return COCO_MINI


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    return coco_mini_or_skip()


@pytest.fixture(scope="session")
def sample_image_paths(tmp_path_factory) -> list[Path]:
    """coco-mini's PARITY_IMAGES where coco-mini is present, else three generated shapes
    images (360 x 480, 1-4 shapes each): what the layer and Detector tests run on. The shapes
    get seeded pixel noise (std 12): flat colour gives exactly equal features, hence exactly
    tied scores over whole regions, which float noise then breaks either way."""
    if have_coco_mini():
        return [COCO_MINI / "train2017" / name for name in PARITY_IMAGES]
    from PIL import Image

    from jaxmrcnn import shapes

    img_dir, _ = shapes.generate(tmp_path_factory.mktemp("shapes"), n_images=3, seed=0)
    paths = sorted(img_dir.glob("*.png"))
    rng = np.random.default_rng(0)
    for p in paths:
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"), np.float32)
        a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(p)
    return paths


@pytest.fixture(scope="session")
def sample_images(sample_image_paths) -> list[np.ndarray]:
    from torch_reference import load_image

    return [load_image(p) for p in sample_image_paths]


@pytest.fixture(scope="session")
def parity_images(coco_mini, sample_images) -> list[np.ndarray]:
    """The real coco-mini PARITY_IMAGES (the same arrays as `sample_images` there)."""
    return sample_images


def require_source(reference, framework: str) -> Path:
    """The framework's source folder for a live test, which fails (not skips) without it."""
    src = reference.source_dir()
    if src is None:
        pytest.fail(f"live test: {framework}'s source is not here: set {reference.ENV_VAR} to "
                    f"a folder holding it (currently {os.environ.get(reference.ENV_VAR)!r}); "
                    "live tests run only with `-m live`", pytrace=False)
    return src


def pytest_collection_modifyitems(config, items):
    """Deselects `live` tests unless the -m expression names `live` (`pytest -m live`). Not
    done with `-m "not live"` in addopts: a user's own `-m "not slow"` would replace it."""
    if "live" in (config.getoption("markexpr") or ""):
        return
    live = [item for item in items if item.get_closest_marker("live")]
    if live:
        config.hook.pytest_deselected(items=live)
        items[:] = [item for item in items if not item.get_closest_marker("live")]


class TorchvisionReference:
    """A calibrated torchvision model, its state-dict file and the converted checkpoint."""

    def __init__(self, version: str, images, tmp: Path, size: dict = SMALL):
        import torch
        import torch_reference as R

        from jaxmrcnn.converters.from_torch import convert_file

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.version = version
        self.model = R.build(version, **size)
        R.calibrate(self.model, [R.to_tensor(a) for a in images])
        self.state_dict_path = tmp / f"torchvision_{version}.pth"
        torch.save(self.model.state_dict(), self.state_dict_path)
        ckpt, self.summary = convert_file(self.state_dict_path)
        ckpt.config = ckpt.config.replace(input=size)
        self.checkpoint = ckpt
        self._cache: dict = {}

    def run(self, image: np.ndarray) -> dict:
        """Reference outputs for one image (batch of one), with intermediates."""
        key = id(image)
        if key not in self._cache:
            import torch
            import torch_reference as R

            with torch.no_grad():
                x = [R.to_tensor(image)]
                il, _ = self.model.transform(x)
                feats = self.model.backbone(il.tensors)
                props, _ = self.model.rpn(il, feats)
                out = self.model(x)[0]
            self._cache[key] = dict(
                input=il.tensors[0].permute(1, 2, 0).numpy(),
                image_size=tuple(il.image_sizes[0]),
                features={k: v[0].permute(1, 2, 0).numpy() for k, v in feats.items()},
                proposals=props[0].numpy(),
                boxes=out["boxes"].numpy(),
                scores=out["scores"].numpy(),
                labels=out["labels"].numpy(),
                masks=out["masks"][:, 0].numpy(),
            )
        return self._cache[key]


@pytest.fixture(scope="session")
def tv_v1(sample_images, tmp_path_factory):
    """Calibrated on `sample_images` (coco-mini's, else generated shapes)."""
    return TorchvisionReference("v1", sample_images, tmp_path_factory.mktemp("tv_v1"))


@pytest.fixture(scope="session")
def tv_v2(sample_images, tmp_path_factory):
    return TorchvisionReference("v2", sample_images, tmp_path_factory.mktemp("tv_v2"))


@pytest.fixture(scope="session")
def tv_v1_full(parity_images, tmp_path_factory):
    """v1 at torchvision's standard 800/1333 (for the slow test), calibrated on one image."""
    return TorchvisionReference(
        "v1", parity_images[:1], tmp_path_factory.mktemp("tv_v1_full"),
        size=dict(min_size=800, max_size=1333),
    )
