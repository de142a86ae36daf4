"""Detection ops, jitted JAX vs torchvision, the same inputs, one process.

    python benchmarks/ops.py [--repeats R] [--only NAME ...]

Sizes are those of Mask R-CNN inference on an 800x1344 canvas:
  rpn_nms      5 FPN levels x 1000 boxes, IoU 0.7 (levels never suppress each other) -> 1000
  box_nms      1000 proposals x 80 classes, score > 0.05, class-aware IoU 0.5 -> 100
  roi_align_*  1000 ROIs 7x7 and 100 ROIs 14x14 over P2..P5 (256 channels), sampling
               ratio 2 (torchvision) and 0 (adaptive), multi-level with torchvision's rule
  roi_align_v2_*  ROIAlignV2 as in Detectron2 (aligned, adaptive sampling ratio 0, detectron2
               level rule) on an 800x1216 image, P2..P5 with 256 channels, against
               torchvision.ops.roi_align per level on the ROIs assigned to it (Detectron2's
               ROIPooler): 1000 proposal-like boxes 7x7, the same with 5% elongated boxes
               (aspect 20:1 to 100:1, 300 to 1216 px long), and 100 boxes 14x14 (masks)
  paste        100 masks 28x28 into 800x1216, thresholded at 0.5

--max-samples G sets roi_align's adaptive chunk (samples per bin and axis per work item; the
result is exact for any G, only the speed changes).

For each op it prints the median time of both, the ratio JAX / torchvision (< 1: JAX is
faster), the one-off compile time (trace + lower + compile) and a check that both computed
the same thing. Runs alternate between the two frameworks so that they share the machine's
noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign

from jaxmrcnn import ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "ops"))
import _refs  # noqa: E402  (the tests' input generators)

CANVAS = (800, 1344)


def clustered_boxes(rng, n, n_objects, hw, jitter=0.15):
    """Overlapping boxes around `n_objects` objects (tests/ops/_refs.py), clipped to `hw`."""
    h, w = hw
    boxes = _refs.clustered_boxes(rng, n, n_objects=n_objects, image_hw=hw, jitter=jitter)
    return np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)


def proposal_boxes(rng, n, hw, elongated=0.0):
    """RPN-proposal-like boxes inside `hw`: sqrt(area) log-uniform in [16, 800] px, aspect
    log-uniform in [1/3, 3]; a fraction `elongated` instead 300 to 1216 px long (at most
    the image side) with aspect 20:1 to 100:1, 70% horizontal."""
    h, w = hw
    s = np.exp(rng.uniform(np.log(16), np.log(800), n))
    ar = np.exp(rng.uniform(np.log(1 / 3), np.log(3), n))
    bw, bh = s * np.sqrt(ar), s / np.sqrt(ar)
    k = int(round(elongated * n))
    horizontal = rng.random(k) < 0.7
    long_side = np.exp(rng.uniform(np.log(300), np.log(1216), k))
    long_side = np.minimum(long_side, np.where(horizontal, w, h))
    short_side = long_side / np.exp(rng.uniform(np.log(20), np.log(100), k))
    bw[:k] = np.where(horizontal, long_side, short_side)
    bh[:k] = np.where(horizontal, short_side, long_side)
    bw, bh = np.minimum(bw, w), np.minimum(bh, h)
    cx, cy = rng.uniform(bw / 2, w - bw / 2), rng.uniform(bh / 2, h - bh / 2)
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)
    return boxes[rng.permutation(n)].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Problems: each returns (jax_fn, jax_args, torch_fn, check(jax_out, torch_out) -> str)
# ---------------------------------------------------------------------------------------------
def rpn_nms(rng):
    boxes = np.stack([clustered_boxes(rng, 1000, 60, CANVAS) for _ in range(5)])  # [5, 1000, 4]
    scores = rng.random((5, 1000)).astype(np.float32)

    def jax_fn(b, s):  # the model's way: per-level NMS, then the best 1000 over all levels
        idx, ok = ops.nms(b, s, 0.7, 1000)  # [5, 1000]
        kept = jnp.where(ok, jnp.take_along_axis(s, idx, axis=1), -jnp.inf).reshape(-1)
        top_s, top = jax.lax.top_k(kept, 1000)
        flat = (idx + 1000 * jnp.arange(5)[:, None]).reshape(-1)[top]
        return flat, jnp.isfinite(top_s)

    tb = torch.from_numpy(boxes.reshape(-1, 4))
    ts = torch.from_numpy(scores.reshape(-1))
    lv = torch.arange(5).repeat_interleave(1000)

    def torch_fn():
        return torchvision.ops.batched_nms(tb, ts, lv, 0.7)[:1000]

    def check(j, t):
        flat, ok = (np.asarray(x) for x in j)
        same = np.array_equal(flat[ok], t.numpy())
        return f"keep lists identical ({len(t)} kept)" if same else "keep lists DIFFER"

    return jax_fn, (jnp.asarray(boxes), jnp.asarray(scores)), torch_fn, check


def box_nms(rng):
    n, c = 1000, 80
    props = clustered_boxes(rng, n, 30, CANVAS)
    boxes = props[:, None, :] + rng.normal(0, 4, (n, c, 4)).astype(np.float32)  # per-class boxes
    logits = rng.normal(0, 1, (n, c + 1)) + 3.0 * (rng.random((n, c + 1)) < 0.03)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = probs[:, 1:].astype(np.float32)  # [N, C]
    labels = np.broadcast_to(np.arange(1, c + 1), (n, c)).astype(np.int32)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)

    def jax_fn(b, s, lab):
        valid = s > 0.05
        nb = ops.torchvision_offset_boxes(b, lab, valid)  # torchvision's own arithmetic
        return ops.batched_nms(nb, s, lab, 0.5, 100, valid=valid)

    tb, ts, tl = (torch.from_numpy(x) for x in (boxes, scores, labels))

    def torch_fn():
        keep = torch.where(ts > 0.05)[0]
        k = torchvision.ops.batched_nms(tb[keep], ts[keep], tl[keep], 0.5)[:100]
        return keep[k]

    def check(j, t):
        idx, ok = (np.asarray(x) for x in j)
        same = np.array_equal(idx[ok], t.numpy())
        n_cand = int((scores > 0.05).sum())
        return f"keep lists identical ({n_cand} candidates)" if same else "keep lists DIFFER"

    return jax_fn, (jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(labels)), torch_fn, check


def roi_align_problem(n_rois, size, sr):
    def make(rng, max_samples):
        h, w = CANVAS
        feats = [rng.normal(0, 1, (1, 256, h // s, w // s)).astype(np.float32)
                 for s in (4, 8, 16, 32)]
        rois = clustered_boxes(rng, n_rois, 40, CANVAS, jitter=0.3)

        def jax_fn(f2, f3, f4, f5, r):
            return ops.roi_align(
                [f2, f3, f4, f5], r[None], output_size=size,
                spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], sampling_ratio=sr,
                aligned=False, level_rule="torchvision", max_samples=max_samples,
            )

        pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], size, sr)
        tf = {str(i): torch.from_numpy(f) for i, f in enumerate(feats)}
        tr = [torch.from_numpy(rois)]

        def torch_fn():
            return pooler(tf, tr, [CANVAS])

        args = [jnp.asarray(f.transpose(0, 2, 3, 1)) for f in feats] + [jnp.asarray(rois)]
        return jax_fn, tuple(args), torch_fn, _roi_align_check

    return make


def _roi_align_check(j, t):
    out, multi = j
    ref = t.numpy().transpose(0, 2, 3, 1)
    err = float(np.abs(np.asarray(out)[0] - ref).max())
    mx = np.abs(ref).max()
    return f"max abs err {err:.1e} (max |ref| {mx:.1f}), {int(multi)} multi-item ROIs"


def roi_align_v2_problem(n_rois, size, elongated=0.0):
    """Detectron2's ROIAlignV2 pooler: aligned, sampling ratio 0, detectron2 level rule."""
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]

    def make(rng, max_samples):
        h, w = 800, 1216
        feats = [rng.normal(0, 1, (1, 256, h // s, w // s)).astype(np.float32)
                 for s in (4, 8, 16, 32)]
        rois = proposal_boxes(rng, n_rois, (h, w), elongated)

        def jax_fn(f2, f3, f4, f5, r):
            return ops.roi_align(
                [f2, f3, f4, f5], r[None], output_size=size, spatial_scales=scales,
                sampling_ratio=0, aligned=True, level_rule="detectron2", max_samples=max_samples,
            )

        tf = [torch.from_numpy(f) for f in feats]
        tr = torch.from_numpy(rois)

        def torch_fn():  # detectron2.modeling.poolers.ROIPooler.forward
            area = (tr[:, 2] - tr[:, 0]) * (tr[:, 3] - tr[:, 1])
            lvl = torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8))
            lvl = torch.clamp(lvl, min=2, max=5).to(torch.int64) - 2
            out = torch.zeros(len(tr), 256, size, size)
            boxes = torch.cat([torch.zeros(len(tr), 1), tr], 1)
            for i, (f, s) in enumerate(zip(tf, scales, strict=True)):
                idx = torch.nonzero(lvl == i, as_tuple=True)[0]
                pooled = torchvision.ops.roi_align(f, boxes[idx], size, s, 0, True)
                out.index_put_((idx,), pooled)
            return out

        args = [jnp.asarray(f.transpose(0, 2, 3, 1)) for f in feats] + [jnp.asarray(rois)]
        return jax_fn, tuple(args), torch_fn, _roi_align_check

    return make


def paste(rng):
    n, (h, w) = 100, (800, 1216)
    logits = rng.normal(0, 3, (n, 1, 7, 7)).astype(np.float32)
    masks = torch.sigmoid(torch.nn.functional.interpolate(
        torch.from_numpy(logits), size=(28, 28), mode="bilinear", align_corners=False))[:, 0]
    masks = masks.numpy()
    boxes = clustered_boxes(rng, n, 30, (h, w), jitter=0.3)

    def jax_fn(m, b):
        return ops.paste_masks(m, b, (h, w), method="torchvision", threshold=0.5)

    tm, tb = torch.from_numpy(masks)[:, None], torch.from_numpy(boxes)

    def torch_fn():
        return paste_masks_in_image(tm, tb, (h, w))[:, 0] >= 0.5

    def check(j, t):
        diff = int((np.asarray(j) != t.numpy()).sum())
        return f"{diff} differing pixels of {t.numel()}"

    return jax_fn, (jnp.asarray(masks), jnp.asarray(boxes)), torch_fn, check


PROBLEMS = {
    "rpn_nms": rpn_nms,
    "box_nms": box_nms,
    "roi_align_1000x7_sr2": roi_align_problem(1000, 7, 2),
    "roi_align_100x14_sr2": roi_align_problem(100, 14, 2),
    "roi_align_1000x7_sr0": roi_align_problem(1000, 7, 0),
    "roi_align_100x14_sr0": roi_align_problem(100, 14, 0),
    "roi_align_v2_1000x7": roi_align_v2_problem(1000, 7),
    "roi_align_v2_1000x7_long": roi_align_v2_problem(1000, 7, elongated=0.05),
    "roi_align_v2_100x14": roi_align_v2_problem(100, 14),
    "paste": paste,
}


def run(name, repeats, seed=0, max_samples=4):
    make = PROBLEMS[name]
    rng = np.random.default_rng(seed)
    if name.startswith("roi_align"):
        jax_fn, args, torch_fn, check = make(rng, max_samples)
    else:
        jax_fn, args, torch_fn, check = make(rng)
    t0 = time.perf_counter()
    compiled = jax.jit(jax_fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0

    def time_jax():
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        return time.perf_counter() - t, out

    def time_torch():
        t = time.perf_counter()
        with torch.inference_mode():
            out = torch_fn()
        return time.perf_counter() - t, out

    time_jax(), time_torch()  # warm-up
    tj, tt = [], []
    for _ in range(repeats):
        dt, jout = time_jax()
        tj.append(dt)
        dt, tout = time_torch()
        tt.append(dt)
    mj, mt = statistics.median(tj), statistics.median(tt)
    return dict(name=name, jax=mj, torch=mt, ratio=mj / mt, compile=compile_s,
                check=check(jout, tout))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="timed runs per framework")
    p.add_argument("--only", nargs="*", choices=sorted(PROBLEMS), help="ops to run")
    p.add_argument("--max-samples", type=int, default=4,
                   help="roi_align's adaptive chunk G (speed only; exact for any G)")
    a = p.parse_args(argv)
    names = a.only or list(PROBLEMS)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), median of {a.repeats}, "
          f"roi_align max_samples={a.max_samples}")
    header = f"{'op':<26}{'jax ms':>9}{'torch ms':>10}{'ratio':>7}{'compile s':>11}  check"
    print(header)
    print("-" * len(header))
    for name in names:
        r = run(name, a.repeats, max_samples=a.max_samples)
        print(f"{r['name']:<26}{1e3 * r['jax']:>9.2f}{1e3 * r['torch']:>10.2f}"
              f"{r['ratio']:>7.2f}{r['compile']:>11.2f}  {r['check']}", flush=True)


if __name__ == "__main__":
    main()
