"""The model's convolutions: torch vs XLA with its defaults vs XLA with the Detector's CPU
compiler options (jaxmrcnn.detector.CPU_COMPILER_OPTIONS), the same inputs, one process.

    python benchmarks/convs.py [--repeats R]

Shapes are those of R50-FPN Mask R-CNN on an 800x1216 canvas: the FPN/RPN 3x3 at P2 and P3,
the mask head's 3x3 on 100 ROIs of 14x14, backbone 3x3s and 1x1s, the RPN's 1x1 predictors.
Each conv is followed by bias + ReLU, as in the model. Prints the median time of each, the
ratios to torch (< 1: faster than torch) and the max difference between the two XLA builds.
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
    a = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), median of {a.repeats}; options {CPU_COMPILER_OPTIONS}")
    head = f"{'conv':<22}{'torch ms':>9}{'xla ms':>9}{'+opts ms':>9}{'xla/t':>7}{'opts/t':>7}  max diff"
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    tot = np.zeros(3)
    for name, b, h, w, c, o, k, s in SHAPES:
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
            median_time(torch_fn, a.repeats),
            median_time(lambda: jax.block_until_ready(plain(*args)), a.repeats),
            median_time(lambda: jax.block_until_ready(opts(*args)), a.repeats),
        ]
        tot += times
        diff = float(jnp.abs(plain(*args) - opts(*args)).max())
        ref = torch_fn().permute(0, 2, 3, 1).numpy()
        diff_t = float(np.abs(np.asarray(opts(*args)) - ref).max())
        t_ms = [1e3 * t for t in times]
        print(f"{name:<22}{t_ms[0]:>9.1f}{t_ms[1]:>9.1f}{t_ms[2]:>9.1f}{times[1] / times[0]:>7.2f}"
              f"{times[2] / times[0]:>7.2f}  {diff:.1e} (vs torch {diff_t:.1e})", flush=True)
    print(f"{'all of the above':<22}{1e3 * tot[0]:>9.1f}{1e3 * tot[1]:>9.1f}{1e3 * tot[2]:>9.1f}"
          f"{tot[1] / tot[0]:>7.2f}{tot[2] / tot[0]:>7.2f}")


if __name__ == "__main__":
    main()
