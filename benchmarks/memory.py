"""Peak memory of Detector.stream over few and many images: it should not grow with the count.

    python benchmarks/memory.py [--counts 10 1000] [--size 128 192] [--chunk-size N]

Runs a torchvision-preset Mask R-CNN (seeded random Flax weights, no torch needed) at a small
input size over N generated images of one size, each count in its own fresh process: the
images come from a generator (never all in memory at once), their Detections (masks pasted)
are consumed and dropped, as an evaluation loop would. Prints each process's peak resident
memory (ru_maxrss of the child, and VmHWM) and the ratio of the largest count's to the
smallest's: ~1.0 when memory is bounded.

The size is small to run 1000 images in a few minutes on a 2-core CPU: short side 128 (images
128x192), 50 proposals and 5 detections per image (the mask head costs ~1 GFLOP per
detection), every detection kept (score threshold 0: random weights score ~1/91 per class)
so that every image pastes its 5 masks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(n: int, hw: tuple[int, int], chunk_size: int | None) -> None:
    """One run over n generated images; prints JSON."""
    import numpy as np

    from jaxmrcnn.checkpoint import Checkpoint
    from jaxmrcnn.config import torchvision_maskrcnn_r50_fpn
    from jaxmrcnn.detector import Detector
    from jaxmrcnn.model import init_params

    cfg = torchvision_maskrcnn_r50_fpn().replace(
        input=dict(min_size=min(hw), max_size=max(hw)),
        rpn=dict(pre_nms_top_n=100, post_nms_top_n=50),
        roi_heads=dict(score_thresh=0.0, detections_per_img=5),
    )
    params = jax_to_numpy(init_params(cfg))
    ckpt = Checkpoint(cfg, params, [f"c{i}" for i in range(91)], list(range(91)), {})
    det = Detector(ckpt, buckets="exact", compilation_cache=False)

    def images():
        rng = np.random.default_rng(0)
        for _ in range(n):  # smooth random scenes
            small = rng.integers(0, 255, (8, 12, 3)).astype(np.float32)
            img = np.kron(small, np.ones((hw[0] // 8 + 1, hw[1] // 12 + 1, 1)))[: hw[0], : hw[1]]
            yield np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)

    t = time.perf_counter()
    count = dets = mask_px = 0
    for d in det.stream(images(), chunk_size=chunk_size):
        count += 1
        dets += len(d)
        mask_px += int(d.masks.sum())
    secs = time.perf_counter() - t
    print(json.dumps(dict(images=count, detections=dets, mask_pixels=mask_px, seconds=secs,
                          ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          vm_hwm_mb=vm_hwm_mb())))


def jax_to_numpy(tree):
    import jax
    import numpy as np

    return jax.tree_util.tree_map(np.asarray, tree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--size", type=int, nargs=2, default=[128, 192], metavar=("H", "W"))
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, tuple(args.size), args.chunk_size)
        return
    # The parent imports no jax: a child's ru_maxrss (which Linux carries across fork and
    # exec) starts from this small process, so it is the child's own peak.
    runs = {}
    for n in args.counts:
        cmd = [sys.executable, __file__, "--child", str(n), "--size", *map(str, args.size)]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if res.returncode != 0:
            sys.exit(f"child with {n} images failed:\n{res.stderr[-3000:]}")
        runs[n] = json.loads(res.stdout.strip().splitlines()[-1])
        r = runs[n]
        print(f"{n:6d} images: peak RSS {r['ru_maxrss_mb']:7.0f} MB (ru_maxrss), "
              f"{r['vm_hwm_mb']:7.0f} MB (VmHWM); {r['seconds']:.1f} s "
              f"({r['seconds'] / n:.3f} s/image), {r['detections'] / n:.1f} detections/image",
              flush=True)
    lo, hi = min(runs), max(runs)
    ratio = runs[hi]["ru_maxrss_mb"] / runs[lo]["ru_maxrss_mb"]
    print(f"peak RSS ratio {hi} / {lo} images: {ratio:.3f}   (flat: ~1.0)")


if __name__ == "__main__":
    main()
