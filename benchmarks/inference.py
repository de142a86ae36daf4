"""Mask R-CNN inference, jaxmrcnn vs torchvision, the same weights and images, one process.

    python benchmarks/inference.py [--version v1|v2] [--images N] [--repeats R] [--quick]

Builds torchvision's maskrcnn_resnet50_fpn (v1 or v2) with seeded random weights calibrated
to produce 100 detections per image (tests/torch_reference.py), saves its state dict,
converts it with converters/from_torch.py, and times both frameworks on the same images
(real ones from ../shared/data/coco-mini when present, else generated) at the standard
800/1333 preprocessing. Runs alternate between the two to share the machine's noise.

Prints median s/image for both and the ratio, the cold compile time, the warm start with
the persistent compilation cache (a fresh process: load + first image), and the peak memory
of each framework (measured in separate processes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

COCO_MINI = Path(os.environ.get("JAXMRCNN_COCO_MINI", ROOT.parent / "shared" / "data" / "coco-mini"))


def load_image(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_images(n: int, shape=None):
    import numpy as np

    folder = COCO_MINI / "train2017"
    if folder.is_dir():
        from PIL import Image

        files = sorted(folder.glob("*.jpg"))
        if shape is not None:  # select by header size, decode only what is returned
            sized = []
            for f in files:
                with Image.open(f) as im:
                    if im.size[::-1] == tuple(shape):
                        sized.append(f)
            files = sized or files
        return [load_image(f) for f in files[:n]], f"coco-mini ({folder})"
    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(n):  # smooth random scenes at COCO's most common size
        small = rng.integers(0, 255, (16, 24, 3)).astype(np.float32)
        img = np.kron(small, np.ones((27, 27, 1)))[:427, :640]
        imgs.append(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    return imgs, "generated (coco-mini not found)"


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's,
    since Linux carries it across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, weights: str, ckpt: str, image_index: int, cache_dir: str) -> None:
    """Runs one framework on one image in a fresh process; prints JSON."""
    import numpy as np

    t0 = time.perf_counter()
    imgs, _ = load_images(image_index + 1, (427, 640))
    img = imgs[image_index]
    if mode == "torch":
        import torch
        import torch_reference as R

        model = R.build(json.loads(os.environ["BENCH_VERSION"]))
        model.load_state_dict(torch.load(weights, weights_only=True))
        with torch.no_grad():
            for _ in range(2):
                model([R.to_tensor(img)])
        print(json.dumps(dict(peak_mb=peak_rss_mb(), pid=os.getpid())))
        return
    os.environ["JAXMRCNN_CACHE_DIR"] = cache_dir
    import jaxmrcnn

    det = jaxmrcnn.load(ckpt, buckets="exact")
    out = det([img])
    first = time.perf_counter() - t0
    for _ in range(1):
        det([img])
    cached = len(list(Path(cache_dir).glob("*")))
    print(json.dumps(dict(first_result_s=first, n=len(out[0]), peak_mb=peak_rss_mb(), cache_files=cached)))
    _ = np


def run_child(mode, args_ns, weights, ckpt, cache_dir):
    env = dict(os.environ, BENCH_VERSION=json.dumps(args_ns.version))
    cmd = [sys.executable, __file__, "--child", mode, "--weights", weights, "--ckpt", ckpt, "--cache", cache_dir]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default="v1", choices=["v1", "v2"])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the images")
    ap.add_argument("--quick", action="store_true", help="2 images, 1 pass, no memory runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.weights, args.ckpt, 0, args.cache)
        return
    if args.quick:
        args.images, args.repeats = 2, 1

    import numpy as np
    import torch
    import torch_reference as R

    from converters.from_torch import convert_file
    from jaxmrcnn.detector import Detector, enable_compilation_cache

    tmp = Path(tempfile.mkdtemp(prefix="jaxmrcnn_bench_"))
    cache_dir = str(tmp / "xla_cache")
    os.environ["JAXMRCNN_CACHE_DIR"] = cache_dir
    enable_compilation_cache()

    imgs, source = load_images(args.images, (427, 640))
    print(f"images: {len(imgs)} from {source}, sizes {sorted({a.shape[:2] for a in imgs})}")
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}")

    model = R.build(args.version)
    t = time.perf_counter()
    R.calibrate(model, [R.to_tensor(imgs[0])])
    print(f"calibrated torchvision {args.version} in {time.perf_counter() - t:.1f}s")
    weights = tmp / f"torchvision_{args.version}.pth"
    torch.save(model.state_dict(), weights)
    ckpt, summary = convert_file(weights)
    ckpt_path = tmp / f"torchvision_{args.version}.jaxmrcnn.msgpack"
    ckpt.save(ckpt_path)
    print("\n".join(summary))

    det = Detector(ckpt, buckets="exact")
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")

    # Cold compile: first call minus a steady-state call on the same image.
    t = time.perf_counter()
    out = det([imgs[0]])
    first = time.perf_counter() - t
    t = time.perf_counter()
    det([imgs[0]])
    steady = time.perf_counter() - t
    compile_s = first - steady
    for a in imgs[1:]:  # compile every canvas before timing
        det([a])

    t_tv, t_jax, n_tv, n_jax = [], [], [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            for a in imgs:
                x = [R.to_tensor(a)]
                t = time.perf_counter()
                ref = model(x)
                t_tv.append(time.perf_counter() - t)
                n_tv.append(len(ref[0]["boxes"]))
                t = time.perf_counter()
                out = det([a])
                t_jax.append(time.perf_counter() - t)
                n_jax.append(len(out[0]))
    med_tv, med_jax = statistics.median(t_tv), statistics.median(t_jax)

    print()
    print(f"{'':28s}{'torchvision':>14s}{'jaxmrcnn':>14s}")
    print(f"{'median s/image':28s}{med_tv:14.3f}{med_jax:14.3f}")
    print(f"{'min s/image':28s}{min(t_tv):14.3f}{min(t_jax):14.3f}")
    print(f"{'detections/image (mean)':28s}{np.mean(n_tv):14.1f}{np.mean(n_jax):14.1f}")
    print(f"ratio jaxmrcnn / torchvision (median): {med_jax / med_tv:.3f}   (goal <= 0.75)")
    print(f"cold compile (first call - steady call): {compile_s:.1f}s   (goal <= 90 s)")

    if not args.quick:
        warm = run_child("jax", args, str(weights), str(ckpt_path), cache_dir)
        tv_mem = run_child("torch", args, str(weights), str(ckpt_path), cache_dir)
        print(
            f"warm start with the compilation cache (fresh process: import, load, first "
            f"image): {warm['first_result_s']:.1f}s   (goal <= 10 s)"
        )
        print(f"peak RSS: torchvision {tv_mem['peak_mb']:.0f} MB, jaxmrcnn {warm['peak_mb']:.0f} MB "
              f"(one image at a time; cache entries {warm['cache_files']})")


if __name__ == "__main__":
    main()
