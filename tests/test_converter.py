"""converters/from_torch.py: round trip on torchvision's own files, key styles, bad files.

The reference state dicts come from torchvision's model constructors with random weights,
saved with `torch.save(model.state_dict())` exactly as users do; that the converted weights
compute the same outputs is shown by tests/test_parity_torchvision.py.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import jaxmrcnn
from jaxmrcnn.converters.from_torch import convert_file
from jaxmrcnn.converters.from_torch import main as cli_main
from jaxmrcnn.converters.load import CheckpointError
from jaxmrcnn.converters.torchvision import ConversionError
from jaxmrcnn.model import flatten_tree

ROOT = Path(__file__).resolve().parent.parent


def _flat(tree):
    return ((k, np.asarray(v)) for k, v in flatten_tree(tree))


@pytest.fixture(scope="module")
def tv_state_dicts():
    torch.manual_seed(0)
    kw = dict(weights=None, weights_backbone=None)
    v1 = torchvision.models.detection.maskrcnn_resnet50_fpn(**kw).state_dict()
    v2 = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(**kw).state_dict()
    return {"v1": v1, "v2": v2}


@pytest.fixture(scope="module")
def v1_file(tv_state_dicts, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "maskrcnn_v1.pth"
    torch.save(tv_state_dicts["v1"], path)
    return path


def test_cli_round_trip_v1(v1_file, tv_state_dicts, tmp_path):
    """torch.save file -> CLI (a separate process) -> jaxmrcnn.load: every tensor arrives."""
    out = tmp_path / "converted.msgpack"
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "converters" / "from_torch.py"), str(v1_file),
            "--out", str(out),
        ],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "detected format: torchvision (maskrcnn_resnet50_fpn, new key style)" in proc.stdout
    assert "ResNet-50" in proc.stdout and "91 classes (COCO)" in proc.stdout
    n_ignored = sum(k.endswith("num_batches_tracked") for k in tv_state_dicts["v1"])
    n_tensors = len(tv_state_dicts["v1"]) - n_ignored
    assert f"tensors:         {n_tensors} converted, {n_ignored} ignored" in proc.stdout

    det = jaxmrcnn.load(out)
    assert det.config.name.startswith("torchvision_maskrcnn_r50_fpn")
    # weights=None builds nn.BatchNorm2d (its state dict has num_batches_tracked): eps 1e-5
    assert det.config.backbone.norm_eps == 1e-5
    assert det.classes[1] == "person" and len(det.classes) == 91
    got = dict(_flat(det.params))
    sd = tv_state_dicts["v1"]
    # Spot checks of each layout transform (the parity tests check all of them numerically).
    t = lambda k: sd[k].numpy()  # noqa: E731
    np.testing.assert_array_equal(
        got["backbone/conv1/kernel"], t("backbone.body.conv1.weight").transpose(2, 3, 1, 0))
    w6 = t("roi_heads.box_head.fc6.weight").reshape(1024, 256, 7, 7)  # [out, C, H, W]
    np.testing.assert_array_equal(  # NHWC flattening: rows ordered (h, w, c)
        got["box_head/fc6/kernel"], w6.transpose(2, 3, 1, 0).reshape(-1, 1024))
    np.testing.assert_array_equal(  # ConvTranspose2d weight [in, out, kh, kw], not flipped
        got["mask_head/deconv_kernel"],
        t("roi_heads.mask_predictor.conv5_mask.weight").transpose(2, 3, 0, 1))
    total = sum(v.size for v in got.values())
    assert total == sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked"))


def test_every_tensor_lands_once(tv_state_dicts, tmp_path):
    """The values of every source tensor appear in the converted params (as multisets)."""
    for version, sd in tv_state_dicts.items():
        path = tmp_path / f"{version}.pth"
        torch.save(sd, path)
        ckpt, summary = convert_file(path)
        assert ("v2" in summary[0]) == (version == "v2")
        got = sorted(np.sort(v.ravel()).tobytes() for _, v in _flat(ckpt.params))
        want = sorted(
            np.sort(v.numpy().astype(np.float32).ravel()).tobytes()
            for k, v in sd.items() if not k.endswith("num_batches_tracked")
        )
        assert got == want, version


def test_bn_epsilon_follows_the_norm_layer(tv_state_dicts, tmp_path):
    """torchvision's COCO v1 weights run with FrozenBatchNorm2d and eps overwritten to 0
    (their state dict has no num_batches_tracked); BatchNorm2d models run with 1e-5."""
    frozen = {k: v for k, v in tv_state_dicts["v1"].items() if "num_batches_tracked" not in k}
    torch.save(frozen, tmp_path / "frozen.pth")
    ckpt, _ = convert_file(tmp_path / "frozen.pth")
    assert ckpt.config.backbone.norm_eps == 0.0
    ckpt, _ = convert_file(tmp_path / "frozen.pth", bn_eps=1e-3)
    assert ckpt.config.backbone.norm_eps == 1e-3


def _old_style(sd):
    """torchvision's pre-0.13 key names (FPN and mask head without the Conv2dNormActivation
    level), which its own _load_from_state_dict still accepts."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"fpn\.(inner|layer)_blocks\.(\d+)\.0\.", r"fpn.\1_blocks.\2.", k)
        m = re.fullmatch(r"roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)", k)
        if m:
            k = f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}"
        out[k] = v
    return out


def test_old_key_style_converts_identically(tv_state_dicts, tmp_path):
    sd = tv_state_dicts["v1"]
    old = _old_style(sd)
    assert "backbone.fpn.inner_blocks.0.weight" in old
    assert "roi_heads.mask_head.mask_fcn1.weight" in old
    # torchvision itself reads the old names into the same model
    m = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    m.load_state_dict(old)
    torch.save(sd, tmp_path / "new.pth")
    torch.save(old, tmp_path / "old.pth")
    new_ckpt, _ = convert_file(tmp_path / "new.pth")
    old_ckpt, summary = convert_file(tmp_path / "old.pth")
    assert "old key style" in summary[0]
    a, b = dict(_flat(new_ckpt.params)), dict(_flat(old_ckpt.params))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_wrapped_checkpoints(tv_state_dicts, tmp_path):
    """{'model': sd} (training scripts) and DDP's 'module.' prefix are unwrapped."""
    sd = tv_state_dicts["v1"]
    torch.save({"model": sd, "epoch": 3}, tmp_path / "a.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "b.pth")
    for name in ("a.pth", "b.pth"):
        ckpt, _ = convert_file(tmp_path / name)
        assert ckpt.config.roi_heads.num_classes == 91


# ---------------------------------------------------------------------------------------------
# Bad files: a clear error, exit status 1, nothing written
# ---------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_file(kind, tmp_path, sd):
    path = tmp_path / f"{kind}.pth"
    if kind == "text":
        path.write_text("this is a README, not weights\n")
    elif kind == "truncated":
        torch.save(sd, tmp_path / "full.pth")
        data = (tmp_path / "full.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "needs_code":  # a training checkpoint that also pickles its argparse.Namespace
        torch.save({"model": sd, "args": argparse.Namespace(lr=0.02)}, path)
    elif kind == "evil_pkl":
        path = tmp_path / "evil.pkl"
        evil = _Evil()
        evil.marker = tmp_path / "pwned"
        path.write_bytes(pickle.dumps({"blobs": {"conv1_w": evil}}))
    elif kind == "missing":
        torch.save({k: v for k, v in sd.items() if k != "roi_heads.box_head.fc7.weight"}, path)
    elif kind == "unexpected":
        torch.save({**sd, "roi_heads.extra_head.weight": torch.zeros(3)}, path)
    elif kind == "shape":
        bad = dict(sd)
        bad["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(40, 1024)
        torch.save(bad, path)
    elif kind == "detectron2":
        model = {
            "backbone.bottom_up.res2.0.conv1.weight": torch.zeros(64, 64, 1, 1),
            "proposal_generator.rpn_head.conv.weight": torch.zeros(256, 256, 3, 3),
        }
        torch.save({"model": model}, path)
    elif kind == "not_a_state_dict":
        torch.save([1, 2, 3], path)
    return path


BAD = {
    "text": "not a readable PyTorch checkpoint",
    "truncated": "not a readable PyTorch checkpoint",
    "empty": "is empty",
    "needs_code": "would execute code",
    "evil_pkl": "could run code",
    "missing": r"missing keys \(1\): roi_heads.box_head.fc7.weight",
    "unexpected": r"unexpected keys \(1\): roi_heads.extra_head.weight",
    "shape": r"roi_heads.box_predictor.bbox_pred.weight: shape \(40, 1024\)",
    "detectron2": "not a Detectron2 Mask R-CNN state dict",
    "not_a_state_dict": "holds no state dict",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_file_is_refused_and_nothing_written(kind, tv_state_dicts, tmp_path, capsys):
    path = _bad_file(kind, tmp_path, tv_state_dicts["v1"])
    out = tmp_path / "out.msgpack"
    with pytest.raises((CheckpointError, ConversionError), match=BAD[kind]):
        convert_file(path)
    assert cli_main([str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "nothing was written" in err
    assert not out.exists()
    assert not (tmp_path / "pwned").exists()  # the pickle's payload never ran


def test_existing_output_survives_a_failed_conversion(tv_state_dicts, tmp_path):
    """A failed run does not clobber a previous good output file."""
    out = tmp_path / "out.msgpack"
    out.write_bytes(b"previous result")
    bad = _bad_file("truncated", tmp_path, tv_state_dicts["v1"])
    assert cli_main([str(bad), "--out", str(out)]) == 1
    assert out.read_bytes() == b"previous result"


def test_load_accepts_a_framework_checkpoint_and_caches_it(v1_file, tmp_path, monkeypatch):
    """jaxmrcnn.load(file.pth) converts in memory (as Detectron2's predictor loads its own
    files); the second load reads the cached conversion instead of converting again."""
    import jaxmrcnn.converters.from_torch as ft

    monkeypatch.setenv("JAXMRCNN_CACHE_DIR", str(tmp_path / "cache"))
    det = jaxmrcnn.load(v1_file, compilation_cache=False)
    assert det.config.name == "torchvision_maskrcnn_r50_fpn" and len(det.classes) == 91
    cached = list((tmp_path / "cache" / "converted").glob("*.msgpack"))
    assert len(cached) == 1

    def no_conversion(*a, **k):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(ft, "convert_file", no_conversion)
    again = jaxmrcnn.load(v1_file, compilation_cache=False)
    a, b = dict(_flat(det.params)), dict(_flat(again.params))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_legacy_torch_serialization_is_read(tv_state_dicts, tmp_path):
    """PyTorch < 1.6 files (non-zip; maskrcnn-benchmark's and Matterport's zoo files) start
    with a pickle byte but are torch.save files: torch.load(weights_only=True) reads them."""
    path = tmp_path / "legacy.pth"
    torch.save(tv_state_dicts["v1"], path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    ckpt, summary = convert_file(path)
    assert "torchvision" in summary[0] and ckpt.config.roi_heads.num_classes == 91


def test_format_flag_that_contradicts_the_keys_is_refused(v1_file):
    with pytest.raises(ConversionError, match="--format detectron2 was asked for"):
        convert_file(v1_file, fmt="detectron2")


def test_five_class_model_converts_and_its_heads_compute_torchvisions(tmp_path):
    """A torchvision model trained on 4 classes + background (num_classes=5, as the
    fine-tuning tutorial builds it): no flags, placeholder names, and the converted box head +
    predictor and mask head (each class's mask channel) equal torchvision's modules on random
    features (1e-4 of the output's scale, as tests/test_layers.py)."""
    import jax.numpy as jnp

    from jaxmrcnn.model import MaskRCNN

    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5).eval()
    path = tmp_path / "five.pth"
    torch.save(model.state_dict(), path)
    ckpt, summary = convert_file(path)
    h = ckpt.config.roi_heads
    assert (h.num_classes, h.background_index) == (5, 0)
    assert ckpt.classes == ["__background__", "class_1", "class_2", "class_3", "class_4"]
    assert "5 classes" in summary[1] and "COCO" not in summary[1]

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 7, 7, 256)).astype(np.float32)
    xm = rng.standard_normal((5, 14, 14, 256)).astype(np.float32)
    labels = np.array([1, 4, 2, 3, 4])
    rh = model.roi_heads
    with torch.no_grad():
        logits, deltas = rh.box_predictor(rh.box_head(torch.from_numpy(x).permute(0, 3, 1, 2)))
        m = rh.mask_predictor(rh.mask_head(torch.from_numpy(xm).permute(0, 3, 1, 2)))
        mask_logits = m[torch.arange(5), torch.from_numpy(labels)].numpy()
    ours, params = MaskRCNN(ckpt.config), {"params": ckpt.params}
    ours_l, ours_d = ours.apply(params, jnp.asarray(x),
                                method=lambda mod, v: mod.box_predictor(mod.box_head(v)))
    ours_m = ours.apply(params, jnp.asarray(xm), jnp.asarray(labels),
                        method=lambda mod, v, lab: mod.mask_head(v, lab))
    for name, got, want in (("class logits", ours_l, logits.numpy()),
                            ("box deltas", ours_d, deltas.numpy().reshape(6, -1, 4)),
                            ("mask logits", ours_m, mask_logits)):
        got = np.asarray(got)
        assert got.shape == want.shape, f"{name}: {got.shape} vs {want.shape}"
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"
