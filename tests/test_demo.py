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


def test_folders_expand_to_their_images(fake, tmp_path, capsys):
    folder = tmp_path / "imgs"
    _image(folder / "b.png", 10)
    _image(folder / "a.png", 20)
    (folder / "notes.txt").write_text("not an image")
    assert demo.expand_inputs([folder]) == [str(folder / "a.png"), str(folder / "b.png")]
    assert demo.main(["--weights", "w", str(folder), "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "b.png"]
    assert fake.calls == 2
    (tmp_path / "empty").mkdir()
    assert demo.main(["--weights", "w", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "folder without image files" in capsys.readouterr().err
    assert demo.main(["--weights", "w", str(tmp_path / "clip.mp4"), "--out", str(tmp_path)]) == 1
    assert "is a video: draw it with --video" in capsys.readouterr().err
    assert fake.calls == 2


# ---------------------------------------------------------------------- video and camera
def _no_model(monkeypatch):
    def load(path):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(jaxmrcnn, "load", load)


def test_video_input_errors_are_clear(monkeypatch, tmp_path, capsys):
    """Every bad video input fails before the model is loaded, with a message that says
    what is wrong and what to do; nothing is written."""
    _no_model(monkeypatch)
    out = ["--out", str(tmp_path / "o.mp4")]
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 100)
    cases = [
        (["--video", str(junk)], "not a readable video"),
        (["--video", str(tmp_path / "missing.mp4")], "no such file"),
        (["--video", str(tmp_path)], "is a folder"),
        (["--webcam", "7"], "no camera at index 7"),  # no camera on this machine
    ]
    for args, message in cases:
        assert demo.main(["--weights", "w", *args, *out]) == 1, args
        err = capsys.readouterr().err
        assert message in err, err
    # Without --out the frames would go to a window: this OpenCV (headless) has none.
    assert demo.main(["--weights", "w", "--webcam", "0"]) == 1
    err = capsys.readouterr().err
    assert "no GUI" in err and "pass --out FILE.mp4" in err
    # An output that exists, or is the input itself, is refused.
    (tmp_path / "o.mp4").write_bytes(b"earlier output")
    assert demo.main(["--weights", "w", "--video", str(junk), *out]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert demo.main(["--weights", "w", "--video", str(junk), "--out", str(junk),
                      "--overwrite"]) == 1
    assert "is the input video" in capsys.readouterr().err
    assert demo.main(["--weights", "w", "--video", str(tmp_path / "gone.mp4"), *out,
                      "--overwrite"]) == 1
    assert "gone.mp4: no such file" in capsys.readouterr().err
    assert (tmp_path / "o.mp4").read_bytes() == b"earlier output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.mp4", "o.mp4"]  # no temp files
    with pytest.raises(SystemExit):
        demo.main(["--weights", "w", "--video", str(junk), "--webcam", "0"])
    assert "not --video and --webcam" in capsys.readouterr().err


FRAMES, VIDEO_HW = 6, (96, 128)


def _write_video(path):
    """FRAMES frames of a red rectangle moving right and a green disc moving left on grey,
    with seeded noise (flat colour gives exactly tied scores)."""
    import cv2

    rng = np.random.default_rng(0)
    h, w = VIDEO_HW
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (w, h))
    for i in range(FRAMES):
        f = np.full((h, w, 3), 90, np.uint8)
        f[20:50, 10 + 8 * i : 50 + 8 * i] = (40, 40, 200)  # BGR
        cv2.circle(f, (100 - 6 * i, 65), 14, (60, 200, 40), -1)
        f = np.clip(f + rng.normal(0, 8, f.shape), 0, 255).astype(np.uint8)
        writer.write(f)
    writer.release()
    return path


def _read_video(path):
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


@pytest.fixture(scope="module")
def tiny_detector():
    """The tiny config of the suite (depth 26, 16 base channels, 128 px) with seeded random
    weights drawn in numpy (no op-by-op Flax init), without the persistent caches, so every
    new program is a real compilation."""
    from jaxmrcnn.checkpoint import Checkpoint
    from jaxmrcnn.config import torchvision_maskrcnn_r50_fpn
    from jaxmrcnn.detector import Detector
    from jaxmrcnn.model import param_shapes

    cfg = torchvision_maskrcnn_r50_fpn(4).replace(
        backbone=dict(depth=26, base_channels=16), fpn=dict(out_channels=32),
        roi_heads=dict(fc_dim=64, conv_dim=32), input=dict(min_size=128, max_size=128))
    rng = np.random.default_rng(0)

    def leaf(path, shape):
        name = path[-1].key
        if name in ("weight", "var"):
            return np.ones(shape, np.float32)
        if name in ("mean",) or "bias" in name:
            return np.zeros(shape, np.float32)
        fan_in = int(np.prod(shape[:-1])) or 1
        return (rng.normal(0, 1, shape) / np.sqrt(fan_in)).astype(np.float32)

    import jax

    params = jax.tree_util.tree_map_with_path(
        leaf, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    ckpt = Checkpoint(cfg, params, ["__background__", "red", "green", "blue"], [-1, 1, 2, 3],
                      {"format": "test"})
    return Detector(ckpt, compilation_cache=False)


@pytest.fixture(scope="module")
def video_run(tiny_detector, tmp_path_factory):
    """The demo on a generated video, twice in one process (the second with --overwrite),
    counting XLA backend compilations during each run."""
    import jax

    folder = tmp_path_factory.mktemp("video")
    src = _write_video(folder / "in.mp4")
    out = folder / "drawn.mp4"
    counts = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts[-1] += 1

    mp = pytest.MonkeyPatch()
    mp.setattr(jaxmrcnn, "load", lambda path: tiny_detector)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        argv = ["--weights", "w", "--video", str(src), "--out", str(out), "--score-thresh", "0"]
        for extra in ([], ["--overwrite"]):
            counts.append(0)
            assert demo.main(argv + extra) == 0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        mp.undo()
    return dict(src=src, out=out, compiles=counts)


def _blocks(image):
    """Means of 8x8 blocks, `[H/8, W/8, 3]` float."""
    h, w, c = image.shape
    return image.astype(np.float64).reshape(h // 8, 8, w // 8, 8, c).mean(axis=(1, 3))


def test_video_is_drawn_frame_for_frame(video_run, tiny_detector):
    """The output has every frame at the input's size; each is the input frame with the
    detections drawn (up to the codec's loss), and the drawing changes the pixels."""
    frames, drawn = _read_video(video_run["src"]), _read_video(video_run["out"])
    assert len(frames) == FRAMES and len(drawn) == FRAMES
    assert all(d.shape == VIDEO_HW + (3,) for d in drawn)
    results = tiny_detector(frames)  # the same programs: nothing compiles here
    assert all(len(r) > 0 for r in results)
    x1, y1, x2, y2 = demo.FPS_BOX
    for frame, out, result in zip(frames, drawn, results, strict=True):
        expected = demo.draw_frame(frame, result, None, score_thresh=0.0)
        # MPEG-4 part 2 at OpenCV's default bit rate keeps 8x8 block means, not pixels (100
        # noisy translucent masks: mean pixel error 15-18): compare those, away from the
        # frame rate (which differs from run to run). Measured <= 2.9 on random masks.
        diff = np.abs(_blocks(out) - _blocks(expected))
        diff[: -(-(y2 + 1) // 8), : -(-(x2 + 1) // 8)] = 0
        assert diff.mean() < 5, diff.mean()
        assert np.abs(_blocks(out) - _blocks(frame)).mean() > 5 * diff.mean()
        change = np.abs(out.astype(np.int16) - frame.astype(np.int16)).mean(axis=2)
        covered = result.masks.any(axis=0)
        covered[y1:y2 + 1, x1:x2 + 1] = False
        assert change[covered].mean() > 15  # translucent masks over the detections


def test_drawing_changes_only_detections_and_the_rate():
    """draw_frame (exact, before any codec): pixels in a drawn mask change, pixels away from
    every drawn box, label and the frame-rate box do not, a detection under the threshold
    is not drawn."""
    from jaxmrcnn.detector import Detections

    frame = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 30:50, 40:70] = True
    masks[1, 5:15, 5:15] = True
    det = Detections(boxes=np.array([[40, 30, 70, 50], [5, 5, 15, 15]], np.float32),
                     scores=np.array([0.9, 0.2], np.float32), labels=np.array([1, 2]),
                     masks=masks, class_index=np.array([1, 2]), names=["red", "green"])
    out = demo.draw_frame(frame, det, 12.5, score_thresh=0.5)
    changed = (out != frame).any(axis=2)
    assert changed[32:48, 42:68].all()  # inside the drawn mask
    near = np.zeros_like(changed)
    near[30 - 13 : 50 + 2, 40 - 2 : 80] = True  # the box, its outline and its label
    x1, y1, x2, y2 = demo.FPS_BOX
    near[y1:y2 + 1, x1:x2 + 1] = True
    assert not changed[~near].any()  # the second detection (0.2 < 0.5) is not drawn
    assert changed[y1:y2, x1:x2].any()


def test_video_compiles_on_the_first_frames_only(video_run, tiny_detector):
    """All frames share one canvas bucket and so one model program; a second pass over the
    video compiles nothing at all (model and mask-paste programs are all cached)."""
    first, second = video_run["compiles"]
    assert first >= 1  # the model (and the mask paste) compiled in the first run ...
    assert second == 0  # ... and nothing in the second
    assert len(tiny_detector._programs) == 1  # one canvas for every frame
    (program,) = tiny_detector._programs.values()
    assert program._cache_size() == 1  # traced and compiled once
