"""Mask R-CNN training step, jaxmrcnn vs torchvision, same weights and batch, one process.

    python benchmarks/train_step.py [--steps N] [--warmup W] [--size 512] [--images 2]
                                    [--profile]

torchvision's maskrcnn_resnet50_fpn (v1: FrozenBatchNorm2d, trainable_backbone_layers=3,
so conv1 and layer1 frozen), seeded random weights calibrated on the batch
(tests/torch_reference.py), saved and converted with converters/from_torch.py, so both start
from identical weights. The batch: `--images` generated scenes of `--size` x `--size`
(noisy background, 4-6 filled ellipses and rectangles each, their masks, boxes and classes).
Training settings are torchvision's defaults on both sides: RPN 2000 / 2000 proposals per
image, 256 sampled anchors, 512 sampled ROIs, SGD momentum 0.9, weight decay 1e-4, LR
0.02 x batch / 16 (no warm-up: a constant LR costs the same).

One step: torchvision model(images, targets) (its transform included) -> sum of losses ->
backward -> SGD step; ours: the jitted train step (jaxmrcnn/train/step.py) on the already
normalised batch, waited for. Steps alternate between the two (noise is shared); after
`--warmup` steps each, prints the median of `--steps` steps and the ratio ours / torchvision,
and our compile time separately (lower + compile). --profile: also times our training
forward alone and its parts (jitted separately) to see where the step goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def scenes(n: int, size: int, seed: int = 0):
    """n images `[size, size, 3]` float in [0, 1] and per-image boxes, classes, masks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, targets = [], []
    for _ in range(n):
        img = rng.uniform(0.2, 0.7, (size, size, 3)).astype(np.float32)
        masks, boxes, classes = [], [], []
        for _ in range(int(rng.integers(4, 7))):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            ry, rx = rng.uniform(0.05, 0.2, 2) * size
            if rng.random() < 0.5:
                m = (yy - cy) ** 2 / ry ** 2 + (xx - cx) ** 2 / rx ** 2 < 1
            else:
                m = (abs(yy - cy) < ry) & (abs(xx - cx) < rx)
            img[m] = rng.uniform(0, 1, 3)
            ys, xs = np.nonzero(m)
            masks.append(m.astype(np.uint8))
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            classes.append(int(rng.integers(1, 91)))
        images.append(img)
        targets.append(dict(boxes=np.asarray(boxes, np.float32), classes=np.asarray(classes),
                            masks=np.stack(masks)))
    return images, targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per framework first")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import torch
    import torch_reference as R

    from jaxmrcnn.converters.from_torch import convert_file
    from jaxmrcnn.train import TrainConfig, pad_ground_truth
    from jaxmrcnn.train.step import (
        OptimConfig,
        data_mesh,
        init_state,
        make_optimizer,
        make_train_step,
    )

    n, size = args.images, args.size
    imgs, targets = scenes(n, size)
    xs = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in imgs]

    # ------------------------------------------------------------ torchvision
    model = R.build("v1", min_size=size, max_size=size)
    R.calibrate(model, xs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tv_v1.pth"
        torch.save(model.state_dict(), path)
        ckpt, _ = convert_file(path)
    lr = OptimConfig().lr(n)
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=1e-4)
    t_targets = [dict(boxes=torch.from_numpy(t["boxes"]),
                      labels=torch.from_numpy(t["classes"]).to(torch.int64),
                      masks=torch.from_numpy(t["masks"])) for t in targets]

    def torch_step():
        losses = model(xs, t_targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    # ------------------------------------------------------------ ours
    cfg, params = ckpt.config, ckpt.params
    mean, std = np.asarray(cfg.input.mean, np.float32), np.asarray(cfg.input.std, np.float32)
    hw = np.tile([[size, size]], (n, 1)).astype(np.int32)
    gt = pad_ground_truth([dict(boxes=t["boxes"], classes=t["classes"], masks=t["masks"])
                           for t in targets], 8, (size, size))
    batch = dict(images=np.stack([(im - mean) / std for im in imgs]).astype(np.float32),
                 image_hw=hw, padded_hw=hw, gt_boxes=gt["boxes"], gt_classes=gt["classes"],
                 gt_masks=gt["masks"], gt_valid=gt["valid"])
    tcfg = TrainConfig()
    tx = make_optimizer(OptimConfig(warmup_steps=0), n, params)
    step = make_train_step(cfg, tcfg, tx, mesh=data_mesh(jax.devices()[:1]))
    state = step.replicate(init_state(params, tx))
    dbatch = step.shard_batch(batch)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, dbatch, key).compile()
    compile_s = time.perf_counter() - t0

    def our_step():
        nonlocal state
        state, met = compiled(state, dbatch, key)
        return float(met["loss"])  # waits for the step

    # ------------------------------------------------------------ alternate
    times = {"torchvision": [], "ours": []}
    losses = {"torchvision": [], "ours": []}
    for i in range(args.warmup + args.steps):
        for name, fn in (("torchvision", torch_step), ("ours", our_step)):
            t0 = time.perf_counter()
            loss = fn()
            dt = time.perf_counter() - t0
            losses[name].append(loss)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"batch {n} x {size}x{size}, {args.steps} steps after {args.warmup} warm-up, "
          f"torch threads {torch.get_num_threads()}, jax devices {jax.devices()[:1]}")
    print(f"first-step loss: torchvision {losses['torchvision'][0]:.4f}, "
          f"ours {losses['ours'][0]:.4f}")
    for k in ("torchvision", "ours"):
        print(f"{k:12s} median {med[k]:.3f} s/step  "
              f"(all: {', '.join(f'{t:.2f}' for t in times[k])})")
    print(f"ratio ours / torchvision: {med['ours'] / med['torchvision']:.2f}")
    print(f"our step compile (lower + compile): {compile_s:.1f} s")
    if args.profile:
        profile(cfg, params, batch, tcfg, args.steps)
    return 0


def profile(cfg, params, batch, tcfg, repeats: int):
    """Our training forward and forward + backward, jitted separately, timed (median)."""
    import jax
    import jax.numpy as jnp

    from jaxmrcnn.train.step import batch_losses

    params = jax.tree_util.tree_map(jnp.asarray, params)
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    key = jax.random.PRNGKey(0)

    def fwd(p):
        return batch_losses(p, batch, key, cfg, tcfg)[0]["loss"]

    parts = {"forward (losses)": jax.jit(fwd), "forward + backward": jax.jit(jax.grad(fwd))}
    for name, fn in parts.items():
        jax.block_until_ready(fn(params))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params))
            ts.append(time.perf_counter() - t0)
        print(f"  {name:24s} {statistics.median(ts):.3f} s")


if __name__ == "__main__":
    sys.exit(main())
