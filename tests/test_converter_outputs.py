"""What the converter writes, and where: half-precision checkpoints convert exactly, the
default output keeps the whole stem, an existing output is never replaced without
--overwrite, and files are written fsynced, atomically, with the usual permissions.

The source is torchvision's maskrcnn_resnet50_fpn with random weights (3 classes), saved with
torch.save(state_dict()) as users do.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
import torchvision

from jaxmrcnn import checkpoint
from jaxmrcnn.checkpoint import atomic_write, load_checkpoint
from jaxmrcnn.converters.from_torch import convert_file, default_output
from jaxmrcnn.converters.from_torch import main as cli_main
from jaxmrcnn.model import flatten_tree


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3)
    return model.state_dict()


def _cast(sd: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _params(ckpt) -> dict:
    return {k: np.asarray(v) for k, v in flatten_tree(ckpt.params)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_converts_exactly(state_dict, tmp_path, dtype):
    """A bf16 / fp16 checkpoint converts to float32 params equal to its exact upcast."""
    half = _cast(state_dict, dtype)
    torch.save(half, tmp_path / "half.pth")
    torch.save(_cast(half, torch.float32), tmp_path / "upcast.pth")
    got = _params(convert_file(tmp_path / "half.pth")[0])
    want = _params(convert_file(tmp_path / "upcast.pth")[0])
    assert got.keys() == want.keys() and len(got) > 100
    for k in want:
        assert got[k].dtype == np.float32, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # and the half values really are what arrived (not a zero or rounded tree)
    w = half["backbone.body.conv1.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(got["backbone/conv1/kernel"], w)
    assert len(np.unique(w)) > 100


def test_default_output_keeps_the_whole_stem(tmp_path):
    out = default_output(tmp_path / "model.epoch1.pth")
    assert out == tmp_path / "model.epoch1.jaxmrcnn.msgpack"
    assert default_output(tmp_path / "model.pth") == tmp_path / "model.jaxmrcnn.msgpack"
    assert default_output(tmp_path / "R-50.pkl") == tmp_path / "R-50.jaxmrcnn.msgpack"
    assert default_output(tmp_path / "weights") == tmp_path / "weights.jaxmrcnn.msgpack"


def test_epochs_of_one_run_get_their_own_outputs(state_dict, tmp_path, capsys):
    """model.epoch1.pth and model.epoch2.pth, converted with no --out, side by side."""
    key = "roi_heads.box_predictor.cls_score.bias"
    for epoch in (1, 2):
        sd = dict(state_dict, **{key: torch.full_like(state_dict[key], float(epoch))})
        torch.save(sd, tmp_path / f"model.epoch{epoch}.pth")
        assert cli_main([str(tmp_path / f"model.epoch{epoch}.pth")]) == 0, capsys.readouterr().err
    for epoch in (1, 2):
        ckpt = load_checkpoint(tmp_path / f"model.epoch{epoch}.jaxmrcnn.msgpack")
        np.testing.assert_array_equal(ckpt.params["box_predictor"]["cls_score"]["bias"],
                                      np.full(3, epoch, np.float32))
    assert not (tmp_path / "model.jaxmrcnn.msgpack").exists()


def test_existing_output_is_not_replaced_without_overwrite(state_dict, tmp_path, capsys):
    src = tmp_path / "model.pth"
    torch.save(state_dict, src)
    out = tmp_path / "model.jaxmrcnn.msgpack"
    out.write_bytes(b"another model's weights")
    for argv in ([str(src)], [str(src), "--out", str(out)]):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert f"{out} exists; pass --overwrite" in err and "nothing was written" in err
        assert out.read_bytes() == b"another model's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.jaxmrcnn.msgpack", "model.pth"]

    assert cli_main([str(src), "--overwrite"]) == 0, capsys.readouterr().err
    assert load_checkpoint(out).config.roi_heads.num_classes == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.jaxmrcnn.msgpack", "model.pth"]


def test_output_cannot_be_the_input(state_dict, tmp_path, capsys):
    src = tmp_path / "model.pth"
    torch.save(state_dict, src)
    before = src.read_bytes()
    assert cli_main([str(src), "--out", str(src), "--overwrite"]) == 1
    assert "is the input checkpoint" in capsys.readouterr().err
    assert src.read_bytes() == before


@pytest.fixture
def umask():
    """Sets the process umask for a test and restores it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_written_files_have_the_usual_permissions(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "a.bin", b"data")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644 & ~mask
    assert checkpoint._umask() == mask


def test_converter_output_permissions(state_dict, tmp_path, umask, capsys):
    umask(0o022)
    torch.save(state_dict, tmp_path / "model.pth")
    assert cli_main([str(tmp_path / "model.pth")]) == 0, capsys.readouterr().err
    assert stat.S_IMODE((tmp_path / "model.jaxmrcnn.msgpack").stat().st_mode) == 0o644


def test_atomic_write_fsyncs_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.dirname(a) == str(tmp_path), os.fspath(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "x.bin", b"payload")
    assert events == [("fsync", "file"), ("replace", True, str(tmp_path / "x.bin")),
                      ("fsync", "dir")]
    assert (tmp_path / "x.bin").read_bytes() == b"payload"


def test_failed_write_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    (tmp_path / "x.bin").write_bytes(b"old")

    def broken(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "x.bin", b"new")
    assert (tmp_path / "x.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_no_overwrite_is_atomic(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="exists; not overwriting"):
        atomic_write(tmp_path / "x.bin", b"new", overwrite=False)
    assert (tmp_path / "x.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    atomic_write(tmp_path / "y.bin", b"new", overwrite=False)
    assert (tmp_path / "y.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "y.bin"]
