"""Run an exported Mask R-CNN (jaxmrcnn.export) without jaxmrcnn: numpy, plus jax for the
StableHLO program or onnxruntime for the ONNX model. `python -m jaxmrcnn.export` copies this
file into its output folder as `run_export.py`, so it is used from there:

    python DIR/run_export.py DIR image.jpg [--onnx]      # prints the detections

    import run_export                                    # (DIR on sys.path)
    model = run_export.load(DIR, backend="onnx")         # or "stablehlo"
    dets = model(image)       # HxWx3 uint8 RGB -> dict of boxes, scores, labels, names, masks

`export.json` (written beside the programs) states the inputs, outputs, preprocessing and
class names; this file implements the preprocessing it describes (the same rules as
jaxmrcnn/preprocess.py, which tests/test_export.py checks it against).

The program's outputs are per-detection `M x M` mask probabilities (`masks`), as the
Detector's raw outputs: the pasting into the image (the Detector's second program) is not
part of the export.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

INPUT_NAMES = ("images", "image_hw", "padded_hw", "orig_hw")
OUTPUT_NAMES = ("boxes", "scores", "class_index", "masks", "valid")


def resized_size(h: int, w: int, p: dict) -> tuple[int, int]:
    """Output (h, w) of the framework's resize rule (`p`: export.json's "preprocess")."""
    rule, lo, hi = p["resize_rule"], p["min_size"], p["max_size"]
    if rule == "torchvision":
        scale = min(lo / min(h, w), hi / max(h, w))
        return math.floor(h * scale), math.floor(w * scale)
    if rule == "detectron2":
        size = lo * 1.0
        scale = size / min(h, w)
        newh, neww = (size, scale * w) if h < w else (scale * h, size)
        if max(newh, neww) > hi:
            scale = hi * 1.0 / max(newh, neww)
            newh, neww = newh * scale, neww * scale
        return int(newh + 0.5), int(neww + 0.5)
    if rule == "maskrcnn_benchmark":
        size = lo
        short, long_ = float(min(h, w)), float(max(h, w))
        if long_ / short * size > hi:
            size = int(round(hi * short / long_))
        if (w <= h and w == size) or (h <= w and h == size):
            return h, w
        return (int(size * h / w), size) if w < h else (size, int(size * w / h))
    if rule == "mmdet":
        scale = min(hi / max(h, w), lo / min(h, w))
        return int(h * float(scale) + 0.5), int(w * float(scale) + 0.5)
    raise ValueError(f"unknown resize_rule {rule!r} in export.json")


def _taps(n_in: int, n_out: int):
    """torch bilinear (align_corners=False) taps along one axis, the source position rounded
    once from float64 as torch's fused multiply-add does."""
    if n_in == n_out:
        idx = np.arange(n_out)
        return idx, idx, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = i0 + (i0 < n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - l1).astype(np.float32), l1


def _torch_bilinear(x: np.ndarray, hw) -> np.ndarray:
    """`[H, W, C]` float32 resized as torch's CPU bilinear kernel (same operation order)."""
    y0, y1, wy0, wy1 = _taps(x.shape[0], hw[0])
    x0, x1, wx0, wx1 = _taps(x.shape[1], hw[1])
    r0 = x[y0][:, x0] * wx0[None, :, None] + x[y0][:, x1] * wx1[None, :, None]
    r1 = x[y1][:, x0] * wx0[None, :, None] + x[y1][:, x1] * wx1[None, :, None]
    return (r0 * wy0[:, None, None] + r1 * wy1[:, None, None]).astype(np.float32)


def _normalize(x: np.ndarray, p: dict) -> np.ndarray:
    x = x if p["channel_order"] == "RGB" else x[:, :, ::-1]
    x = x.astype(np.float32) / np.float32(p["pixel_scale"])
    if p["pixel_rescale"] != 1.0:
        x = x * np.float32(p["pixel_rescale"])
    return (x - np.asarray(p["mean"], np.float32)) / np.asarray(p["std"], np.float32)


def preprocess(image: np.ndarray, p: dict):
    """HxWx3 uint8 RGB -> (network input `[h, w, 3]` float32, image_hw, padded_hw, orig_hw)."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image must be an HxWx3 uint8 RGB array, got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    rh, rw = resized_size(h, w, p)
    impl = p["resize_impl"]
    if impl == "torch_bilinear":
        x = _normalize(a, p)
        x = x if (rh, rw) == (h, w) else _torch_bilinear(x, (rh, rw))
    else:
        if (rh, rw) != (h, w):
            if impl == "pillow_bilinear":
                from PIL import Image

                a = np.asarray(Image.fromarray(a).resize((rw, rh), Image.BILINEAR))
            elif impl == "opencv_linear":
                import cv2

                a = cv2.resize(a, (rw, rh), interpolation=cv2.INTER_LINEAR)
            else:
                raise ValueError(f"unknown resize_impl {impl!r} in export.json")
        x = _normalize(a, p)
    d = p["size_divisible"]
    return x, (rh, rw), (-(-rh // d) * d, -(-rw // d) * d), (h, w)


def pack(prepared: list, canvas_hw, batch: int) -> dict:
    """Pads preprocessed images into the program's `[B, H, W, 3]` input (dummy 32 x 32 slots
    fill the batch), with their size arrays: the program's inputs by name."""
    if len(prepared) > batch:
        raise ValueError(f"{len(prepared)} images for a program exported with batch {batch}")
    ch, cw = canvas_hw
    images = np.zeros((batch, ch, cw, 3), np.float32)
    sizes = {k: np.full((batch, 2), 32, np.int32) for k in INPUT_NAMES[1:]}
    for i, (x, image_hw, padded_hw, orig_hw) in enumerate(prepared):
        if padded_hw[0] > ch or padded_hw[1] > cw:
            raise ValueError(
                f"image {i} resizes to {image_hw} (padded {padded_hw}), larger than the exported "
                f"canvas {ch}x{cw}: export again with --size covering it (e.g. --size "
                f"{max(ch, padded_hw[0])} {max(cw, padded_hw[1])})")
        images[i, : image_hw[0], : image_hw[1]] = x
        sizes["image_hw"][i], sizes["padded_hw"][i], sizes["orig_hw"][i] = (
            image_hw, padded_hw, orig_hw)
    return {"images": images, **sizes}


class Exported:
    """An exported model: `model(image)` -> detections of one image; `model.run(inputs)` ->
    the program's raw outputs (dict of `[B, ...]` arrays) for packed inputs."""

    def __init__(self, directory, backend: str = "onnx"):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "export.json").read_text())
        self.backend = backend
        if backend == "stablehlo":
            import jax

            data = (self.dir / self.meta["files"]["stablehlo"]).read_bytes()
            exported = jax.export.deserialize(bytearray(data))
            self._fn = jax.jit(exported.call)
        elif backend == "onnx":
            import onnxruntime as ort

            self._session = ort.InferenceSession(
                str(self.dir / self.meta["files"]["onnx"]), providers=["CPUExecutionProvider"])
        else:
            raise ValueError(f"backend must be 'stablehlo' or 'onnx', got {backend!r}")

    def run(self, inputs: dict) -> dict:
        if self.backend == "stablehlo":
            out = self._fn(*(inputs[k] for k in INPUT_NAMES))
            return {k: np.asarray(v) for k, v in zip(OUTPUT_NAMES, out, strict=True)}
        out = self._session.run(list(OUTPUT_NAMES), {k: inputs[k] for k in INPUT_NAMES})
        return dict(zip(OUTPUT_NAMES, out, strict=True))

    def __call__(self, image: np.ndarray) -> dict:
        m = self.meta
        inputs = pack([preprocess(image, m["preprocess"])], m["canvas_hw"], m["batch"])
        raw = {k: v[0] for k, v in self.run(inputs).items()}
        keep = raw["valid"].astype(bool)
        cls = raw["class_index"][keep].astype(np.int64)
        return {
            "boxes": raw["boxes"][keep], "scores": raw["scores"][keep],
            "labels": np.asarray(m["category_ids"], np.int64)[cls], "class_index": cls,
            "names": [m["classes"][c] for c in cls], "masks": raw["masks"][keep],
        }


def load(directory, backend: str = "onnx") -> Exported:
    return Exported(directory, backend)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run an exported jaxmrcnn model on images.")
    ap.add_argument("dir", help="the export folder (holds export.json)")
    ap.add_argument("images", nargs="+", help="image files (read with Pillow)")
    ap.add_argument("--onnx", action="store_true", help="onnxruntime (default: StableHLO)")
    args = ap.parse_args(argv)
    from PIL import Image

    model = load(args.dir, "onnx" if args.onnx else "stablehlo")
    for path in args.images:
        with Image.open(path) as im:
            dets = model(np.asarray(im.convert("RGB")))
        print(f"{path}: {len(dets['scores'])} detections")
        for b, s, n in zip(dets["boxes"], dets["scores"], dets["names"], strict=True):
            print(f"  {n:>16s} {s:.3f}  [{b[0]:.1f}, {b[1]:.1f}, {b[2]:.1f}, {b[3]:.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
