"""Recorded outputs of the REAL maskrcnn-benchmark ("goldens") on a checkpoint that can be
rebuilt bit for bit without maskrcnn-benchmark, so that CI (which cannot install it: it is not
on the package registry) still compares jaxmrcnn with the framework itself. The design is
tests/golden_detectron2.py's.

    python tests/golden_maskrcnn_benchmark.py record [--arch R_50|X_101_32x8d]   # needs MB
    python tests/golden_maskrcnn_benchmark.py check [--arch ...]                 # numpy only

The checkpoint, per architecture
================================
1. `synthetic_state_dict(arch, seed)`: every tensor of a maskrcnn-benchmark Mask R-CNN state
   dict (its exact key names after DDP's `module.`, shapes, float32) drawn with numpy alone, as
   golden_detectron2.synthetic_state_dict draws Detectron2's (one `default_rng([seed, hash of
   the key])` per key, uniform values of std 1/sqrt(fan_in) for weights, 0.1 for biases;
   FrozenBatchNorm weight in [0.6, 1.4], bias of std 0.2, running stats 0/1), plus the RPN's
   stored anchors `rpn.anchor_generator.cell_anchors.{0..4}`: exactly MB's legacy
   generate_anchors (`jaxmrcnn.ops.cell_anchors(size, ratios, flavour="legacy", stride=s)`,
   checked against a real model's buffers when MB's source is present). Key names and shapes
   come from `jaxmrcnn.converters.maskrcnn_benchmark.key_map` and the Flax model's parameter
   shapes run back through each layout transform; `mb_key_order` puts them in MB's module order.
2. Calibration (`calibrate`, needs MB): the synthetic weights are loaded into the real MB model
   (`reference_maskrcnn_benchmark.build` from the repository's yaml at SMALL size), which runs
   on the three PARITY_IMAGES in one batch (its own test transforms and padding) and is made
   non-trivial as `reference_maskrcnn_benchmark.calibrate` does it: FrozenBatchNorm running
   stats = mean and variance (+ 1e-2; MB's FrozenBN has no eps) of its actual input, in
   execution order; the RPN conv to std 1, the objectness logits to std 1 around -3 (MB takes
   the SIGMOID BEFORE top-k and sorts proposals by it: Detectron2's spread, std 2.5 around -1,
   saturates float32 sigmoids at 1 and ties the proposals' order), the deltas to std 0.3; box
   head fc6/fc7 to std 1, class scores to std 1.5 centred per class, box deltas std 1 around 0;
   mask convs/deconv to std 1, mask logits to std 3 centred per class. Every number derived
   from activations is QUANTISED before it is used: BN statistics to float16-representable
   values, each layer's scale factor and bias shift to 3 significant digits.
   `calibration.npz` records exactly those numbers and nothing else.
3. `reconstruct(arch)`: seed + calibration record -> the calibrated state dict, in numpy
   (float64 arithmetic, one rounding to float32), identical on every machine; its sha256 is
   `state_dict.sha256` in the golden folder and is checked every time.

The file MB loads (`save_mb_checkpoint`)
========================================
What a DDP training run of MB leaves (`Checkpointer.save("model_final", iteration=MAX_ITER)`
on `DistributedDataParallel(model)`): `{"model": {"module." + key: tensor} in MB's module
order, "optimizer": SGD's state dict with MB's param groups (make_optimizer: one per trainable
parameter, bias lr x2 and no weight decay; stem and layer1 frozen), "scheduler":
WarmupMultiStepLR's state at step 0, "iteration": the yaml's MAX_ITER}`, written in PyTorch's
LEGACY (pre-1.6, non-zip) serialization as MB's model-zoo files are, or in the zip one. No MB
code is needed to write it; a live test checks it against `reference_maskrcnn_benchmark.save`'s.

The outputs (`record`, needs MB)
================================
The reconstructed state dict is written by `save_mb_checkpoint(legacy=True)`, loaded by MB's
own `DetectronCheckpointer` into the model built from its yaml (test size 384/640) and run by
`reference_maskrcnn_benchmark.run` (MB's COCO evaluation stage by stage, checked equal to
`model(images)`). `outputs.npz` keeps per image (keys `<i>/<name>`): image_size, input_hw
(padded), orig_hw, a seeded sample of 1000 input values and of each FPN level's values (with
their flat indices, the level's shape and max |value|), the 1000 proposals and their
objectness (MB's field: the sigmoid probability, proposals sorted by it), the detections IN
MB'S ORDER (by class, then proposal index; never by score): raw_boxes (resized coordinates),
boxes (original pixels, BoxList.resize), scores, labels (1..80), the masks pasted by MB's
Masker as COCO RLE, and the 28x28 mask probabilities of the MASK_PROBS_KEPT highest-scoring
detections (rows `mask_probs_index`) as float16. `meta.json` names the MB source (a sha256 of
its package's .py files), torch/torchvision/numpy/Pillow versions, torch threads, the images
(file and decoded-pixel sha256) and the non-triviality summary per image.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for _p in (str(TESTS), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from golden_detectron2 import (  # noqa: E402  (numpy-only helpers shared with Detectron2's)
    _source_shape,
    _uniform,
    image_sha256,
    parity_image_paths,
    quantise,
    scaled,
    state_dict_sha256,
)

GOLDEN = TESTS / "golden"
SEED = 0
# Architecture -> (MB config in its configs/, depth, groups, width per group).
ARCHS = {
    "R_50": ("e2e_mask_rcnn_R_50_FPN_1x", 50, 1, 64),
    "X_101_32x8d": ("e2e_mask_rcnn_X_101_32x8d_FPN_1x", 101, 32, 8),
}
NUM_CLASSES = 81  # background (0) + 80 COCO classes
SAMPLE_SIZE = 1000  # values sampled per FPN level and for the input
SAMPLE_SEED = 1234
MASK_PROBS_KEPT = 20  # 28x28 probabilities kept for the top-scoring detections of each image
LEVELS = ("p2", "p3", "p4", "p5", "p6")
TORCH_THREADS = 2  # the recording's torch.set_num_threads (float sums can depend on it)
REGENERATE = "regenerate with python tests/golden_maskrcnn_benchmark.py record"
ANCHORS = "rpn.anchor_generator.cell_anchors."
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # MODEL.RPN.ANCHOR_SIZES (the FPN yamls)
ANCHOR_STRIDES = (4, 8, 16, 32, 64)  # MODEL.RPN.ANCHOR_STRIDE
ASPECT_RATIOS = (0.5, 1.0, 2.0)  # MODEL.RPN.ASPECT_RATIOS (defaults.py)
# MB's solver (config/defaults.py + each yaml's SOLVER), for the checkpoint's optimizer,
# scheduler and iteration (the yaml's MAX_ITER: the "iteration" of its model_final.pth).
SOLVER = dict(BIAS_LR_FACTOR=2, WEIGHT_DECAY=0.0001, WEIGHT_DECAY_BIAS=0, MOMENTUM=0.9,
              GAMMA=0.1, WARMUP_FACTOR=1.0 / 3, WARMUP_ITERS=500, WARMUP_METHOD="linear")
SCHEDULES = {  # arch -> the yaml's BASE_LR, STEPS, MAX_ITER
    "R_50": dict(BASE_LR=0.02, STEPS=(60000, 80000), MAX_ITER=90000),
    "X_101_32x8d": dict(BASE_LR=0.01, STEPS=(120000, 160000), MAX_ITER=180000),
}
FROZEN_PREFIXES = ("backbone.body.stem.", "backbone.body.layer1.")  # FREEZE_CONV_BODY_AT 2

# The calibration recipe (reference_maskrcnn_benchmark.calibrate's targets): layer -> (output
# std, output mean or None, centre every output channel on its own mean).
RPN = "rpn.head"
BOX = "roi_heads.box"
MASK = "roi_heads.mask"
SCALED_LAYERS = {
    f"{RPN}.conv": (1.0, None, False),
    f"{RPN}.cls_logits": (1.0, -3.0, False),
    f"{RPN}.bbox_pred": (0.3, 0.0, False),
    f"{BOX}.feature_extractor.fc6": (1.0, None, False),
    f"{BOX}.feature_extractor.fc7": (1.0, None, False),
    f"{BOX}.predictor.cls_score": (1.5, None, True),
    f"{BOX}.predictor.bbox_pred": (1.0, 0.0, False),
    **{f"{MASK}.feature_extractor.mask_fcn{i}": (1.0, None, False) for i in range(1, 5)},
    f"{MASK}.predictor.conv5_mask": (1.0, None, False),
    f"{MASK}.predictor.mask_fcn_logits": (3.0, 0.0, True),
}


class GoldenError(RuntimeError):
    """The golden files do not reproduce the recorded checkpoint (or are missing)."""


def golden_dir(arch: str, root: Path | None = None, *,
               prefix: str = "maskrcnn_benchmark") -> Path:
    """`root`/<prefix>_<arch> (`prefix` "detectron": tests/golden_detectron.py's goldens)."""
    _check_arch(arch)
    return Path(root or GOLDEN) / f"{prefix}_{arch}"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")


# ---------------------------------------------------------------------------------------------
# The synthetic state dict (numpy only)


def mb_anchors() -> dict[str, np.ndarray]:
    """`rpn.anchor_generator.cell_anchors.{0..4}`: MB's legacy cell anchors per level."""
    from jaxmrcnn import ops

    return {
        f"{ANCHORS}{i}": np.asarray(
            ops.cell_anchors(size, ASPECT_RATIOS, flavour="legacy", stride=stride), np.float32)
        for i, (size, stride) in enumerate(zip(ANCHOR_SIZES, ANCHOR_STRIDES, strict=True))
    }


def mb_key_order(keys) -> list[str]:
    """`keys` (the converter's key map order plus the anchors) in MB's `state_dict()` order:
    modules in construction order, so a block's `downsample` comes before its conv1
    (resnet.py Bottleneck builds it first) and the anchor generator before the RPN head."""
    keys = list(keys)
    anchors = [k for k in keys if k.startswith(ANCHORS)]
    rest = [k for k in keys if not k.startswith(ANCHORS)]
    out: list[str] = []
    for k in rest:
        if ".downsample." in k:
            continue
        if k.endswith(".0.conv1.weight") and k.startswith("backbone.body.layer"):
            block = k[: -len("conv1.weight")]
            out += [d for d in rest if d.startswith(block + "downsample.")]
        if k == f"{RPN}.conv.weight":
            out += anchors
        out.append(k)
    assert sorted(out) == sorted(keys), "mb_key_order lost keys"
    return out


def mb_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """maskrcnn-benchmark's state-dict key (after `module.`) -> shape for `arch`, in MB's
    order, derived without MB from `jaxmrcnn.converters.maskrcnn_benchmark.key_map` and
    `jaxmrcnn.model.param_shapes`, each shape run back through its layout transform (and
    checked forwards); the anchors are [3, 4]."""
    from jaxmrcnn.config import maskrcnn_benchmark_mask_rcnn
    from jaxmrcnn.converters.maskrcnn_benchmark import key_map
    from jaxmrcnn.model import flatten_tree, param_shapes

    _check_arch(arch)
    _, depth, groups, width = ARCHS[arch]
    cfg = maskrcnn_benchmark_mask_rcnn(depth, groups, width, num_classes=NUM_CLASSES)
    ours = dict(flatten_tree(param_shapes(cfg)))
    info = dict(depth=depth, groups=groups, width_per_group=width, num_classes=NUM_CLASSES)
    shapes = {}
    for key, (path, fn) in key_map(info).items():
        want = tuple(ours["/".join(path)])
        src = _source_shape(fn, want)
        got = np.shape(fn(np.empty(src, np.float32)))
        if tuple(got) != want:
            raise AssertionError(f"{key}: {src} maps to {got}, not {want}")
        shapes[key] = src
    for key, value in mb_anchors().items():
        shapes[key] = value.shape
    return {k: shapes[k] for k in mb_key_order(shapes)}


def synthetic_state_dict(arch: str, seed: int = SEED) -> dict[str, np.ndarray]:
    """A maskrcnn-benchmark-keyed Mask R-CNN state dict (float32, MB's order) from numpy's
    seeded generators, with MB's anchors."""
    shapes = mb_shapes(arch)
    anchors = mb_anchors()
    norms = {k.rsplit(".", 1)[0] for k in shapes if k.endswith(".running_mean")}
    sd = {}
    for key, shape in shapes.items():
        module, kind = key.rsplit(".", 1)
        if key in anchors:
            sd[key] = anchors[key]
        elif module in norms:
            if kind == "running_mean":
                sd[key] = np.zeros(shape, np.float32)
            elif kind == "running_var":
                sd[key] = np.ones(shape, np.float32)
            elif kind == "weight":
                sd[key] = _uniform(key, seed, shape, 0.4 / np.sqrt(3.0), 1.0)  # [0.6, 1.4]
            else:
                sd[key] = _uniform(key, seed, shape, 0.2)
        elif kind == "bias":
            sd[key] = _uniform(key, seed, shape, 0.1)
        else:
            # fan_in: inputs per output value; the 2x2 stride-2 transposed conv (in, out, kh,
            # kw) gives each output one tap of every input channel.
            deconv = key == f"{MASK}.predictor.conv5_mask.weight"
            fan_in = shape[0] if deconv else int(np.prod(shape[1:]))
            sd[key] = _uniform(key, seed, shape, 1.0 / np.sqrt(fan_in))
    return sd


# ---------------------------------------------------------------------------------------------
# Calibration record -> state dict


def apply_calibration(sd: dict, rec: dict) -> dict:
    """The state dict `sd` (synthetic) with the record's BN statistics and layer scales."""
    out = dict(sd)
    modules = [str(m) for m in rec["bn_modules"]]
    if any(f"{m}.running_mean" not in sd for m in modules):
        raise GoldenError(f"calibration record: BN modules do not fit the model; {REGENERATE}")
    sizes = [sd[f"{m}.running_mean"].shape[0] for m in modules]
    if sum(sizes) != len(rec["bn_mean"]) or len(rec["bn_mean"]) != len(rec["bn_var"]):
        raise GoldenError(f"calibration record: BN statistics do not fit the model; {REGENERATE}")
    offsets = np.cumsum([0, *sizes])
    for m, a, b in zip(modules, offsets[:-1], offsets[1:], strict=True):
        out[f"{m}.running_mean"] = rec["bn_mean"][a:b].astype(np.float32)
        out[f"{m}.running_var"] = rec["bn_var"][a:b].astype(np.float32)
    lens = rec["scale_shift_len"]
    shifts = np.split(rec["scale_shift"], np.cumsum(lens)[:-1])
    for i, layer in enumerate(str(x) for x in rec["scale_layers"]):
        shift = shifts[i] if lens[i] else 0.0
        w, b = scaled(sd[f"{layer}.weight"], sd.get(f"{layer}.bias"), float(rec["scale_factor"][i]),
                      shift, float(rec["scale_target_mean"][i]))
        out[f"{layer}.weight"] = w
        if b is not None:
            out[f"{layer}.bias"] = b
    return out


def load_calibration(arch: str, root: Path | None = None, *,
                     prefix: str = "maskrcnn_benchmark") -> dict:
    path = golden_dir(arch, root, prefix=prefix) / "calibration.npz"
    if not path.is_file():
        raise GoldenError(f"no calibration record at {path}; {REGENERATE}")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def reconstruct(arch: str, *, root: Path | None = None, verify: bool = True,
                prefix: str = "maskrcnn_benchmark") -> dict:
    """Seed + calibration record -> the calibrated maskrcnn-benchmark state dict (numpy
    float32, MB's key order), checked against the recorded sha256 (GoldenError if it differs)."""
    rec = load_calibration(arch, root, prefix=prefix)
    meta = json.loads(str(rec["meta"]))
    sd = apply_calibration(synthetic_state_dict(arch, int(meta["seed"])), rec)
    if verify:
        path = golden_dir(arch, root, prefix=prefix) / "state_dict.sha256"
        if not path.is_file():
            raise GoldenError(f"no {path}; {REGENERATE}")
        want = path.read_text().split()[0]
        got = state_dict_sha256(sd)
        if got != want:
            raise GoldenError(
                f"the reconstructed {arch} checkpoint (sha256 {got[:16]}...) is not the recorded "
                f"one ({want[:16]}...): the synthetic weights or the calibration record changed "
                f"(numpy's generator, the key map, the anchors, or the files); {REGENERATE}"
            )
    return sd


# ---------------------------------------------------------------------------------------------
# The checkpoint file, as MB writes it


def _is_parameter(key: str) -> bool:
    """A learnable parameter of MB's model (FrozenBatchNorm's four tensors and the anchors
    are buffers)."""
    module, kind = key.rsplit(".", 1)
    bn = module.endswith(("bn1", "bn2", "bn3", "downsample.1"))
    return not key.startswith(ANCHORS) and not bn and kind in ("weight", "bias")


def mb_optimizer_and_scheduler(arch: str, keys) -> tuple[dict, dict]:
    """The state dicts of MB's `make_optimizer` (solver/build.py: one SGD param group per
    trainable parameter, in named_parameters order; biases lr x BIAS_LR_FACTOR and
    WEIGHT_DECAY_BIAS) and `make_lr_scheduler` (WarmupMultiStepLR, freshly built: last_epoch
    0, lr = base * WARMUP_FACTOR) for a model with these state-dict keys, as `Checkpointer.save`
    stores them; torch's SGD makes the optimizer's (so its fields are this torch's)."""
    import torch

    s = dict(SOLVER, **SCHEDULES[arch])
    trainable = [k for k in keys if _is_parameter(k) and not k.startswith(FROZEN_PREFIXES)]
    groups = []
    for k in trainable:
        bias = "bias" in k
        groups.append(dict(params=[torch.zeros(0)],
                           lr=s["BASE_LR"] * s["BIAS_LR_FACTOR"] if bias else s["BASE_LR"],
                           weight_decay=s["WEIGHT_DECAY_BIAS"] if bias else s["WEIGHT_DECAY"]))
    optimizer = torch.optim.SGD(groups, groups[-1]["lr"], momentum=s["MOMENTUM"])
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    # WarmupMultiStepLR.get_lr at last_epoch 0 (linear warmup: alpha = 0)
    factor = s["WARMUP_FACTOR"] * (1 - 0.0) + 0.0
    lrs = [lr * factor * s["GAMMA"] ** 0 for lr in base_lrs]
    for g, base, lr in zip(optimizer.param_groups, base_lrs, lrs, strict=True):
        g["initial_lr"] = base
        g["lr"] = lr
    scheduler = dict(milestones=tuple(s["STEPS"]), gamma=s["GAMMA"],
                     warmup_factor=s["WARMUP_FACTOR"], warmup_iters=s["WARMUP_ITERS"],
                     warmup_method=s["WARMUP_METHOD"], base_lrs=base_lrs, last_epoch=0,
                     _step_count=1, _last_lr=lrs)
    return optimizer.state_dict(), scheduler


def save_mb_checkpoint(arch: str, sd: dict, path, *, legacy: bool = True) -> Path:
    """`sd` as the `model_final.pth` of a DDP training run of MB with `arch`'s yaml (see the
    module doc), in PyTorch's legacy serialization (`legacy`, as MB's model-zoo files) or the
    zip one."""
    import torch

    path = Path(path)
    optimizer, scheduler = mb_optimizer_and_scheduler(arch, sd)
    data = {
        "model": {"module." + k: torch.from_numpy(np.array(v, np.float32)) for k, v in sd.items()},
        "optimizer": optimizer,
        "scheduler": scheduler,
        "iteration": SCHEDULES[arch]["MAX_ITER"],
    }
    torch.save(data, path, _use_new_zipfile_serialization=not legacy)
    return path


# ---------------------------------------------------------------------------------------------
# Golden outputs


def load_outputs(arch: str, root: Path | None = None, *,
                 prefix: str = "maskrcnn_benchmark") -> tuple[list[dict], dict]:
    """Per image dicts of the recorded outputs (masks decoded to [N, H, W] bool), and meta."""
    from pycocotools import mask as mask_utils

    d = golden_dir(arch, root, prefix=prefix)
    if not (d / "outputs.npz").is_file():
        raise GoldenError(f"no {d / 'outputs.npz'}; {REGENERATE}")
    meta = json.loads((d / "meta.json").read_text())
    with np.load(d / "outputs.npz", allow_pickle=False) as f:
        flat = {k: f[k] for k in f.files}
    images = []
    for i in range(len(meta["images"])):
        r = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(f"{i}/")}
        h, w = (int(x) for x in r["orig_hw"])
        ends = np.cumsum(r["rle_lengths"])
        rles = [{"size": [h, w], "counts": r["rle_counts"][e - n : e].tobytes()}
                for n, e in zip(r["rle_lengths"], ends, strict=True)]
        r["masks"] = (mask_utils.decode(rles).transpose(2, 0, 1).astype(bool) if rles
                      else np.zeros((0, h, w), bool))
        images.append(r)
    return images, meta


def _sample(x: np.ndarray, image_index: int, level_index: int) -> tuple[np.ndarray, np.ndarray]:
    flat = x.ravel()
    rng = np.random.default_rng([SAMPLE_SEED, image_index, level_index])
    idx = np.sort(rng.choice(flat.size, size=min(SAMPLE_SIZE, flat.size), replace=False))
    return idx.astype(np.int32), flat[idx].astype(np.float32)


def compact(out: dict, image_index: int) -> dict:
    """One `reference_maskrcnn_benchmark.run` output -> the small arrays `outputs.npz` keeps
    (detections in MB's order)."""
    from pycocotools import mask as mask_utils

    res = {
        "image_size": out["image_size"].astype(np.int64),
        "input_hw": np.array(out["input"].shape[:2], np.int64),
        "orig_hw": np.array(out["masks"].shape[1:], np.int64),
        "proposals": out["proposals"].astype(np.float32),
        "proposal_scores": out["proposal_scores"].astype(np.float32),
        "raw_boxes": out["raw_boxes"].astype(np.float32),
        "boxes": out["boxes"].astype(np.float32),
        "scores": out["scores"].astype(np.float32),
        "labels": out["labels"].astype(np.int64),
    }
    res["input_idx"], res["input_values"] = _sample(out["input"], image_index, 0)
    for j, name in enumerate(LEVELS, start=1):
        f = out["features"][name]
        res[f"{name}_shape"] = np.array(f.shape, np.int64)
        res[f"{name}_absmax"] = np.float32(np.abs(f).max())
        res[f"{name}_idx"], res[f"{name}_values"] = _sample(f, image_index, j)
    top = np.argsort(-out["scores"], kind="stable")[:MASK_PROBS_KEPT]
    res["mask_probs_index"] = top.astype(np.int64)
    res["mask_probs"] = out["mask_probs"][top].astype(np.float16)
    rles = mask_utils.encode(np.asfortranarray(out["masks"].transpose(1, 2, 0).astype(np.uint8)))
    counts = [r["counts"] for r in rles]
    res["rle_lengths"] = np.array([len(c) for c in counts], np.int64)
    res["rle_counts"] = np.frombuffer(b"".join(counts), np.uint8)
    return res


def mb_source_sha256() -> str:
    """A sha256 of the maskrcnn_benchmark package's .py files (relative paths and contents)."""
    import reference_maskrcnn_benchmark as R

    pkg = Path(R.import_maskrcnn_benchmark().__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*.py")):
        h.update(str(p.relative_to(pkg)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def mb_outputs(arch: str, checkpoint_path, images: list[np.ndarray]):
    """The real MB on `images`: the model built from its yaml at SMALL size and loaded from
    `checkpoint_path` by DetectronCheckpointer, run stage by stage. Returns the model and the
    `reference_maskrcnn_benchmark.run` output per image."""
    import reference_maskrcnn_benchmark as R
    import torch
    from conftest import SMALL

    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        model = R.load(ARCHS[arch][0], checkpoint_path, **SMALL)
        return model, [R.run(model, im) for im in images]
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Calibration and recording (need maskrcnn-benchmark)


def calibrate(arch: str, images: list[np.ndarray], seed: int = SEED,
              config: str | None = None) -> dict:
    """Calibrates the synthetic weights in the real MB model on `images` (uint8 RGB), with
    every activation-derived number quantised; returns the record (see module doc). `config`:
    the MB yaml to build the model from (default `ARCHS[arch][0]`; the Detectron golden passes
    the caffe2 yaml of the same architecture)."""
    config = config or ARCHS[arch][0]
    import reference_maskrcnn_benchmark as R
    import torch
    from conftest import SMALL

    torch.set_num_threads(TORCH_THREADS)
    sd = synthetic_state_dict(arch, seed)
    model = R.build(config, **SMALL)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    names = {id(m): n for n, m in model.named_modules()}
    norms = R._norm_modules(model)
    assert all(names[id(m)].startswith("backbone.body.") for m in norms), "norms outside"

    bn_modules, bn_mean, bn_var = [], [], []

    def set_stats(mod, inputs):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3)).numpy().astype(np.float16)
        var = (x.var(dim=(0, 2, 3)) + 1e-2).numpy().astype(np.float16)
        name = names[id(mod)]
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise OverflowError(f"{name}: BN statistics do not fit float16")
        mod.running_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        mod.running_var.copy_(torch.from_numpy(var.astype(np.float32)))
        bn_modules.append(name)
        bn_mean.append(mean)
        bn_var.append(var)

    layers, factors, targets, shifts, shift_lens = [], [], [], [], []

    def outputs(layer, run_fn):
        seen = []
        h = layer.register_forward_hook(
            lambda mod, inp, out: seen.append(out.transpose(0, 1).reshape(out.shape[1], -1)))
        run_fn()
        h.remove()
        return torch.cat(seen, dim=1).double()

    def scale_layer(layer, run_fn):
        name = names[id(layer)]
        target_std, target_mean, center = SCALED_LAYERS[name]
        out = outputs(layer, run_fn)
        if center:
            shift = quantise(out.mean(dim=1).numpy())
            std = float((out - torch.from_numpy(shift)[:, None]).std())
        elif target_mean is not None:
            shift = quantise(float(out.mean())).reshape(1)
            std = float(out.std())
        else:
            shift = np.zeros(0)
            std = float(out.std())
        factor = float(quantise(target_std / max(std, 1e-12)))
        tm = 0.0 if target_mean is None else float(target_mean)
        w, b = scaled(sd[f"{name}.weight"], sd.get(f"{name}.bias"), factor,
                      shift if shift.size else 0.0, tm)
        layer.weight.copy_(torch.from_numpy(w))
        if b is not None:
            layer.bias.copy_(torch.from_numpy(b))
        layers.append(name)
        factors.append(factor)
        targets.append(tm)
        shifts.append(shift)
        shift_lens.append(shift.size)

    with torch.no_grad():
        batch = R.batch(model, images)  # MB's test transforms, padded together (divisible 32)
        handles = [m.register_forward_pre_hook(set_stats) for m in norms]
        model.backbone(batch.tensors)
        for h in handles:
            h.remove()
        assert len(bn_modules) == len(norms)
        features = model.backbone(batch.tensors)

        head = model.rpn.head
        run_rpn = lambda: head(features)  # noqa: E731
        for layer in (head.conv, head.cls_logits, head.bbox_pred):
            scale_layer(layer, run_rpn)
        proposals, _ = model.rpn(batch, features)

        box = model.roi_heads.box
        fe = box.feature_extractor
        pooled = fe.pooler(features, proposals)
        run_box = lambda: box.predictor(  # noqa: E731
            torch.relu(fe.fc7(torch.relu(fe.fc6(pooled.view(pooled.size(0), -1))))))
        for layer in (fe.fc6, fe.fc7, box.predictor.cls_score, box.predictor.bbox_pred):
            scale_layer(layer, run_box)
        _, detections, _ = box(features, proposals)

        mask = model.roi_heads.mask
        mfe = mask.feature_extractor
        mpooled = mfe.pooler(features, detections)

        def run_mask():
            x = mpooled
            for name in mfe.blocks:
                x = torch.relu(getattr(mfe, name)(x))
            return mask.predictor(x)

        for name in mfe.blocks:
            scale_layer(getattr(mfe, name), run_mask)
        scale_layer(mask.predictor.conv5_mask, run_mask)
        scale_layer(mask.predictor.mask_fcn_logits, run_mask)
    assert sorted(layers) == sorted(SCALED_LAYERS), layers

    rec = dict(
        meta=np.array(json.dumps(dict(arch=arch, config=config, seed=seed, size=SMALL))),
        bn_modules=np.array(bn_modules),
        bn_mean=np.concatenate(bn_mean),
        bn_var=np.concatenate(bn_var),
        scale_layers=np.array(layers),
        scale_factor=np.array(factors, np.float64),
        scale_target_mean=np.array(targets, np.float64),
        scale_shift=np.concatenate(shifts).astype(np.float64),
        scale_shift_len=np.array(shift_lens, np.int64),
    )
    # The record alone must rebuild what the model now holds, bit for bit.
    rebuilt = apply_calibration(sd, rec)
    msd = model.state_dict()
    assert list(rebuilt) == list(msd), "synthetic keys are not in MB's order"
    bad = [k for k in msd if not np.array_equal(msd[k].numpy(), rebuilt[k])]
    assert not bad, f"the record does not rebuild the calibrated model: {bad[:5]}"
    return rec


def record(arch: str, seed: int = SEED, root: Path | None = None) -> Path:
    """Calibrates, reconstructs, runs the real MB and writes the golden folder."""
    import tempfile

    import PIL
    import reference_maskrcnn_benchmark as R
    import torch
    import torchvision
    from conftest import PARITY_IMAGES, SMALL

    t0 = time.perf_counter()

    def step(msg):
        print(f"[{arch} {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    out_dir = golden_dir(arch, root)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = parity_image_paths()
    images = [R.load_image(p) for p in paths]
    rec = calibrate(arch, images, seed)
    buf = io.BytesIO()
    np.savez_compressed(buf, **rec)
    (out_dir / "calibration.npz").write_bytes(buf.getvalue())
    step("calibrated")
    sd = reconstruct(arch, root=root, verify=False)
    digest = state_dict_sha256(sd)
    note = f"synthetic seed {seed} + calibration.npz"
    (out_dir / "state_dict.sha256").write_text(f"{digest}  {note}\n")
    with tempfile.TemporaryDirectory() as tmp:
        pth = save_mb_checkpoint(arch, sd, Path(tmp) / "model_final.pth", legacy=True)
        assert not zipfile.is_zipfile(pth), "not PyTorch's legacy serialization"
        model, outs = mb_outputs(arch, pth, images)
    msd = model.state_dict()
    bad = [k for k in sd if not np.array_equal(msd[k].numpy(), sd[k])]
    assert list(msd) == list(sd) and not bad, f"DetectronCheckpointer did not restore {bad[:3]}"
    step("ran maskrcnn-benchmark on the reconstructed checkpoint (legacy .pth, loaded by "
         "DetectronCheckpointer)")
    summaries = []
    flat = {}
    for i, out in enumerate(outs):
        s = R.summary(out)
        R.check_nontrivial(s)
        summaries.append(s)
        flat.update({f"{i}/{k}": v for k, v in compact(out, i).items()})
        print(s)
    buf = io.BytesIO()
    np.savez_compressed(buf, **flat)
    (out_dir / "outputs.npz").write_bytes(buf.getvalue())
    meta = dict(
        arch=arch, config=ARCHS[arch][0], seed=seed, size=SMALL,
        state_dict_sha256=digest,
        maskrcnn_benchmark_source_sha256=mb_source_sha256(),
        torch=torch.__version__, torchvision=torchvision.__version__, numpy=np.__version__,
        pillow=PIL.__version__, torch_threads=TORCH_THREADS,
        images=[dict(name=n, file_sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                     pixels_sha256=image_sha256(im), hw=list(im.shape[:2]))
                for n, p, im in zip(PARITY_IMAGES, paths, images, strict=True)],
        summaries=summaries,
    )
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    step(f"wrote {out_dir} ({size / 1024:.0f} KiB)")
    return out_dir


def check(archs=tuple(ARCHS), root: Path | None = None) -> None:
    for arch in archs:
        t = time.perf_counter()
        sd = reconstruct(arch, root=root)
        print(f"{arch}: {len(sd)} tensors reconstructed, sha256 matches "
              f"({time.perf_counter() - t:.1f}s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="calibrate, run the real maskrcnn-benchmark, write goldens")
    c = sub.add_parser("check", help="reconstruct the golden checkpoints, check their sha256")
    for q in (r, c):
        q.add_argument("--arch", choices=list(ARCHS), action="append",
                       help="architecture (repeatable; default: all)")
    a = p.parse_args(argv)
    archs = a.arch or list(ARCHS)
    if a.cmd == "record":
        for arch in archs:
            record(arch)
    else:
        try:
            check(archs)
        except GoldenError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
