"""Small building blocks shared by the layers: conv, grouped 3x3 conv, frozen norm, spatial
validity masks."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.linen.linear import default_kernel_init


class FrozenNorm(nn.Module):
    """Inference-time BatchNorm: y = x * scale + shift, scale = w / sqrt(var + eps),
    shift = b - mean * scale (torchvision FrozenBatchNorm2d / BatchNorm2d in eval mode;
    maskrcnn-benchmark with eps = 0). `affine=True` is Detectron's AffineChannel: y = x * w + b.

    Params: `weight`, `bias` and, unless affine, `mean`, `var` (all `[C]`).
    """

    eps: float = 0.0
    affine: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (c,))
        b = self.param("bias", nn.initializers.zeros, (c,))
        if self.affine:
            return x * w + b
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        scale = w * jax.lax.rsqrt(var + self.eps)  # float32: mean, var are (model.cast_params)
        shift = b - mean * scale
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)  # no-ops for float32 x


def conv(features, kernel, stride=1, *, bias=True, groups=1, name=None, dilation=1):
    """A PyTorch-style Conv2d: symmetric padding kernel // 2, NHWC, HWIO kernel."""
    pad = (kernel // 2) * dilation
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        feature_group_count=groups,
        kernel_dilation=(dilation, dilation),
        name=name,
    )


# ----------------------------------------------------------------------------- grouped 3x3 conv
#
# XLA:CPU runs `feature_group_count` convolutions 1.2-4x slower than torch (worst with many small
# groups; benchmarks/convs.py). `grouped_conv3x3` computes PyTorch's Conv2d(C, O, 3, stride,
# padding=1, groups=G) exactly, in one of these forms (Cg = C / G input channels per group):
#
#   "scan"  (the default) a `lax.scan` over steps of k groups: each step slices its k * Cg input
#           channels and runs ONE dense 3x3 conv with the block-diagonal kernel of its k groups
#           (zeros between groups: the same sums plus exact zeros); the step outputs are stacked
#           `[G/k, B, H', W', k * O/G]` and transposed back once. k = 1 from Cg = 8 up; for
#           Cg <= 4 (ResNeXt 64x4d / 32x4d stage 1) k = 16 / Cg (16-channel convs: k times the
#           multiply-adds, still ~1.3-1.5x faster than k = 1 there). The scan keeps the program
#           one conv big: unrolling the G convs (a Python loop) runs as fast but compiles for
#           3-6 s per layer. Its gradient is a custom VJP, itself a scan of each step's VJP
#           (plain autodiff of the scan would add one full-size input-gradient update per step).
#   "taps"  9 taps x Cg input channels of broadcast multiply-adds over `[B, H, W, G, O/G]`. Alone
#           and for Cg <= 4 it is the fastest (one fused loop, ~2x faster than torch), but in the
#           model it is not: with the Detector's XLA option (detector.CPU_COMPILER_OPTIONS, the
#           YNNPACK dot fusion) the multiply-add chain is pulled into the fusion of the 1x1 conv
#           that consumes it and runs op by op on materialised taps (~2x slower than "scan" in a
#           bottleneck); for Cg >= 16 XLA splits the fusion and it collapses (~50x slower).
#           Kept as an independent check and for other contexts.
#   "xla"   `lax.conv_general_dilated(feature_group_count=G)`: the reference formulation.
#
# All compute the same sums in another order (float32 differences <= ~1e-6 relative).

_DN = ("NHWC", "HWIO", "NHWC")


def _out_size(n: int, stride: int) -> int:
    return (n - 1) // stride + 1  # (n + 2 * 1 - 3) // stride + 1


def _grouped_xla(x, kernel, stride, groups, per_step=None):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=_DN,
        feature_group_count=groups,
    )


def _grouped_taps(x, kernel, stride, groups, per_step=None):
    b, h, w, c = x.shape
    cg, og = c // groups, kernel.shape[-1] // groups
    ho, wo = _out_size(h, stride), _out_size(w, stride)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    wk = kernel.reshape(3, 3, cg, groups, og)
    acc = None
    for dy in range(3):
        for dx in range(3):
            tap = jax.lax.slice(
                xp, (0, dy, dx, 0),
                (b, dy + stride * (ho - 1) + 1, dx + stride * (wo - 1) + 1, c),
                (1, stride, stride, 1),
            ).reshape(b, ho, wo, groups, cg)
            for ci in range(cg):
                term = tap[..., ci : ci + 1] * wk[dy, dx, ci]  # [B, H', W', G, 1] * [G, O/G]
                acc = term if acc is None else acc + term
    return acc.reshape(b, ho, wo, groups * og)


def _group_conv(xg, wg, stride):
    return jax.lax.conv_general_dilated(
        xg, wg, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=_DN
    )


def _step_kernels(kernel, groups, per_step):
    """HWIO `[3, 3, Cg, O]` -> `[G/k, 3, 3, Cg, k, O/G]`: the k groups of each step."""
    cg, o = kernel.shape[2], kernel.shape[3]
    w = kernel.reshape(3, 3, cg, groups // per_step, per_step, o // groups)
    return w.transpose(3, 0, 1, 2, 4, 5)


def _block_diagonal(w):
    """`[3, 3, Cg, k, O/G]` -> the dense `[3, 3, k * Cg, k * O/G]` kernel of k groups."""
    _, _, cg, k, og = w.shape
    if k == 1:
        return w.reshape(3, 3, cg, og)
    eye = jnp.eye(k, dtype=w.dtype)
    return jnp.einsum("hwcko,kj->hwkcjo", w, eye).reshape(3, 3, k * cg, k * og)


def _step(x, w, g, stride):
    """The conv of step g (its k groups' channels of x) with its kernels w `[3, 3, Cg, k, O/G]`."""
    cin = w.shape[2] * w.shape[3]
    xg = jax.lax.dynamic_slice_in_dim(x, g * cin, cin, axis=3)
    return _group_conv(xg, _block_diagonal(w), stride)


def _channels_last(ys):
    """`[S, B, H, W, K]` -> `[B, H, W, S * K]`."""
    s, b, h, w, k = ys.shape
    return ys.transpose(1, 2, 3, 0, 4).reshape(b, h, w, s * k)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grouped_scan(x, kernel, stride, groups, per_step):
    ws = _step_kernels(kernel, groups, per_step)

    def step(_, g):
        return None, _step(x, ws[g], g, stride)

    ys = jax.lax.scan(step, None, jnp.arange(groups // per_step), unroll=2)[1]
    return _channels_last(ys)


def _grouped_scan_fwd(x, kernel, stride, groups, per_step):
    return _grouped_scan(x, kernel, stride, groups, per_step), (x, kernel)


def _grouped_scan_bwd(stride, groups, per_step, res, ct):
    x, kernel = res
    ws = _step_kernels(kernel, groups, per_step)
    ostep = kernel.shape[-1] // groups * per_step
    xg_shape = x.shape[:3] + (x.shape[3] // groups * per_step,)

    def step(_, g):
        ctg = jax.lax.dynamic_slice_in_dim(ct, g * ostep, ostep, axis=3)
        xg = jax.lax.dynamic_slice_in_dim(x, g * xg_shape[3], xg_shape[3], axis=3)
        _, vjp = jax.vjp(lambda a, w: _group_conv(a, _block_diagonal(w), stride), xg, ws[g])
        return None, vjp(ctg)

    # dx [G/k, B, H, W, k * Cg], dw [G/k, 3, 3, Cg, k, O/G]
    dx, dw = jax.lax.scan(step, None, jnp.arange(groups // per_step), unroll=2)[1]
    dkernel = dw.transpose(1, 2, 3, 0, 4, 5).reshape(kernel.shape)
    return _channels_last(dx), dkernel


_grouped_scan.defvjp(_grouped_scan_fwd, _grouped_scan_bwd)

GROUPED_METHODS = {"scan": _grouped_scan, "taps": _grouped_taps, "xla": _grouped_xla}


def groups_per_step(channels_per_group: int, groups: int) -> int:
    """Groups per scan step (k above), measured with benchmarks/convs.py --context on the
    ResNeXt 32x8d / 64x4d / 32x4d shapes of an 800x1216 input: 16 / Cg for Cg <= 4, else 1
    (lowered to a divisor of `groups`)."""
    k = 16 // channels_per_group if channels_per_group <= 4 else 1
    while groups % k:
        k -= 1
    return k


def grouped_conv3x3(x, kernel, stride: int = 1, groups: int = 1, method: str = "scan",
                    per_step: int | None = None):
    """PyTorch `Conv2d(C, O, 3, stride, padding=1, groups=groups, bias=False)` on NHWC `x`
    `[B, H, W, C]` with the HWIO kernel `[3, 3, C / groups, O]` of `nn.Conv(...,
    feature_group_count=groups)` (group g: input channels g*C/G.., output channels g*O/G..).
    method: "scan", "taps" or "xla" (see above); per_step: groups per scan step (default
    `groups_per_step`)."""
    c = x.shape[-1]
    k = kernel.shape
    if k[:2] != (3, 3) or c % groups or k[3] % groups or k[2] * groups != c:
        raise ValueError(f"kernel {k} does not fit {c} input channels in {groups} groups")
    if method not in GROUPED_METHODS:
        raise ValueError(f"method must be one of {sorted(GROUPED_METHODS)}, got {method!r}")
    if per_step is None:
        per_step = groups_per_step(c // groups, groups)
    if per_step < 1 or groups % per_step:
        raise ValueError(f"per_step {per_step} does not divide {groups} groups")
    return GROUPED_METHODS[method](x, kernel, stride, groups, per_step)


class GroupedConv3x3(nn.Module):
    """`conv(features, 3, stride, bias=False, groups=groups)` computed by `grouped_conv3x3`.

    The same parameter as that `nn.Conv`: `kernel` `[3, 3, C / groups, features]`, with the
    same initialiser, so checkpoints and param trees are unchanged."""

    features: int
    stride: int = 1
    groups: int = 1
    method: str = "scan"

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.groups or self.features % self.groups:
            raise ValueError(
                f"{c} -> {self.features} channels do not split into {self.groups} groups"
            )
        kernel = self.param("kernel", default_kernel_init, (3, 3, c // self.groups, self.features))
        x, kernel = promote_dtype(x, kernel)
        return grouped_conv3x3(x, kernel, self.stride, self.groups, self.method)


def spatial_mask(valid_hw, shape_hw, stride):
    """`[B, H, W, 1]` float mask of the valid region at a feature stride, or None.

    valid_hw: `[B, 2]` per-image valid (padded) size in input pixels, or None when every
    image fills its canvas. The valid feature size is ceil(valid / stride).
    """
    if valid_hw is None:
        return None
    h, w = shape_hw
    vh = -(-valid_hw[:, 0] // stride)
    vw = -(-valid_hw[:, 1] // stride)
    m = (jnp.arange(h)[None, :, None] < vh[:, None, None]) & (
        jnp.arange(w)[None, None, :] < vw[:, None, None]
    )
    return m[..., None].astype(jnp.float32)


def apply_mask(x, mask):
    return x if mask is None else x * mask.astype(x.dtype)
