"""The demo CLI never replaces a file it was not asked to: inputs with the same name, outputs
written into the inputs' own folder, existing outputs. A stand-in detector (seconds); the
real model's demo run is in test_detector.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import jaxmrcnn
from jaxmrcnn import demo
from jaxmrcnn.detector import Detections


class FakeDetector:
    """One box and mask in the image's top-left quarter, per image."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        (image,) = images
        h, w = image.shape[:2]
        masks = np.zeros((1, h, w), bool)
        masks[0, : h // 2, : w // 2] = True
        return [Detections(boxes=np.array([[0, 0, w / 2, h / 2]], np.float32),
                           scores=np.array([0.9], np.float32), labels=np.array([1]), masks=masks,
                           class_index=np.array([1]), names=["person"])]


@pytest.fixture
def fake(monkeypatch):
    det = FakeDetector()
    monkeypatch.setattr(jaxmrcnn, "load", lambda path: det)
    return det


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 24, 3), value, np.uint8)).save(path)
    return path


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_outputs_never_collide_or_replace_inputs(fake, tmp_path, capsys):
    a = _image(tmp_path / "a" / "x.png", 10)
    b = _image(tmp_path / "b" / "x.png", 20)
    z_png = _image(tmp_path / "a" / "z.png", 30)
    z_jpg = _image(tmp_path / "a" / "z.jpg", 40)
    y = _image(tmp_path / "a" / "y.png", 50)
    inputs = [a, b, z_png, z_jpg, y]
    before = {p: p.read_bytes() for p in inputs}
    out = tmp_path / "a"  # drawn into the inputs' own folder
    argv = ["--weights", "w", *map(str, inputs), "--out", str(out), "--score-thresh", "0"]
    assert demo.main(argv) == 0, capsys.readouterr().err
    assert {p: p.read_bytes() for p in inputs} == before  # no input replaced
    expected = ["a_x.png", "b_x.png", "z_png.png", "z_jpg.png", "y-2.png"]
    assert [t.name for t in demo.output_paths(inputs, out)] == expected
    drawn = {}
    for name, src in zip(expected, inputs, strict=True):
        with Image.open(out / name) as im:
            drawn[name] = np.asarray(im.convert("RGB"))
        # the picture of its own input: the untouched bottom-right pixel is the input's
        assert (drawn[name][-1, -1] == np.asarray(Image.open(src).convert("RGB"))[-1, -1]).all()
    assert fake.calls == 5

    # The same command again: every output exists; refused before any work, nothing changed.
    files = _files(tmp_path)
    capsys.readouterr()
    assert demo.main(argv) == 1
    err = capsys.readouterr().err
    assert "5 of the outputs already exist" in err and "--overwrite" in err
    assert _files(tmp_path) == files and fake.calls == 5
    (out / "a_x.png").write_bytes(b"old output")
    assert demo.main(argv + ["--overwrite"]) == 0
    assert (out / "a_x.png").read_bytes() != b"old output"  # outputs replaced ...
    assert {p: p.read_bytes() for p in inputs} == before  # ... inputs still never
    assert fake.calls == 10


def test_output_names():
    names = lambda paths, out="/o": [p.name for p in demo.output_paths(paths, out)]  # noqa: E731
    assert names(["/d/x.jpg", "/e/y.jpg"]) == ["x.png", "y.png"]
    assert names(["/d/p/x.jpg", "/d/q/r/x.jpg"]) == ["p_x.png", "q_r_x.png"]
    assert names(["/d/x.jpg", "/d/x.jpg"]) == ["x_jpg.png", "x_jpg-2.png"]  # the same file twice
    assert names(["/d/x.jpg", "/d/x_jpg.png", "/d/x.png"]) == ["x_jpg.png", "x_jpg-2.png",
                                                               "x_png.png"]
    assert names(["/d/x.png"], out="/d") == ["x-2.png"]  # the input's own path


def test_output_folder_is_a_file(fake, tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    assert demo.main(["--weights", "w", str(_image(tmp_path / "x.png", 1)), "--out",
                      str(tmp_path / "f")]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "a file"
