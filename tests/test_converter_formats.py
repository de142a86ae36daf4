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

from jaxmrcnn.config import PRESETS
from jaxmrcnn.converters import detectron, detectron2, maskrcnn_benchmark, mmdet
from jaxmrcnn.converters.common import ConversionError
from jaxmrcnn.converters.from_torch import convert_file
from jaxmrcnn.converters.from_torch import main as cli_main
from jaxmrcnn.converters.load import CheckpointError
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
    k = dict(info).get("num_classes", cfg.roi_heads.num_classes)
    h = cfg.roi_heads
    if k != h.num_classes:  # a model trained on another dataset (background first or last)
        bg = k - 1 if h.background_index == h.num_classes - 1 else h.background_index
        cfg = cfg.replace(roi_heads=dict(num_classes=k, background_index=bg))
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
    known = r"\(3, 4, 36, 3\) blocks per stage; known: ResNet-26 \(2, 2, 2, 2\), ResNet-50"
    with pytest.raises(ConversionError, match=known):
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


# ---------------------------------------------------------------------------------------------
# Converted weights compute the framework's numbers, without the framework. The backbone: a
# torchvision ResNet set up as the framework's (stride in the 1x1 conv, FrozenBN's eps;
# Detectron's AffineChannel y = x * s + b is FrozenBatchNorm2d with mean 0, var 1, eps 0), its
# tensors written under the framework's key names (the rest of the state dict synthetic),
# converted with no flags; C2..C5 against torchvision's. Tolerance: max |ours - ref| <= 1e-4 *
# max |ref| (float32 sums in another order through 50-100 layers, as tests/test_layers.py);
# a stride in the wrong conv changes them by ~0.1 of the scale, a dropped eps by >= 2% per
# norm (the variances are ~1e-4).

FORWARD_CASES = [
    # (converter, preset, arch, norm eps, AffineChannel, stride in the 1x1)
    pytest.param(detectron, "detectron/e2e_mask_rcnn_R-50-FPN_1x", "R_50", 0.0, True, True,
                 id="detectron-R_50-affine-stride_in_1x1"),
    pytest.param(detectron2, "detectron2/mask_rcnn_R_101_FPN_3x", "R_101", 1e-5, False, True,
                 id="detectron2-R_101-stride_in_1x1"),
]


def torch_resnet(depth: int, *, eps: float, affine: bool, stride_in_1x1: bool, seed: int = 0):
    """An eval torchvision ResNet with FrozenBatchNorm2d(eps) of random statistics (mean 0,
    var 1 when `affine`), the stride of each stage's first block in its 1x1 conv if asked."""
    from torchvision.models import resnet50, resnet101
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(seed)
    net = {50: resnet50, 101: resnet101}[depth](
        weights=None, norm_layer=lambda c: FrozenBatchNorm2d(c, eps=eps)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, FrozenBatchNorm2d):
                c = m.weight.shape[0]
                scale = 0.3 + 0.4 * torch.rand(c, generator=g)
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                if affine:
                    m.weight.copy_(scale)
                    m.running_mean.zero_()
                    m.running_var.fill_(1.0)
                else:  # small variances, so that the eps matters (2-5% of each norm's scale)
                    var = 1e-4 * (1 + torch.rand(c, generator=g))
                    m.weight.copy_(scale * torch.sqrt(var + eps))
                    m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                    m.running_var.copy_(var)
    if stride_in_1x1:
        for layer in (net.layer2, net.layer3, net.layer4):
            layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    return net


def torch_backbone_by_path(net) -> dict[str, np.ndarray]:
    """torchvision ResNet tensors keyed by our param path ("backbone/layer1_0/bn1/mean")."""
    bn_leaf = {"weight": "weight", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    out = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "fc":
            continue
        if parts[0] in ("conv1", "bn1"):
            module, leaf = parts[0], parts[1]
            path = ["backbone", module]
        else:
            block = f"{parts[0]}_{parts[1]}"
            if parts[2] == "downsample":
                module = "downsample_conv" if parts[3] == "0" else "downsample_bn"
            else:
                module = parts[2]
            leaf = parts[-1]
            path = ["backbone", block, module]
        path.append("kernel" if "conv" in module else bn_leaf[leaf])
        out["/".join(path)] = value.numpy()
    return out


@pytest.mark.parametrize("module, preset, arch, eps, affine, stride_in_1x1", FORWARD_CASES)
def test_converted_backbone_computes_the_frameworks_resnet(module, preset, arch, eps, affine,
                                                          stride_in_1x1):
    import jax.numpy as jnp

    from jaxmrcnn.model import MaskRCNN

    info = info_for(module, arch)
    net = torch_resnet(info["depth"], eps=eps, affine=affine, stride_in_1x1=stride_in_1x1)
    by_path = torch_backbone_by_path(net)
    sd = synthetic(module, preset, info)
    written = 0
    for key, (path, _) in module.key_map(info).items():
        if path[0] == "backbone":
            sd[key] = by_path["/".join(path)]
            written += 1
    n_torch = len([p for p in by_path if not (affine and p.endswith(("/mean", "/var")))])
    assert written == n_torch  # every torchvision tensor has its framework key, and only once
    ckpt = module.convert(sd, {})
    b = ckpt.config.backbone
    assert (b.depth, b.stride_in_1x1, b.norm_eps) == (info["depth"], stride_in_1x1, eps)
    assert b.norm == ("affine" if affine else "frozen_bn")
    assert ckpt.config.replace(name=PRESETS[preset]().name) == PRESETS[preset]()

    x = np.random.default_rng(0).normal(size=(1, 64, 96, 3)).astype(np.float32)
    with torch.no_grad():
        t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        t = net.maxpool(net.relu(net.bn1(net.conv1(t))))
        want = {}
        for i, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
            t = layer(t)
            want[f"c{i + 2}"] = t.numpy().transpose(0, 2, 3, 1)
    feats, _ = MaskRCNN(ckpt.config).apply(
        {"params": ckpt.params}, jnp.asarray(x), None, method=lambda m, im, v: m.pyramid(im, v))
    for name, ref in want.items():
        got = np.asarray(feats[name])
        assert got.shape == ref.shape, name
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"


def test_detectron2_three_class_model_converts_and_its_heads_compute_detectron2s(tmp_path):
    """A Detectron2 model trained on 3 classes (cls_score 4 rows: 3 + background last; 12-row
    regressor; 3-channel mask predictor), written as DetectionCheckpointer's .pth: read off the
    shapes with no flags, placeholder class names; the box head + predictor and the mask head
    (the mask channel of each class) equal Detectron2's FastRCNNConvFCHead /
    FastRCNNOutputLayers / MaskRCNNConvUpsampleHead written in torch.nn.functional (flatten
    NCHW, fc1, relu, fc2, relu, linear; 4 x conv3x3 + relu, deconv 2x2/2 + relu, 1x1). Same
    tolerance as tests/test_layers.py: 1e-4 of the output's scale."""
    import jax.numpy as jnp
    import torch.nn.functional as F

    from jaxmrcnn.model import MaskRCNN

    info = dict(ARCHS["R_50"], num_classes=4)
    sd = synthetic(detectron2, "detectron2/mask_rcnn_R_50_FPN_3x", info)
    rng = np.random.default_rng(1)
    for key, value in sd.items():  # zero-mean head weights, so the ReLUs cut
        if key.startswith("roi_heads."):
            fan_in = int(np.prod(value.shape[1:])) if value.ndim > 1 else 1
            scale = 1 / np.sqrt(fan_in) if value.ndim > 1 else 0.1
            sd[key] = (scale * rng.standard_normal(value.shape)).astype(np.float32)
    assert sd["roi_heads.box_predictor.cls_score.weight"].shape == (4, 1024)
    assert sd["roi_heads.box_predictor.bbox_pred.weight"].shape == (12, 1024)
    assert sd["roi_heads.mask_head.predictor.weight"].shape == (3, 256, 1, 1)
    path = tmp_path / "model_final.pth"
    write("d2_pth", sd, path)
    ckpt, summary = convert_file(path)
    h = ckpt.config.roi_heads
    assert (h.num_classes, h.background_index) == (4, 3)
    assert ckpt.classes == ["class_0", "class_1", "class_2", "__background__"]
    assert "3 classes + background" in summary[1] and "COCO" not in summary[1]
    assert ckpt.config.replace(name="x", roi_heads=dict(num_classes=81, background_index=80)) == (
        PRESETS["detectron2/mask_rcnn_R_50_FPN_3x"]().replace(name="x"))

    t = {k: torch.from_numpy(v) for k, v in sd.items() if k.startswith("roi_heads.")}
    x = rng.standard_normal((6, 7, 7, 256)).astype(np.float32)
    with torch.no_grad():
        f = F.relu(F.linear(torch.from_numpy(x).permute(0, 3, 1, 2).flatten(1),
                            t["roi_heads.box_head.fc1.weight"], t["roi_heads.box_head.fc1.bias"]))
        f = F.relu(F.linear(f, t["roi_heads.box_head.fc2.weight"],
                            t["roi_heads.box_head.fc2.bias"]))
        p = "roi_heads.box_predictor."
        logits = F.linear(f, t[p + "cls_score.weight"], t[p + "cls_score.bias"]).numpy()
        deltas = F.linear(f, t[p + "bbox_pred.weight"], t[p + "bbox_pred.bias"]).numpy()
    xm = rng.standard_normal((5, 14, 14, 256)).astype(np.float32)
    labels = np.array([0, 2, 1, 2, 0])  # Detectron2's class index (== ours; background last)
    with torch.no_grad():
        m = torch.from_numpy(xm).permute(0, 3, 1, 2)
        for i in range(1, 5):
            w = f"roi_heads.mask_head.mask_fcn{i}."
            m = F.relu(F.conv2d(m, t[w + "weight"], t[w + "bias"], padding=1))
        m = F.relu(F.conv_transpose2d(m, t["roi_heads.mask_head.deconv.weight"],
                                      t["roi_heads.mask_head.deconv.bias"], stride=2))
        m = F.conv2d(m, t["roi_heads.mask_head.predictor.weight"],
                     t["roi_heads.mask_head.predictor.bias"])
        mask_logits = m[torch.arange(5), torch.from_numpy(labels)].numpy()

    model, params = MaskRCNN(ckpt.config), {"params": ckpt.params}
    ours_l, ours_d = model.apply(params, jnp.asarray(x),
                                 method=lambda mod, v: mod.box_predictor(mod.box_head(v)))
    ours_m = model.apply(params, jnp.asarray(xm), jnp.asarray(labels),
                         method=lambda mod, v, lab: mod.mask_head(v, lab))
    for name, got, want in (("class logits", ours_l, logits),
                            ("box deltas", ours_d, deltas.reshape(6, -1, 4)),
                            ("mask logits", ours_m, mask_logits)):
        got = np.asarray(got)
        assert got.shape == want.shape, f"{name}: {got.shape} vs {want.shape}"
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"
