"""train/train.py end to end on the "tiny" preset (64 px generated shapes, 2 images a step):
an interrupted run (Ctrl-C after 3 steps, then resumed) ends with params bit-identical to an
uninterrupted 4-step run, across an epoch boundary; a NaN stops the run naming the step and
the term and keeps the last good checkpoint; the final model loads with jaxmrcnn.load."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxmrcnn
from jaxmrcnn.checkpoint import load_checkpoint
from jaxmrcnn.data.loader import Loader
from jaxmrcnn.model import flatten_tree

_spec = importlib.util.spec_from_file_location(
    "train_cli", Path(__file__).resolve().parents[1] / "train" / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
sys.modules["train_cli"] = train_cli  # dataclasses look their module up
_spec.loader.exec_module(train_cli)


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    old = jax.config.read("jax_disable_most_optimizations")
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def argv(out, *extra):
    return ["--out", str(out), "--preset", "tiny", "--synth", "6", "--synth-size", "64",
            "--steps", "4", "--save-every", "2", "--no-progress", "--fast-compile",
            "--workers", "1", "--synth-val", "0", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert train_cli.main(argv(out)) == 0
    return out


def test_resume_is_bit_identical(straight, tmp_path):
    out = tmp_path / "resumed"
    assert train_cli.main(argv(out), stop_after=3) == 130  # Ctrl-C after 3 steps: saved
    assert sorted(int(p.name) for p in (out / "ckpt").iterdir() if p.name.isdigit()) == [2, 3]
    assert not (out / "model.msgpack").exists()
    assert train_cli.main(argv(out)) == 0  # resumes at step 3 (epoch 1, batch 0)
    a = dict(flatten_tree(load_checkpoint(straight / "model.msgpack").params))
    b = dict(flatten_tree(load_checkpoint(out / "model.msgpack").params))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ma, mb = metrics(straight), metrics(out)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb, strict=True):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"]
    assert all(np.isfinite(m["loss"]) and m["images_per_s"] > 0 for m in ma)
    assert {"loss_objectness", "loss_mask", "grad_norm", "step_time"} <= ma[0].keys()


def test_interrupt_after_a_step_ran_resumes_exactly(straight, tmp_path, monkeypatch):
    """Ctrl-C landing after the 3rd step's update but before the loop recorded it: the
    saved checkpoint is step 3 with the data position after its batch."""
    real, calls = train_cli.check_finite, []

    def interrupting(met, step):
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(met, step)

    out = tmp_path / "mid"
    monkeypatch.setattr(train_cli, "check_finite", interrupting)
    assert train_cli.main(argv(out)) == 130
    monkeypatch.setattr(train_cli, "check_finite", real)
    assert 3 in [int(p.name) for p in (out / "ckpt").iterdir() if p.name.isdigit()]
    assert train_cli.main(argv(out)) == 0
    a = dict(flatten_tree(load_checkpoint(straight / "model.msgpack").params))
    b = dict(flatten_tree(load_checkpoint(out / "model.msgpack").params))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_periodic_evaluation(tmp_path):
    """--eval-every: COCO AP of the in-training params on a generated validation split at
    the given steps and at the end, in metrics.jsonl; the final evaluation equals
    eval/coco.py's on the saved model (the same Detector and COCOeval, another entry point)."""
    out = tmp_path / "ev"
    args = argv(out, "--eval-every", "2", "--synth-val", "3", "--steps", "3")
    args[args.index("--synth-val") + 1] = "3"  # argv() turns validation off by default
    assert train_cli.main(args) == 0
    evals = [r for r in metrics(out) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 3]
    keys = {f"{t}_{k}" for t in ("bbox", "segm") for k in ("AP", "AP50", "AP75")}
    for r in evals:
        assert set(r["eval"]) == keys
        assert all(-1 <= v <= 1 for v in r["eval"].values())  # -1: COCOeval's "no data"
    spec = importlib.util.spec_from_file_location(
        "eval_cli", Path(__file__).resolve().parents[1] / "eval" / "coco.py")
    eval_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cli)
    val = out / "synth_val"
    assert eval_cli.main(["--weights", str(out / "model.msgpack"), "--annotations",
                          str(val / "annotations.json"), "--images", str(val / "images"),
                          "--out", str(tmp_path / "eval")]) == 0
    got = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    print(got)
    assert evals[-1]["eval"]["bbox_AP"] == pytest.approx(got["bbox"]["AP"], abs=1e-4)
    assert evals[-1]["eval"]["segm_AP"] == pytest.approx(got["segm"]["AP"], abs=1e-4)


def test_final_model_loads(straight):
    det = jaxmrcnn.load(straight / "model.msgpack")
    ckpt = load_checkpoint(straight / "model.msgpack")
    assert ckpt.classes == ["__background__", "circle", "square", "triangle", "ellipse", "star"]
    assert ckpt.category_ids == [-1, 1, 2, 3, 4, 5]
    assert ckpt.config.roi_heads.num_classes == 6 and ckpt.config.input.min_size == 64
    assert det is not None


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    make_batch = Loader.make_batch

    def poisoned(self, epoch, batch):
        out = make_batch(self, epoch, batch)
        if (epoch, batch) == (0, 2):  # the batch of step 3 (0-based step 2)
            out["images"] = np.full_like(out["images"], np.nan)
        return out

    monkeypatch.setattr(Loader, "make_batch", poisoned)
    out = tmp_path / "nan"
    assert train_cli.main(argv(out, "--save-every", "1")) == 3
    err = capsys.readouterr().err
    assert "non-finite values at step 2" in err and "loss" in err
    assert "last good checkpoint is step 2" in err
    steps = sorted(int(p.name) for p in (out / "ckpt").iterdir() if p.name.isdigit())
    assert steps == [1, 2]
    assert not (out / "model.msgpack").exists()
    assert [m["step"] for m in metrics(out)] == [1, 2]
