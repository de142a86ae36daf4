"""Every framework's converter, without the framework: state dicts in each framework's key
names, shapes and container (built from our model's parameter shapes through the inverse of
each key map), for R50, R101 and ResNeXt. Each converts with no flags (format and
architecture read off the keys and shapes), and each kind of bad file gives one clear error
and writes nothing. That the converted weights compute the framework's numbers is shown by
the parity tests (tests/test_parity_*.py)."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch

from jaxmrcnn.converters import detectron, detectron2, maskrcnn_benchmark, mmdet
from jaxmrcnn.converters.common import ConversionError
from jaxmrcnn.converters.from_torch import convert_file
from jaxmrcnn.converters.from_torch import main as cli_main
from jaxmrcnn.converters.load import CheckpointError
from jaxmrcnn.config import PRESETS
from jaxmrcnn.model import flatten_tree, param_shapes


def torch_shape(fn, ours: tuple) -> tuple:
    """The framework-side shape of a tensor that `fn` maps to our `ours` shape."""
    name = getattr(fn, "__qualname__", "")
    if name == "conv_hwio":
        h, w, i, o = ours
        return (o, i, h, w)
    if name in ("linear", "conv1x1_io"):
        return (ours[1], ours[0]) + ((1, 1) if name == "conv1x1_io" else ())
    if "linear_from_chw" in name:
        return (ours[1], ours[0])
    if name == "deconv_abio":
        kh, kw, i, o = ours
        return (i, o, kh, kw)
    if name == "same":
        return ours
    raise AssertionError(f"unknown transform {name}")


def synthetic(module, preset: str, info: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A random state dict with `module`'s key names for the architecture of `preset` (a
    fresh copy of a cached one: tests modify it)."""
    return dict(_synthetic(module, preset, tuple(sorted(info.items())), seed))


@functools.cache
def _synthetic(module, preset: str, info: tuple, seed: int) -> dict[str, np.ndarray]:
    cfg = PRESETS[preset]()
    shapes = dict(flatten_tree(param_shapes(cfg)))
    rng = np.random.default_rng(seed)
    sd = {}
    for key, (path, fn) in sorted(module.key_map(dict(info)).items()):
        sd[key] = rng.random(torch_shape(fn, shapes["/".join(path)]), dtype=np.float32)
    return sd


ARCHS = {
    "R_50": dict(depth=50, groups=1, width_per_group=64),
    "R_101": dict(depth=101, groups=1, width_per_group=64),
    "X_101_32x8d": dict(depth=101, groups=32, width_per_group=8),
}
CASES = [
    # (converter, preset, arch, how the framework writes the file)
    (detectron2, "detectron2/mask_rcnn_R_50_FPN_3x", "R_50", "d2_pkl"),
    (detectron2, "detectron2/mask_rcnn_R_101_FPN_3x", "R_101", "d2_pth"),
    (detectron2, "detectron2/mask_rcnn_X_101_32x8d_FPN_3x", "X_101_32x8d", "d2_pkl"),
    (maskrcnn_benchmark, "maskrcnn_benchmark/e2e_mask_rcnn_R_50_FPN_1x", "R_50", "mb_legacy"),
    (maskrcnn_benchmark, "maskrcnn_benchmark/e2e_mask_rcnn_R_101_FPN_1x", "R_101", "mb_zip"),
    (maskrcnn_benchmark, "maskrcnn_benchmark/e2e_mask_rcnn_X_101_32x8d_FPN_1x", "X_101_32x8d",
     "mb_zip"),
    (mmdet, "mmdet/mask-rcnn_r50_fpn_1x_coco", "R_50", "mm_v2"),
    (mmdet, "mmdet/mask-rcnn_r101_fpn_1x_coco", "R_101", "mm_plain"),
    (mmdet, "mmdet/mask-rcnn_x101-64x4d_fpn_1x_coco", "X_101_64x4d", "mm_v2"),
    (detectron, "detectron/e2e_mask_rcnn_R-50-FPN_1x", "R_50", "d1_pkl"),
    (detectron, "detectron/e2e_mask_rcnn_X-101-32x8d-FPN_1x", "X_101_32x8d", "d1_pkl"),
]
ARCHS["X_101_64x4d"] = dict(depth=101, groups=64, width_per_group=4)


def write(kind: str, sd: dict, path) -> None:
    t = {k: torch.from_numpy(v) for k, v in sd.items()}
    if kind == "d2_pkl":
        with open(path, "wb") as f:
            pickle.dump({"model": sd, "__author__": "test", "matching_heuristics": True}, f)
    elif kind == "d2_pth":
        torch.save({"model": t, "iteration": 5}, path)
    elif kind in ("mb_zip", "mb_legacy"):
        torch.save({"model": {"module." + k: v for k, v in t.items()}, "iteration": 90000}, path,
                   _use_new_zipfile_serialization=kind == "mb_zip")
    elif kind == "mm_v2":
        torch.save({"meta": {"CLASSES": tuple(f"c{i}" for i in range(80))}, "state_dict": t}, path)
    elif kind == "mm_plain":
        torch.save(t, path)
    elif kind == "d1_pkl":
        blobs = dict(sd)
        blobs.update({k + "_momentum": np.zeros_like(v) for k, v in sd.items()})
        with open(path, "wb") as f:
            pickle.dump({"blobs": blobs, "cfg": "MODEL:\n  TYPE: generalized_rcnn\n"}, f)
    else:
        raise AssertionError(kind)


def info_for(module, arch: str) -> dict:
    return dict(ARCHS[arch], num_classes=81)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].NAME}-{c[2]}-{c[3]}")
def test_converts_with_no_flags(case, tmp_path):
    module, preset, arch, kind = case
    sd = synthetic(module, preset, info_for(module, arch))
    suffix = ".pkl" if kind.endswith("pkl") else ".pth"
    path = tmp_path / f"model{suffix}"
    write(kind, sd, path)
    ckpt, summary = convert_file(path)
    want = PRESETS[preset]()
    if kind == "mm_v2":  # custom class names from the meta
        assert ckpt.classes[:2] == ["c0", "c1"] and ckpt.category_ids[:2] == [1, 2]
    else:
        assert ckpt.classes[1 if want.roi_heads.background_index == 0 else 0] == "person"
    assert ckpt.config.replace(name=want.name) == want
    assert summary[0].startswith(f"detected format: {module.NAME}")
    assert any(line.startswith("convention") for line in summary)
    # every tensor landed once: the multiset of values is preserved
    got = sorted(np.sort(np.asarray(v).ravel()).tobytes() for _, v in flatten_tree(ckpt.params))
    assert got == sorted(np.sort(v.ravel()).tobytes() for v in sd.values())


def _r50(module):
    preset = {"detectron2": "detectron2/mask_rcnn_R_50_FPN_3x",
              "maskrcnn_benchmark": "maskrcnn_benchmark/e2e_mask_rcnn_R_50_FPN_1x",
              "mmdet": "mmdet/mask-rcnn_r50_fpn_1x_coco",
              "detectron": "detectron/e2e_mask_rcnn_R-50-FPN_1x"}[module.NAME]
    return synthetic(module, preset, info_for(module, "R_50"))


def _mask_logits_key(module):
    return {"detectron2": "roi_heads.mask_head.predictor.weight",
            "maskrcnn_benchmark": "roi_heads.mask.predictor.mask_fcn_logits.weight",
            "mmdet": "roi_head.mask_head.conv_logits.weight",
            "detectron": "mask_fcn_logits_w"}[module.NAME]


def _bbox_pred_key(module):
    return {"detectron2": "roi_heads.box_predictor.bbox_pred.weight",
            "maskrcnn_benchmark": "roi_heads.box.predictor.bbox_pred.weight",
            "mmdet": "roi_head.bbox_head.fc_reg.weight",
            "detectron": "bbox_pred_w"}[module.NAME]


MODULES = [detectron2, maskrcnn_benchmark, mmdet, detectron]
KIND = {"detectron2": "d2_pkl", "maskrcnn_benchmark": "mb_zip", "mmdet": "mm_plain",
        "detectron": "d1_pkl"}


def bad_file(module, problem: str, tmp_path):
    sd = _r50(module)
    kind = KIND[module.NAME]
    path = tmp_path / ("bad.pkl" if kind.endswith("pkl") else "bad.pth")
    if problem == "no_mask_head":  # a Faster R-CNN
        sd = {k: v for k, v in sd.items() if k != _mask_logits_key(module)}
    elif problem == "class_mismatch":  # box regressor for 91 classes, classifier for 81
        key = _bbox_pred_key(module)
        sd[key] = np.zeros((4 * 91, sd[key].shape[1]), np.float32)
    elif problem == "unexpected_key":
        sd = dict(sd, **{"extra_head.weight": np.zeros(3, np.float32)})
    write(kind, sd, path)
    if problem == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    return path


PROBLEMS = {
    "no_mask_head": r"no mask head|not a Mask R-CNN",
    "class_mismatch": r"rows|classes|shape",
    "unexpected_key": r"unexpected keys \(1\): extra_head.weight",
    "truncated": r"not a readable|truncated",
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_bad_file_gives_one_clear_error_and_writes_nothing(module, problem, tmp_path, capsys):
    path = bad_file(module, problem, tmp_path)
    with pytest.raises((ConversionError, CheckpointError), match=PROBLEMS[problem]):
        convert_file(path)
    out = tmp_path / "out.msgpack"
    assert cli_main([str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nothing was written" in err
    assert not out.exists()


def test_unsupported_depth_is_named(tmp_path):
    """A ResNet-152 Detectron2 checkpoint: the error names what was found and what is known."""
    sd = _r50(detectron2)
    for b in range(6, 36):
        for k in list(sd):
            if k.startswith("backbone.bottom_up.res4.5."):
                sd[k.replace("res4.5.", f"res4.{b}.")] = sd[k]
    path = tmp_path / "r152ish.pkl"
    write("d2_pkl", sd, path)
    with pytest.raises(ConversionError, match=r"\(3, 4, 36, 3\) blocks per stage; known: ResNet-50"):
        convert_file(path)


def test_arch_flag_must_fit_the_shapes(tmp_path):
    path = tmp_path / "r50.pkl"
    write("d2_pkl", _r50(detectron2), path)
    ckpt, _ = convert_file(path, arch="detectron2/mask_rcnn_R_50_FPN_1x")
    assert ckpt.config.backbone.depth == 50
    with pytest.raises(ConversionError, match="is ResNet-101 but the checkpoint holds a ResNet-50"):
        convert_file(path, arch="detectron2/mask_rcnn_R_101_FPN_3x")
    with pytest.raises(ConversionError, match="unknown Detectron2 --arch"):
        convert_file(path, arch="mmdet/mask-rcnn_r50_fpn_1x_coco")


def test_mmengine_training_checkpoint_with_history_buffers(tmp_path):
    """A real mmengine v3 training checkpoint keeps HistoryBuffer objects (numpy inside) in
    its message hub, which weights_only refuses; they are read as inert stand-ins (no code of
    theirs runs) and the weights and meta arrive."""
    from mmengine.logging.history_buffer import HistoryBuffer

    sd = _r50(mmdet)
    buf = HistoryBuffer()
    buf.update(1.25)
    path = tmp_path / "epoch_12.pth"
    torch.save({"meta": {"dataset_meta": {"classes": tuple(f"k{i}" for i in range(80))}},
                "state_dict": {k: torch.from_numpy(v) for k, v in sd.items()},
                "message_hub": {"log_scalars": {"train/loss": buf}}}, path)
    ckpt, summary = convert_file(path)
    assert "v3" in summary[0] and ckpt.classes[0] == "k0"
