"""The Detectron (Caffe2) reference for parity tests: Detectron's `.pkl` weights run by the REAL
maskrcnn-benchmark, the faithful way to run Detectron weights in PyTorch (its
configs/caffe2/e2e_mask_rcnn_{R_50,R_101,X_101_32x8d}_FPN_1x_caffe2.yaml and its Caffe2
loader, maskrcnn_benchmark/utils/c2_model_loading.py), through the stand-ins and helpers of
tests/reference_maskrcnn_benchmark.py (imported as R; nothing of maskrcnn-benchmark is
copied here). Detectron itself (Caffe2) is not runnable today.

    python tests/reference_detectron.py --arch R_50 \\
        --image ../shared/data/coco-mini/train2017/000000000790.jpg --out /tmp/d1ref

builds maskrcnn-benchmark's model from the caffe2 yaml (random weights, `MODEL.WEIGHT ""`),
calibrates it (R.calibrate), writes it as a Detectron `.pkl` (`write_pkl`), builds a fresh
model whose `MODEL.WEIGHT` is that local `.pkl` and loads it through `DetectronCheckpointer`
(the real path: `_load_file` -> `load_c2_format` -> `_load_c2_pickled_weights` ->
`_rename_weights_for_resnet` -> suffix matching), checks that the loaded model holds exactly
the writer's weights and computes the same outputs, and saves the outputs (`R.run`).

The Detectron `.pkl` (what detectron/utils/net.py `save_model_to_weights_file` writes,
net.py:136-169; Detectron = github:facebookresearch/Detectron at 04155a0)
===========================================================================================
- Container: `{'blobs': {name: float32 ndarray}, 'cfg': <yaml text>}`, pickle protocol 2
  (detectron/utils/io.py:39 `save_object(..., pickle_format=2)`), written here as Python 2
  wrote the model zoo files (`Python2Pickler`; Python 3's protocol 2 would add `_codecs.encode`
  calls, see there).
- Parameters (`model.params`, net.py:145-151), Caffe2 layouts = PyTorch's (conv OIHW, FC
  (out, in), ConvTranspose (in, out, kh, kw)), names below.
- `<param>_momentum` for every TRAINABLE parameter (net.py:152-158; detector.py:68-79): the
  convs/FCs of res3..res5, FPN, RPN and heads. Not for `conv1_w` and `res2_*` (cut off by
  StopGradient at TRAIN.FREEZE_AT = 2, ResNet.py:104-105, config.py:198) nor for the
  AffineChannel `_s`/`_b` (Caffe2's AffineChannel computes no parameter gradient unless
  is_learnable). Written as zeros here.
- Blobs of the ImageNet initialisation the detection net does not use are preserved and saved
  again (net.py:119-133,159-167): the classifier `fc1000_{w,b}` (R-50/R-101 files; `pred_{w,b}`
  in the X-101 ImageNet file, which maskrcnn-benchmark renames to fc1000,
  c2_model_loading.py:88-90). Written with random values: neither loader may use them.

Detectron blob names (ResNet.py, FPN.py, fast_rcnn_heads.py, mask_rcnn_heads.py) and how
maskrcnn-benchmark renames them (c2_model_loading.py, line numbers of MB 57eec25)
==================================================================================
- `conv1_w` (stem conv, no_bias=1, ResNet.py:252) -> `conv1.weight` (:13-14), matched by suffix
  to `backbone.body.stem.conv1.weight`; `res_conv1_bn_{s,b}` (ResNet.py:253) -> `res.conv1_bn.
  scale` (:15,17) -> `conv1_bn.` (:21) -> `bn1.weight`/`bn1.bias` (:30,33) -> stem.bn1.
- `res{2..5}_{b}_branch2{a,b,c}_w` + `_bn_{s,b}` (ConvAffine, detector.py:414-442) ->
  `layer{1..4}.{b}.conv{1,2,3}.weight`, `.bn{1,2,3}.{weight,bias}` (:35-45; `.b` -> `.bias`
  also hits `.branch`, undone by :18); `res{s}_0_branch1_w` + `_bn_{s,b}` ->
  `layer{s-1}.0.downsample.{0,1}` (:47-48).
- FPN (FPN.py:134-257): blobs named after the last block of each stage, R50 `res5_2_sum,
  res4_5_sum, res3_3_sum, res2_2_sum` (FPN.py:547-549), R101/X101 `res4_22_sum` (:557); the
  top lateral `fpn_inner_res5_2_sum_{w,b}`, the others `fpn_inner_res{4,3,2}_{last}_sum_
  lateral_{w,b}` (FPN.py:267-268), outputs `fpn_res{5..2}_{last}_sum_{w,b}` (:192-213). MB:
  `_C2_STAGE_NAMES` R-50 ["1.2", "2.3", "3.5", "4.2"], R-101 ["1.2", "2.3", "3.22", "4.2"]
  (:173-177; the X-101 caffe2 yaml's CONV_BODY is R-101-FPN) -> `fpn.inner.layer{i}.{last}.sum
  {.lateral}` -> `fpn_inner{1..4}` (lateral suffix for stages 1-3, none for 4), `fpn.layer{i}.
  {last}.sum` -> `fpn_layer{1..4}` (:64-72).
- RPN: `conv_rpn_fpn2_{w,b}`, `rpn_cls_logits_fpn2_{w,b}`, `rpn_bbox_pred_fpn2_{w,b}` (FPN.py:
  341-372; levels 3-6 share them, :379-415) -> `rpn.head.{conv,cls_logits,bbox_pred}` (:24-27,
  75-79,109).
- Box head `fc6`, `fc7` (fast_rcnn_heads.py:113-116; fc6 over the (256, 7, 7) C-major flatten),
  `cls_score` (81 rows, background 0), `bbox_pred` (324 rows) (:51,67) -> same names (:19-20),
  suffix-matched to roi_heads.box.{feature_extractor,predictor}.
- Mask head `_[mask]_fcn{1..4}` (mask_rcnn_heads.py:153), `conv5_mask` (:169), `mask_fcn_logits`
  (:57) -> `mask_fcn{i}`, `conv5_mask`, `mask_fcn_logits` (:99-101).
- `*_momentum` blobs are skipped (:120-121). Unmatched model keys (the FrozenBatchNorm running
  statistics, the anchor buffers) keep the fresh model's values (model_serialization.py:
  10-58): running_mean 0 and running_var 1 (layers/batch_norm.py:14-17).

AffineChannel vs maskrcnn-benchmark's FrozenBatchNorm2d
=======================================================
Detectron's norm is AffineChannel, y = x * s + b (detector.py:81-105). maskrcnn-benchmark's
FrozenBatchNorm2d computes scale = w * rsqrt(running_var), bias = b - running_mean * scale,
y = x * scale + bias (layers/batch_norm.py:27-31). `write_pkl` folds each calibrated norm into
s = w * rsqrt(var), b = bias - mean * s (the same float32 expressions) and sets the model to
mean 0, var 1, weight s, bias b: MB then computes scale = s * rsqrt(1) = s and bias = b - 0 * s
= b exactly, so the folded model computes what the calibrated one did, bit for bit, and a
fresh model loaded from the `.pkl` (whose running stats stay 0 / 1) equals it.
"""

from __future__ import annotations

import argparse
import pickle
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_maskrcnn_benchmark as R  # noqa: E402

ARCHS = {  # ours -> maskrcnn-benchmark's caffe2 config (configs/caffe2/)
    "R_50": "caffe2/e2e_mask_rcnn_R_50_FPN_1x_caffe2",
    "R_101": "caffe2/e2e_mask_rcnn_R_101_FPN_1x_caffe2",
    "X_101_32x8d": "caffe2/e2e_mask_rcnn_X_101_32x8d_FPN_1x_caffe2",
}
DETECTRON_NAMES = {  # ours -> Detectron model zoo name
    "R_50": "e2e_mask_rcnn_R-50-FPN_1x",
    "R_101": "e2e_mask_rcnn_R-101-FPN_1x",
    "X_101_32x8d": "e2e_mask_rcnn_X-101-32x8d-FPN_1x",
}
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
source_dir = R.source_dir
ENV_VAR = R.ENV_VAR


# ---------------------------------------------------------------------------------------------
# maskrcnn-benchmark model keys <-> Detectron blob names


def stage_blobs(depth: int) -> list[str]:
    """The FPN input blobs res2..res5, named after each stage's last block."""
    return [f"res{s}_{n - 1}_sum" for s, n in zip(range(2, 6), BLOCKS[depth], strict=True)]


def detectron_name(key: str, depth: int) -> str | None:
    """The Detectron blob for a maskrcnn-benchmark state-dict key (None: not stored, i.e. the
    FrozenBatchNorm running statistics and the anchor buffers). KeyError if unknown."""
    if key.endswith((".running_mean", ".running_var")) or key.startswith(
        "rpn.anchor_generator.cell_anchors."
    ):
        return None
    wb = {"weight": "w", "bias": "b"}
    sb = {"weight": "s", "bias": "b"}
    m = re.fullmatch(r"backbone\.body\.stem\.conv1\.weight", key)
    if m:
        return "conv1_w"
    m = re.fullmatch(r"backbone\.body\.stem\.bn1\.(weight|bias)", key)
    if m:
        return f"res_conv1_bn_{sb[m[1]]}"
    m = re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight", key)
    if m:
        return f"res{int(m[1]) + 1}_{m[2]}_branch2{'abc'[int(m[3]) - 1]}_w"
    m = re.fullmatch(r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(weight|bias)", key)
    if m:
        return f"res{int(m[1]) + 1}_{m[2]}_branch2{'abc'[int(m[3]) - 1]}_bn_{sb[m[4]]}"
    m = re.fullmatch(r"backbone\.body\.layer(\d)\.0\.downsample\.0\.weight", key)
    if m:
        return f"res{int(m[1]) + 1}_0_branch1_w"
    m = re.fullmatch(r"backbone\.body\.layer(\d)\.0\.downsample\.1\.(weight|bias)", key)
    if m:
        return f"res{int(m[1]) + 1}_0_branch1_bn_{sb[m[2]]}"
    m = re.fullmatch(r"backbone\.fpn\.fpn_(inner|layer)(\d)\.(weight|bias)", key)
    if m:
        i = int(m[2])
        blob = stage_blobs(depth)[i - 1]
        if m[1] == "inner":
            return f"fpn_inner_{blob}{'' if i == 4 else '_lateral'}_{wb[m[3]]}"
        return f"fpn_{blob}_{wb[m[3]]}"
    heads = {
        "rpn.head.conv": "conv_rpn_fpn2",
        "rpn.head.cls_logits": "rpn_cls_logits_fpn2",
        "rpn.head.bbox_pred": "rpn_bbox_pred_fpn2",
        "roi_heads.box.feature_extractor.fc6": "fc6",
        "roi_heads.box.feature_extractor.fc7": "fc7",
        "roi_heads.box.predictor.cls_score": "cls_score",
        "roi_heads.box.predictor.bbox_pred": "bbox_pred",
        "roi_heads.mask.predictor.conv5_mask": "conv5_mask",
        "roi_heads.mask.predictor.mask_fcn_logits": "mask_fcn_logits",
    }
    heads.update({f"roi_heads.mask.feature_extractor.mask_fcn{i}": f"_[mask]_fcn{i}"
                  for i in range(1, 5)})
    prefix, _, leaf = key.rpartition(".")
    if prefix in heads and leaf in wb:
        return f"{heads[prefix]}_{wb[leaf]}"
    raise KeyError(f"no Detectron blob for maskrcnn-benchmark key {key}")


def is_trainable(blob: str) -> bool:
    """Whether Detectron keeps a momentum blob for this parameter (see the module docstring):
    not the AffineChannel params, not the stem and res2 (TRAIN.FREEZE_AT = 2)."""
    if blob.endswith(("_bn_s", "_bn_b")):
        return False
    return not (blob == "conv1_w" or blob.startswith("res2_"))


def depth_of(model) -> int:
    return int(model.cfg.MODEL.BACKBONE.CONV_BODY.split("-")[1])


def cfg_yaml(model) -> str:
    """The training cfg Detectron stores next to the blobs (the essentials of its
    configs/12_2017_baselines/e2e_mask_rcnn_*-FPN_1x.yaml with the defaults that decide the
    architecture, as yaml text)."""
    import yaml

    c = model.cfg
    depth = depth_of(model)
    resnext = c.MODEL.RESNETS.NUM_GROUPS > 1
    cfg = {
        "MODEL": {"TYPE": "generalized_rcnn",
                  "CONV_BODY": f"FPN.add_fpn_ResNet{depth}_conv5_body",
                  "NUM_CLASSES": int(c.MODEL.ROI_BOX_HEAD.NUM_CLASSES),
                  "FASTER_RCNN": True, "MASK_ON": True},
        "RESNETS": {"STRIDE_1X1": bool(c.MODEL.RESNETS.STRIDE_IN_1X1),
                    "TRANS_FUNC": "bottleneck_transformation",
                    "NUM_GROUPS": int(c.MODEL.RESNETS.NUM_GROUPS),
                    "WIDTH_PER_GROUP": int(c.MODEL.RESNETS.WIDTH_PER_GROUP)},
        "FPN": {"FPN_ON": True, "MULTILEVEL_ROIS": True, "MULTILEVEL_RPN": True},
        "FAST_RCNN": {"ROI_BOX_HEAD": "fast_rcnn_heads.add_roi_2mlp_head",
                      "ROI_XFORM_METHOD": "RoIAlign", "ROI_XFORM_RESOLUTION": 7,
                      "ROI_XFORM_SAMPLING_RATIO": 2},
        "MRCNN": {"ROI_MASK_HEAD": "mask_rcnn_heads.mask_rcnn_fcn_head_v1up4convs",
                  "RESOLUTION": 28, "ROI_XFORM_METHOD": "RoIAlign", "ROI_XFORM_RESOLUTION": 14,
                  "ROI_XFORM_SAMPLING_RATIO": 2, "DILATION": 1, "CONV_INIT": "MSRAFill"},
        "TRAIN": {"FREEZE_AT": 2,
                  "WEIGHTS": "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/"
                  + ("20171220/X-101-32x8d.pkl" if resnext else f"MSRA/R-{depth}.pkl")},
        "TEST": {"SCALE": int(c.INPUT.MIN_SIZE_TEST), "MAX_SIZE": int(c.INPUT.MAX_SIZE_TEST),
                 "NMS": 0.5, "RPN_PRE_NMS_TOP_N": 1000, "RPN_POST_NMS_TOP_N": 1000},
        "PIXEL_MEANS": [[[102.9801, 115.9465, 122.7717]]],
    }
    return yaml.safe_dump(cfg, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Writing the .pkl


@torch.no_grad()
def fold_norms(model) -> int:
    """Folds every FrozenBatchNorm2d of the model into AffineChannel form in place: weight s =
    w * rsqrt(var), bias b - mean * s (maskrcnn-benchmark's own float32 expressions), running
    stats 0 / 1. The model computes the same, bit for bit. Returns how many were folded."""
    norms = R._norm_modules(model)
    for m in norms:
        scale = m.weight * m.running_var.rsqrt()
        bias = m.bias - m.running_mean * scale
        m.weight.copy_(scale)
        m.bias.copy_(bias)
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
    return len(norms)


def detectron_blobs(model, *, seed: int = 0, momentum: bool = True,
                    imagenet_leftovers: bool = True) -> dict[str, np.ndarray]:
    """The blob dict of a model whose norms are folded (`fold_norms`): every stored tensor
    under its Detectron name, plus the momentum blobs and the unused ImageNet classifier."""
    depth = depth_of(model)
    blobs: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        name = detectron_name(key, depth)
        if name is None:
            if key.endswith(".running_mean"):
                assert not value.any(), f"{key}: norms not folded (call fold_norms first)"
            if key.endswith(".running_var"):
                assert (value == 1).all(), f"{key}: norms not folded (call fold_norms first)"
            continue
        assert name not in blobs, f"two keys map to {name}"
        blobs[name] = value.detach().cpu().numpy().astype(np.float32, copy=True)
    if momentum:
        blobs.update({f"{k}_momentum": np.zeros_like(v) for k, v in list(blobs.items())
                      if is_trainable(k)})
    if imagenet_leftovers:
        rng = np.random.default_rng(seed)
        pre = "pred" if model.cfg.MODEL.RESNETS.NUM_GROUPS > 1 else "fc1000"
        blobs[f"{pre}_w"] = rng.standard_normal((1000, 2048)).astype(np.float32) * 0.01
        blobs[f"{pre}_b"] = np.zeros(1000, np.float32)
    return blobs


class Python2Pickler(pickle._Pickler):
    """Pickle protocol 2 as Python 2 wrote it, which is how the Detectron model zoo files were
    made (2018, Python 2, `cPickle` protocol 2): `str` and `bytes` as Python 2 `str`
    (SHORT_BINSTRING / BINSTRING, read back as latin-1 text; numpy accepts latin-1 text as
    array data, its own Python 2 compatibility), and numpy's `_reconstruct` under its Python 2
    era module `numpy.core.multiarray`. Python 3's protocol 2 would instead pickle every
    array's bytes as a call of `_codecs.encode`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        n = len(data)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else (
            pickle.BINSTRING + struct.pack("<i", n))
        self.write(head + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":
            name = name or obj.__name__
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + name.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_pkl(model, path, *, python2: bool = True, **kwargs) -> Path:
    """Writes `model` (a calibrated maskrcnn-benchmark model of a caffe2 config) as a Detectron
    `.pkl`: folds its norms in place (`fold_norms`), then pickles `{'blobs': ..., 'cfg': ...}`
    with protocol 2 as Detectron does (io.py:39), as Python 2 wrote it (the model zoo files;
    `Python2Pickler`) or, with `python2=False`, as Python 3 writes it (Detectron run under
    Python 3). kwargs go to `detectron_blobs`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fold_norms(model)
    data = {"blobs": detectron_blobs(model, **kwargs), "cfg": cfg_yaml(model)}
    with open(path, "wb") as f:
        if python2:
            Python2Pickler(f, protocol=2).dump(data)
        else:
            pickle.dump(data, f, protocol=2)
    return path


# ---------------------------------------------------------------------------------------------
# Building and loading through maskrcnn-benchmark


def build(arch: str, *, seed: int = 0, min_size: int = 800, max_size: int = 1333):
    """maskrcnn-benchmark's model for the caffe2 yaml of `arch` (R.build: seeded random
    weights, `MODEL.WEIGHT ""`, so nothing is downloaded)."""
    return R.build(ARCHS[arch], seed=seed, min_size=min_size, max_size=max_size)


def load(arch: str, pkl, *, seed: int = 1000, **size):
    """A fresh model whose `MODEL.WEIGHT` is the local `.pkl`, loaded as tools/test_net.py loads
    `cfg.MODEL.WEIGHT`: `DetectronCheckpointer(cfg, model).load(...)` -> `_load_file` ->
    `load_c2_format` (the Caffe2 loader; chosen because the name ends in .pkl)."""
    R.import_maskrcnn_benchmark()
    from maskrcnn_benchmark.utils.checkpoint import DetectronCheckpointer

    pkl = Path(pkl).resolve()
    if pkl.suffix != ".pkl" or not pkl.is_file():
        raise FileNotFoundError(f"{pkl}: not a local .pkl (this harness never downloads)")
    model = build(arch, seed=seed, **size)
    cfg = model.cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHT = str(pkl)
    cfg.freeze()
    model.cfg = cfg
    DetectronCheckpointer(cfg, model, save_dir="").load(cfg.MODEL.WEIGHT, use_latest=False)
    return model.eval()


def mb_renamed(blob_names, depth: int) -> dict[str, str | None]:
    """What maskrcnn-benchmark's `_rename_weights_for_resnet` names each blob, renaming one at
    a time (two blobs may get the same name, e.g. `fc1000_w` and `pred_w`); None for the blobs
    it drops (`*_momentum`, checked next to their parameter)."""
    R.import_maskrcnn_benchmark()
    from maskrcnn_benchmark.utils.c2_model_loading import (
        _C2_STAGE_NAMES,
        _rename_weights_for_resnet,
    )

    stages = _C2_STAGE_NAMES[f"R-{depth}"]
    zero = np.zeros(1, np.float32)
    out: dict[str, str | None] = {}
    for name in blob_names:
        base = name[: -len("_momentum")] if name.endswith("_momentum") else name
        (new, *rest) = _rename_weights_for_resnet({name: zero, base: zero}, stages)
        assert not rest, f"{name} was not dropped"
        out[name] = None if name != base else new
    return out


def check_loaded(writer, loaded) -> None:
    """The loaded model holds exactly the (folded) writer's state: every parameter and buffer."""
    a, b = writer.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys(), "state-dict keys differ"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors not restored from the .pkl, e.g. {bad[:5]}"


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="R_50", choices=sorted(ARCHS))
    p.add_argument("--image", required=True, action="append")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=384)
    p.add_argument("--max-size", type=int, default=640)
    a = p.parse_args(argv)
    size = dict(min_size=a.min_size, max_size=a.max_size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()

    def step(msg):
        nonlocal t
        now = time.perf_counter()
        print(f"[{now - t:7.1f}s] {msg}", flush=True)
        t = now

    images = [R.load_image(path) for path in a.image]
    model = build(a.arch, seed=a.seed, **size)
    R.calibrate(model, images, seed=a.seed)
    step(f"built and calibrated {ARCHS[a.arch]}")
    before = [R.run(model, im) for im in images]
    pkl = write_pkl(model, out / f"{DETECTRON_NAMES[a.arch]}.pkl", seed=a.seed)
    step(f"wrote {pkl} ({pkl.stat().st_size >> 20} MiB)")
    loaded = load(a.arch, pkl, seed=a.seed + 1000, **size)
    check_loaded(model, loaded)
    step("loaded through DetectronCheckpointer: identical weights")
    refs = [R.run(loaded, im) for im in images]
    for i, (x, y) in enumerate(zip(before, refs, strict=True)):
        R.assert_same_outputs(x, y, f"image {i}: folded + reloaded vs calibrated")
        s = R.summary(y)
        print(s)
        R.check_nontrivial(s)
        np.savez(out / f"outputs_{i}.npz", original_image=images[i], **R.flat(y))
    step("outputs identical to the calibrated model's; wrote outputs_*.npz")


if __name__ == "__main__":
    main()
