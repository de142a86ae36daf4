"""The Detector API: input conversion and errors, bucketing and batching invariance, the
demo CLI and the persistent compilation cache. Uses the calibrated torchvision v1 model of
conftest.py at the small test size, on conftest's `sample_images`: coco-mini's where it is
present, else generated shapes images (these tests need no real images)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from parity import match_detections
from PIL import Image

from jaxmrcnn.detector import CPU_COMPILER_OPTIONS, Detector, resolve_compiler_options

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def detector(tv_v1):
    return Detector(tv_v1.checkpoint, batch_size=1)


def _same(a, b, *, atol=1e-4):
    """Two Detections equal up to float noise: same count, labels, boxes, scores and masks."""
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=atol * 100)  # pixels
    np.testing.assert_allclose(a.scores, b.scores, atol=atol)
    if a.masks.size:
        differ = (a.masks != b.masks).mean()
        assert differ < 1e-4, f"{differ:.2e} of mask pixels differ"


def test_output_contract(detector, sample_images):
    img = sample_images[0]
    (det,) = detector([img])
    n = len(det)
    assert n > 0
    assert det.boxes.shape == (n, 4) and det.boxes.dtype == np.float32
    assert det.scores.shape == (n,) and np.all(np.diff(det.scores) <= 0)
    assert det.masks.shape == (n,) + img.shape[:2] and det.masks.dtype == bool
    assert det.masks.any()
    h, w = img.shape[:2]
    assert (det.boxes >= 0).all()
    assert (det.boxes[:, [0, 2]] <= w).all() and (det.boxes[:, [1, 3]] <= h).all()
    # COCO category ids (torchvision's 91-entry list: index == id, 0 background)
    assert set(det.labels) <= set(range(1, 91))
    assert [detector.classes[i] for i in det.class_index] == det.names


def test_grayscale_and_rgba_are_converted(detector, sample_images):
    img = sample_images[1]
    gray = np.asarray(Image.fromarray(img).convert("L"))
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 7, np.uint8)], axis=2)
    d_gray, d_gray3, d_rgba, d_rgb = detector([gray, np.repeat(gray[:, :, None], 3, 2), rgba, img])
    _same(d_gray, d_gray3, atol=0)
    _same(d_rgba, d_rgb, atol=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 5), np.uint8), r"shape \[H, W\]"),
        (np.zeros((10, 10, 3), np.float32), "dtype uint8"),
        ("cat.jpg", "must be a numpy array"),
        (None, "must be a numpy array"),
    ],
)
def test_bad_images_raise_clear_errors(detector, bad, message):
    with pytest.raises(ValueError, match=message):
        detector([bad])


def test_single_array_instead_of_list(detector, sample_images):
    with pytest.raises(ValueError, match="pass a list of images"):
        detector(sample_images[0])


def test_buckets_and_batching_do_not_change_results(tv_v1, sample_images, detector):
    """One image at a time on the default buckets == three images batched by 2 (the last
    batch padded with an empty slot) on a larger square canvas that pads every image further."""
    imgs = sample_images[:2] + [sample_images[0][:300, :250]]  # one more, of another shape
    bucketed = Detector(tv_v1.checkpoint, buckets=[(640, 640)], batch_size=2)
    canvases = {tuple(p.padded_hw) for p in bucketed.prepare(imgs)}
    assert (640, 640) not in canvases  # the bucket really pads further
    for a, b in zip(detector(imgs), bucketed(imgs), strict=True):
        _, matched = match_detections(a, b, score_tol=1e-4)
        assert matched == 1.0
        _same(a, b)


def test_cpu_compiler_options_do_not_change_results(tv_v1, sample_images, detector):
    """The Detector compiles with CPU_COMPILER_OPTIONS on CPU (a speed setting); XLA's
    defaults give the same detections, up to the order of near-equal scores (a different
    summation order moves scores by ~1e-6 on coco-mini; on the shapes images, whose model is
    calibrated on 3 simple images, one score moves by 1.3e-4 (its box by 3e-4 px)): matched
    with the parity tests' score tolerance, 1e-3."""
    if jax.default_backend() == "cpu":
        assert detector.compiler_options == CPU_COMPILER_OPTIONS, "the option is not in effect"
    plain = Detector(tv_v1.checkpoint, compiler_options=None)
    assert plain.compiler_options is None
    imgs = sample_images[:2]
    for a, b in zip(detector(imgs), plain(imgs), strict=True):
        pairs, matched = match_detections(a, b, score_tol=1e-3)
        assert matched == 1.0 and len(a) == len(b)
        i, j = np.array(pairs).T
        np.testing.assert_allclose(a.boxes[i], b.boxes[j], atol=1e-2)
        differ = (a.masks[i] != b.masks[j]).mean()
        assert differ < 1e-4, f"{differ:.2e} of mask pixels differ"


def test_compiler_options_setting_is_checked(tv_v1):
    with pytest.raises(ValueError, match="compiler_options must be"):
        Detector(tv_v1.checkpoint, compiler_options="fast")
    no_fast_math = {"xla_cpu_enable_fast_math": False}
    assert resolve_compiler_options(no_fast_math) == no_fast_math


def test_demo_cli_and_compilation_cache(tv_v1, sample_image_paths, tmp_path):
    """The demo draws PNGs; the first process fills the persistent compilation cache and the
    traced-program cache, and a second one reads them back unchanged and draws the same
    picture (the timing is in benchmarks/inference.py, not here)."""
    weights = tmp_path / "small.jaxmrcnn.msgpack"
    tv_v1.checkpoint.save(weights)
    images = [str(sample_image_paths[0]), str(tmp_path / "missing.jpg")]
    env = dict(os.environ, JAXMRCNN_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "jaxmrcnn.demo", "--weights", str(weights), *images,
           "--out", str(tmp_path / "out"), "--score-thresh", "0.0"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "missing.jpg" in first.stdout + first.stderr and "skipped" in first.stdout + first.stderr
    assert "images" in first.stderr  # the progress bar
    png = tmp_path / "out" / (sample_image_paths[0].stem + ".png")
    original = np.asarray(Image.open(images[0]).convert("RGB"))
    with Image.open(png) as im:
        assert im.size == original.shape[1::-1]  # the input's size
        drawn = np.asarray(im.convert("RGB"))
    assert (drawn != original).any(axis=2).mean() > 0.01  # masks and boxes were drawn
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert cached, "the first run wrote nothing to the compilation cache"
    (program,) = (tmp_path / "cache" / "programs").glob("maskrcnn-*.jaxexport")
    stamp = (program.stat().st_ino, program.stat().st_mtime_ns)
    first_png = png.read_bytes()
    second = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=900)
    assert second.returncode == 0, second.stderr
    after = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert set(cached) <= set(after)
    stat = program.stat()
    assert (stat.st_ino, stat.st_mtime_ns) == stamp, "the program was traced again"
    assert png.read_bytes() == first_png
