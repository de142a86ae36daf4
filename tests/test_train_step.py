"""The train step (jaxmrcnn/train/step.py): param masks, LR schedule, head re-initialisation,
one update on 1 and on 8 devices, on 2 processes, in bfloat16, and the non-finite guard.

The device tests run subprocesses, all at once, since XLA_FLAGS must be set before JAX
starts: one with --xla_force_host_platform_device_count=8, where a tiny batch (8 images of
64 x 64, few anchors and ROIs, a narrow R26-FPN) steps once on a 1-device mesh, once on the
8-device mesh from the same state, and once on 1 device in bfloat16; and two with 4 devices
each, joined by jax.distributed (gloo CPU collectives) into one 8-device mesh, each feeding
its own 4 rows of the same batch. Observed: max relative difference of the updated params
~1e-7 (bound 1e-5) between all of them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxmrcnn.config import torchvision_maskrcnn_r50_fpn
from jaxmrcnn.model import flatten_tree
from jaxmrcnn.train.step import (
    TERMS,
    OptimConfig,
    check_finite,
    init_for_classes,
    lr_schedule,
    param_labels,
    scratch_params,
)

REL_TOL = 1e-5
# bfloat16 compute vs float32, same batch and key, per loss term. bfloat16 keeps 8 bits of
# mantissa (relative rounding 2^-9 ~ 2e-3 per value), compounded through ~30 layers.
# Observed: classifier 2.0e-2 (random fc head), the total 6.9e-3, the others <= 3.3e-4;
# the gradient's global norm 2.3e-2.
BF16_RTOL = 5e-2
BF16_GRAD_RTOL = 1e-1
# The subprocesses' model (a narrow R26-FPN: the step's code paths at a fraction of R50's
# compile time); SCRIPT builds the same.
TINY = torchvision_maskrcnn_r50_fpn(3).replace(
    backbone=dict(depth=26, base_channels=16), fpn=dict(out_channels=32),
    roi_heads=dict(fc_dim=64, conv_dim=32))


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

COMMON = textwrap.dedent("""
    import sys
    import jax
    if len(sys.argv) > 2:  # process i of 2 through jax.distributed, CPU collectives by gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{sys.argv[3]}", num_processes=2,
                                   process_id=int(sys.argv[2]))
    jax.config.update("jax_disable_most_optimizations", True)  # compile time, not results
    import numpy as np
    from jaxmrcnn.config import torchvision_maskrcnn_r50_fpn
    from jaxmrcnn.train import TrainConfig, pad_ground_truth
    from jaxmrcnn.train.step import (OptimConfig, data_mesh, init_state, make_optimizer,
                                     make_train_step, scratch_params)

    def tree(prefix, t):
        return {f"{prefix}/{jax.tree_util.keystr(p)}": np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}

    assert jax.device_count() == 8, jax.devices()
    cfg = torchvision_maskrcnn_r50_fpn(3).replace(
        backbone=dict(depth=26, base_channels=16), fpn=dict(out_channels=32),
        roi_heads=dict(fc_dim=64, conv_dim=32))
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
""")

SINGLE = COMMON + textwrap.dedent("""
    for n in (1, 8):
        step = make_train_step(cfg, tcfg, tx, mesh=data_mesh(jax.devices()[:n]))
        state, met = step(step.replicate(init_state(params, tx)), step.shard_batch(batch), key)
        out.update(tree(f"p{n}", jax.device_get(state["params"])))
        out.update({f"m{n}/{k}": np.asarray(v) for k, v in met.items()})
        out[f"shards{n}"] = np.asarray(len(step.shard_batch(batch)["images"].sharding.device_set))
    # A NaN in the input: the step reports it and leaves the state as it was.
    bad = dict(batch, images=np.where(np.arange(B)[:, None, None, None] == 3, np.nan, images))
    state0 = step.replicate(init_state(params, tx))
    state, met = step(state0, step.shard_batch(bad), key)
    out.update({f"nan/{k}": np.asarray(v) for k, v in met.items()})
    out["nan/step"] = np.asarray(state["step"])
    out.update(tree("nan_p", jax.device_get(state["params"])))
    out.update(tree("p0", params))
    # compute "bfloat16" on one device: the lowered program's convolutions and dots.
    step = make_train_step(cfg, tcfg, tx, mesh=data_mesh(jax.devices()[:1]),
                           precision="bfloat16")
    args = (step.replicate(init_state(params, tx)), step.shard_batch(batch), key)
    text = step.lower(*args).as_text()
    for op in ("convolution", "dot_general"):
        lines = [ln for ln in text.splitlines() if f"stablehlo.{op}" in ln]
        out[f"bf16/n_{op}"] = np.asarray(len(lines))
        # operand types: before the last "->" (dim_numbers hold one too)
        out[f"bf16/n_{op}_bf16"] = np.asarray(sum("bf16>" in ln.rsplit("->", 1)[0]
                                                  for ln in lines))
    state, met = step(*args)
    out.update({f"bf16/{k}": np.asarray(v) for k, v in met.items()})
    out.update(tree("bf16_p", jax.device_get(state["params"])))
    np.savez(sys.argv[1], **out)
""")

# Process i of 2, 4 devices each: the global 8-device mesh (data_mesh's default), the step
# fed with this process' rows only; the global-batch route of shard_batch must place the
# same rows on the same devices.
MULTI = COMMON + textwrap.dedent("""
    i = jax.process_index()
    assert jax.process_count() == 2 and jax.local_device_count() == 4
    step = make_train_step(cfg, tcfg, tx)
    local = step.shard_batch({k: v[4 * i:4 * i + 4] for k, v in batch.items()},
                             process_local=True)
    whole = step.shard_batch(batch)
    same = all(a.device == b.device and np.array_equal(a.data, b.data)
               for k in batch for a, b in zip(local[k].addressable_shards,
                                              whole[k].addressable_shards, strict=True))
    state, met = step(step.replicate(init_state(params, tx)), local, key)
    out.update(tree("p", jax.device_get(state["params"])))
    out.update({f"m/{k}": np.asarray(v) for k, v in met.items()})
    out["same_rows"] = np.asarray(same)
    out["addressable"] = np.asarray(len(local["images"].addressable_shards))
    np.savez(sys.argv[1], **out)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory):
    """Both runs at once (three processes): the single 8-device process and the two
    4-device processes of one distributed run."""
    tmp = tmp_path_factory.mktemp("step")
    port = str(_free_port())
    jobs = []
    for name, script, n_dev, extra in (("single", SINGLE, 8, []), ("proc0", MULTI, 4, ["0", port]),
                                       ("proc1", MULTI, 4, ["1", port])):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_dev}",
                   JAX_PLATFORMS="cpu")
        path = tmp / f"{name}.npz"
        proc = subprocess.Popen([sys.executable, "-c", script, str(path), *extra], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        jobs.append((name, path, proc))
    runs = {}
    try:
        for name, path, proc in jobs:
            log, _ = proc.communicate(timeout=1800)
            assert proc.returncode == 0, f"{name}: {log[-3000:]}"
            with np.load(path) as z:
                runs[name] = dict(z)
    finally:
        for _, _, proc in jobs:
            if proc.poll() is None:
                proc.kill()
    return runs


@pytest.fixture(scope="module")
def device_run(device_runs):
    return device_runs["single"]


def _params(run, prefix):
    return {k[len(prefix) + 1:]: v for k, v in run.items() if k.startswith(prefix + "/")}


def _max_rel(p, ref, p0):
    """Max over tensors of |p - ref| / max(|ref's update|, |ref|)."""
    worst = 0.0
    for k in ref:
        d = ref[k] - p0[k]
        worst = max(worst, np.abs(p[k] - ref[k]).max()
                    / max(np.abs(d).max(), np.abs(ref[k]).max(), 1e-12))
    return worst


def test_8_devices_equal_1_device(device_run):
    assert device_run["shards1"] == 1 and device_run["shards8"] == 8
    p0, p1, p8 = (_params(device_run, p) for p in ("p0", "p1", "p8"))
    assert p1.keys() == p8.keys() == p0.keys() and len(p1) > 100
    worst = _max_rel(p8, p1, p0)
    assert worst <= REL_TOL, worst
    for t in ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
              "loss_mask"):
        np.testing.assert_allclose(device_run[f"m8/{t}"], device_run[f"m1/{t}"], rtol=REL_TOL)
    print(f"8 vs 1 device: max relative param difference {worst:.2e}")


def test_step_updates_trainable_params_only(device_run):
    p0, p1 = _params(device_run, "p0"), _params(device_run, "p1")
    labels = dict(flatten_tree(param_labels(jax.tree_util.tree_map(
        np.asarray, scratch_params(TINY)))))
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


def test_two_processes_equal_one_process(device_runs):
    """jax.distributed, 2 processes x 4 CPU devices (gloo collectives), each feeding its own
    4 rows of the global batch: the same update as 1 device and as 8 devices in one process."""
    single, runs = device_runs["single"], (device_runs["proc0"], device_runs["proc1"])
    p0, p1, p8 = (_params(single, p) for p in ("p0", "p1", "p8"))
    for run in runs:
        assert run["same_rows"] and run["addressable"] == 4
        pm = _params(run, "p")
        assert pm.keys() == p1.keys()
        worst1, worst8 = _max_rel(pm, p1, p0), _max_rel(pm, p8, p0)
        assert max(worst1, worst8) <= REL_TOL, (worst1, worst8)
        for t in ("loss", *TERMS):
            np.testing.assert_allclose(run[f"m/{t}"], single[f"m1/{t}"], rtol=REL_TOL)
    # both processes hold the same (replicated) params
    for k, v in _params(runs[0], "p").items():
        np.testing.assert_array_equal(v, _params(runs[1], "p")[k], err_msg=k)
    print(f"2 processes vs 1 device: {worst1:.2e}, vs 8 devices {worst8:.2e}")


def test_bf16_step(device_run):
    """compute "bfloat16": every convolution and dot of the lowered step (forward and
    backward) takes bfloat16 operands; the step is finite and its loss terms are close to
    float32's on the same batch and key."""
    r = device_run
    # Every convolution; every dot but one: the RPN's per-level NMS IoU tiles (box geometry,
    # float32 by design, `[B, 1, levels, 64]` operands).
    assert r["bf16/n_convolution"] > 100
    assert r["bf16/n_convolution_bf16"] == r["bf16/n_convolution"]
    assert r["bf16/n_dot_general"] > 10
    assert r["bf16/n_dot_general"] - r["bf16/n_dot_general_bf16"] <= 1
    assert r["bf16/finite"]
    for k, v in _params(r, "bf16_p").items():
        assert v.dtype == np.float32 and np.isfinite(v).all(), k  # float32 master params
    for t in ("loss", *TERMS):
        np.testing.assert_allclose(r[f"bf16/{t}"], r[f"m1/{t}"], rtol=BF16_RTOL, err_msg=t)
    np.testing.assert_allclose(r["bf16/grad_norm"], r["m1/grad_norm"], rtol=BF16_GRAD_RTOL)
