"""The model's convolutions: torch vs XLA with its defaults vs XLA with the Detector's CPU
compiler options (jaxmrcnn.detector.CPU_COMPILER_OPTIONS), the same inputs, one process.

    python benchmarks/convs.py [--repeats R] [--only dense|grouped] [--arch 32x8d,64x4d,32x4d]
                               [--context]

Shapes are those of R50-FPN Mask R-CNN on an 800x1216 canvas: the FPN/RPN 3x3 at P2 and P3,
the mask head's 3x3 on 100 ROIs of 14x14, backbone 3x3s and 1x1s, the RPN's 1x1 predictors.
Each conv is followed by bias + ReLU, as in the model. Prints the median time of each, the
ratios to torch (< 1: faster than torch) and the max difference between the two XLA builds.

Then the grouped 3x3 convs of ResNeXt-101 32x8d (Detectron2, maskrcnn-benchmark), 64x4d and
32x4d (mmdet) at the same canvas: every stage's stride-1 3x3 and the stride-2 3x3 of the first
block of stages 2-4 (stride on the 3x3, as ResNeXt has it). torch's conv2d(groups=G) vs XLA's
feature_group_count conv vs ours (jaxmrcnn.layers.common.grouped_conv3x3: its default, and
variants), all XLA programs built with the Detector's options, each followed by ReLU; with
--context, inside a bottleneck's ops (BN + ReLU + spatial mask before, BN + ReLU + 1x1 conv
after), where XLA's fusion decisions differ (see "taps" in common.py). Runs interleaved
round-robin (the machine's noise is shared), median of R.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jaxmrcnn.detector import CPU_COMPILER_OPTIONS  # noqa: E402
from jaxmrcnn.layers.common import (  # noqa: E402
    grouped_conv3x3,
    groups_per_step,
    spatial_mask,
)

# (name, batch, H, W, C_in, C_out, kernel, stride)
SHAPES = [
    ("fpn/rpn 3x3 P2", 1, 200, 304, 256, 256, 3, 1),
    ("fpn/rpn 3x3 P3", 1, 100, 152, 256, 256, 3, 1),
    ("mask head 3x3", 100, 14, 14, 256, 256, 3, 1),
    ("layer1 3x3", 1, 200, 304, 64, 64, 3, 1),
    ("layer3 3x3", 1, 50, 76, 256, 256, 3, 1),
    ("stem 7x7 s2", 1, 800, 1216, 3, 64, 7, 2),
    ("layer1 1x1 256->64", 1, 200, 304, 256, 64, 1, 1),
    ("layer1 1x1 64->256", 1, 200, 304, 64, 256, 1, 1),
    ("fpn lateral 1x1 P2", 1, 200, 304, 256, 256, 1, 1),
    ("layer3 1x1 1024->256", 1, 50, 76, 1024, 256, 1, 1),
    ("layer4 ds 1x1 s2", 1, 50, 76, 1024, 2048, 1, 2),
    ("rpn 1x1 256->15 P2", 1, 200, 304, 256, 15, 1, 1),
]

# ResNeXt (groups, width per group) by name; the 3x3 width of stage i is 2**i * G * d.
RESNEXT = {"32x8d": (32, 8), "64x4d": (64, 4), "32x4d": (32, 4)}
CANVAS = (800, 1216)


def grouped_shapes(arch):
    """(name, H, W, C, groups, stride) of one ResNeXt's grouped 3x3 convs at CANVAS."""
    g, d = RESNEXT[arch]
    out = []
    for stage in range(4):
        width = 2**stage * g * d
        h, w = CANVAS[0] // 2 ** (stage + 2), CANVAS[1] // 2 ** (stage + 2)
        if stage > 0:  # first block: stride 2 on the 3x3, input at the previous stride
            out.append((f"{arch} s{stage + 1} 3x3/2", 2 * h, 2 * w, width, g, 2))
        out.append((f"{arch} s{stage + 1} 3x3", h, w, width, g, 1))
    return out


def interleaved(fns, repeats):
    """Median time of each callable, run round-robin (rotating the order each round)."""
    for f in fns.values():
        f()
    keys = list(fns)
    ts = {k: [] for k in keys}
    for i in range(repeats):
        for k in keys[i % len(keys):] + keys[: i % len(keys)]:
            t = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


# Our variants besides the default ("ours": method "scan", groups_per_step's k): (name,
# method, groups per step or None for the default).
VARIANTS = [("scan k=1", "scan", 1), ("taps", "taps", None)]


def grouped(archs, repeats, context=False):
    cols = ["torch", "xla", "ours", *(v[0] for v in VARIANTS)]
    print()
    print("grouped 3x3 convs" + (" in their bottleneck context (BN + ReLU + spatial mask before, "
                                 "BN + ReLU + 1x1 conv after)" if context else " (+ ReLU)"))
    head = (f"{'shape (Cg: in channels per group)':<36}"
            + "".join(f"{c + ' ms':>11}" for c in cols)
            + f"{'xla/t':>7}{'ours/t':>7}{'k':>4}  max rel diff vs torch")
    print(head)
    print("-" * len(head))
    tot = dict.fromkeys(cols, 0.0)
    for arch in archs:
        for name, h, w, c, g, s in grouped_shapes(arch):
            med, diff = grouped_one(h, w, c, g, s, repeats, context)
            for k in cols:
                tot[k] += med.get(k, float("nan"))
            print(f"{name + f' {h}x{w} C{c} Cg{c // g}':<36}"
                  + "".join(f"{1e3 * med.get(k, float('nan')):>11.1f}" for k in cols)
                  + f"{med['xla'] / med['torch']:>7.2f}{med['ours'] / med['torch']:>7.2f}"
                  + f"{groups_per_step(c // g, g):>4}  {diff:.1e}", flush=True)
    print(f"{'all of the above (nan: not run)':<36}"
          + "".join(f"{1e3 * tot[k]:>11.1f}" for k in cols)
          + f"{tot['xla'] / tot['torch']:>7.2f}{tot['ours'] / tot['torch']:>7.2f}")


def grouped_one(h, w, c, g, s, repeats, context=False):
    """Median times {torch, xla, ours, *VARIANTS} of one grouped conv + ReLU (NaN: not run),
    or with `context` of BN + ReLU + mask -> grouped conv -> BN + ReLU -> 1x1 conv C -> C (as
    in a bottleneck), and the max difference to torch of all XLA programs, relative to
    max |torch|."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, h, w, c), np.float32)
    wt = (rng.standard_normal((3, 3, c // g, c)) / np.sqrt(9 * c / g)).astype(np.float32)
    w1 = (rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32)
    scale = (0.5 + rng.random(c)).astype(np.float32)
    shift = (rng.random(c) - 0.5).astype(np.float32)
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    wtt = torch.from_numpy(wt).permute(3, 2, 0, 1).contiguous()
    w1t = torch.from_numpy(w1.T.copy())[:, :, None, None]
    st, bt = torch.from_numpy(scale)[:, None, None], torch.from_numpy(shift)[:, None, None]

    def torch_fn():
        with torch.inference_mode():
            y = torch.relu(xt * st + bt) if context else xt
            y = torch.relu(torch.nn.functional.conv2d(y, wtt, stride=s, padding=1, groups=g))
            return torch.nn.functional.conv2d(torch.relu(y * st + bt), w1t) if context else y

    args = (jnp.asarray(x), jnp.asarray(wt), jnp.asarray(w1), jnp.asarray(scale),
            jnp.asarray(shift))
    # the Bottleneck's spatial mask (everything valid here; its multiply stays in the graph)
    mask = spatial_mask(jnp.array([[4 * h, 4 * w]]), (h, w), 4)

    def program(method, per_step):
        def f(x, k, w1, sc, sh):
            y = jax.nn.relu(x * sc + sh) * mask if context else x
            y = jax.nn.relu(grouped_conv3x3(y, k, s, g, method, per_step))
            if context:
                y = (jax.nn.relu(y * sc + sh).reshape(-1, c) @ w1).reshape(1, ho, wo, c)
            return y

        return jax.jit(f, compiler_options=CPU_COMPILER_OPTIONS).lower(*args).compile()

    progs = {"xla": program("xla", None), "ours": program("scan", None)}
    for name, method, per_step in VARIANTS:
        if name == "taps" and c // g > 8:
            continue  # collapses beyond 8 channels per group (seconds per conv)
        if name == "scan k=1" and groups_per_step(c // g, g) == 1:
            continue  # that is "ours"
        progs[name] = program(method, per_step)
    fns = {"torch": torch_fn}
    fns.update((k, lambda p=p: jax.block_until_ready(p(*args))) for k, p in progs.items())
    med = interleaved(fns, repeats)
    ref = torch_fn().permute(0, 2, 3, 1).numpy()
    diff = max(float(np.abs(np.asarray(p(*args)) - ref).max()) for p in progs.values())
    return med, diff / float(np.abs(ref).max())


def median_time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only", choices=["dense", "grouped"], help="run one table only")
    p.add_argument("--context", action="store_true",
                   help="grouped convs inside their bottleneck context (see grouped_one)")
    p.add_argument("--arch", default=",".join(RESNEXT),
                   help=f"ResNeXt variants for the grouped table ({', '.join(RESNEXT)})")
    a = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), median of {a.repeats}; "
          f"options {CPU_COMPILER_OPTIONS}")
    if a.only != "grouped":
        dense(a.repeats)
    if a.only != "dense":
        grouped(a.arch.split(","), a.repeats, a.context)


def dense_one(rng, b, h, w, c, o, k, s, repeats):
    """(times [torch, xla, xla + options], max diff between the XLA builds, vs torch)."""
    x = rng.standard_normal((b, h, w, c), np.float32)
    wt = (rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c)).astype(np.float32)
    bias = rng.standard_normal(o).astype(np.float32)
    pad = k // 2

    def f(x, wt, bias):
        y = jax.lax.conv_general_dilated(x, wt, (s, s), ((pad, pad), (pad, pad)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y + bias)

    args = (jnp.asarray(x), jnp.asarray(wt), jnp.asarray(bias))
    plain = jax.jit(f).lower(*args).compile()
    opts = jax.jit(f, compiler_options=CPU_COMPILER_OPTIONS).lower(*args).compile()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    wtt = torch.from_numpy(wt).permute(3, 2, 0, 1).contiguous()
    bt = torch.from_numpy(bias)

    def torch_fn():
        with torch.inference_mode():
            return torch.relu(torch.nn.functional.conv2d(xt, wtt, bt, stride=s, padding=pad))

    times = [
        median_time(torch_fn, repeats),
        median_time(lambda: jax.block_until_ready(plain(*args)), repeats),
        median_time(lambda: jax.block_until_ready(opts(*args)), repeats),
    ]
    diff = float(jnp.abs(plain(*args) - opts(*args)).max())
    ref = torch_fn().permute(0, 2, 3, 1).numpy()
    diff_t = float(np.abs(np.asarray(opts(*args)) - ref).max())
    return times, diff, diff_t


def dense(repeats):
    head = (f"{'conv':<22}{'torch ms':>9}{'xla ms':>9}{'+opts ms':>9}{'xla/t':>7}{'opts/t':>7}"
            "  max diff")
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    tot = np.zeros(3)
    for name, *shape in SHAPES:
        times, diff, diff_t = dense_one(rng, *shape, repeats)
        tot += times
        t_ms = [1e3 * t for t in times]
        print(f"{name:<22}{t_ms[0]:>9.1f}{t_ms[1]:>9.1f}{t_ms[2]:>9.1f}{times[1] / times[0]:>7.2f}"
              f"{times[2] / times[0]:>7.2f}  {diff:.1e} (vs torch {diff_t:.1e})", flush=True)
    print(f"{'all of the above':<22}{1e3 * tot[0]:>9.1f}{1e3 * tot[1]:>9.1f}{1e3 * tot[2]:>9.1f}"
          f"{tot[1] / tot[0]:>7.2f}{tot[2] / tot[0]:>7.2f}")


if __name__ == "__main__":
    main()
