"""Draw detections on images, folders of images, a video file or a camera's frames.

    python -m jaxmrcnn.demo --weights MODEL IMAGE_OR_FOLDER... --out DIR [--overwrite]
    python -m jaxmrcnn.demo --weights MODEL --video FILE [--out FILE.mp4] [--overwrite]
    python -m jaxmrcnn.demo --weights MODEL --webcam N [--out FILE.mp4] [--max-frames K]

Images: writes DIR/<image name>.png with masks, boxes, class names and scores drawn on the
image; a folder stands for the image files directly in it (sorted by name). No file is ever
replaced by surprise: two inputs with the same name (a/x.jpg, b/x.jpg) get distinct outputs
(a_x.png, b_x.png), an output never replaces an input (x.png drawn into its own folder
becomes x-2.png), and existing outputs are refused before any work unless --overwrite. Each
PNG is written to a temporary file and renamed into place.

Video and camera: every frame is drawn, with the frame rate in the top-left corner, and
written to --out (an .mp4, or .avi for Motion JPEG, at the source's frame rate and size), or
shown in a window when --out is not given (which needs an OpenCV with a GUI; the
opencv-python-headless that jaxmrcnn installs has none). Frames go through
`Detector.stream`, which reads and preprocesses the next frames in a thread while the model
runs; all frames of one size share one canvas bucket, so the model compiles on the first
frame only. The video is written to a temporary file renamed into place at the end (also
after Ctrl-C or an error: the frames drawn so far are kept); an existing --out is refused
unless --overwrite, and the input video is never replaced.

Video I/O is OpenCV's (opencv-python-headless, already a dependency for mmdet's resize): its
wheels bundle FFmpeg for files and V4L2 for cameras, so nothing else needs installing.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from jaxmrcnn.images import read_image

PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
        (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    ],
    np.float32,
)  # fmt: skip

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv",
                  ".flv"}
# Output containers and the codec each is written with (both in OpenCV's bundled FFmpeg).
VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}
FPS_BOX = (0, 0, 64, 14)  # x1, y1, x2, y2 of the frame-rate label in the top-left corner


def draw(image: np.ndarray, det, *, score_thresh: float = 0.5, alpha: float = 0.5) -> Image.Image:
    """Returns a PIL image with the detections above `score_thresh` drawn on `image`."""
    out = image.astype(np.float32).copy()
    keep = [i for i in range(len(det)) if det.scores[i] >= score_thresh]
    for rank, i in enumerate(keep):
        color = PALETTE[rank % len(PALETTE)]
        m = det.masks[i]
        if m.size:
            out[m] = out[m] * (1 - alpha) + color * alpha
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    canvas = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    for rank, i in enumerate(keep):
        color = tuple(int(c) for c in PALETTE[rank % len(PALETTE)])
        x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
        canvas.rectangle([x1, y1, x2, y2], outline=color, width=2)
        label = f"{det.names[i]} {det.scores[i]:.2f}"
        tw = canvas.textlength(label, font=font)
        ty = max(0.0, y1 - 12)
        canvas.rectangle([x1, ty, x1 + tw + 4, ty + 12], fill=color)
        canvas.text((x1 + 2, ty), label, fill=(0, 0, 0), font=font)
    return pil


def draw_frame(frame: np.ndarray, det, fps: float | None, *, score_thresh: float) -> np.ndarray:
    """`draw` on a video frame, plus the frame rate in FPS_BOX: `[H, W, 3]` uint8 RGB."""
    pil = draw(frame, det, score_thresh=score_thresh)
    canvas = ImageDraw.Draw(pil)
    canvas.rectangle(FPS_BOX, fill=(0, 0, 0))
    text = "-- fps" if fps is None else f"{fps:.1f} fps"
    canvas.text((FPS_BOX[0] + 3, FPS_BOX[1] + 1), text, fill=(255, 255, 255),
                font=ImageFont.load_default())
    return np.asarray(pil)


# ---------------------------------------------------------------------- images and folders
def expand_inputs(paths) -> list[str]:
    """The image files named by `paths`: a file as given, a folder as the image files
    directly in it (by suffix, sorted). A folder without images, or a video file among the
    images, is a ValueError saying what to do."""
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(str(f) for f in path.iterdir()
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"{p} is a folder without image files (looked for "
                                 f"{', '.join(sorted(IMAGE_SUFFIXES))} directly in it)")
            out.extend(found)
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            raise ValueError(f"{p} is a video: draw it with --video {p} --out OUT.mp4")
        else:
            out.append(str(p))
    return out


def output_paths(inputs, out_dir) -> list[Path]:
    """The PNG each input is drawn to in `out_dir`: `<stem>.png`; where stems repeat, the
    folders that tell the inputs apart, then the extension (a/x.jpg, b/x.jpg -> a_x.png,
    b_x.png; x.jpg, x.png -> x_jpg.png, x_png.png); a name still shared, or the path of an
    input itself, gets -2, -3, ... Never the same path twice, never an input's path."""
    srcs = [Path(os.path.abspath(p)) for p in inputs]
    names = [s.stem for s in srcs]
    for spell in (_with_folders, lambda group: [f"{n}_{s.suffix.lstrip('.')}" for n, s in group]):
        counts = Counter(names)
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            if counts[n] > 1:
                groups.setdefault(n, []).append(i)
        for idxs in groups.values():
            for i, new in zip(idxs, spell([(names[i], srcs[i]) for i in idxs]), strict=True):
                names[i] = new
    input_set = set(srcs)
    out_dir = Path(out_dir)
    taken: set[Path] = set()
    out = []
    for name in names:
        target, n = out_dir / f"{name}.png", 1
        while target in taken or _is_input(target, input_set):
            n += 1
            target = out_dir / f"{name}-{n}.png"
        taken.add(target)
        out.append(target)
    return out


def _with_folders(group):
    """(name, path) pairs of inputs sharing a name -> names with the folders below their
    common ancestor: a/x.jpg, b/x.jpg -> a_x, b_x."""
    parents = [p.parent.parts for _, p in group]
    common = len(os.path.commonprefix(parents))
    return ["_".join(p.parent.parts[common:] + (name,)) for name, p in group]


def _is_input(target: Path, inputs: set[Path]) -> bool:
    target = Path(os.path.abspath(target))
    if target in inputs:
        return True
    # the same file by another path (a link, a differently spelled folder)
    return target.exists() and any(s.exists() and os.path.samefile(target, s) for s in inputs)


def save_png(image: Image.Image, path: Path, overwrite: bool) -> None:
    """Writes `image` as PNG through a temporary file renamed into place; without
    `overwrite`, an existing `path` is never replaced (FileExistsError)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        _move_into_place(tmp, path, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _move_into_place(tmp: str, path: Path, overwrite: bool) -> None:
    """Renames the finished file `tmp` to `path`; without `overwrite` an existing `path` is
    never replaced (FileExistsError, `tmp` left for the caller)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic: FileExistsError if something is there
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: create it exclusively
        with open(tmp, "rb") as src, open(path, "xb") as f:
            f.write(src.read())
    os.unlink(tmp)


def run_images(det, images, out_dir: Path, *, overwrite: bool, score_thresh: float) -> int:
    """Draws each image file into `out_dir` (targets from `output_paths`); returns 1 when no
    image could be drawn, else 0. Unreadable images are reported and skipped."""
    targets = output_paths(images, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path, target in tqdm(list(zip(images, targets, strict=True)), desc="images",
                             unit="img"):
        try:
            image = read_image(path)
        except ValueError as e:
            tqdm.write(f"skipped: {e}")
            failed += 1
            continue
        result = det([image])[0]
        try:
            save_png(draw(image, result, score_thresh=score_thresh), target, overwrite)
        except FileExistsError:
            tqdm.write(f"skipped: {target} appeared meanwhile and is not replaced "
                       f"(--overwrite replaces it)")
            failed += 1
            continue
        shown = int((result.scores >= score_thresh).sum())
        tqdm.write(f"{path}: {len(result)} detections, {shown} drawn -> {target}")
    return 1 if failed == len(images) else 0


# ---------------------------------------------------------------------- video and camera
class VideoError(ValueError):
    """A video file or camera that cannot be read, or an output that cannot be written; the
    message says what is wrong and what to do."""


def _cv2():
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # we say what failed
    return cv2


class VideoSource:
    """Frames of a video file or a camera as `[H, W, 3]` uint8 RGB. Opening reads the first
    frame, so an unreadable file or a missing camera fails here (VideoError), before any
    model work. Iterating yields every frame once, the first included."""

    def __init__(self, capture, first_bgr: np.ndarray, name: str, fps: float,
                 frame_count: int | None):
        self._capture = capture
        self._first = first_bgr
        self.name = name
        self.fps = fps  # frames per second of the source (30 when it does not say)
        self.frame_count = frame_count  # as the container states it; None for a camera
        self.size = (first_bgr.shape[1], first_bgr.shape[0])  # (width, height)

    @classmethod
    def open_file(cls, path) -> VideoSource:
        cv2 = _cv2()
        path = Path(path)
        if not path.exists():
            raise VideoError(f"{path}: no such file")
        if path.is_dir():
            raise VideoError(f"{path} is a folder; --video takes one video file (folders of "
                             f"images are drawn with: python -m jaxmrcnn.demo {path} --out DIR)")
        capture = cv2.VideoCapture(str(path))
        ok, first = capture.read() if capture.isOpened() else (False, None)
        if not ok or first is None:
            capture.release()
            raise VideoError(f"{path}: not a readable video (OpenCV's FFmpeg could not decode "
                             f"a frame of it); is it a complete video file?")
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        return cls(capture, first, str(path), _fps(capture.get(cv2.CAP_PROP_FPS)),
                   count if count > 0 else None)

    @classmethod
    def open_camera(cls, index: int) -> VideoSource:
        cv2 = _cv2()
        capture = cv2.VideoCapture(index)
        ok, first = capture.read() if capture.isOpened() else (False, None)
        if not ok or first is None:
            capture.release()
            found = sorted(str(p) for p in Path("/dev").glob("video*"))
            raise VideoError(
                f"no camera at index {index}: OpenCV could not open it or read a frame ("
                f"{'cameras here: ' + ', '.join(found) if found else 'no /dev/video* device'}"
                f"); pass another --webcam index, or a file with --video FILE")
        return cls(capture, first, f"camera {index}", _fps(capture.get(cv2.CAP_PROP_FPS)), None)

    def __iter__(self) -> Iterator[np.ndarray]:
        cv2 = _cv2()
        first, self._first = self._first, None
        if first is not None:
            yield cv2.cvtColor(first, cv2.COLOR_BGR2RGB)
        while True:
            ok, frame = self._capture.read()
            if not ok:
                return
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self._capture.release()


def _fps(value: float) -> float:
    return float(value) if 1.0 <= value <= 1000.0 else 30.0


class VideoSink:
    """Writes RGB frames to `path` (.mp4: MPEG-4 Part 2, .avi: Motion JPEG) through a
    temporary file in the same folder, renamed into place by `close` (never over an existing
    file unless `overwrite`). Codecs need even sizes: an odd width or height is padded by one
    edge-replicated column or row (`padded` tells)."""

    def __init__(self, path, fps: float, size: tuple[int, int], *, overwrite: bool):
        cv2 = _cv2()
        self.path = Path(path)
        self.overwrite = overwrite
        suffix = self.path.suffix.lower()
        if suffix not in VIDEO_CODECS:
            raise VideoError(f"--out {path}: write videos as .mp4 or .avi")
        w, h = size
        self.pad = (h % 2, w % 2)
        self.padded = any(self.pad)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                         suffix=suffix)
        os.close(fd)
        self._writer = cv2.VideoWriter(self._tmp, cv2.VideoWriter_fourcc(*VIDEO_CODECS[suffix]),
                                       fps, (w + self.pad[1], h + self.pad[0]))
        if not self._writer.isOpened():
            os.unlink(self._tmp)
            raise VideoError(f"--out {path}: OpenCV cannot write {suffix} videos here")
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        cv2 = _cv2()
        if self.padded:
            rgb = np.pad(rgb, ((0, self.pad[0]), (0, self.pad[1]), (0, 0)), mode="edge")
        self._writer.write(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> Path:
        """Finishes the file and moves it to `path`; returns where it is (the temporary
        file's own name when `path` appeared meanwhile and is not replaced)."""
        self._writer.release()
        try:
            _move_into_place(self._tmp, self.path, self.overwrite)
        except FileExistsError:
            kept = self.path.with_name(f"{self.path.stem}-{os.getpid()}{self.path.suffix}")
            os.replace(self._tmp, kept)
            return kept
        return self.path


class FrameRate:
    """Frames per second over the last `window` frame intervals (what the viewer sees:
    reading, model, drawing and writing together)."""

    def __init__(self, window: int = 10):
        self.times: deque[float] = deque(maxlen=window + 1)

    def tick(self, now: float | None = None) -> float | None:
        self.times.append(time.perf_counter() if now is None else now)
        if len(self.times) < 2:
            return None
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


def draw_stream(det, frames: Iterable[np.ndarray], *, score_thresh: float,
                max_frames: int | None = None,
                chunk_size: int | None = None) -> Iterator[tuple[np.ndarray, object, float | None]]:
    """(drawn frame, Detections, frames per second) for each frame, through
    `Detector.stream` (the next frames are read and preprocessed in its thread while the
    model runs; `chunk_size` as there: 1 for the least latency, the default for throughput).
    The rate of the first frame is None; later ones are over the last frame intervals."""
    if max_frames is not None:
        frames = itertools.islice(frames, max_frames)
    rate = FrameRate()
    for frame, result in zip_frames(frames, det, chunk_size):
        fps = rate.tick()
        yield draw_frame(frame, result, fps, score_thresh=score_thresh), result, fps


def zip_frames(frames: Iterable[np.ndarray], det,
               chunk_size: int | None = None) -> Iterator[tuple[np.ndarray, object]]:
    """(frame, its Detections) through `det.stream`, keeping each frame until its results
    come back (the stream holds at most three chunks of frames, so this holds as many)."""
    pending: deque[np.ndarray] = deque()

    def remember():
        for f in frames:
            pending.append(f)
            yield f

    for result in det.stream(remember(), chunk_size=chunk_size):
        yield pending.popleft(), result


def run_video(det, source: VideoSource, sink: VideoSink | None, *, score_thresh: float,
              max_frames: int | None = None, show=None) -> int:
    """Draws `source`'s frames into `sink` and/or `show(frame) -> keep going`; returns the
    number of frames drawn. Ctrl-C stops early; the frames drawn so far are kept. A camera's
    frames go one at a time (least latency), a file's in the stream's default chunks."""
    chunk_size = 1 if source.frame_count is None else None
    total = source.frame_count if max_frames is None else min(
        max_frames, source.frame_count or max_frames)
    n, fps = 0, None
    bar = tqdm(total=total, desc=source.name, unit="frame")
    start = time.perf_counter()
    first_s = None
    try:
        for drawn, _, fps in draw_stream(det, source, score_thresh=score_thresh,
                                         max_frames=max_frames, chunk_size=chunk_size):
            if sink is not None:
                sink.write(drawn)
            n += 1
            if first_s is None:
                first_s = time.perf_counter() - start
            bar.update(1)
            if fps is not None:
                bar.set_postfix_str(f"{fps:.1f} fps")
            if show is not None and not show(drawn):
                break
    except KeyboardInterrupt:
        tqdm.write("interrupted: keeping the frames drawn so far")
    finally:
        bar.close()
    if n:
        rest = time.perf_counter() - start - first_s
        steady = f", then {(n - 1) / rest:.1f} fps" if n > 1 and rest > 0 else ""
        print(f"{n} frames: the first in {first_s:.1f} s (with any compiling){steady}",
              file=sys.stderr)
    return n


def _window():
    """`show(frame) -> keep going` in an OpenCV window (q or Esc closes it), or a VideoError
    when this OpenCV has no GUI (opencv-python-headless)."""
    cv2 = _cv2()
    gui = [line for line in cv2.getBuildInformation().splitlines() if "GUI:" in line]
    if not gui or gui[0].split(":", 1)[1].strip().upper() in ("", "NONE", "NO"):
        raise VideoError("this OpenCV has no GUI (opencv-python-headless), so frames cannot be "
                         "shown in a window: pass --out FILE.mp4 to write the drawn video")

    def show(rgb):
        cv2.imshow("jaxmrcnn", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        return cv2.waitKey(1) & 0xFF not in (ord("q"), 27)

    return show


def _check_video_out(out: Path, video_in: Path | None, overwrite: bool) -> None:
    if out.suffix.lower() not in VIDEO_CODECS:
        raise VideoError(f"--out {out}: a video is written as FILE.mp4 (or FILE.avi); got "
                         f"{out.suffix or 'no extension'}")
    if out.is_dir():
        raise VideoError(f"--out {out} is a folder; name the video file, e.g. {out / 'out.mp4'}")
    if video_in is not None and out.exists() and video_in.exists() and os.path.samefile(
            out, video_in):
        raise VideoError(f"--out {out} is the input video; name another file")
    if out.exists() and not overwrite:
        raise VideoError(f"--out {out} already exists; pass --overwrite to replace it or "
                         f"another --out (nothing was written)")
    if not out.parent.is_dir():
        raise VideoError(f"--out {out}: folder {out.parent} does not exist")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Draw Mask R-CNN detections on images, folders, a video or a camera.")
    ap.add_argument("--weights", required=True, help="converted checkpoint (.jaxmrcnn.msgpack)")
    ap.add_argument("images", nargs="*", help="image files or folders of images")
    ap.add_argument("--video", help="a video file to draw (frame by frame)")
    ap.add_argument("--webcam", type=int, metavar="N", help="camera index to draw (0: first)")
    ap.add_argument("--out", help="output folder for the PNGs; for --video / --webcam the "
                    "output video FILE.mp4 (or .avi); without it frames are shown in a window")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace existing outputs (inputs are never replaced)")
    ap.add_argument("--score-thresh", type=float, default=0.5, help="draw detections above this")
    ap.add_argument("--max-frames", type=int, help="stop after this many frames (video, camera)")
    args = ap.parse_args(argv)

    kinds = [k for k, v in (("images", args.images), ("--video", args.video),
                            ("--webcam", args.webcam is not None)) if v]
    if len(kinds) != 1:
        ap.error("give image files or folders, --video FILE or --webcam N"
                 + (f" (one of them, not {' and '.join(kinds)})" if kinds else ""))
    if args.max_frames is not None and args.max_frames < 1:
        ap.error(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.images:
        if args.out is None:
            ap.error("images need --out DIR (the folder the drawn PNGs go to)")
        return _images_main(args)
    return _video_main(args)


def _images_main(args) -> int:
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: --out {out_dir} is a file, not a folder", file=sys.stderr)
        return 1
    try:
        images = expand_inputs(args.images)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    targets = output_paths(images, out_dir)
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        print(f"error: {len(existing)} of the outputs already exist ("
              f"{', '.join(str(t) for t in existing[:4])}{', ...' if len(existing) > 4 else ''}); "
              f"pass --overwrite to replace them or another --out (nothing was written)",
              file=sys.stderr)
        return 1
    det = _load(args)
    if det is None:
        return 1
    return run_images(det, images, out_dir, overwrite=args.overwrite,
                      score_thresh=args.score_thresh)


def _video_main(args) -> int:
    out = None if args.out is None else Path(args.out)
    source = sink = None
    try:
        show = _window() if out is None else None
        if out is not None:
            _check_video_out(out, Path(args.video) if args.video else None, args.overwrite)
        source = (VideoSource.open_file(args.video) if args.video
                  else VideoSource.open_camera(args.webcam))
        det = _load(args)
        if det is None:
            return 1
        if out is not None:
            sink = VideoSink(out, source.fps, source.size, overwrite=args.overwrite)
            if sink.padded:
                print(f"note: frames are {source.size[0]}x{source.size[1]}; video codecs need "
                      f"even sizes, so the output has one more (edge-copied) row or column",
                      file=sys.stderr)
        n = run_video(det, source, sink, score_thresh=args.score_thresh,
                      max_frames=args.max_frames, show=show)
    except VideoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if source is not None:
            source.close()
        written = sink.close() if sink is not None else None
    if written is not None:
        print(f"{n} frames -> {written}", file=sys.stderr)
    return 0 if n else 1


def _load(args):
    """The Detector for --weights, or None after printing why it cannot be loaded."""
    import jaxmrcnn

    try:
        det = jaxmrcnn.load(args.weights)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return det


if __name__ == "__main__":
    sys.exit(main())
