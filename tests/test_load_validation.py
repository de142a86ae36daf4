"""jaxmrcnn.load / load_checkpoint validate everything in a file before building a model:
format version, config types and values, class list, and every param's path, shape and dtype.
Every bad file raises CheckpointError naming the file and the problem, never an error from
deep inside.

The checkpoint is a slimmed torchvision config (narrow ResNet-50, 16-channel FPN and heads,
~4M params) with zero weights: validation only looks at the tree, not at the numbers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import serialization

import jaxmrcnn
from jaxmrcnn import config as C
from jaxmrcnn.checkpoint import (
    VERSION,
    Checkpoint,
    CheckpointError,
    CheckpointNotFoundError,
    expected_params,
    load_checkpoint,
)
from jaxmrcnn.model import flatten_tree

LEAF = "backbone/conv1/kernel"  # a param every config has


def tiny_config() -> C.ModelConfig:
    return C.torchvision_maskrcnn_r50_fpn(3).replace(
        backbone=dict(width_per_group=8), fpn=dict(out_channels=16),
        roi_heads=dict(fc_dim=16, conv_dim=16),
    )


def _tree(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Framework-file loads cache conversions: keep them out of the real home."""
    monkeypatch.setenv("JAXMRCNN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    cfg = tiny_config()
    rng = np.random.default_rng(0)
    params = _tree({k: rng.standard_normal(s.shape).astype(s.dtype)
                    for k, s in expected_params(cfg).items()})
    path = tmp_path_factory.mktemp("good") / "tiny.jaxmrcnn.msgpack"
    classes = ["__background__", "cat", "dog"]
    Checkpoint(cfg, params, classes, [0, 1, 2], {"format": "test"}).save(path)
    return path.read_bytes()


@pytest.fixture
def payload(good_bytes) -> dict:
    """A fresh, editable copy of the good file's contents."""
    return serialization.msgpack_restore(good_bytes)


def _write(tmp_path, payload: dict):
    path = tmp_path / "edited.jaxmrcnn.msgpack"
    path.write_bytes(serialization.msgpack_serialize(payload))
    return path


def _config(payload: dict) -> dict:
    return json.loads(payload["config"])


def _rejects(path, match: str) -> CheckpointError:
    """Both entry points raise CheckpointError naming the file and matching `match`."""
    with pytest.raises(CheckpointError, match=match) as e1:
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=match) as e2:
        jaxmrcnn.load(path, compilation_cache=False)
    for e in (e1, e2):
        assert str(path) in str(e.value)
    return e1.value


def test_good_file_loads(tmp_path, good_bytes):
    path = tmp_path / "tiny.jaxmrcnn.msgpack"
    path.write_bytes(good_bytes)
    ckpt = load_checkpoint(path)
    assert ckpt.config == tiny_config()
    assert ckpt.classes == ["__background__", "cat", "dog"] and ckpt.category_ids == [0, 1, 2]
    det = jaxmrcnn.load(path, compilation_cache=False)
    assert det.config == tiny_config() and det.classes == ckpt.classes


def test_missing_file(tmp_path):
    for load in (load_checkpoint, lambda p: jaxmrcnn.load(p, compilation_cache=False)):
        with pytest.raises(CheckpointNotFoundError, match="no (converted )?checkpoint at"):
            load(tmp_path / "nope.msgpack")
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("keep", [0.5, 0.99, 40])
def test_truncated_file(tmp_path, good_bytes, keep):
    n = int(len(good_bytes) * keep) if keep < 1 else keep
    path = tmp_path / "cut.jaxmrcnn.msgpack"
    path.write_bytes(good_bytes[:n])
    with pytest.raises(CheckpointError, match="truncated|cannot be decoded") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    # jaxmrcnn.load: a cut header is no longer recognisably ours and goes to the framework
    # reader, which refuses it with the same error type.
    with pytest.raises(CheckpointError, match="truncated") as e:
        jaxmrcnn.load(path, compilation_cache=False)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("head", [b"", b"\x85"])
def test_random_bytes(tmp_path, head):
    """Random bytes, and random bytes that start like a msgpack map holding our marker."""
    rng = np.random.default_rng(1)
    path = tmp_path / "noise.bin"
    path.write_bytes(head + rng.bytes(3000) + (b"jaxmrcnn-checkpoint" if head else b""))
    with pytest.raises(CheckpointError, match="not a jaxmrcnn checkpoint") as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError) as e:
        jaxmrcnn.load(path, compilation_cache=False)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("version, match", [
    (VERSION + 1, "newer than this jaxmrcnn reads.*upgrade jaxmrcnn"),
    (0, "reads versions"),
    ("2", "not a number"),
])
def test_wrong_version(tmp_path, payload, version, match):
    payload["version"] = version
    _rejects(_write(tmp_path, payload), match)


def test_missing_part(tmp_path, payload):
    del payload["classes"]
    _rejects(_write(tmp_path, payload), r"lacks \['classes'\]")


def test_param_missing(tmp_path, payload):
    del payload["params"]["backbone"]["conv1"]["kernel"]
    err = _rejects(_write(tmp_path, payload), r"missing \(1\): backbone/conv1/kernel")
    assert "re-convert" in str(err)


def test_param_unexpected(tmp_path, payload):
    payload["params"]["backbone"]["extra"] = {"kernel": np.zeros(3, np.float32)}
    _rejects(_write(tmp_path, payload), r"unexpected \(1\): backbone/extra/kernel")


def test_param_wrong_shape(tmp_path, payload):
    k = payload["params"]["backbone"]["conv1"]["kernel"]
    wider = np.zeros(k.shape[:-1] + (k.shape[-1] + 1,), k.dtype)
    payload["params"]["backbone"]["conv1"]["kernel"] = wider
    _rejects(_write(tmp_path, payload),
             rf"shape mismatches \(1\): {LEAF}: \(7, 7, 3, 65\) vs expected \(7, 7, 3, 64\)")


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32])
def test_param_wrong_dtype(tmp_path, payload, dtype):
    k = payload["params"]["backbone"]["conv1"]["kernel"]
    payload["params"]["backbone"]["conv1"]["kernel"] = k.astype(dtype)
    _rejects(_write(tmp_path, payload),
             rf"dtype mismatches \(1\): {LEAF}: {np.dtype(dtype).name} vs expected float32")


def test_param_not_an_array(tmp_path, payload):
    payload["params"]["backbone"]["conv1"]["kernel"] = "weights"
    _rejects(_write(tmp_path, payload), rf"not arrays \(1\): {LEAF} \(str\)")


def test_many_problems_are_listed_a_few_at_a_time(tmp_path, payload):
    del payload["params"]["box_head"]
    del payload["params"]["mask_head"]
    err = _rejects(_write(tmp_path, payload), r"missing \(\d+\)")
    line = next(x for x in str(err).splitlines() if "missing (" in x)
    assert line.endswith("...") and line.count(";") == 4  # five named, the rest counted


@pytest.mark.parametrize("part, field, value, match", [
    ("roi_heads", "result_order", "Score",
     r"roi_heads.result_order must be one of \['score', 'class'\]"),
    ("input", "resize_rule", "nearest", "input.resize_rule must be one of"),
    ("input", "resize_impl", "cv2", "input.resize_impl must be one of"),
    ("roi_heads", "box_reg", "per_image", "roi_heads.box_reg must be one of"),
    ("paste", "method", "opencv", "paste.method must be one of"),
    ("fpn", "norm", "gn", r"fpn.norm must be one of \[None, 'bn'\]"),
    ("anchors", "flavour", "yolo", "anchors.flavour must be one of"),
    ("roi_heads", "background_index", 1, "roi_heads.background_index must be 0 or num_classes - 1"),
    ("input", "min_size", 0, "input needs 0 < min_size <= max_size"),
    ("anchors", "sizes", [32, 64], r"anchors.sizes must be 5 positive sizes \(P2..P6\)"),
])
def test_unknown_config_value(tmp_path, payload, part, field, value, match):
    data = _config(payload)
    data[part][field] = value
    payload["config"] = json.dumps(data)
    _rejects(_write(tmp_path, payload), "invalid model config: " + match)


@pytest.mark.parametrize("part, field, value, match", [
    ("input", "min_size", "800", "input.min_size must be an integer, got '800'"),
    ("input", "max_size", 1333.0, "input.max_size must be an integer, got 1333.0"),
    ("backbone", "stride_in_1x1", 1, "backbone.stride_in_1x1 must be true/false, got 1"),
    ("input", "mean", [0.5, 0.5], r"input.mean must be a list of 3 numbers, got \(0.5, 0.5\)"),
    ("anchors", "sizes", [32, "64"], "anchors.sizes must be a list of integers"),
    ("rpn", "nms_thresh", None, "rpn.nms_thresh must be a number, got None"),
    ("roi_heads", "result_order", 0, "roi_heads.result_order must be a string, got 0"),
])
def test_wrong_type_in_config(tmp_path, payload, part, field, value, match):
    data = _config(payload)
    data[part][field] = value
    payload["config"] = json.dumps(data)
    _rejects(_write(tmp_path, payload), "invalid model config: " + match)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["rpn"].pop("nms_thresh"), r"RPNConfig lacks fields \['nms_thresh'\]"),
    (lambda d: d["rpn"].update(nms_threshold=0.7),
     r"unknown RPNConfig fields: \['nms_threshold'\]"),
    (lambda d: d.update(rpn=[1, 2]), "config for RPNConfig must be a JSON object"),
])
def test_config_fields_missing_or_unknown(tmp_path, payload, edit, match):
    data = _config(payload)
    edit(data)
    payload["config"] = json.dumps(data)
    _rejects(_write(tmp_path, payload), "model config cannot be read: " + match)


def test_config_that_cannot_build_a_model(tmp_path, payload, monkeypatch):
    """A config that passes validate but on which the model itself fails is reported too."""
    from jaxmrcnn import checkpoint

    def fails(cfg):
        raise IndexError("deep inside the model")

    monkeypatch.setattr(checkpoint, "expected_params", fails)
    _rejects(_write(tmp_path, payload), r"cannot build a model \(IndexError: deep inside")


@pytest.mark.parametrize("config", ["{not json", 7])
def test_config_not_json(tmp_path, payload, config):
    payload["config"] = config
    _rejects(_write(tmp_path, payload), "model config cannot be read")


@pytest.mark.parametrize("field, value, match", [
    ("classes", ["__background__", "cat"], "2 classes for a model of 3 classes"),
    ("classes", ["__background__", "cat", "dog", "emu"], "4 classes for a model of 3 classes"),
    ("category_ids", [0, 1], "2 category_ids for a model of 3 classes"),
    ("classes", ["__background__", "cat", 3], "'classes' must be a list of str"),
    ("category_ids", [0, 1, "2"], "'category_ids' must be a list of int"),
])
def test_classes_length_mismatch(tmp_path, payload, field, value, match):
    payload[field] = value
    _rejects(_write(tmp_path, payload), match)


def test_every_preset_is_valid():
    for name, make in C.PRESETS.items():
        make().validate()  # raises ValueError naming the field otherwise
        assert make() == make(), name


def test_choices_agree_with_the_code_that_uses_them():
    """config.CHOICES lists what the modules accept; they must not drift apart."""
    import importlib

    from jaxmrcnn import preprocess

    anchors, boxes, masks, roi_align = (importlib.import_module(f"jaxmrcnn.ops.{m}")
                                        for m in ("anchors", "boxes", "masks", "roi_align"))

    same = {
        ("input", "resize_rule"): preprocess.RESIZE_RULES,
        ("input", "resize_impl"): preprocess.RESIZE_IMPLS,
        ("anchors", "flavour"): anchors.ANCHOR_FLAVOURS,
        ("rpn", "coder_style"): boxes.CODER_STYLES,
        ("roi_heads", "coder_style"): boxes.CODER_STYLES,
        ("pooler", "level_rule"): roi_align.LEVEL_RULES,
        ("paste", "method"): masks.PASTE_METHODS,
    }
    for key, values in same.items():
        assert set(C.CHOICES[key]) == set(values), key
    # every string-valued field has its list (validate would fail on a new one otherwise)
    strings = {(part, name) for part, name in _string_fields(C.ModelConfig)} - C.FREE_TEXT
    assert strings == set(C.CHOICES)


def _string_fields(cls, where=""):
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _string_fields(hint, f.name)
        elif str in (hint, *typing.get_args(hint)):
            yield where, f.name


def test_validation_finds_each_problem_in_memory():
    """config.validate itself, without a file: one message per wrong field."""
    bad = tiny_config().replace(roi_heads=dict(result_order="Score"), input=dict(min_size="8"))
    with pytest.raises(ValueError, match="input.min_size must be an integer"):
        bad.validate()
    flat = dict(flatten_tree(expected_params(tiny_config())))
    assert LEAF in flat and flat[LEAF].dtype == np.float32


# ----------------------------------------------------------------------------- read-only home
# The child drops every capability before it starts Python (prctl PR_CAPBSET_DROP, then
# exec), so that a chmod 0o500 directory is read-only even when the tests run as root; it
# checks that for itself before anything else.
DROP_CAPABILITIES_THEN_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in range(64):
    libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EPERM/EINVAL (not root, no such cap): fine
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""

CHILD = """
import json, os, sys, warnings
home, tiny, pth, infer = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
try:
    open(os.path.join(home, "probe"), "w").close()
    writable = True
except OSError:
    writable = False
import jax
import numpy as np
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import jaxmrcnn
    before = dict(jax.config.values)
    det = jaxmrcnn.load(tiny)                 # a converted file, caches on by default
    det2 = jaxmrcnn.load(pth) if pth else None  # a framework file: converted, cache skipped
    after = dict(jax.config.values)
    n = len(det([np.full((40, 56, 3), 127, np.uint8)])[0]) if infer else -1
changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
print("RESULT " + json.dumps(dict(
    writable=writable, changed=changed, n=n, program_cache=det._program_cache is not None,
    warnings=[str(w.message) for w in caught if "jaxmrcnn" in str(w.message)],
    classes=det2.classes if det2 else None)))
"""

CACHE_KEYS = ["jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
              "jax_persistent_cache_min_entry_size_bytes"]


def _run_child(tmp_path, home, cache_dir, tiny, pth="", infer=False) -> dict:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("JAXMRCNN_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR")}
    env["HOME"] = str(home)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # compiles the one inference faster
    if cache_dir is not None:
        env["JAXMRCNN_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.run(
        [sys.executable, "-c", DROP_CAPABILITIES_THEN_EXEC, "-c", CHILD, str(home), str(tiny),
         str(pth), "1" if infer else "0"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _small_file(tmp_path, good_bytes):
    """The tiny checkpoint with a 64-pixel input, so one inference compiles quickly."""
    payload = serialization.msgpack_restore(good_bytes)
    data = json.loads(payload["config"])
    data["input"].update(min_size=64, max_size=64)
    payload["config"] = json.dumps(data)
    path = tmp_path / "small.jaxmrcnn.msgpack"
    path.write_bytes(serialization.msgpack_serialize(payload))
    return path


@pytest.fixture
def read_only_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)
    yield home
    home.chmod(0o700)


@pytest.mark.parametrize("cache_env", ["JAXMRCNN_CACHE_DIR=home", "unset"])
def test_read_only_home_turns_caches_off_with_one_warning(
        tmp_path, good_bytes, read_only_home, cache_env):
    """HOME (and JAXMRCNN_CACHE_DIR) a chmod 0o500 directory: jaxmrcnn.load of a converted
    file and of a framework file both work, one warning says the caches are off, no jax
    config changes, and the detector runs."""
    import torch
    import torchvision

    tiny = _small_file(tmp_path, good_bytes)
    pth = ""
    if cache_env == "unset":  # also a framework file, whose conversion cache is skipped
        torch.manual_seed(0)
        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=3)
        pth = tmp_path / "tv.pth"
        torch.save(model.state_dict(), pth)
    cache = read_only_home if cache_env != "unset" else None
    got = _run_child(tmp_path, read_only_home, cache, tiny, pth, infer=cache_env != "unset")
    assert not got["writable"], "the test could not make a read-only directory"
    assert got["changed"] == [], "jax config changed although the cache dir is not writable"
    assert len(got["warnings"]) == 1 and "jaxmrcnn's caches are off" in got["warnings"][0]
    assert str(read_only_home) in got["warnings"][0]
    assert not got["program_cache"]
    if pth:
        assert len(got["classes"]) == 3
    else:
        assert got["n"] >= 0  # the detector ran
    assert list(read_only_home.iterdir()) == []


def test_writable_cache_changes_only_the_documented_jax_config(tmp_path, good_bytes):
    """The control: a writable cache dir turns the caches on, and the three compilation-cache
    settings are the only global JAX state a Detector changes."""
    home = tmp_path / "home"
    home.mkdir()
    got = _run_child(tmp_path, home, tmp_path / "cache", _small_file(tmp_path, good_bytes))
    assert got["writable"]
    assert "jax_compilation_cache_dir" in got["changed"]
    assert set(got["changed"]) <= set(CACHE_KEYS)  # (a setting may already have its value)
    assert got["warnings"] == [] and got["program_cache"]
    assert (tmp_path / "cache").is_dir()
