"""The user-facing Detector: load a converted checkpoint, batch images into canvas buckets,
run the jitted model, paste masks, return per-image detections.

    det = jaxmrcnn.load("model.jaxmrcnn.msgpack")
    outs = det([img1, img2])        # HxWx3 uint8 RGB arrays of any sizes
    outs[0].boxes, .scores, .labels, .masks

Buckets: images are padded into one of a few canvases so that a handful of compiled
programs serve every image size; each image is still computed exactly as alone (see
model.py), so the bucket never changes the numbers. Compiled programs are kept in a
persistent XLA cache (`~/.cache/jaxmrcnn/xla`, or $JAXMRCNN_CACHE_DIR) and traced ones in its
`programs/` folder (programs.py), so that a second process neither traces nor compiles.

Devices: a batch is spread over the local devices (`jax.local_devices()`, or `devices=`),
sharded along the batch axis: each device runs the model on its slice of the batch, the same
program as one device with that smaller batch. See `Detector`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmrcnn import ops
from jaxmrcnn.checkpoint import (
    MAGIC,
    Checkpoint,
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
)
from jaxmrcnn.config import ModelConfig
from jaxmrcnn.model import PRECISIONS, MaskRCNN, cast_params, compute_dtype, matmul_precision
from jaxmrcnn.preprocess import Prepared, batch, prepare
from jaxmrcnn.programs import ProgramCache, source_digest


@dataclasses.dataclass
class Detections:
    """Detections of one image, in the source framework's order: by score, descending (most
    presets), or by class then proposal (maskrcnn-benchmark and Detectron:
    `config.roi_heads.result_order`)."""

    boxes: np.ndarray  # [N, 4] float32 xyxy in original-image pixels
    scores: np.ndarray  # [N] float32
    # Two label spaces, one name each: `labels` are the dataset's category ids (COCO ids for
    # COCO models, what annotation files and pycocotools use); `class_index` is the model's
    # output index (row of the classifier: what `classes` / `names` index). The boundary is
    # `Checkpoint.category_ids[class_index]`, applied here and nowhere else.
    labels: np.ndarray  # [N] int: dataset category ids (COCO ids for COCO models)
    masks: np.ndarray  # [N, H, W] bool, original image size
    class_index: np.ndarray  # [N] int: the model's class index
    names: list[str]  # [N] class names

    def __len__(self) -> int:
        return len(self.scores)


def enable_compilation_cache(path=None) -> str | None:
    """Turns on JAX's persistent compilation cache in `path` (default $JAXMRCNN_CACHE_DIR,
    else ~/.cache/jaxmrcnn/xla), unless the user configured one (then returns theirs).

    These three jax.config settings are the only global state jaxmrcnn changes:
    jax_compilation_cache_dir, jax_persistent_cache_min_compile_time_secs (0.1) and
    jax_persistent_cache_min_entry_size_bytes (0). When the directory cannot be created or
    written (a read-only home), nothing is changed, the caches are off (one warning per
    process) and the result is None."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if path is None:
        root = _cache_root()
        path = os.environ.get("JAXMRCNN_CACHE_DIR") or (None if root is None else root / "xla")
    directory = usable_cache_dir(path)
    if directory is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(directory)


_caches_off_warned = False


def usable_cache_dir(path) -> Path | None:
    """`path`, created if needed, when this process can write a file in it; else None, after
    one warning per process that jaxmrcnn's caches are off (everything still runs)."""
    global _caches_off_warned
    try:
        if path is None:
            raise OSError("no home directory")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # mode bits can mislead (root, ACLs): try
            pass
        return path
    except OSError as e:
        if not _caches_off_warned:
            _caches_off_warned = True
            warnings.warn(
                f"jaxmrcnn's caches are off: cannot write to {path} ({e.strerror or e}). "
                f"Everything runs, but compiled programs and converted checkpoints are not kept "
                f"for the next process; set JAXMRCNN_CACHE_DIR to a writable directory to keep "
                f"them.", stacklevel=3)
        return None


# XLA:CPU hands convolutions, dots and elementwise ops to its YNNPACK library fusions by
# default; restricting those to dots leaves convolutions to XLA's own convolution runtime,
# which runs this model's 3x3 convs 1.0-1.2x and its 1x1 convs 1.2-5x faster on this x86 CPU
# (the same numbers up to float summation order; `python benchmarks/convs.py` measures both).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def resolve_compiler_options(setting="auto") -> dict | None:
    """XLA compiler options for the Detector's programs. "auto": CPU_COMPILER_OPTIONS when
    the default backend is CPU and this XLA accepts them, else none; None: none; a dict:
    used as given."""
    if setting is None or isinstance(setting, dict):
        return setting
    if setting != "auto":
        raise ValueError(f"compiler_options must be 'auto', None or a dict, got {setting!r}")
    if jax.default_backend() != "cpu":
        return None
    return CPU_COMPILER_OPTIONS if _accepted(tuple(CPU_COMPILER_OPTIONS.items())) else None


@functools.cache
def _accepted(options: tuple) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
    except Exception:  # an XLA without this (experimental) option: compile with defaults
        return False
    return True


def _canvas_sides(cfg: ModelConfig) -> tuple[int, int]:
    """The resize rule's short side and long-side cap, rounded up to the size divisor."""
    d = cfg.input.size_divisible
    return -(-cfg.input.min_size // d) * d, -(-cfg.input.max_size // d) * d


def default_buckets(cfg: ModelConfig) -> list[tuple[int, int]]:
    """A few canvases for the config's resize rule: short side ceil(min_size), long side
    ceil(max_size) and two shorter steps, in both orientations."""
    short, long_max = _canvas_sides(cfg)
    d = cfg.input.size_divisible
    longs = sorted({long_max, max(short, long_max - 4 * d), max(short, long_max - 8 * d)})
    out = {(short, short)}
    for lg in longs:
        out.add((short, lg))
        out.add((lg, short))
    return sorted(out, key=lambda hw: (hw[0] * hw[1], hw))


def coarse_buckets(cfg: ModelConfig) -> list[tuple[int, int]]:
    """Three canvases (square, landscape and portrait at the largest size): the fewest
    compilations, for short runs where compile time outweighs the padding's extra compute."""
    short, long_max = _canvas_sides(cfg)
    return sorted({(short, short), (short, long_max), (long_max, short)},
                  key=lambda hw: (hw[0] * hw[1], hw))


def choose_canvas(padded_hw, buckets, max_waste: float = 1.6):
    """The smallest bucket that holds `padded_hw` without more than `max_waste` x its area;
    else the image's own padded size."""
    h, w = padded_hw
    for bh, bw in buckets:
        if bh >= h and bw >= w and bh * bw <= max_waste * h * w:
            return (bh, bw)
    return (h, w)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_devices() -> list:
    """The devices a Detector spreads its batches over by default: all local devices of the
    default backend, or only the device set with `jax.default_device` where one is set."""
    chosen = jax.config.jax_default_device
    if chosen is None:
        return jax.local_devices()
    if isinstance(chosen, str):  # a platform name
        return jax.local_devices(backend=chosen)
    return [chosen]


class Detector:
    """Runs a converted Mask R-CNN on lists of images. See the module docstring.

    batch_size: images per model call. With several local devices (GPUs, TPU cores, or CPU
    devices made with XLA_FLAGS=--xla_force_host_platform_device_count=N), each call's batch
    is sharded along the batch axis over min(batch_size, device count) of them (`devices`:
    which; default `jax.local_devices()`), padded with empty slots to a multiple of that
    count (`program_batch`); the empty slots' results are dropped. Each device computes its
    images exactly as one device computes a batch of program_batch / devices images.

    precision: of matmuls and convolutions (model.PRECISIONS; "float32" = HIGHEST, the
    default). dtype: the compute dtype of the network (model.DTYPES: "float32", the default,
    "bfloat16" or "float16"): the backbone, FPN, RPN head and box / mask heads run their
    activations and params in it (params cast once, here; frozen-norm statistics folded in
    float32). Box decoding, NMS, score thresholds, ROIAlign's sampling and the mask paste
    stay float32 whatever the dtype. Half precision changes results: on the seeded
    torchvision R50 of `benchmarks/precision.py` bfloat16 keeps most of float32's detections,
    not all (see the README for the measured agreement).

    Global state: with `compilation_cache=True` (the default) constructing a Detector turns
    on JAX's persistent compilation cache (enable_compilation_cache: three jax.config
    settings, left alone if the user set a cache directory); nothing else global changes.
    A cache directory that cannot be written (read-only home) turns the caches off with one
    warning and changes nothing."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        buckets: str | Sequence[tuple[int, int]] = "auto",
        batch_size: int = 1,
        compilation_cache: bool = True,
        compiler_options="auto",
        precision: str = "float32",
        dtype: str = "float32",
        devices: Sequence | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        compute_dtype(dtype)  # ValueError naming the choices
        self.precision = precision  # of matmuls and convolutions (model.PRECISIONS)
        self.dtype = dtype  # of the network's activations and params (model.DTYPES)
        self._program_cache = None
        self.compiler_options = resolve_compiler_options(compiler_options)
        if compilation_cache:  # the only global change: see enable_compilation_cache
            cache_dir = enable_compilation_cache()
            if cache_dir is not None:  # None: not writable, caches off (one warning)
                self._program_cache = ProgramCache(Path(cache_dir) / "programs",
                                                   self.compiler_options)
        self._programs: dict = {}
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.classes = checkpoint.classes
        self.category_ids = np.asarray(checkpoint.category_ids)
        if buckets == "auto":
            self.buckets = default_buckets(self.config)
        elif buckets == "coarse":
            self.buckets = coarse_buckets(self.config)
        elif buckets == "exact":
            self.buckets = []
        else:
            self.buckets = sorted((int(h), int(w)) for h, w in buckets)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        chosen = default_devices() if devices is None else list(devices)
        if not chosen:
            raise ValueError("devices is empty: pass None (all local devices) or a list of "
                             "jax devices")
        self.devices = chosen[: min(len(chosen), batch_size)]  # those a batch is spread over
        self.program_batch = _round_up(batch_size, len(self.devices))  # with empty slots
        params = cast_params(checkpoint.params, dtype)  # once; float32: unchanged
        self._mesh = None
        if len(self.devices) == 1:  # as before devices existed: one plain jit
            self.params = jax.device_put(params, None if devices is None else self.devices[0])
        else:
            self._mesh = Mesh(np.array(self.devices), ("batch",))
            self.params = jax.device_put(params, NamedSharding(self._mesh, P()))
        self.model = MaskRCNN(self.config, precision=precision, dtype=dtype)
        pc = self.config.paste
        paste = partial(
            ops.paste_masks, method=pc.method, threshold=pc.threshold, strict=pc.strict,
            padding=pc.padding,
        )

        def paste_at_precision(*args, **kwargs):
            with matmul_precision(precision):
                return paste(*args, **kwargs)

        self._paste = jax.jit(paste_at_precision, static_argnames=("out_hw",))

    def _infer_fn(self, params, images, info):
        dets, _ = self.model.apply({"params": params}, images, info)
        return dets

    def _program(self, images, info):
        """The jitted model for this canvas and batch size: traced once per process, or
        read back from the program cache (see programs.py) so a new process skips tracing.
        Over several devices: the model under shard_map, each device on its slice of the
        batch (params replicated), so a device runs the one-device program of that slice."""
        key = images.shape
        if key not in self._programs:
            fn, shardings = self._infer_fn, {}
            if self._mesh is not None:
                batched = P("batch")
                fn = jax.shard_map(self._infer_fn, mesh=self._mesh,
                                   in_specs=(P(), batched, batched), out_specs=batched,
                                   check_vma=False)  # per-device code: no collectives
                shardings = dict(
                    in_shardings=(NamedSharding(self._mesh, P()),) + (self._batched(),) * 2,
                    out_shardings=self._batched())
            if self._program_cache is None:
                self._programs[key] = jax.jit(fn, compiler_options=self.compiler_options,
                                              **shardings)
            else:
                # everything that shapes the program besides the arguments' shapes and dtypes
                name = (f"maskrcnn|{self.precision}|{self.dtype}|devices={len(self.devices)}|"
                        f"{self.config!r}")
                self._programs[key] = self._program_cache.get(
                    name, fn, (self.params, images, info), **shardings
                )
        return self._programs[key]

    def _batched(self) -> NamedSharding:
        """Arrays split along their first (batch) axis over the devices."""
        return NamedSharding(self._mesh, P("batch"))

    # ------------------------------------------------------------------ batching
    def prepare(self, images) -> list[Prepared]:
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            raise ValueError("pass a list of images, e.g. det([image]), not a single array")
        if not isinstance(images, (list, tuple)):
            raise ValueError(
                f"images must be a list of HxWx3 uint8 arrays, got {type(images).__name__}"
            )
        return [prepare(img, self.config.input) for img in images]

    def run_prepared(self, prepared: list[Prepared]) -> list[dict]:
        """Raw padded outputs per image (numpy): boxes, scores, class_index, masks
        (M x M probabilities), valid. Groups images by canvas and batches them."""
        return self._collect(self._dispatch(prepared), len(prepared))

    def _dispatch(self, prepared: list[Prepared]) -> list:
        """Starts the model on `prepared`, grouped by canvas and batched, without waiting for
        it (JAX dispatch is asynchronous): [(image indices, the batch's device outputs)]."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(prepared):
            groups.setdefault(choose_canvas(p.padded_hw, self.buckets), []).append(i)
        running = []
        for canvas, idxs in groups.items():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                # padded to program_batch (a multiple of the devices) with empty slots; their
                # results are never read (`_collect` takes the chunk's rows only)
                images, info, _ = batch([prepared[i] for i in chunk], canvas, self.program_batch)
                if self._mesh is not None:  # each device receives its slice only
                    images, info = jax.device_put((images, info), self._batched())
                running.append((chunk, self._program(images, info)(self.params, images, info)))
        return running

    @staticmethod
    def _collect(running: list, n: int) -> list[dict]:
        """`_dispatch`'s outputs on the host, per image (waits for the device)."""
        results: list[dict | None] = [None] * n
        for chunk, out in running:
            out = jax.device_get(out)
            for j, i in enumerate(chunk):
                results[i] = {k: v[j] for k, v in out.items()}
        return results

    def paste(self, raw: dict, orig_hw: tuple[int, int]) -> np.ndarray:
        """`[N, H, W]` bool masks of the valid detections in `raw`."""
        return self._paste_result(self._paste_start(raw, orig_hw), orig_hw)

    def _paste_start(self, raw: dict, orig_hw: tuple[int, int]):
        """Dispatches the paste of `raw`'s valid masks: (device array or None, count)."""
        valid = raw["valid"]
        n = int(valid.sum())
        h, w = orig_hw
        if n == 0:
            return None, 0
        n_pad = _round_up(n, 20)
        masks = np.zeros((n_pad,) + raw["masks"].shape[1:], np.float32)
        boxes = np.zeros((n_pad, 4), np.float32)
        masks[:n] = raw["masks"][valid]
        boxes[:n] = raw["boxes"][valid]
        out_hw = (_round_up(h, 64), _round_up(w, 64))
        pasted = self._paste(jnp.asarray(masks), jnp.asarray(boxes), out_hw=out_hw,
                             image_hw=jnp.array([h, w]))
        return pasted, n

    @staticmethod
    def _paste_result(started, orig_hw: tuple[int, int]) -> np.ndarray:
        pasted, n = started
        h, w = orig_hw
        if pasted is None:
            return np.zeros((0, h, w), bool)
        return np.asarray(pasted)[:n, :h, :w]

    def to_detections(self, raw: dict, orig_hw: tuple[int, int],
                      with_masks: bool = True) -> Detections:
        masks = self.paste(raw, orig_hw) if with_masks else None
        return self._detections(raw, masks)

    def _detections(self, raw: dict, masks: np.ndarray | None) -> Detections:
        """Detections of `raw`'s valid rows, with pasted `masks` (None: no masks)."""
        valid = raw["valid"]
        cls = raw["class_index"][valid].astype(np.int64)
        return Detections(
            boxes=raw["boxes"][valid].astype(np.float32),
            scores=raw["scores"][valid].astype(np.float32),
            labels=self.category_ids[cls],
            masks=masks if masks is not None else np.zeros((len(cls), 0, 0), bool),
            class_index=cls,
            names=[self.classes[c] for c in cls],
        )

    def __call__(self, images, *, masks: bool = True,
                 chunk_size: int | None = None) -> list[Detections]:
        """images: a list (or any iterable) of HxWx3 uint8 RGB arrays (grayscale and RGBA are
        converted) -> their Detections, in order. Runs `stream`: bounded memory for any
        number of images (beyond the returned Detections themselves)."""
        return list(self.stream(images, masks=masks, chunk_size=chunk_size))

    # ------------------------------------------------------------------ streaming
    def stream(self, images: Iterable, *, masks: bool = True,
               chunk_size: int | None = None) -> Iterator[Detections]:
        """Yields the Detections of each image of `images` (any iterable of HxWx3 uint8 RGB
        arrays: a list, or a generator that reads files), in input order, holding at most
        three chunks of `chunk_size` images (default 4 x batch_size) at a time.

        A pipeline over chunks, host work beside device work (on a CPU backend the device's
        programs run one at a time, in dispatch order):

            thread    take chunk i+1 from `images` (the iterable's own work, e.g. decoding,
                      included) and preprocess it
            main      wait for chunk i-1's outputs; dispatch its mask pastes; dispatch
                      chunk i's model (both asynchronous, so the device runs them back to
                      back); then build chunk i-1's Detections and yield them while the
                      device runs chunk i

        Each image goes through the same programs as in `run_prepared` + `to_detections`, so
        the results are the same bit for bit whatever `chunk_size`.
        """
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            raise ValueError("pass a list of images, e.g. det([image]), not a single array")
        if not isinstance(images, Iterable) or isinstance(images, (str, bytes, dict)):
            raise ValueError(
                f"images must be a list of HxWx3 uint8 arrays, got {type(images).__name__}")
        chunk_size = chunk_size or 4 * self.batch_size
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        source = iter(images)

        def next_chunk() -> list[Prepared]:
            return [prepare(img, self.config.input) for img in itertools.islice(source, chunk_size)]

        pool = ThreadPoolExecutor(1, thread_name_prefix="jaxmrcnn-prepare")
        try:
            ahead = pool.submit(next_chunk)
            previous = None  # (prepared, running) of the chunk on the device
            while True:
                prepared = ahead.result()
                if prepared:
                    ahead = pool.submit(next_chunk)
                if previous is not None:
                    raws = self._collect(previous[1], len(previous[0]))
                    pastes = [self._paste_start(r, p.orig_hw) if masks else None
                              for r, p in zip(raws, previous[0], strict=True)]
                running = self._dispatch(prepared) if prepared else None
                if previous is not None:
                    for r, p, started in zip(raws, previous[0], pastes, strict=True):
                        yield self._detections(
                            r, self._paste_result(started, p.orig_hw) if masks else None)
                    del raws, pastes
                if not prepared:
                    return
                previous = (prepared, running)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def load(path, **kwargs) -> Detector:
    """A Detector from a converted checkpoint (converters/from_torch.py), directly from a
    framework's own checkpoint file (torchvision, Detectron2, mmdet, maskrcnn-benchmark,
    Detectron), which is converted in memory once and cached (see `converted_checkpoint`),
    or from a model-zoo name such as "detectron2/mask_rcnn_R_50_FPN_3x" (`jaxmrcnn.zoo`)."""
    return Detector(read_any_checkpoint(path), **kwargs)


def read_any_checkpoint(path) -> Checkpoint:
    """The validated Checkpoint in a converted file, a framework's checkpoint, or a model-zoo
    name (`jaxmrcnn.zoo`: downloaded, verified, converted with its preset, all cached); every
    problem is a CheckpointError naming the file (a zoo.ZooError for a failed download)."""
    from jaxmrcnn import zoo

    if not Path(path).exists() and zoo.is_known(str(path)):
        entry = zoo.get(str(path))
        return converted_checkpoint(zoo.resolve(str(path)), arch=entry.get("preset"))
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint at {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    if is_jaxmrcnn_checkpoint(head):
        return load_checkpoint(path)
    return converted_checkpoint(path)


def is_jaxmrcnn_checkpoint(head: bytes) -> bool:
    """Whether a file's first bytes (1 MiB) are a jaxmrcnn checkpoint's: a msgpack map (first
    byte 0x81-0x8f; a pickle starts 0x80 then its protocol, a zip "PK") whose keys, sorted,
    put the magic string after the class list and the config."""
    return len(head) > 1 and 0x81 <= head[0] <= 0x8F and MAGIC.encode() in head


def converted_checkpoint(path, arch: str | None = None) -> Checkpoint:
    """A framework checkpoint converted (jaxmrcnn.converters, which needs PyTorch for
    .pth files), cached as a jaxmrcnn checkpoint under `<cache>/converted/`, keyed by the
    file's sha256, `arch` (a preset name, else read off the shapes) and the converters'
    source, so the next load skips the conversion."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    converters_dir = Path(__file__).resolve().parent / "converters"
    for src in sorted(converters_dir.glob("*.py")):
        digest.update(src.read_bytes())
    digest.update(source_digest().encode())
    digest.update(f"arch={arch}".encode())
    root = _cache_root()
    folder = usable_cache_dir(None if root is None else root / "converted")  # None: off
    name = f"{path.name.split('.')[0]}-{digest.hexdigest()[:20]}.msgpack"
    cache = None if folder is None else folder / name
    if cache is not None and cache.is_file():
        try:
            return load_checkpoint(cache)
        except CheckpointError:  # damaged: convert again
            pass
    try:
        from jaxmrcnn.converters.from_torch import convert_file
    except ImportError as e:
        raise CheckpointError(
            f"{path} is not a jaxmrcnn checkpoint; converting a framework checkpoint needs "
            f"PyTorch (pip install 'jaxmrcnn[torch]'): {e}"
        ) from None
    # CheckpointError (ConversionError is one) on any problem
    ckpt, _ = convert_file(path, arch=arch)
    if cache is not None:
        try:
            ckpt.save(cache)
        except OSError as e:  # e.g. a full disk: converted again next time
            warnings.warn(f"could not cache the converted checkpoint at {cache}: {e}", stacklevel=3)
    return ckpt


def _cache_root() -> Path | None:
    """$JAXMRCNN_CACHE_DIR, else ~/.cache/jaxmrcnn; None when there is no home directory."""
    if os.environ.get("JAXMRCNN_CACHE_DIR"):
        return Path(os.environ["JAXMRCNN_CACHE_DIR"])
    try:
        return Path.home() / ".cache" / "jaxmrcnn"
    except RuntimeError:  # no $HOME and no password entry
        return None
