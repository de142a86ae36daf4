"""The exported model in onnxruntime (CPU) vs our Detector and torchvision, one process.

    python benchmarks/export_onnx.py [--min-size 384] [--max-size 640] [--images N] [--repeats R]

Builds torchvision's maskrcnn_resnet50_fpn (v1) with seeded random weights calibrated on the
first image (tests/torch_reference.py), converts it, exports it with jaxmrcnn.export
(StableHLO and ONNX, a max_size x max_size canvas, batch 1), and times per image, in
alternating passes over the same images (coco-mini where present, else generated):

    onnxruntime  the exported ONNX model (CPUExecutionProvider, default threads)
    stablehlo    the exported jax.export artifact, reloaded (jax only)
    ours         Detector.run_prepared (the jitted model, same canvas)
    torchvision  the model itself on the same image (its own preprocessing included)

The three exported / jaxmrcnn paths are timed on the same preprocessed inputs (the
network and its post-processing, no mask paste); torchvision's time includes its
transform (resize) and mask paste, which are a few percent of its total. Prints the median
wall time and process CPU time (all threads) per image of each, the ratios to onnxruntime,
and the agreement of the ONNX detections with ours (jaxmrcnn.compare).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-size", type=int, default=384)
    ap.add_argument("--max-size", type=int, default=640)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import importlib.util

    import numpy as np
    import torch
    import torch_reference as R
    from inference import load_images

    from jaxmrcnn.compare import match_detections, matched_box_error
    from jaxmrcnn.converters.from_torch import convert_file
    from jaxmrcnn.detector import Detector
    from jaxmrcnn.export import export
    from jaxmrcnn.preprocess import prepare

    imgs, source = load_images(args.images)
    print(f"images: {len(imgs)} from {source}; size {args.min_size}/{args.max_size}; "
          f"torch threads {torch.get_num_threads()}")
    tmp = Path(tempfile.mkdtemp(prefix="jaxmrcnn_export_bench_"))
    model = R.build("v1", min_size=args.min_size, max_size=args.max_size)
    R.calibrate(model, [R.to_tensor(imgs[0])])
    torch.save(model.state_dict(), tmp / "tv.pth")
    ckpt, _ = convert_file(tmp / "tv.pth")
    ckpt = dataclasses.replace(ckpt, config=ckpt.config.replace(
        input=dict(min_size=args.min_size, max_size=args.max_size)))
    d = ckpt.config.input.size_divisible
    side = -(-args.max_size // d) * d
    t = time.perf_counter()
    meta = export(ckpt, tmp / "export", (side, side), 1)
    print(f"exported (StableHLO + ONNX) in {time.perf_counter() - t:.1f}s to {tmp / 'export'}")

    spec = importlib.util.spec_from_file_location("run_export", tmp / "export" / "run_export.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    onnx_model = runner.load(tmp / "export", "onnx")
    hlo_model = runner.load(tmp / "export", "stablehlo")
    det = Detector(ckpt, buckets=[(side, side)], compilation_cache=False)

    prepared = [prepare(im, ckpt.config.input) for im in imgs]
    packed = [runner.pack([runner.preprocess(im, meta["preprocess"])], meta["canvas_hw"], 1)
              for im in imgs]
    tensors = [R.to_tensor(im) for im in imgs]
    paths = {
        "onnxruntime": lambda i: onnx_model.run(packed[i]),
        "stablehlo": lambda i: hlo_model.run(packed[i]),
        "ours": lambda i: det.run_prepared([prepared[i]]),
        "torchvision": lambda i: model(tensors[i : i + 1]),
    }
    with torch.no_grad():
        for i in range(len(imgs)):  # warm-up: compile, first-run allocations
            for fn in paths.values():
                fn(i)
        times = {k: [] for k in paths}
        for _ in range(args.repeats):
            for i in range(len(imgs)):
                for k, fn in paths.items():
                    times[k].append(timed(lambda fn=fn, i=i: fn(i)))

    # Agreement of the ONNX detections with ours on every image.
    fracs, box_err = [], 0.0
    for i in range(len(imgs)):
        o = {k: v[0] for k, v in onnx_model.run(packed[i]).items()}
        (r,) = det.run_prepared([prepared[i]])
        sel = lambda x: dict(boxes=x["boxes"][x["valid"]], scores=x["scores"][x["valid"]],  # noqa: E731
                             labels=x["class_index"][x["valid"]])
        pairs, frac = match_detections(sel(r), sel(o))
        fracs.append(frac)
        box_err = max(box_err, matched_box_error(sel(r), sel(o), pairs))

    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in times.items()}
    print(f"\n{'path':<12} {'wall s/img':>10} {'CPU s/img':>10} {'wall / ORT':>11} "
          f"{'CPU / ORT':>10}")
    ow, oc = med["onnxruntime"]
    for k, (w, c) in med.items():
        print(f"{k:<12} {w:>10.3f} {c:>10.3f} {w / ow:>11.2f} {c / oc:>10.2f}")
    print(f"\nONNX vs ours: {np.mean(fracs):.1%} of our detections matched (same class, "
          f"IoU >= 0.99, |score diff| <= 1e-3), max box difference {box_err:.2e} px")


if __name__ == "__main__":
    main()
