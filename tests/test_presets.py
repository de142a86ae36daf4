"""Presets state every convention (no field has a default to fall back on), round-trip
through the checkpoint's JSON, and old checkpoints (version 1, torchvision only) still load
with torchvision's values for the fields added since."""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from jaxmrcnn import config as C
from jaxmrcnn.checkpoint import Checkpoint, load_checkpoint
from jaxmrcnn.config import PRESETS, ModelConfig

CONFIG_CLASSES = [C.InputConfig, C.BackboneConfig, C.FPNConfig, C.AnchorConfig, C.RPNConfig,
                  C.PoolerConfig, C.ROIHeadsConfig, C.PasteConfig, C.ModelConfig]


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_no_config_field_has_a_default(cls):
    """A preset cannot rely on a default it did not choose: there are none."""
    with_default = [f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING
                    or f.default_factory is not dataclasses.MISSING]
    assert with_default == []


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_json(name):
    cfg = PRESETS[name]()
    assert isinstance(cfg, ModelConfig)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_json_missing_a_field_is_an_error():
    data = json.loads(PRESETS["torchvision_maskrcnn_r50_fpn"]().to_json())
    del data["rpn"]["min_size_strict"]
    with pytest.raises(ValueError, match="RPNConfig lacks fields \\['min_size_strict'\\]"):
        ModelConfig.from_json(json.dumps(data))


OLD_FIELDS = {
    1: [("rpn", "min_size_strict"), ("rpn", "box_plus_one"), ("roi_heads", "box_reg"),
        ("roi_heads", "clip_to_original"), ("input", "resize_impl"), ("backbone", "base_channels")],
    2: [("backbone", "base_channels")],
}


@pytest.mark.parametrize("version", [1, 2])
def test_older_checkpoint_versions_load(tmp_path, version):
    """A file written before fields existed still loads: version 1 (torchvision only, before
    the convention fields) gets torchvision's values, version 2 (before base_channels) 64."""
    from flax import serialization

    cfg = PRESETS["torchvision_maskrcnn_r50_fpn"]()
    data = json.loads(cfg.to_json())
    for part, field in OLD_FIELDS[version]:
        del data[part][field]
    import numpy as np

    from jaxmrcnn.classes import torchvision_coco_classes
    from jaxmrcnn.model import param_shapes

    # params of the model the config builds (loading validates every path, shape and dtype)
    params = jax.tree.map(lambda s: np.zeros(s, np.float32), param_shapes(cfg),
                          is_leaf=lambda s: isinstance(s, tuple))
    names, ids = torchvision_coco_classes()
    Checkpoint(cfg, params, names, ids, {}).save(tmp_path / "x")
    payload = serialization.msgpack_restore((tmp_path / "x").read_bytes())
    payload["version"] = version
    payload["config"] = json.dumps(data)
    (tmp_path / "old.msgpack").write_bytes(serialization.msgpack_serialize(payload))
    assert load_checkpoint(tmp_path / "old.msgpack").config == cfg


def _diff(a, b, prefix=""):
    """Field paths where two configs differ."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            out += _diff(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append(f"{prefix}{f.name}")
    return out


def test_detectron2_differs_from_torchvision_exactly_where_the_frameworks_do():
    """Every difference is one of the documented conventions (CONVENTIONS.md section 3), and
    none is missing: a preset that silently kept torchvision's value would fail here."""
    tv = PRESETS["torchvision_maskrcnn_r50_fpn"]()
    d2 = PRESETS["detectron2/mask_rcnn_R_50_FPN_3x"]()
    assert sorted(_diff(tv, d2)) == sorted([
        "name",
        "input.channel_order", "input.pixel_scale", "input.mean", "input.std",
        "input.resize_rule", "input.resize_impl",
        "backbone.stride_in_1x1", "backbone.norm_eps",
        "anchors.flavour", "anchors.stride_rule",
        "rpn.min_size", "rpn.min_size_strict",
        "pooler.sampling_ratio", "pooler.aligned", "pooler.level_rule",
        "roi_heads.num_classes", "roi_heads.background_index", "roi_heads.box_reg",
        "roi_heads.min_box_size", "roi_heads.clip_to_original",
        "paste.method", "paste.strict", "paste.padding",
    ])
    x101 = PRESETS["detectron2/mask_rcnn_X_101_32x8d_FPN_3x"]()
    assert sorted(_diff(d2, x101)) == sorted([
        "name", "input.std", "backbone.depth", "backbone.groups", "backbone.width_per_group",
        "backbone.stride_in_1x1",
    ])
    assert x101.input.std == (57.375, 57.120, 58.395) and not x101.backbone.stride_in_1x1
