"""The train step (jaxmrcnn/train/step.py): param masks, LR schedule, head re-initialisation,
one update on 1 and on 8 devices, and the non-finite guard.

The device tests run one subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the flag must be set before JAX starts): a tiny batch (8 images of 64 x 64, few anchors and
ROIs) steps once on a 1-device mesh and once on the 8-device mesh from the same state.
Observed: max relative difference of the updated params ~1e-7 (bound 1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxmrcnn.config import torchvision_maskrcnn_r50_fpn
from jaxmrcnn.model import flatten_tree
from jaxmrcnn.train.step import (
    OptimConfig,
    check_finite,
    init_for_classes,
    lr_schedule,
    param_labels,
    scratch_params,
)

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def params4():
    return scratch_params(torchvision_maskrcnn_r50_fpn(4), seed=0)


def test_param_labels(params4):
    labels = dict(flatten_tree(param_labels(params4)))
    # Every FrozenNorm param (backbone bn*, downsample_bn) is frozen, wherever it is.
    norms = [k for k in labels if k.rsplit("/", 2)[-2].startswith(("bn", "downsample_bn"))]
    assert norms and all(labels[k] == "frozen" for k in norms)
    assert labels["backbone/conv1/kernel"] == "frozen"
    assert labels["backbone/layer1_2/conv2/kernel"] == "frozen"
    assert labels["backbone/layer2_0/conv1/kernel"] == "decay"
    assert labels["fpn/inner_0/conv/kernel"] == "decay"
    assert labels["fpn/inner_0/conv/bias"] == "no_decay"
    assert labels["mask_head/deconv_kernel"] == "decay"
    assert labels["mask_head/logits_bias"] == "no_decay"
    assert labels["box_predictor/cls_score/bias"] == "no_decay"
    # Nothing frozen outside the backbone; trainable backbone = layer2..layer4 convs.
    frozen = {k for k, v in labels.items() if v == "frozen"}
    assert all(k.startswith("backbone/") for k in frozen)
    assert {k for k in labels if k.startswith("backbone/") and k not in frozen} == {
        k for k in labels if k.startswith(("backbone/layer2", "backbone/layer3", "backbone/layer4"))
        and k.endswith("kernel")}


def test_lr_schedule():
    o = OptimConfig(warmup_steps=10, warmup_factor=1e-3, milestones=(20, 30), gamma=0.1)
    assert o.lr(16) == pytest.approx(0.02) and o.lr(4) == pytest.approx(0.005)
    s = lr_schedule(o, 8)  # 0.01
    want = [1e-5, 1e-5 + 0.5 * (0.01 - 1e-5), 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4]
    got = [float(s(i)) for i in (0, 5, 10, 19, 20, 29, 30, 100)]
    np.testing.assert_allclose(got, want, rtol=1e-4)  # float32


def test_init_for_classes_reinitialises_only_the_class_heads():
    cfg91 = torchvision_maskrcnn_r50_fpn(91)
    ckpt = scratch_params(cfg91, seed=1)
    cfg, params = init_for_classes(ckpt, cfg91, 4, seed=2)
    assert cfg.roi_heads.num_classes == 4
    old, new = dict(flatten_tree(ckpt)), dict(flatten_tree(params))
    assert old.keys() == new.keys()
    heads = {k for k in new if k.startswith(("box_predictor/", "mask_head/logits_"))}
    assert heads == {"box_predictor/cls_score/kernel", "box_predictor/cls_score/bias",
                     "box_predictor/bbox_pred/kernel", "box_predictor/bbox_pred/bias",
                     "mask_head/logits_kernel", "mask_head/logits_bias"}
    assert new["box_predictor/cls_score/kernel"].shape == (1024, 4)
    assert new["box_predictor/bbox_pred/kernel"].shape == (1024, 16)
    assert new["mask_head/logits_kernel"].shape == (256, 4)
    for k in new.keys() - heads:
        np.testing.assert_array_equal(new[k], old[k], err_msg=k)
    same, _ = init_for_classes(ckpt, cfg91, 91)
    assert same == cfg91


def test_check_finite_names_step_and_term():
    ok = dict(loss=1.0, loss_mask=0.5, grad_norm=2.0, finite=True)
    check_finite(ok, 3)
    with pytest.raises(FloatingPointError, match=r"step 7: .*loss_mask=nan"):
        check_finite(dict(ok, loss_mask=float("nan"), loss=float("nan"), finite=False), 7)


# --------------------------------------------------------------------------- devices

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_disable_most_optimizations", True)  # compile time, not results
    import numpy as np
    from jaxmrcnn.config import torchvision_maskrcnn_r50_fpn
    from jaxmrcnn.train import TrainConfig, pad_ground_truth
    from jaxmrcnn.train.step import (OptimConfig, data_mesh, init_state, make_optimizer,
                                     make_train_step, scratch_params)

    assert jax.device_count() == 8, jax.devices()
    cfg = torchvision_maskrcnn_r50_fpn(3)
    tcfg = TrainConfig(rpn_pre_nms_top_n=64, rpn_post_nms_top_n=32,
                       rpn_batch_size_per_image=32, roi_batch_size_per_image=16)
    B, H = 8, 64
    rng = np.random.default_rng(0)
    images = rng.normal(size=(B, H, H, 3)).astype(np.float32)
    inst = []
    for i in range(B):
        x0, y0 = rng.integers(0, 24, 2)
        w, h = rng.integers(16, 40, 2)
        m = np.zeros((H, H), np.uint8)
        m[y0:y0 + h, x0:x0 + w] = 1
        images[i][m.astype(bool)] += 2.0
        inst.append(dict(boxes=[[x0, y0, min(x0 + w, H), min(y0 + h, H)]],
                         classes=[1 + i % 2], masks=m[None]))
    gt = pad_ground_truth(inst, 3, (H, H))
    hw = np.tile([[H, H]], (B, 1)).astype(np.int32)
    batch = dict(images=images, image_hw=hw, padded_hw=hw, gt_boxes=gt["boxes"],
                 gt_classes=gt["classes"], gt_masks=gt["masks"], gt_valid=gt["valid"])
    params = scratch_params(cfg, seed=0)
    # warm-up off so that the step's LR is the full LR and moves the params visibly
    tx = make_optimizer(OptimConfig(warmup_steps=0, clip_norm=10.0), B, params)
    key = jax.random.PRNGKey(0)
    out = {}
    for n in (1, 8):
        step = make_train_step(cfg, tcfg, tx, mesh=data_mesh(jax.devices()[:n]))
        state, met = step(step.replicate(init_state(params, tx)), step.shard_batch(batch), key)
        out.update({f"p{n}/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in
                    jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]})
        out.update({f"m{n}/{k}": np.asarray(v) for k, v in met.items()})
        out[f"shards{n}"] = np.asarray(len(step.shard_batch(batch)["images"].sharding.device_set))
    # A NaN in the input: the step reports it and leaves the state as it was.
    bad = dict(batch, images=np.where(np.arange(B)[:, None, None, None] == 3, np.nan, images))
    state0 = step.replicate(init_state(params, tx))
    state, met = step(state0, step.shard_batch(bad), key)
    out.update({f"nan/{k}": np.asarray(v) for k, v in met.items()})
    out["nan/step"] = np.asarray(state["step"])
    out.update({f"nan_p/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in
                jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]})
    out.update({f"p0/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in
                jax.tree_util.tree_flatten_with_path(params)[0]})
    np.savez(sys.argv[1], **out)
""")


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("step") / "out.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(path) as z:
        return dict(z)


def _params(run, prefix):
    return {k[len(prefix) + 1:]: v for k, v in run.items() if k.startswith(prefix + "/")}


def test_8_devices_equal_1_device(device_run):
    assert device_run["shards1"] == 1 and device_run["shards8"] == 8
    p0, p1, p8 = (_params(device_run, p) for p in ("p0", "p1", "p8"))
    assert p1.keys() == p8.keys() == p0.keys() and len(p1) > 300
    worst = 0.0
    for k in p1:
        d1 = p1[k] - p0[k]  # the update of the 1-device step
        rel = np.abs(p8[k] - p1[k]).max() / max(np.abs(d1).max(), np.abs(p1[k]).max(), 1e-12)
        worst = max(worst, rel)
    assert worst <= REL_TOL, worst
    for t in ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
              "loss_mask"):
        np.testing.assert_allclose(device_run[f"m8/{t}"], device_run[f"m1/{t}"], rtol=REL_TOL)
    print(f"8 vs 1 device: max relative param difference {worst:.2e}")


def test_step_updates_trainable_params_only(device_run):
    p0, p1 = _params(device_run, "p0"), _params(device_run, "p1")
    labels = dict(flatten_tree(param_labels(jax.tree_util.tree_map(
        np.asarray, scratch_params(torchvision_maskrcnn_r50_fpn(3))))))
    labels = {f"['{k.replace('/', chr(39) + '][' + chr(39))}']": v for k, v in labels.items()}
    assert labels.keys() == p0.keys()
    moved = {k for k in p0 if not np.array_equal(p0[k], p1[k])}
    frozen = {k for k, v in labels.items() if v == "frozen"}
    assert not moved & frozen
    # every trainable kernel moves (weight decay alone moves it); biases may get 0 gradient
    assert {k for k in labels if labels[k] == "decay"} <= moved
    assert np.isfinite(device_run["m1/loss"]) and device_run["m1/finite"]


def test_nan_input_leaves_state_unchanged(device_run):
    assert not device_run["nan/finite"]
    assert not np.isfinite(device_run["nan/loss"])
    assert int(device_run["nan/step"]) == 0
    p0, pn = _params(device_run, "p0"), _params(device_run, "nan_p")
    for k in p0:
        np.testing.assert_array_equal(pn[k], p0[k], err_msg=k)
    with pytest.raises(FloatingPointError, match="step 0"):
        check_finite({k[4:]: v for k, v in device_run.items() if k.startswith("nan/")}, 0)
