"""Detector.stream: chunked, pipelined inference over any iterable. The same results bit for
bit as the one-shot path (prepare -> run_prepared -> to_detections over the whole list),
input order kept, bounded look-ahead into a generator, errors raised. Uses the calibrated
torchvision v1 model of conftest.py at the small test size, on one 640x640 canvas (one
compilation)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmrcnn.detector import Detector


@pytest.fixture(scope="module")
def detector(tv_v1):
    return Detector(tv_v1.checkpoint, buckets=[(640, 640)], batch_size=2)


@pytest.fixture(scope="module")
def images(parity_images):
    """Five images: the three parity images, one mirrored, one cropped (distinct results)."""
    a, b, c = parity_images
    return [a, b, c, np.ascontiguousarray(a[:, ::-1]), np.ascontiguousarray(b[40:, 30:])]


@pytest.fixture(scope="module")
def one_shot(detector, images):
    """Today's sequential path: every image prepared, batched across the whole list, then
    converted one by one."""
    prepared = detector.prepare(images)
    raws = detector.run_prepared(prepared)
    return [detector.to_detections(r, p.orig_hw) for r, p in zip(raws, prepared, strict=True)]


def _identical(a, b):
    assert len(a) == len(b)
    for name in ("boxes", "scores", "labels", "masks", "class_index"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.names == b.names


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_stream_equals_one_shot_bit_for_bit(detector, images, one_shot, chunk_size):
    """chunk 1: every image its own (half-empty) batch; 3: batches of 2 + 1 with other
    partners than in the one-shot path; None: the default (8 for batch_size 2: one chunk)."""
    assert all(len(d) > 0 for d in one_shot)
    streamed = list(detector.stream(iter(images), chunk_size=chunk_size))
    assert len(streamed) == len(images)
    for a, b in zip(streamed, one_shot, strict=True):
        _identical(a, b)


def test_call_uses_stream_and_takes_generators(detector, images, one_shot):
    outs = detector(img for img in images[:3])
    assert isinstance(outs, list) and len(outs) == 3
    for a, b in zip(outs, one_shot[:3], strict=True):
        _identical(a, b)
    without = detector(images[:2], masks=False)
    for a, b in zip(without, one_shot[:2], strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.masks.shape == (len(b), 0, 0)


def test_stream_reads_ahead_boundedly(detector, images):
    """A consumer that has the first result has pulled at most three chunks of input: the
    one yielded from, the one on the device and the one being prepared."""
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield images[i % len(images)]

    gen = detector.stream(source(), chunk_size=2, masks=False)
    first = next(gen)
    assert len(first) > 0
    assert 2 <= len(pulled) <= 6
    gen.close()  # stops the reader thread; no more input is taken
    n = len(pulled)
    assert n <= 6 and len(pulled) == n


def test_stream_errors(detector, images):
    with pytest.raises(ValueError, match="chunk_size"):
        list(detector.stream(images, chunk_size=-1))
    with pytest.raises(ValueError, match="pass a list of images"):
        list(detector.stream(images[0]))
    with pytest.raises(ValueError, match="must be a list"):
        detector("cat.jpg")
    with pytest.raises(ValueError, match="must be a numpy array"):  # the bad one is the 4th
        list(detector.stream([images[0], images[1], images[2], None], chunk_size=2))

    def failing():
        yield images[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        detector(failing())
