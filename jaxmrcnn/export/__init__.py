"""Export a converted model as one static-shape program: a jax.export StableHLO artifact and
an ONNX model (no custom ops), each with `export.json` and a standalone runner.

    python -m jaxmrcnn.export WEIGHTS --out DIR [--size H W] [--batch B] [--no-onnx]

DIR gets:
    model.stablehlo   jax.export serialization of the Detector's program for a `[B, H, W, 3]`
                      canvas, weights included (reload: jax.export.deserialize, .call)
    model.onnx        the same program converted by jax2onnx (jaxmrcnn/export/onnx.py);
                      runs in onnxruntime with its standard operators only
    export.json       inputs and outputs (names, shapes, dtypes), preprocessing (the resize
                      rule, mean/std, channel order, size divisor), classes and category ids
    run_export.py     a copy of jaxmrcnn/export/runtime.py: preprocessing and both runners,
                      needing numpy and jax or onnxruntime, not jaxmrcnn

Inputs (per batch slot; runtime.pack builds them): images `[B, H, W, 3]` float32 normalized
and zero-padded, image_hw / padded_hw / orig_hw `[B, 2]` int32 (model.py's `info`). Outputs:
boxes `[B, D, 4]` (original-image xyxy), scores `[B, D]`, class_index `[B, D]` int32, masks
`[B, D, M, M]` probabilities, valid `[B, D]` bool, D = detections_per_img: exactly
`Detector.run_prepared`'s raw outputs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmrcnn.checkpoint import Checkpoint
from jaxmrcnn.export.runtime import INPUT_NAMES, OUTPUT_NAMES
from jaxmrcnn.model import MaskRCNN

RUNTIME = Path(__file__).resolve().parent / "runtime.py"


def program(ckpt: Checkpoint, precision: str = "float32"):
    """`fn(images, image_hw, padded_hw, orig_hw) -> (boxes, scores, class_index, masks, valid)`
    with the checkpoint's weights as constants: the Detector's program, flattened."""
    model = MaskRCNN(ckpt.config, precision=precision)
    params = ckpt.params

    def fn(images, image_hw, padded_hw, orig_hw):
        info = dict(image_hw=image_hw, padded_hw=padded_hw, orig_hw=orig_hw)
        dets, _ = model.apply({"params": params}, images, info)
        return tuple(dets[k] for k in OUTPUT_NAMES)

    return fn


def input_specs(canvas_hw: tuple[int, int], batch: int) -> list[jax.ShapeDtypeStruct]:
    h, w = canvas_hw
    return [jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)] + [
        jax.ShapeDtypeStruct((batch, 2), jnp.int32) for _ in INPUT_NAMES[1:]]


def check_canvas(canvas_hw, divisor: int) -> tuple[int, int]:
    h, w = (int(s) for s in canvas_hw)
    if h <= 0 or w <= 0 or h % divisor or w % divisor:
        raise ValueError(f"--size {h} {w}: the canvas must be positive multiples of the model's "
                         f"size divisor {divisor} (e.g. --size {-(-max(h, 1) // divisor) * divisor}"
                         f" {-(-max(w, 1) // divisor) * divisor})")
    return h, w


def default_canvas(ckpt: Checkpoint) -> tuple[int, int]:
    """The square canvas that holds every image the resize rule produces (long side <= max)."""
    d = ckpt.config.input.size_divisible
    side = -(-ckpt.config.input.max_size // d) * d
    return side, side


def metadata(ckpt: Checkpoint, canvas_hw, batch: int, files: dict) -> dict:
    specs = input_specs(canvas_hw, batch)
    out = jax.eval_shape(program(ckpt), *specs)
    return {
        "format": "jaxmrcnn-export-1",
        "model": ckpt.config.name,
        "canvas_hw": list(canvas_hw),
        "batch": batch,
        "inputs": [{"name": n, "shape": list(s.shape), "dtype": str(s.dtype)}
                   for n, s in zip(INPUT_NAMES, specs, strict=True)],
        "outputs": [{"name": n, "shape": list(o.shape), "dtype": str(o.dtype)}
                    for n, o in zip(OUTPUT_NAMES, out, strict=True)],
        "preprocess": dataclasses.asdict(ckpt.config.input),
        "mask_paste": dataclasses.asdict(ckpt.config.paste),
        "classes": list(ckpt.classes),
        "category_ids": [int(c) for c in ckpt.category_ids],
        "files": files,
        "notes": "images: uint8 RGB -> preprocess (resize_rule/resize_impl, channel_order, "
                 "/ pixel_scale * pixel_rescale, - mean, / std) -> zero-pad into the canvas at "
                 "the top left; image_hw: resized size, padded_hw: resized size rounded up to "
                 "size_divisible, orig_hw: original size; unused batch slots: zeros with 32 x 32 "
                 "sizes. Outputs are padded to D rows: read `valid`. masks are M x M "
                 "probabilities to paste into each box (mask_paste).",
    }


def export_stablehlo(ckpt: Checkpoint, path, canvas_hw, batch: int = 1) -> Path:
    exported = jax.export.export(jax.jit(program(ckpt)))(*input_specs(canvas_hw, batch))
    path = Path(path)
    path.write_bytes(exported.serialize())
    return path


def export_onnx(ckpt: Checkpoint, path, canvas_hw, batch: int = 1) -> Path:
    from jaxmrcnn.export.onnx import to_onnx

    to_onnx(program(ckpt), input_specs(canvas_hw, batch), path, INPUT_NAMES, OUTPUT_NAMES)
    return Path(path)


def export(ckpt: Checkpoint, out_dir, canvas_hw=None, batch: int = 1, *, onnx: bool = True,
           stablehlo: bool = True) -> dict:
    """Writes the export folder (see the module docstring); returns export.json's content."""
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    canvas_hw = check_canvas(canvas_hw or default_canvas(ckpt), ckpt.config.input.size_divisible)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if stablehlo:
        files["stablehlo"] = export_stablehlo(ckpt, out / "model.stablehlo", canvas_hw, batch).name
    if onnx:
        files["onnx"] = export_onnx(ckpt, out / "model.onnx", canvas_hw, batch).name
    shutil.copyfile(RUNTIME, out / "run_export.py")
    files["runner"] = "run_export.py"
    meta = metadata(ckpt, canvas_hw, batch, files)
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    return meta
