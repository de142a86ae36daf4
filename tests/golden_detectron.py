"""Recorded outputs ("goldens") of Detectron (Caffe2) weights as the REAL maskrcnn-benchmark runs
them (its configs/caffe2/e2e_mask_rcnn_R_50_FPN_1x_caffe2.yaml and its Caffe2 loader), on a
Detectron `.pkl` that can be rebuilt bit for bit without maskrcnn-benchmark, so that CI (which
cannot install MB) still compares jaxmrcnn's Detectron path with a real framework. A thin layer
over tests/golden_maskrcnn_benchmark.py (imported as G; its design, functions and file
formats), golden folder tests/golden/detectron_R_50/.

    python tests/golden_detectron.py record   # needs MB ($JAXMRCNN_MASKRCNN_BENCHMARK_SRC)
    python tests/golden_detectron.py check    # numpy only

The checkpoint
==============
1. `G.synthetic_state_dict("R_50", SEED)`: the seeded MB-keyed state dict (SEED 1, so not the
   MB golden's weights); the caffe2 yaml builds exactly MB's e2e_mask_rcnn_R_50_FPN_1x model
   (the two yamls differ only in MODEL.WEIGHT and the training sets/solver).
2. Calibration (`G.calibrate(..., config=CONFIG)`, needs MB): the real MB model built from the
   caffe2 yaml at the test size, on the three parity images; quantised numbers only, recorded
   in `calibration.npz` (G's format, rebuilt by `G.reconstruct(..., prefix="detectron")`).
3. `reconstruct()`: the calibrated state dict folded into Detectron's AffineChannel form
   (`fold`: s = w / sqrt(var), b = bias - mean * s, in float64, one rounding to float32) and
   renamed to Detectron blobs (`reference_detectron.detectron_name`; the running statistics and
   anchors are not stored: MB's loader leaves a fresh model's 0 / 1 and its own anchors). Its
   sha256 (G's `state_dict_sha256` of the blob dict) is `state_dict.sha256`, checked every time.
4. `write_pkl`: the file as Detectron's `save_model_to_weights_file` writes it and the model zoo
   holds it: `{'blobs': ..., 'cfg': <yaml text>}` with zero `_momentum` blobs for the trainable
   parameters and the unused ImageNet classifier `fc1000_{w,b}` (seeded), pickled protocol 2 as
   Python 2 wrote it (`reference_detectron.Python2Pickler`); `bare=True` writes the blob dict
   alone. No MB code is needed.

The outputs (`record`, needs MB)
================================
The `.pkl` is loaded by MB's own `DetectronCheckpointer` (the Caffe2 loader: `load_c2_format`,
`_rename_weights_for_resnet`, suffix matching) into a fresh model built from the caffe2 yaml at
the test size (`reference_detectron.load`), checked to hold exactly the folded weights, and run
by `reference_maskrcnn_benchmark.run` with G.TORCH_THREADS threads; `outputs.npz` and
`meta.json` are G's (`G.compact`), meta naming the MB source (G.mb_source_sha256) and the
`.pkl`'s own sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import golden_maskrcnn_benchmark as G  # noqa: E402

ARCH = "R_50"
PREFIX = "detectron"
CONFIG = "caffe2/e2e_mask_rcnn_R_50_FPN_1x_caffe2"  # in MB's configs/
SEED = 1
DEPTH = 50
PKL_NAME = "e2e_mask_rcnn_R-50-FPN_1x.pkl"
REGENERATE = "regenerate with python tests/golden_detectron.py record"
GoldenError = G.GoldenError


def golden_dir(root: Path | None = None) -> Path:
    return G.golden_dir(ARCH, root, prefix=PREFIX)


def fold(sd: dict) -> dict:
    """The MB state dict with every FrozenBatchNorm folded into AffineChannel form (numpy,
    float64, one rounding to float32), running statistics 0 / 1."""
    out = dict(sd)
    for key in sd:
        if not key.endswith(".running_mean"):
            continue
        m = key[: -len(".running_mean")]
        mean, var = (sd[f"{m}.running_{s}"].astype(np.float64) for s in ("mean", "var"))
        w, b = sd[f"{m}.weight"].astype(np.float64), sd[f"{m}.bias"].astype(np.float64)
        s = w / np.sqrt(var)
        out[f"{m}.weight"] = s.astype(np.float32)
        out[f"{m}.bias"] = (b - mean * s).astype(np.float32)
        out[f"{m}.running_mean"] = np.zeros_like(sd[key])
        out[f"{m}.running_var"] = np.ones_like(sd[key])
    return out


def blobs_of(sd: dict) -> dict[str, np.ndarray]:
    """A folded MB state dict -> the Detectron parameter blobs (sorted by name)."""
    import reference_detectron as D

    blobs = {}
    for key, value in sd.items():
        name = D.detectron_name(key, DEPTH)
        if name is not None:
            assert name not in blobs, f"two keys map to {name}"
            blobs[name] = np.asarray(value, np.float32)
    return dict(sorted(blobs.items()))


def reconstruct(*, root: Path | None = None, verify: bool = True) -> dict[str, np.ndarray]:
    """Seed + calibration record -> the Detectron parameter blobs (numpy float32), checked
    against the recorded sha256 (GoldenError if it differs)."""
    d = golden_dir(root)
    if not (d / "calibration.npz").is_file():
        raise GoldenError(f"no calibration record at {d / 'calibration.npz'}; {REGENERATE}")
    sd = G.reconstruct(ARCH, root=root, verify=False, prefix=PREFIX)
    blobs = blobs_of(fold(sd))
    if verify:
        path = d / "state_dict.sha256"
        if not path.is_file():
            raise GoldenError(f"no {path}; {REGENERATE}")
        want = path.read_text().split()[0]
        got = G.state_dict_sha256(blobs)
        if got != want:
            raise GoldenError(
                f"the reconstructed Detectron blobs (sha256 {got[:16]}...) are not the recorded "
                f"ones ({want[:16]}...): the synthetic weights, the fold, the blob names or the "
                f"calibration record changed; {REGENERATE}")
    return blobs


def cfg_text() -> str:
    """The training cfg Detectron stores next to the blobs (`reference_detectron.cfg_yaml` of
    the R-50 caffe2 model at the test size)."""
    import reference_detectron as D
    from conftest import SMALL

    ns = SimpleNamespace
    cfg = ns(MODEL=ns(BACKBONE=ns(CONV_BODY="R-50-FPN"), ROI_BOX_HEAD=ns(NUM_CLASSES=81),
                      RESNETS=ns(STRIDE_IN_1X1=True, NUM_GROUPS=1, WIDTH_PER_GROUP=64)),
             INPUT=ns(MIN_SIZE_TEST=SMALL["min_size"], MAX_SIZE_TEST=SMALL["max_size"]))
    return D.cfg_yaml(ns(cfg=cfg))


def write_pkl(blobs: dict, path, *, bare: bool = False) -> Path:
    """`blobs` as a Detectron `.pkl` (see the module doc), or the bare blob dict (`bare`)."""
    import reference_detectron as D

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bare:
        data = dict(blobs)
    else:
        full = dict(blobs)
        full.update({f"{k}_momentum": np.zeros_like(v) for k, v in blobs.items()
                     if D.is_trainable(k)})
        rng = np.random.default_rng(SEED)
        full["fc1000_w"] = (rng.standard_normal((1000, 2048)) * 0.01).astype(np.float32)
        full["fc1000_b"] = np.zeros(1000, np.float32)
        data = {"blobs": full, "cfg": cfg_text()}
    with open(path, "wb") as f:
        D.Python2Pickler(f, protocol=2).dump(data)
    return path


def load_outputs(root: Path | None = None) -> tuple[list[dict], dict]:
    return G.load_outputs(ARCH, root, prefix=PREFIX)


def mb_outputs(pkl, images: list[np.ndarray]):
    """The real MB (caffe2 yaml, test size) loaded from `pkl` by its DetectronCheckpointer, run
    on `images`: the model and `reference_maskrcnn_benchmark.run`'s output per image."""
    import reference_detectron as D
    import reference_maskrcnn_benchmark as R
    import torch
    from conftest import SMALL

    threads = torch.get_num_threads()
    torch.set_num_threads(G.TORCH_THREADS)
    try:
        model = D.load(ARCH, pkl, seed=1000, **SMALL)
        return model, [R.run(model, im) for im in images]
    finally:
        torch.set_num_threads(threads)


def record(root: Path | None = None) -> Path:
    """Calibrates, reconstructs, runs the real MB on the `.pkl` and writes the golden folder."""
    import PIL
    import reference_maskrcnn_benchmark as R
    import torch
    import torchvision
    from conftest import PARITY_IMAGES, SMALL

    t0 = time.perf_counter()

    def step(msg):
        print(f"[detectron {ARCH} {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    out_dir = golden_dir(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = G.parity_image_paths()
    images = [R.load_image(p) for p in paths]
    rec = G.calibrate(ARCH, images, SEED, config=CONFIG)
    buf = io.BytesIO()
    np.savez_compressed(buf, **rec)
    (out_dir / "calibration.npz").write_bytes(buf.getvalue())
    step(f"calibrated ({CONFIG})")
    sd = fold(G.reconstruct(ARCH, root=root, verify=False, prefix=PREFIX))
    blobs = blobs_of(sd)
    digest = G.state_dict_sha256(blobs)
    (out_dir / "state_dict.sha256").write_text(
        f"{digest}  Detectron blobs: synthetic seed {SEED} + calibration.npz, folded\n")
    with tempfile.TemporaryDirectory() as tmp:
        pkl = write_pkl(blobs, Path(tmp) / PKL_NAME)
        pkl_sha = hashlib.sha256(pkl.read_bytes()).hexdigest()
        model, outs = mb_outputs(pkl, images)
    msd = model.state_dict()
    assert list(msd) == list(sd), "the caffe2 model's keys are not the synthetic ones"
    bad = [k for k in sd if not np.array_equal(msd[k].numpy(), sd[k])]
    assert not bad, f"DetectronCheckpointer did not restore {bad[:3]}"
    step("ran maskrcnn-benchmark on the .pkl (Caffe2 loader): it holds the folded weights")
    summaries, flat = [], {}
    for i, out in enumerate(outs):
        s = R.summary(out)
        R.check_nontrivial(s)
        summaries.append(s)
        flat.update({f"{i}/{k}": v for k, v in G.compact(out, i).items()})
        print(s)
    buf = io.BytesIO()
    np.savez_compressed(buf, **flat)
    (out_dir / "outputs.npz").write_bytes(buf.getvalue())
    meta = dict(
        arch=ARCH, config=CONFIG, seed=SEED, size=SMALL, state_dict_sha256=digest,
        pkl_sha256=pkl_sha, pkl="{'blobs': ..., 'cfg': ...}, Python 2 protocol 2",
        maskrcnn_benchmark_source_sha256=G.mb_source_sha256(),
        torch=torch.__version__, torchvision=torchvision.__version__, numpy=np.__version__,
        pillow=PIL.__version__, torch_threads=G.TORCH_THREADS,
        images=[dict(name=n, file_sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                     pixels_sha256=G.image_sha256(im), hw=list(im.shape[:2]))
                for n, p, im in zip(PARITY_IMAGES, paths, images, strict=True)],
        summaries=summaries,
    )
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    step(f"wrote {out_dir} ({size / 1024:.0f} KiB)")
    return out_dir


def check(root: Path | None = None) -> None:
    t = time.perf_counter()
    blobs = reconstruct(root=root)
    print(f"detectron {ARCH}: {len(blobs)} blobs reconstructed, sha256 matches "
          f"({time.perf_counter() - t:.1f}s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("record", help="calibrate, run the real maskrcnn-benchmark, write the golden")
    sub.add_parser("check", help="reconstruct the golden .pkl's blobs, check their sha256")
    a = p.parse_args(argv)
    if a.cmd == "record":
        record()
        return 0
    try:
        check()
    except GoldenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
