"""Mask R-CNN inference, jaxmrcnn vs torchvision, the same weights and images, one process.

    python benchmarks/inference.py [--version v1|v2] [--images N] [--repeats R] [--quick]
    python benchmarks/inference.py --preset NAME [--images N] [--repeats R] [--profile]
    python benchmarks/inference.py --stream [--images N] [--repeats R] [--batch-size B]

Builds torchvision's maskrcnn_resnet50_fpn (v1 or v2) with seeded random weights calibrated
to produce 100 detections per image (tests/torch_reference.py), saves its state dict,
converts it with converters/from_torch.py, and times both frameworks on the same images
(real ones from ../shared/data/coco-mini when present, else generated) at the standard
800/1333 preprocessing. Runs alternate between the two to share the machine's noise.

Prints median s/image for both and the ratio, the cold compile time, the warm start with
the persistent compilation cache (a fresh process: load + first image), and the peak memory
of each framework (measured in separate processes).

With --preset NAME (a jaxmrcnn.config.PRESETS name, e.g. detectron2/mask_rcnn_R_50_FPN_3x or
mmdet/mask-rcnn_x101-64x4d_fpn_1x_coco), the torch side is that framework's own model, built
by its reference harness in tests/ (Detectron2 and maskrcnn-benchmark from the source folders
named by JAXMRCNN_DETECTRON2_SRC / JAXMRCNN_MASKRCNN_BENCHMARK_SRC, else the harnesses'
default folders if present; mmdet 3.x installed; torchvision) with seeded random weights
calibrated on all the benchmark images (as the parity tests do; calibrated on one image, the
others saturate: scores near 1, boxes clipped to the border, near-ties that decide which 100
are kept), saved in the framework's checkpoint format and converted by
converters/from_torch.py (--arch NAME), so both run identical weights. Both are timed warm
on the same images at the preset's test size, image in -> detections with pasted masks out
(each framework's own preprocessing and paste included), alternating. Prints s/image, the
ratio, and how many of the reference's detections ours matched (jaxmrcnn.compare: same COCO
category, IoU >= 0.99, |score diff| <= 1e-3). Exits with status 2 if the framework is not
importable. --profile adds a per-stage breakdown of both (backbone, FPN, RPN, ROI heads,
pre/post-processing).

With --stream: throughput over a list of coco-mini images (all sizes, read from disk inside
the timed loop) at eval/coco.py's default size (short side 384, long side <= 640, coarse
buckets), as an evaluation runs them: torchvision one image at a time (masks thresholded), our
Detector.stream (reading, preprocessing and mask paste overlapped with the model), and our
unpipelined path (read and prepare a chunk, run it, paste; what eval/coco.py did before
stream). Passes alternate; prints images/s of each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

COCO_MINI = Path(
    os.environ.get("JAXMRCNN_COCO_MINI", ROOT.parent / "shared" / "data" / "coco-mini")
)


def load_image(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_images(n: int, shape=None):
    import numpy as np

    folder = COCO_MINI / "train2017"
    if folder.is_dir():
        from PIL import Image

        files = sorted(folder.glob("*.jpg"))
        if shape is not None:  # select by header size, decode only what is returned
            sized = []
            for f in files:
                with Image.open(f) as im:
                    if im.size[::-1] == tuple(shape):
                        sized.append(f)
            files = sized or files
        return [load_image(f) for f in files[:n]], f"coco-mini ({folder})"
    rng = np.random.default_rng(0)
    imgs = []
    for _ in range(n):  # smooth random scenes at COCO's most common size
        small = rng.integers(0, 255, (16, 24, 3)).astype(np.float32)
        img = np.kron(small, np.ones((27, 27, 1)))[:427, :640]
        imgs.append(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    return imgs, "generated (coco-mini not found)"


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's,
    since Linux carries it across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, weights: str, ckpt: str, image_index: int, cache_dir: str) -> None:
    """Runs one framework on one image in a fresh process; prints JSON."""
    import numpy as np

    t0 = time.perf_counter()
    imgs, _ = load_images(image_index + 1, (427, 640))
    img = imgs[image_index]
    if mode == "torch":
        import torch
        import torch_reference as R

        model = R.build(json.loads(os.environ["BENCH_VERSION"]))
        model.load_state_dict(torch.load(weights, weights_only=True))
        with torch.no_grad():
            for _ in range(2):
                model([R.to_tensor(img)])
        print(json.dumps(dict(peak_mb=peak_rss_mb(), pid=os.getpid())))
        return
    os.environ["JAXMRCNN_CACHE_DIR"] = cache_dir
    import jaxmrcnn

    det = jaxmrcnn.load(ckpt, buckets="exact")
    out = det([img])
    first = time.perf_counter() - t0
    for _ in range(1):
        det([img])
    cached = len(list(Path(cache_dir).glob("*")))
    print(json.dumps(dict(first_result_s=first, n=len(out[0]), peak_mb=peak_rss_mb(),
                          cache_files=cached)))
    _ = np


def run_child(mode, args_ns, weights, ckpt, cache_dir):
    env = dict(os.environ, BENCH_VERSION=json.dumps(args_ns.version))
    cmd = [sys.executable, __file__, "--child", mode, "--weights", weights, "--ckpt", ckpt,
           "--cache", cache_dir]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default="v1", choices=["v1", "v2"])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the images")
    ap.add_argument("--quick", action="store_true", help="2 images, 1 pass, no memory runs")
    ap.add_argument("--preset", help="time this jaxmrcnn.config.PRESETS architecture against "
                    "its own framework (see the module docstring)")
    ap.add_argument("--profile", action="store_true", help="with --preset: per-stage times")
    ap.add_argument("--stream", action="store_true", help="throughput of Detector.stream vs "
                    "torchvision over coco-mini at eval's default size (see the docstring)")
    ap.add_argument("--batch-size", type=int, default=1, help="with --stream: our batch size")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.weights, args.ckpt, 0, args.cache)
        return
    if args.quick:
        args.images, args.repeats = 2, 1
    if args.preset:
        sys.exit(preset_main(args))
    if args.stream:
        sys.exit(stream_main(args))

    import numpy as np
    import torch
    import torch_reference as R

    from jaxmrcnn.converters.from_torch import convert_file
    from jaxmrcnn.detector import Detector, enable_compilation_cache

    tmp = Path(tempfile.mkdtemp(prefix="jaxmrcnn_bench_"))
    cache_dir = str(tmp / "xla_cache")
    os.environ["JAXMRCNN_CACHE_DIR"] = cache_dir
    enable_compilation_cache()

    imgs, source = load_images(args.images, (427, 640))
    print(f"images: {len(imgs)} from {source}, sizes {sorted({a.shape[:2] for a in imgs})}")
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}")

    model = R.build(args.version)
    t = time.perf_counter()
    R.calibrate(model, [R.to_tensor(imgs[0])])
    print(f"calibrated torchvision {args.version} in {time.perf_counter() - t:.1f}s")
    weights = tmp / f"torchvision_{args.version}.pth"
    torch.save(model.state_dict(), weights)
    ckpt, summary = convert_file(weights)
    ckpt_path = tmp / f"torchvision_{args.version}.jaxmrcnn.msgpack"
    ckpt.save(ckpt_path)
    print("\n".join(summary))

    det = Detector(ckpt, buckets="exact")
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")

    # Cold compile: first call minus a steady-state call on the same image.
    t = time.perf_counter()
    out = det([imgs[0]])
    first = time.perf_counter() - t
    t = time.perf_counter()
    det([imgs[0]])
    steady = time.perf_counter() - t
    compile_s = first - steady
    for a in imgs[1:]:  # compile every canvas before timing
        det([a])

    t_tv, t_jax, n_tv, n_jax = [], [], [], []
    with torch.no_grad():
        for _ in range(args.repeats):
            for a in imgs:
                x = [R.to_tensor(a)]
                t = time.perf_counter()
                ref = model(x)
                t_tv.append(time.perf_counter() - t)
                n_tv.append(len(ref[0]["boxes"]))
                t = time.perf_counter()
                out = det([a])
                t_jax.append(time.perf_counter() - t)
                n_jax.append(len(out[0]))
    med_tv, med_jax = statistics.median(t_tv), statistics.median(t_jax)

    print()
    print(f"{'':28s}{'torchvision':>14s}{'jaxmrcnn':>14s}")
    print(f"{'median s/image':28s}{med_tv:14.3f}{med_jax:14.3f}")
    print(f"{'min s/image':28s}{min(t_tv):14.3f}{min(t_jax):14.3f}")
    print(f"{'detections/image (mean)':28s}{np.mean(n_tv):14.1f}{np.mean(n_jax):14.1f}")
    print(f"ratio jaxmrcnn / torchvision (median): {med_jax / med_tv:.3f}   (goal <= 0.75)")
    print(f"cold compile (first call - steady call): {compile_s:.1f}s   (goal <= 90 s)")

    if not args.quick:
        warm = run_child("jax", args, str(weights), str(ckpt_path), cache_dir)
        tv_mem = run_child("torch", args, str(weights), str(ckpt_path), cache_dir)
        print(
            f"warm start with the compilation cache (fresh process: import, load, first "
            f"image): {warm['first_result_s']:.1f}s   (goal <= 10 s)"
        )
        print(f"peak RSS: torchvision {tv_mem['peak_mb']:.0f} MB, "
              f"jaxmrcnn {warm['peak_mb']:.0f} MB "
              f"(one image at a time; cache entries {warm['cache_files']})")


# ------------------------------------------------------------------------------- --preset NAME


class FrameworkMissing(RuntimeError):
    pass


def _source_env(R) -> None:
    """Detectron2 / maskrcnn-benchmark are imported from a source folder named by the
    reference harness's environment variable (R.ENV_VAR); where it is unset, this benchmark
    names the harness's default folder (R.DEFAULT_SRC) if that exists, and says so."""
    if not os.environ.get(R.ENV_VAR) and R.DEFAULT_SRC.is_dir():
        os.environ[R.ENV_VAR] = str(R.DEFAULT_SRC)
        print(f"{R.ENV_VAR} unset: using {R.DEFAULT_SRC}")


def _coco_ids():
    import numpy as np

    from jaxmrcnn.classes import coco80_classes

    return np.asarray(coco80_classes(80)[1][:80])  # contiguous foreground index -> COCO id


class TorchSide:
    """The real framework's model for a preset: built, calibrated on `calib` (uint8 RGB images),
    saved as the framework's checkpoint file (`self.checkpoint`). `infer(img)` runs one image
    as the framework's own predictor does and returns boxes, scores, labels (COCO category
    ids) as numpy; `stages(img)` returns the per-stage times of one such run."""

    framework = ""

    def __init__(self, config: str, cfg, calib, tmp: Path):
        raise NotImplementedError


class TorchvisionSide(TorchSide):
    framework = "torchvision"

    def __init__(self, config, cfg, calib, tmp):
        import torch
        import torch_reference as R

        self.R = R
        version = "v2" if config.endswith("_v2") else "v1"
        self.model = R.build(version, min_size=cfg.input.min_size, max_size=cfg.input.max_size,
                             bn_eps=cfg.backbone.norm_eps)
        R.calibrate(self.model, [R.to_tensor(im) for im in calib])
        self.checkpoint = tmp / f"torchvision_{version}.pth"
        torch.save(self.model.state_dict(), self.checkpoint)

    def infer(self, img):
        out = self.model([self.R.to_tensor(img)])[0]
        return {k: out[k].numpy() for k in ("boxes", "scores", "labels")}

    def stages(self, img):
        m = self.model
        t = _Lap()
        x = [self.R.to_tensor(img)]
        images, _ = m.transform(x)
        t("preprocess")
        body = m.backbone.body(images.tensors)
        t("backbone")
        feats = m.backbone.fpn(body)
        t("fpn")
        props, _ = m.rpn(images, feats)
        t("rpn")
        dets, _ = m.roi_heads(feats, props, images.image_sizes)
        t("roi heads")
        m.transform.postprocess(dets, images.image_sizes, [im.shape[-2:] for im in x])
        t("postprocess (paste)")
        return t.times


class Detectron2Side(TorchSide):
    framework = "detectron2"

    def __init__(self, config, cfg, calib, tmp):
        import reference_detectron2 as R

        _source_env(R)
        try:
            R.import_detectron2()
        except ImportError as e:
            raise FrameworkMissing(str(e)) from e
        self.R = R
        self.model = R.build(config, min_size=cfg.input.min_size, max_size=cfg.input.max_size)
        R.calibrate(self.model, calib)
        self.checkpoint = R.save_pkl(self.model, tmp / "model_final.pkl")  # the zoo's format
        self.ids = _coco_ids()

    def infer(self, img):
        inst = self.model([self.R.predictor_inputs(self.model, img)])[0]["instances"]
        return dict(boxes=inst.pred_boxes.tensor.numpy(), scores=inst.scores.numpy(),
                    labels=self.ids[inst.pred_classes.numpy()])

    def stages(self, img):
        from detectron2.modeling.postprocessing import detector_postprocess

        m = self.model
        t = _Lap()
        inputs = self.R.predictor_inputs(m, img)
        images = m.preprocess_image([inputs])
        t("preprocess")
        body = m.backbone.bottom_up(images.tensor)
        t("backbone")
        feats = m.backbone(images.tensor)  # bottom-up again + FPN: FPN = this - backbone
        t("fpn+backbone")
        props, _ = m.proposal_generator(images, feats, None)
        t("rpn")
        res, _ = m.roi_heads(images, feats, props, None)
        t("roi heads")
        detector_postprocess(res[0], inputs["height"], inputs["width"])
        t("postprocess (paste)")
        times = t.times
        times["fpn"] = times.pop("fpn+backbone") - times["backbone"]
        del body
        return times


class MMDetSide(TorchSide):
    framework = "mmdet"

    def __init__(self, config, cfg, calib, tmp):
        import reference_mmdet as R  # imports torch/torchvision and finds mmdet's configs

        try:
            R.install_mmcv_ext_shim()
            import mmdet  # noqa: F401
        except ImportError as e:
            raise FrameworkMissing(f"mmdet is not importable ({e}); see "
                                   f"tests/requirements-mmdet.txt") from e
        from jaxmrcnn.classes import coco80_classes

        self.R = R
        self.model = R.build(config, scale=(cfg.input.max_size, cfg.input.min_size))
        R.calibrate(self.model, calib)
        self.checkpoint = tmp / f"{config}.pth"
        R.save_v2(self.model, self.checkpoint, coco80_classes(80)[0][:80])  # the v2 zoo's format
        self.ids = _coco_ids()

    def infer(self, img):
        from mmdet.apis import inference_detector

        pred = inference_detector(self.model, self.R._bgr(img)).pred_instances
        return dict(boxes=pred.bboxes.numpy(), scores=pred.scores.numpy(),
                    labels=self.ids[pred.labels.numpy()])

    def stages(self, img):
        m = self.model
        t = _Lap()
        inputs, samples = self.R.preprocess(m, [img])
        t("preprocess")
        body = m.backbone(inputs)
        t("backbone")
        feats = m.neck(body)
        t("fpn")
        rpn = m.rpn_head.predict(feats, samples, rescale=False)
        t("rpn")
        res = m.roi_head.predict(feats, rpn, samples, rescale=True)
        t("roi heads (+ paste)")
        m.add_pred_to_datasample(samples, res)
        return t.times


class MaskRCNNBenchmarkSide(TorchSide):
    framework = "maskrcnn_benchmark"

    def __init__(self, config, cfg, calib, tmp):
        import reference_maskrcnn_benchmark as R

        _source_env(R)
        try:
            R.import_maskrcnn_benchmark()
        except ImportError as e:
            raise FrameworkMissing(str(e)) from e
        self.R = R
        self.model = R.build(config, min_size=cfg.input.min_size, max_size=cfg.input.max_size)
        R.calibrate(self.model, calib)
        self.checkpoint = R.save(self.model, tmp / "model_final.pth")
        self.ids = _coco_ids()

    def infer(self, img):
        pred = self.model(self.R.batch(self.model, [img]))[0]
        final, _ = self.R.paste_masks(pred, *img.shape[:2])
        return dict(boxes=final.bbox.numpy(), scores=final.get_field("scores").numpy(),
                    labels=self.ids[final.get_field("labels").numpy() - 1])  # 1..80

    def stages(self, img):
        m = self.model
        t = _Lap()
        images = self.R.batch(m, [img])
        t("preprocess")
        body = m.backbone.body(images.tensors)
        t("backbone")
        feats = m.backbone.fpn(body)
        t("fpn")
        props, _ = m.rpn(images, feats)
        t("rpn")
        _, dets, _ = m.roi_heads(feats, props)
        t("roi heads")
        self.R.paste_masks(dets[0], *img.shape[:2])
        t("postprocess (paste)")
        return t.times


SIDES = {
    "torchvision": TorchvisionSide,
    "detectron2": Detectron2Side,
    "mmdet": MMDetSide,
    "maskrcnn_benchmark": MaskRCNNBenchmarkSide,
}


class _Lap:
    """Successive lap times by name (seconds)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.t = time.perf_counter()

    def __call__(self, name):
        now = time.perf_counter()
        self.times[name] = now - self.t
        self.t = now


def framework_of(preset: str) -> tuple[str, str]:
    """(framework, the framework's own config name) of a preset name."""
    if preset.startswith("torchvision_"):
        return "torchvision", preset
    fw, _, config = preset.partition("/")
    return fw, config


def our_stages(det, img):
    """Per-stage times of our Detector on one image: host preprocessing, the backbone, the
    FPN (pyramid - backbone), the rest of the jitted model (RPN, ROI heads, NMS, mask head),
    and the host side of the mask paste. Each stage is its own warm jitted program here."""
    import jax

    from jaxmrcnn.detector import choose_canvas
    from jaxmrcnn.preprocess import batch

    progs = getattr(det, "_bench_stage_programs", None)
    if progs is None:
        model, opts = det.model, det.compiler_options
        progs = dict(
            backbone=jax.jit(lambda p, im, hw: model.apply({"params": p}, im, hw,
                                                           method=lambda m, a, b: m.backbone(a, b)),
                             compiler_options=opts),
            pyramid=jax.jit(lambda p, im, hw: model.apply({"params": p}, im, hw,
                                                          method=lambda m, a, b: m.pyramid(a, b)),
                            compiler_options=opts),
        )
        det._bench_stage_programs = progs
    t = _Lap()
    prepared = det.prepare([img])
    images, info, _ = batch(prepared, choose_canvas(prepared[0].padded_hw, det.buckets),
                            det.batch_size)
    t("preprocess")
    jax.block_until_ready(progs["backbone"](det.params, images, info["padded_hw"]))
    t("backbone")
    jax.block_until_ready(progs["pyramid"](det.params, images, info["padded_hw"]))
    t("fpn+backbone")
    raw = det.run_prepared(prepared)[0]
    t("model")
    det.to_detections(raw, prepared[0].orig_hw)
    t("postprocess (paste)")
    times = t.times
    times["fpn"] = times.pop("fpn+backbone") - times["backbone"]
    times["rpn + roi heads"] = times.pop("model") - times["backbone"] - times["fpn"]
    return times


def preset_main(args) -> int:
    import numpy as np
    import torch

    from jaxmrcnn.compare import match_detections
    from jaxmrcnn.config import PRESETS
    from jaxmrcnn.converters.from_torch import convert_file
    from jaxmrcnn.detector import Detector

    if args.preset not in PRESETS:
        print(f"error: unknown preset {args.preset!r}; one of:\n  " + "\n  ".join(PRESETS),
              file=sys.stderr)
        return 2
    fw, config = framework_of(args.preset)
    if fw not in SIDES:
        print(f"error: --preset supports {', '.join(SIDES)} presets; there is no runnable "
              f"{fw} reference here", file=sys.stderr)
        return 2
    cfg = PRESETS[args.preset]()
    tmp = Path(tempfile.mkdtemp(prefix="jaxmrcnn_bench_"))
    imgs, source = load_images(args.images, (427, 640))
    print(f"preset {args.preset}: {fw} {config}, input {cfg.input.min_size}/{cfg.input.max_size}")
    print(f"images: {len(imgs)} from {source}, sizes {sorted({a.shape[:2] for a in imgs})}")
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

    t = time.perf_counter()
    try:
        with torch.no_grad():
            ref_side = SIDES[fw](config, cfg, imgs, tmp)
    except FrameworkMissing as e:
        print(f"error: {fw} is not importable here, so there is no reference to time: {e}",
              file=sys.stderr)
        return 2
    print(f"built and calibrated the real {fw} model in {time.perf_counter() - t:.1f}s, "
          f"saved {ref_side.checkpoint.name}")
    ckpt, summary = convert_file(ref_side.checkpoint, arch=args.preset)
    print("\n".join(summary))
    det = Detector(ckpt, buckets="exact", compilation_cache=False)

    t = time.perf_counter()
    det([imgs[0]])
    first = time.perf_counter() - t
    for a in imgs[1:]:  # every canvas compiled before timing
        det([a])
    with torch.no_grad():
        for a in imgs:  # and torch warm too
            ref_side.infer(a)
    print(f"ours: first call (trace + compile + run) {first:.1f}s")

    t_ref, t_ours, matched, n_ref, n_ours = [], [], [], [], []
    with torch.no_grad():
        for rep in range(args.repeats):
            for a in imgs:
                t = time.perf_counter()
                ref = ref_side.infer(a)
                t_ref.append(time.perf_counter() - t)
                t = time.perf_counter()
                ours = det([a])[0]
                t_ours.append(time.perf_counter() - t)
                if rep == 0:
                    pairs, _ = match_detections(ref, ours)
                    matched.append(len(pairs))
                    n_ref.append(len(ref["scores"]))
                    n_ours.append(len(ours))
    med_ref, med_ours = statistics.median(t_ref), statistics.median(t_ours)

    print()
    print(f"{'':28s}{fw:>20s}{'jaxmrcnn':>14s}")
    print(f"{'median s/image':28s}{med_ref:20.3f}{med_ours:14.3f}")
    print(f"{'min s/image':28s}{min(t_ref):20.3f}{min(t_ours):14.3f}")
    print(f"{'detections/image (mean)':28s}{np.mean(n_ref):20.1f}{np.mean(n_ours):14.1f}")
    print(f"reference detections matched by ours: {sum(matched)}/{sum(n_ref)} "
          f"({sum(matched) / max(sum(n_ref), 1):.1%}; per image {matched} of {n_ref})")
    print(f"ratio jaxmrcnn / {fw} (median): {med_ours / med_ref:.3f}   (goal <= 0.75)")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    if args.profile:
        runs_ref, runs_ours = [], []
        with torch.no_grad():
            our_stages(det, imgs[0])  # compiles the stage programs
            for _ in range(max(args.repeats, 2)):
                for a in imgs:
                    runs_ref.append(ref_side.stages(a))
                    runs_ours.append(our_stages(det, a))
        print(f"\nper stage, median s/image over {len(runs_ref)} runs (each stage timed "
              "alone; the sum can differ from the end-to-end time)")
        names = list(dict.fromkeys([*runs_ref[0], *runs_ours[0]]))
        print(f"{'stage':28s}{fw:>20s}{'jaxmrcnn':>14s}")
        for name in names:
            cells = []
            for runs in (runs_ref, runs_ours):
                vals = [r[name] for r in runs if name in r]
                cells.append(f"{statistics.median(vals):.3f}" if vals else "-")
            print(f"{name:28s}{cells[0]:>20s}{cells[1]:>14s}")
        if "rpn + roi heads" in names:
            print("(ours: RPN, ROI heads and mask head are one jitted program, timed together)")
    return 0


# ------------------------------------------------------------------------------- --stream


def stream_main(args, min_size: int = 384, max_size: int = 640) -> int:
    import itertools

    import torch
    import torch_reference as R

    from jaxmrcnn.converters.from_torch import convert_file
    from jaxmrcnn.detector import Detector

    folder = COCO_MINI / "train2017"
    if not folder.is_dir():
        print(f"error: --stream needs coco-mini at {folder}", file=sys.stderr)
        return 2
    files = sorted(folder.glob("*.jpg"))[: args.images]
    tmp = Path(tempfile.mkdtemp(prefix="jaxmrcnn_bench_"))
    calib = [load_image(f) for f in files[:3]]
    model = R.build("v1", min_size=min_size, max_size=max_size)
    R.calibrate(model, [R.to_tensor(a) for a in calib])
    weights = tmp / "torchvision_v1.pth"
    torch.save(model.state_dict(), weights)
    ckpt, _ = convert_file(weights)
    ckpt.config = ckpt.config.replace(input=dict(min_size=min_size, max_size=max_size))
    det = Detector(ckpt, buckets="coarse", batch_size=args.batch_size)
    threshold = ckpt.config.paste.threshold
    print(f"{len(files)} coco-mini images, short side {min_size}, long side <= {max_size}, "
          f"coarse buckets {det.buckets}, batch size {det.batch_size}; torch "
          f"{torch.__version__} threads={torch.get_num_threads()}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")

    def read():
        for f in files:
            yield load_image(f)

    def torchvision_pass():
        n = 0
        with torch.inference_mode():
            for img in read():
                out = model([R.to_tensor(img)])[0]
                _ = (out["masks"][:, 0] > threshold).numpy()  # bool masks, as ours
                n += 1
        return n

    def stream_pass():
        return sum(1 for _ in det.stream(read()))

    def unpipelined_pass():
        n, source, chunk = 0, read(), 4 * det.batch_size
        while batch := list(itertools.islice(source, chunk)):
            prepared = det.prepare(batch)
            for raw, p in zip(det.run_prepared(prepared), prepared, strict=True):
                det.to_detections(raw, p.orig_hw)
                n += 1
        return n

    t = time.perf_counter()
    stream_pass()  # compiles every canvas (or reads them from the compilation cache)
    with torch.inference_mode():
        model([R.to_tensor(calib[0])])
    print(f"warm-up (ours: trace + compile every canvas) {time.perf_counter() - t:.1f}s")
    passes = dict(torchvision=torchvision_pass, stream=stream_pass, unpipelined=unpipelined_pass)
    times: dict[str, list[float]] = {k: [] for k in passes}
    for _ in range(args.repeats):
        for name, run in passes.items():
            t = time.perf_counter()
            assert run() == len(files)
            times[name].append(time.perf_counter() - t)
    rate = {k: len(files) / min(v) for k, v in times.items()}  # best pass: least noise
    print(f"\n{'images/s (best of ' + str(args.repeats) + ' passes)':36s}" + "".join(
        f"{k:>14s}" for k in passes))
    print(f"{'':36s}" + "".join(f"{rate[k]:14.3f}" for k in passes))
    print(f"throughput stream / torchvision: {rate['stream'] / rate['torchvision']:.2f}x   "
          f"(goal >= 1.5x)")
    print(f"throughput stream / unpipelined: {rate['stream'] / rate['unpipelined']:.2f}x")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    main()
