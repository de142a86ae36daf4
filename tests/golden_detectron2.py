"""Recorded outputs of the REAL Detectron2 ("goldens") on a checkpoint that can be rebuilt
bit for bit without Detectron2, so that CI (which cannot install Detectron2) still compares
jaxmrcnn with the framework itself.

    python tests/golden_detectron2.py record [--arch R_50|X_101_32x8d]   # needs Detectron2
    python tests/golden_detectron2.py check [--arch ...]                 # numpy only

The checkpoint, per architecture
================================
1. `synthetic_state_dict(arch, seed)`: every tensor of a Detectron2 Mask R-CNN state dict
   (Detectron2's exact key names and shapes, float32) drawn with numpy alone: one
   `np.random.default_rng([seed, hash of the key])` per key, uniform values (`Generator.random`,
   the most version-stable stream numpy has) scaled to std 1/sqrt(fan_in) for weights, 0.1 for
   biases; FrozenBatchNorm affine weight in [0.6, 1.4] and bias of std 0.2; running stats 0/1.
   The key names and shapes come from the converter's key map and the Flax model's parameter
   shapes run backwards through each layout transform (a test checks them against a real
   Detectron2 model's `state_dict()` when its source is present).
2. Calibration (`calibrate`, needs Detectron2): the synthetic weights are loaded into the real
   Detectron2 model, which then runs on the three PARITY_IMAGES at SMALL size (one batch, its
   own preprocessing) and is made non-trivial as `reference_detectron2.calibrate` does: every
   FrozenBatchNorm gets the mean and variance (+ 1e-2) of its actual input, in execution order;
   the RPN, box and mask layers are rescaled to target output statistics, the class scores and
   mask logits centred per class. Every number derived from activations is QUANTISED before it
   is used: BN statistics to float16-representable values, each layer's scale factor and bias
   shift to 3 significant digits. `calibration.npz` records exactly those numbers (BN stats as
   float16, factors and shifts as float64 decimals), and nothing else.
3. `reconstruct(arch)`: seed + calibration record -> the calibrated state dict, in numpy
   (float64 arithmetic, one rounding to float32), identical on every machine; its sha256 is
   `state_dict.sha256` in the golden folder and is checked every time.

The outputs (`record`, needs Detectron2)
========================================
The reconstructed state dict is written as a model-zoo `.pkl`, loaded by Detectron2's own
`DetectionCheckpointer` into the model built from its model-zoo yaml (test size 384/640), and
run by `reference_detectron2.run` (DefaultPredictor's preprocessing, stage by stage, checked
equal to `model([inputs])`). `outputs.npz` keeps per image (keys `<i>/<name>`): image_size,
input_hw (padded), a seeded sample of 1000 input values and of each FPN level's values (with
their flat indices, the level's shape and max |value|), the 1000 proposals and their logits,
raw_boxes/raw_scores/raw_classes (resized coordinates, before detector_postprocess), the final
boxes/scores/classes (0..79), final_to_raw, the final masks as COCO RLE and the 28x28 mask
probabilities of the first MASK_PROBS_KEPT final detections as float16 (all of them would be
~0.4 MB per architecture). `meta.json` names the Detectron2 source (a
sha256 of its package's .py files), torch/torchvision/numpy/Pillow versions, torch threads,
the images (file and decoded-pixel sha256) and the non-triviality summary per image.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for _p in (str(TESTS), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

GOLDEN = TESTS / "golden"
SEED = 0
# Architecture -> (model-zoo config, depth, groups, width per group).
ARCHS = {
    "R_50": ("mask_rcnn_R_50_FPN_3x", 50, 1, 64),
    "X_101_32x8d": ("mask_rcnn_X_101_32x8d_FPN_3x", 101, 32, 8),
}
NUM_CLASSES = 81  # 80 COCO classes + background (last)
SAMPLE_SIZE = 1000  # values sampled per FPN level and for the input
SAMPLE_SEED = 1234
MASK_PROBS_KEPT = 20  # 28x28 probabilities kept for the top final detections of each image
LEVELS = ("p2", "p3", "p4", "p5", "p6")
TORCH_THREADS = 2  # the recording's torch.set_num_threads (float sums can depend on it)
REGENERATE = "regenerate with python tests/golden_detectron2.py record"

# The calibration recipe (reference_detectron2.calibrate's targets): layer -> (output std,
# output mean or None, centre every output channel on its own mean).
RPN = "proposal_generator.rpn_head"
BOX = "roi_heads.box_head"
PRED = "roi_heads.box_predictor"
MASK = "roi_heads.mask_head"
SCALED_LAYERS = {
    f"{RPN}.conv": (1.0, None, False),
    f"{RPN}.objectness_logits": (2.5, -1.0, False),
    f"{RPN}.anchor_deltas": (0.3, 0.0, False),
    f"{BOX}.fc1": (1.0, None, False),
    f"{BOX}.fc2": (1.0, None, False),
    f"{PRED}.cls_score": (1.5, None, True),
    f"{PRED}.bbox_pred": (1.0, 0.0, False),
    **{f"{MASK}.mask_fcn{i}": (1.0, None, False) for i in range(1, 5)},
    f"{MASK}.deconv": (1.0, None, False),
    f"{MASK}.predictor": (3.0, 0.0, True),
}


class GoldenError(RuntimeError):
    """The golden files do not reproduce the recorded checkpoint (or are missing)."""


def golden_dir(arch: str, root: Path | None = None) -> Path:
    _check_arch(arch)
    return Path(root or GOLDEN) / f"detectron2_{arch}"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")


# ---------------------------------------------------------------------------------------------
# The synthetic state dict (numpy only)


def _source_shape(fn, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape that the converter's layout transform `fn` maps to our shape."""
    from jaxmrcnn.converters import common as C

    name = getattr(fn, "__qualname__", "")
    if fn is C.conv_hwio:
        h, w, i, o = ours
        return (o, i, h, w)
    if fn is C.deconv_abio:
        h, w, i, o = ours
        return (i, o, h, w)
    if fn is C.conv1x1_io:
        i, o = ours
        return (o, i, 1, 1)
    if fn is C.linear or name.startswith("linear_from_chw"):
        i, o = ours
        return (o, i)
    if fn is C.same:
        return tuple(ours)
    raise ValueError(f"no inverse known for the layout transform {name or fn!r}")


def detectron2_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Detectron2's state-dict key -> shape for `arch`, derived without Detectron2 from
    `jaxmrcnn.converters.detectron2.key_map` and `jaxmrcnn.model.param_shapes`, each shape run back
    through its layout transform (and checked forwards)."""
    from jaxmrcnn.config import detectron2_mask_rcnn
    from jaxmrcnn.converters.detectron2 import key_map
    from jaxmrcnn.model import flatten_tree, param_shapes

    _check_arch(arch)
    _, depth, groups, width = ARCHS[arch]
    cfg = detectron2_mask_rcnn(depth, groups, width, num_classes=NUM_CLASSES)
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
    return dict(sorted(shapes.items()))


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def _uniform(key: str, seed: int, shape, std: float, mean: float = 0.0) -> np.ndarray:
    """Uniform values of the given std and mean (float64 arithmetic, one float32 rounding)."""
    rng = np.random.default_rng([seed, _key_seed(key)])
    u = rng.random(int(np.prod(shape)))  # [0, 1), 53-bit doubles
    half_width = std * np.sqrt(3.0)
    return (mean + (2.0 * u - 1.0) * half_width).astype(np.float32).reshape(shape)


def synthetic_state_dict(arch: str, seed: int = SEED) -> dict[str, np.ndarray]:
    """A Detectron2-keyed Mask R-CNN state dict (float32) from numpy's seeded generators."""
    sd = {}
    for key, shape in detectron2_shapes(arch).items():
        if ".norm." in key:
            kind = key.rsplit(".", 1)[1]
            if kind == "running_mean":
                sd[key] = np.zeros(shape, np.float32)
            elif kind == "running_var":
                sd[key] = np.ones(shape, np.float32)
            elif kind == "weight":
                sd[key] = _uniform(key, seed, shape, 0.4 / np.sqrt(3.0), 1.0)  # [0.6, 1.4]
            else:
                sd[key] = _uniform(key, seed, shape, 0.2)
        elif key.endswith(".bias"):
            sd[key] = _uniform(key, seed, shape, 0.1)
        else:
            # fan_in: inputs per output value; a 2x2 stride-2 transposed conv (in, out, kh, kw)
            # gives each output one tap of every input channel.
            fan_in = shape[0] if key == f"{MASK}.deconv.weight" else int(np.prod(shape[1:]))
            sd[key] = _uniform(key, seed, shape, 1.0 / np.sqrt(fan_in))
    return sd


# ---------------------------------------------------------------------------------------------
# Calibration record -> state dict


def quantise(x) -> np.ndarray:
    """To 3 significant digits (float64 nearest to the decimal)."""
    a = np.asarray(x, np.float64)
    return np.array([float(f"{v:.3g}") for v in a.ravel()], np.float64).reshape(a.shape)


def scaled(weight, bias, factor: float, shift, target_mean: float):
    """A layer rescaled as the calibration does: W * factor, (b - shift) * factor + mean, in
    float64 from the float32 values, rounded once to float32."""
    w = (weight.astype(np.float64) * factor).astype(np.float32)
    if bias is None:
        return w, None
    b = ((bias.astype(np.float64) - shift) * factor + target_mean).astype(np.float32)
    return w, b


def apply_calibration(sd: dict, rec: dict) -> dict:
    """The state dict `sd` (synthetic) with the record's BN statistics and layer scales."""
    out = dict(sd)
    modules = [str(m) for m in rec["bn_modules"]]
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


def state_dict_sha256(sd: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        v = np.ascontiguousarray(sd[k], dtype="<f4")
        h.update(f"{k}|{v.shape}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def load_calibration(arch: str, root: Path | None = None) -> dict:
    path = golden_dir(arch, root) / "calibration.npz"
    if not path.is_file():
        raise GoldenError(f"no calibration record at {path}; {REGENERATE}")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def reconstruct(arch: str, *, root: Path | None = None, verify: bool = True) -> dict:
    """Seed + calibration record -> the calibrated Detectron2 state dict (numpy float32),
    checked against the recorded sha256 (GoldenError if it differs)."""
    rec = load_calibration(arch, root)
    meta = json.loads(str(rec["meta"]))
    sd = apply_calibration(synthetic_state_dict(arch, int(meta["seed"])), rec)
    if verify:
        path = golden_dir(arch, root) / "state_dict.sha256"
        if not path.is_file():
            raise GoldenError(f"no {path}; {REGENERATE}")
        want = path.read_text().split()[0]
        got = state_dict_sha256(sd)
        if got != want:
            raise GoldenError(
                f"the reconstructed {arch} checkpoint (sha256 {got[:16]}...) is not the recorded "
                f"one ({want[:16]}...): the synthetic weights or the calibration record changed "
                f"(numpy's generator, the key map, or the files); {REGENERATE}"
            )
    return sd


def save_zoo_pkl(sd: dict, path) -> Path:
    """The model zoo's container (as reference_detectron2.save_pkl writes it)."""
    import pickle

    path = Path(path)
    data = {"model": dict(sd), "__author__": "jaxmrcnn tests (golden)", "matching_heuristics": True}
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def save_checkpointer_pth(sd: dict, path) -> Path:
    """`{'model': {key: torch.Tensor}}` with torch.save, as DetectionCheckpointer.save writes."""
    import torch

    path = Path(path)
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Golden outputs


def load_outputs(arch: str, root: Path | None = None) -> tuple[list[dict], dict]:
    """Per image dicts of the recorded outputs (masks decoded to [N, H, W] bool), and meta."""
    from pycocotools import mask as mask_utils

    d = golden_dir(arch, root)
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
    """One `reference_detectron2.run` output -> the small arrays `outputs.npz` keeps."""
    from pycocotools import mask as mask_utils

    res = {
        "image_size": out["image_size"].astype(np.int64),
        "input_hw": np.array(out["input"].shape[:2], np.int64),
        "orig_hw": np.array(out["masks"].shape[1:], np.int64),
        "proposals": out["proposals"].astype(np.float32),
        "proposal_logits": out["proposal_logits"].astype(np.float32),
        "raw_boxes": out["raw_boxes"].astype(np.float32),
        "raw_scores": out["raw_scores"].astype(np.float32),
        "raw_classes": out["raw_classes"].astype(np.int64),
        "boxes": out["boxes"].astype(np.float32),
        "scores": out["scores"].astype(np.float32),
        "classes": out["classes"].astype(np.int64),
    }
    res["input_idx"], res["input_values"] = _sample(out["input"], image_index, 0)
    for j, name in enumerate(LEVELS, start=1):
        f = out["features"][name]
        res[f"{name}_shape"] = np.array(f.shape, np.int64)
        res[f"{name}_absmax"] = np.float32(np.abs(f).max())
        res[f"{name}_idx"], res[f"{name}_values"] = _sample(f, image_index, j)
    # Final detections are the raw ones that survive detector_postprocess, in order; scores
    # are distinct (checked by check_nontrivial), so a final score names its raw row.
    final_to_raw = np.array([np.flatnonzero(out["raw_scores"] == s)[0] for s in out["scores"]],
                            np.int64)
    assert np.array_equal(out["raw_classes"][final_to_raw], out["classes"])
    res["final_to_raw"] = final_to_raw
    res["mask_probs"] = out["mask_probs"][final_to_raw[:MASK_PROBS_KEPT]].astype(np.float16)
    rles = mask_utils.encode(np.asfortranarray(out["masks"].transpose(1, 2, 0).astype(np.uint8)))
    counts = [r["counts"] for r in rles]
    res["rle_lengths"] = np.array([len(c) for c in counts], np.int64)
    res["rle_counts"] = np.frombuffer(b"".join(counts), np.uint8)
    return res


def detectron2_source_sha256() -> str:
    """A sha256 of the Detectron2 package's .py files (relative paths and contents)."""
    import reference_detectron2 as R

    pkg = Path(R.import_detectron2().__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*.py")):
        h.update(str(p.relative_to(pkg)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def image_sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, np.uint8).tobytes()).hexdigest()


def parity_image_paths() -> list[Path]:
    from conftest import COCO_MINI, PARITY_IMAGES

    return [COCO_MINI / "train2017" / n for n in PARITY_IMAGES]


def detectron2_outputs(arch: str, checkpoint_path, images: list[np.ndarray]):
    """The real Detectron2 on `images`: the model built from the zoo yaml at SMALL size and
    loaded from `checkpoint_path` by DetectionCheckpointer, run stage by stage. Returns the
    model and the `reference_detectron2.run` output per image."""
    import reference_detectron2 as R
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
# Calibration and recording (need Detectron2)


def calibrate(arch: str, images: list[np.ndarray], seed: int = SEED) -> dict:
    """Calibrates the synthetic weights in the real Detectron2 model on `images` (uint8 RGB),
    with every activation-derived number quantised; returns the record (see module doc)."""
    import reference_detectron2 as R
    import torch
    from conftest import SMALL
    from torch import nn

    torch.set_num_threads(TORCH_THREADS)
    sd = synthetic_state_dict(arch, seed)
    model = R.build(ARCHS[arch][0], **SMALL)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    names = {id(m): n for n, m in model.named_modules()}
    norms = R._norm_modules(model)
    assert all(names[id(m)].startswith("backbone.bottom_up.") for m in norms), "norms outside"

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
        inputs = [R.predictor_inputs(model, im) for im in images]
        batch = model.preprocess_image(inputs)
        handles = [m.register_forward_pre_hook(set_stats) for m in norms]
        model.backbone(batch.tensor)
        for h in handles:
            h.remove()
        assert len(bn_modules) == len(norms)
        features = model.backbone(batch.tensor)

        rpn = model.proposal_generator
        head = rpn.rpn_head
        rpn_in = [features[f] for f in rpn.in_features]
        run_rpn = lambda: head(rpn_in)  # noqa: E731
        for conv in [m for m in head.conv.modules() if isinstance(m, nn.Conv2d)]:
            scale_layer(conv, run_rpn)
        scale_layer(head.objectness_logits, run_rpn)
        scale_layer(head.anchor_deltas, run_rpn)
        proposals, _ = rpn(batch, features, None)

        rh = model.roi_heads
        pooled = rh.box_pooler([features[f] for f in rh.box_in_features],
                               [p.proposal_boxes for p in proposals])
        run_box = lambda: rh.box_predictor(rh.box_head(pooled))  # noqa: E731
        for fc in [m for m in rh.box_head.modules() if isinstance(m, nn.Linear)]:
            scale_layer(fc, run_box)
        scale_layer(rh.box_predictor.cls_score, run_box)
        scale_layer(rh.box_predictor.bbox_pred, run_box)
        detections, _ = rh.box_predictor.inference(run_box(), proposals)

        mpooled = rh.mask_pooler([features[f] for f in rh.mask_in_features],
                                 [d.pred_boxes for d in detections])
        run_mask = lambda: rh.mask_head.layers(mpooled)  # noqa: E731
        for name, layer in rh.mask_head.named_children():
            if name.startswith("mask_fcn") or name == "deconv":
                scale_layer(layer, run_mask)
        scale_layer(rh.mask_head.predictor, run_mask)
    assert sorted(layers) == sorted(SCALED_LAYERS), layers

    rec = dict(
        meta=np.array(json.dumps(dict(arch=arch, config=ARCHS[arch][0], seed=seed, size=SMALL))),
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
    assert rebuilt.keys() == msd.keys()
    bad = [k for k in msd if not np.array_equal(msd[k].numpy(), rebuilt[k])]
    assert not bad, f"the record does not rebuild the calibrated model: {bad[:5]}"
    return rec


def record(arch: str, seed: int = SEED, root: Path | None = None) -> Path:
    """Calibrates, reconstructs, runs the real Detectron2 and writes the golden folder."""
    import tempfile

    import PIL
    import reference_detectron2 as R
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
        pkl = save_zoo_pkl(sd, Path(tmp) / "model.pkl")
        model, outs = detectron2_outputs(arch, pkl, images)
    msd = model.state_dict()
    bad = [k for k in sd if not np.array_equal(msd[k].numpy(), sd[k])]
    assert msd.keys() == sd.keys() and not bad, f"DetectionCheckpointer did not restore {bad[:3]}"
    step("ran Detectron2 on the reconstructed checkpoint (loaded by DetectionCheckpointer)")
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
        detectron2_source_sha256=detectron2_source_sha256(),
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
    r = sub.add_parser("record", help="calibrate, run the real Detectron2, write the goldens")
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
