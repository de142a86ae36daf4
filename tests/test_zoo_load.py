"""Model-zoo names end to end, against a local HTTP server (no internet): a torchvision
checkpoint (and one file per other family, in its own container) served under a catalogue
entry is downloaded, verified, converted and cached by
`jaxmrcnn.load(NAME)` / `read_any_checkpoint(NAME)`, `converters/from_torch.py NAME` and
`eval/coco.py --weights NAME` (its weights_file)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from test_zoo import _entry, _Server

from jaxmrcnn import zoo
from jaxmrcnn.detector import read_any_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def served_checkpoint():
    """A torchvision Mask R-CNN (3 classes, seeded) as torch.save bytes, and its state dict."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue(), model.state_dict()


@pytest.fixture
def zoo_server(monkeypatch, tmp_path, served_checkpoint):
    data, _ = served_checkpoint
    server = _Server()
    path = "/models/maskrcnn_tiny-" + hashlib.sha256(data).hexdigest()[:8] + ".pth"
    server.files[path] = data
    entry = _entry("test/maskrcnn_tiny", path, data, full_hash=False, prefix=True, size=False)
    monkeypatch.setattr(zoo, "_catalogue", lambda: (entry,))
    monkeypatch.setenv(zoo.MIRROR_ENV, server.base)
    monkeypatch.setenv("JAXMRCNN_CACHE_DIR", str(tmp_path / "cache"))
    yield server
    server.close()


def test_load_by_name_downloads_converts_and_caches(zoo_server, served_checkpoint):
    _, sd = served_checkpoint
    ckpt = read_any_checkpoint("test/maskrcnn_tiny")
    assert ckpt.config.roi_heads.num_classes == 3
    # the weights are the served model's (conv1 of the backbone, OIHW -> HWIO)
    want = sd["backbone.body.conv1.weight"].numpy().transpose(2, 3, 1, 0)
    got = ckpt.params["backbone"]["conv1"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got), want)
    assert len(zoo_server.log) == 1
    again = read_any_checkpoint("test/maskrcnn_tiny")  # download and conversion cached
    assert len(zoo_server.log) == 1
    assert again.config == ckpt.config
    assert (Path(zoo.cached_path("test/maskrcnn_tiny")).parent).is_dir()


def test_converter_cli_and_eval_accept_a_name(zoo_server, tmp_path, monkeypatch, capsys):
    from jaxmrcnn.converters.from_torch import main

    monkeypatch.chdir(tmp_path)
    assert main(["test/maskrcnn_tiny"]) == 0
    out = list(tmp_path.glob("maskrcnn_tiny-*.jaxmrcnn.msgpack"))
    assert len(out) == 1
    assert main(["test/maskrcnn_tiny"]) == 1  # the output exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err

    spec = importlib.util.spec_from_file_location("eval_coco_zoo", ROOT / "eval" / "coco.py")
    eval_coco = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_coco)
    assert eval_coco.weights_file("test/maskrcnn_tiny") == zoo.cached_path("test/maskrcnn_tiny")


def test_unreachable_name_is_one_clear_error(monkeypatch, tmp_path, served_checkpoint):
    data, _ = served_checkpoint
    entry = _entry("test/offline", "/m/x.pth", data, host="http://127.0.0.1:9")
    monkeypatch.setattr(zoo, "_catalogue", lambda: (entry,))
    monkeypatch.delenv(zoo.MIRROR_ENV, raising=False)
    monkeypatch.setenv("JAXMRCNN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(zoo.ZooError, match="pass its path instead"):
        read_any_checkpoint("test/offline")
    assert not any((tmp_path / "cache").rglob("*.pth"))


# One served file per family, in that framework's own container (the converter-format tests'
# writers), converted by name with the catalogue entry's preset.
FAMILIES = [
    ("detectron2", "detectron2/mask_rcnn_R_50_FPN_3x", "d2_pkl", ".pkl"),
    ("maskrcnn_benchmark", "maskrcnn_benchmark/e2e_mask_rcnn_R_50_FPN_1x", "mb_legacy", ".pth"),
    ("mmdet", "mmdet/mask-rcnn_r50_fpn_1x_coco", "mm_v2", ".pth"),
    ("detectron", "detectron/e2e_mask_rcnn_R-50-FPN_1x", "d1_pkl", ".pkl"),
]


@pytest.mark.parametrize("family,preset,kind,suffix", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_loads_by_name(family, preset, kind, suffix, tmp_path, monkeypatch):
    import test_converter_formats as F

    from jaxmrcnn.config import PRESETS
    from jaxmrcnn.converters import detectron, detectron2, maskrcnn_benchmark, mmdet

    module = dict(detectron2=detectron2, maskrcnn_benchmark=maskrcnn_benchmark, mmdet=mmdet,
                  detectron=detectron)[family]
    sd = F.synthetic(module, preset, F.info_for(module, "R_50"))
    local = tmp_path / f"model_final{suffix}"
    F.write(kind, sd, local)
    data = local.read_bytes()
    server = _Server()
    try:
        path = f"/{family}/model_final{suffix}"
        server.files[path] = data
        entry = dict(_entry(f"test/{family}", path, data), preset=preset)
        monkeypatch.setattr(zoo, "_catalogue", lambda: (entry,))
        monkeypatch.setenv(zoo.MIRROR_ENV, server.base)
        monkeypatch.setenv("JAXMRCNN_CACHE_DIR", str(tmp_path / "cache"))
        ckpt = read_any_checkpoint(f"test/{family}")
        assert ckpt.config.replace(name=PRESETS[preset]().name) == PRESETS[preset]()
        assert ckpt.source["format"] == family
        assert zoo.cached_path(f"test/{family}").read_bytes() == data
        assert [p for p, _ in server.log] == [path]
    finally:
        server.close()
