"""Matmul/convolution precision: the Detector's programs carry float32 precision (HIGHEST) on
every dot and convolution unless the user asks for less, set at trace time without touching
JAX's global configuration; on an accelerator the results then match the CPU's."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import match_detections

from jaxmrcnn.detector import Detector
from jaxmrcnn.model import MaskRCNN, dummy_inputs

OPS = re.compile(r"stablehlo\.(dot_general|convolution)\b.*")


def _ops(text: str) -> list[str]:
    """Every dot_general / convolution line of a StableHLO module's text."""
    return [m.group(0) for m in OPS.finditer(text)]


def _model_text(ckpt, precision: str) -> str:
    det = Detector(ckpt, precision=precision, compilation_cache=False)
    images, info = dummy_inputs(1, (64, 96))
    return jax.jit(det._infer_fn).lower(det.params, images, info).as_text()


def _paste_text(det: Detector) -> str:
    masks, boxes = jnp.zeros((20, 28, 28)), jnp.zeros((20, 4))
    return det._paste.lower(masks, boxes, out_hw=(64, 64), image_hw=jnp.array([60, 50])).as_text()


@pytest.fixture(scope="module")
def ckpt(tv_v1):
    return tv_v1.checkpoint


def test_every_dot_and_convolution_is_float32(ckpt):
    before = jax.config.jax_default_matmul_precision
    text = _model_text(ckpt, "float32")
    ops = _ops(text)
    # the backbone/FPN/heads' convs and the FC layers, ROIAlign and mask-head matmuls
    assert sum("convolution" in o for o in ops) >= 60
    assert sum("dot_general" in o for o in ops) >= 4
    loose = [o[:160] for o in ops if "HIGHEST, HIGHEST" not in o and "precision HIGHEST>, "
             "#stablehlo<precision HIGHEST" not in o]
    assert not loose, f"{len(loose)} of {len(ops)} ops without float32 precision: {loose[:3]}"
    paste = _ops(_paste_text(Detector(ckpt, compilation_cache=False)))
    assert paste and all("HIGHEST" in o for o in paste)
    # set at trace time only: JAX's global setting is untouched
    assert jax.config.jax_default_matmul_precision == before


def test_less_precision_on_request(ckpt):
    """"default" leaves precision to the backend (no HIGHEST anywhere); "tensorfloat32" asks
    for HIGH. Shows the check above can fail."""
    assert "HIGHEST" not in _model_text(ckpt, "default")
    tf32 = _ops(_model_text(ckpt, "tensorfloat32"))
    assert tf32 and all("HIGHEST" not in o and "HIGH" in o for o in tf32)
    with pytest.raises(ValueError, match="precision must be one of"):
        Detector(ckpt, precision="float64")
    with pytest.raises(ValueError, match="precision must be one of"):
        MaskRCNN(ckpt.config, precision="highest").init(jax.random.PRNGKey(0), *dummy_inputs())


def test_user_global_setting_is_overridden_only_inside(ckpt):
    """A user's global jax_default_matmul_precision ("bfloat16") does not lower the
    Detector's float32 default, and stays the user's setting afterwards."""
    with jax.default_matmul_precision("bfloat16"):
        ops = _ops(_model_text(ckpt, "float32"))
        assert ops and all("HIGHEST" in o for o in ops)
        assert jax.config.jax_default_matmul_precision == "bfloat16"


# ----------------------------------------------------------------------------- accelerator


@pytest.fixture
def accelerator():
    """The first non-CPU device; skips the test where there is none."""
    devices = [d for d in jax.devices() if d.platform != "cpu"]
    if not devices:
        pytest.skip("no accelerator (GPU/TPU) on this machine")
    return devices[0]


@pytest.mark.gpu
def test_accelerator_matches_cpu_at_float32(accelerator, tv_v1, parity_images):
    """The model on the accelerator at the default precision gives the CPU's and torch's
    detections at float32 tolerances (TF32/bf16 matmuls would not: ~1e-3 relative error per
    conv, compounded over ~70 layers)."""
    img = parity_images[0]
    with jax.default_device(accelerator):
        ours = Detector(tv_v1.checkpoint, compilation_cache=False)([img])[0]
    with jax.default_device(jax.devices("cpu")[0]):
        cpu = Detector(tv_v1.checkpoint, compilation_cache=False)([img])[0]
    assert len(ours) == len(cpu) > 0
    np.testing.assert_array_equal(ours.class_index, cpu.class_index)
    np.testing.assert_allclose(ours.boxes, cpu.boxes, atol=1e-2)
    np.testing.assert_allclose(ours.scores, cpu.scores, atol=1e-4)
    assert (ours.masks != cpu.masks).mean() < 1e-4
    ref = tv_v1.run(img)
    _, frac = match_detections(ref, ours)
    assert frac >= 0.99, f"only {frac:.3f} of torchvision's detections matched"
