"""Train Mask R-CNN on a COCO-format dataset: data parallel over all local devices, orbax
checkpoints, exact resumption, logging.

    python train/train.py --preset shapes-small --synth 512 --out runs/shapes
    python train/train.py --annotations ann.json --images DIR --init model.msgpack \
        --out runs/mine --steps 5000 --batch-size 8

Presets (PRESETS below): "shapes-small" trains torchvision's R50-FPN at 256 px from scratch
on generated shapes (jaxmrcnn/data/synth.py), with fewer proposals and sampled ROIs;
"tiny" (64 px, a handful of proposals) is for smoke tests.

Reading order of main(): 1 arguments and preset, 2 data, 3 model and initial weights,
4 optimiser and the jitted step on a device mesh, 5 resume (state, data position, RNG),
6 the loop (NaN guard, logging, periodic checkpoints, Ctrl-C), 7 the final model.

Resumption is exact: the step's RNG is fold_in(seed, step) and the data order is a pure
function of (seed, epoch, batch index) (jaxmrcnn/data/loader.py), both saved with the
params and optimiser state, so an interrupted run ends with the same params, bit for bit,
as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from jaxmrcnn.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from jaxmrcnn.config import torchvision_maskrcnn_r50_fpn  # noqa: E402
from jaxmrcnn.data import STEP_KEYS, Loader, LoaderConfig, read_coco, synth  # noqa: E402
from jaxmrcnn.train.config import TrainConfig  # noqa: E402
from jaxmrcnn.train.evaluate import Evaluator  # noqa: E402
from jaxmrcnn.train.step import (  # noqa: E402
    OptimConfig,
    check_finite,
    data_mesh,
    init_for_classes,
    init_state,
    lr_schedule,
    make_optimizer,
    make_train_step,
    scratch_params,
)


@dataclasses.dataclass(frozen=True)
class Preset:
    min_sizes: tuple[int, ...]  # training shortest edge, one chosen per image
    test_size: int  # inference shortest edge (stored in the final model's config)
    max_size: int
    buckets: tuple[tuple[int, int], ...]  # each bucket is one compiled program
    tcfg: TrainConfig
    optim: OptimConfig
    batch_size: int
    steps: int
    max_gt: int
    rpn_test_top_n: tuple[int, int]  # inference pre / post NMS top-n
    detections_per_img: int
    # ModelConfig changes from torchvision's R50-FPN for models trained from scratch, as
    # cfg.replace(**model) takes them (e.g. a narrower backbone); () keeps torchvision's.
    model: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()


PRESETS = {
    # The shipped shapes model (jaxmrcnn/weights): a narrow R26-FPN from scratch at 256 px.
    "shapes": Preset(
        min_sizes=(256,), test_size=256, max_size=256, buckets=((256, 256),),
        tcfg=TrainConfig(rpn_pre_nms_top_n=600, rpn_post_nms_top_n=300,
                         rpn_batch_size_per_image=128, roi_batch_size_per_image=128,
                         mask_target_max_samples=2),
        optim=OptimConfig(base_lr=0.04, warmup_steps=100, milestones=(900,),
                          frozen_prefixes=()),  # from scratch: train all
        batch_size=4, steps=1100, max_gt=12, rpn_test_top_n=(600, 300),
        detections_per_img=50,
        model=(("backbone", (("depth", 26), ("base_channels", 16))),
               ("fpn", (("out_channels", 64),)),
               ("anchors", (("sizes", (16, 32, 64, 128, 256)),)),
               ("roi_heads", (("fc_dim", 256), ("conv_dim", 64))))),
    "shapes-small": Preset(
        min_sizes=(256,), test_size=256, max_size=256, buckets=((256, 256),),
        tcfg=TrainConfig(rpn_pre_nms_top_n=600, rpn_post_nms_top_n=300,
                         rpn_batch_size_per_image=128, roi_batch_size_per_image=128),
        optim=OptimConfig(warmup_steps=50, frozen_prefixes=()),  # from scratch: train all
        batch_size=2, steps=2000, max_gt=12, rpn_test_top_n=(600, 300),
        detections_per_img=50),
    "tiny": Preset(
        min_sizes=(64,), test_size=64, max_size=64, buckets=((64, 64),),
        tcfg=TrainConfig(rpn_pre_nms_top_n=64, rpn_post_nms_top_n=32,
                         rpn_batch_size_per_image=32, roi_batch_size_per_image=16),
        optim=OptimConfig(warmup_steps=2, frozen_prefixes=()),
        batch_size=2, steps=3, max_gt=6, rpn_test_top_n=(64, 32), detections_per_img=10),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: ckpt/, metrics.jsonl, model.msgpack")
    p.add_argument("--preset", choices=sorted(PRESETS), default="shapes-small")
    p.add_argument("--annotations", help="COCO instances JSON")
    p.add_argument("--images", help="folder of the annotation file's images")
    p.add_argument("--synth", type=int, default=0, metavar="N",
                   help="generate N images of jaxmrcnn/data/synth.py into OUT/synth and train on "
                        "them (instead of --annotations)")
    p.add_argument("--synth-size", type=int, default=256)
    p.add_argument("--synth-val", type=int, default=64, metavar="M",
                   help="with --synth: also generate M validation images (another seed)")
    p.add_argument("--val-annotations", help="validation COCO JSON for periodic evaluation")
    p.add_argument("--val-images", help="folder of the validation annotation file's images")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="COCO box / mask AP on the validation set every N steps and at the end "
                        "(0: only at the end, when there is a validation set)")
    p.add_argument("--init", help="converted checkpoint to start from (class heads "
                                  "re-initialised if its class count differs); default: scratch")
    p.add_argument("--steps", type=int, help="total steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="global batch (a multiple of the devices)")
    p.add_argument("--lr", type=float, help="base LR at 16 images (default 0.02; scaled linearly)")
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--milestones", type=int, nargs="*", help="steps where the LR drops x0.1")
    p.add_argument("--clip", type=float, help="clip gradients to this global norm")
    p.add_argument("--bf16", action="store_true", help="bfloat16 matmuls and convolutions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fast-compile", action="store_true",
                   help="jax_disable_most_optimizations: quicker compile, slower steps (tests)")
    p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0 "
                   "(jax.distributed.initialize; every process runs the same command)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process' index")
    return p.parse_args(argv)


@functools.lru_cache(maxsize=4)
def _compiled_step(cfg, tcfg, ocfg, global_batch, precision, devices, param_labels_key):
    """One jitted step per (config, batch, devices) in a process: a resumed or repeated run
    in the same process reuses the compiled program. `param_labels_key` only keys the cache
    (the optimiser's masks depend on the params tree, which the config determines)."""
    del param_labels_key
    params = scratch_params(cfg)  # shapes only matter to build the optimiser's masks
    tx = make_optimizer(ocfg, global_batch, params)
    mesh = data_mesh(list(devices))
    return tx, make_train_step(cfg, tcfg, tx, mesh=mesh, precision=precision)


def main(argv=None, *, stop_after: int | None = None) -> int:
    """Runs training; returns the exit status. `stop_after`: raise KeyboardInterrupt after
    that many steps of this call (tests of the Ctrl-C path)."""
    # ---------------------------------------------------------------- 1 arguments, preset
    args = parse_args(argv)
    if args.coordinator:  # before any other JAX call; the mesh then spans every process
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    if args.fast_compile:
        jax.config.update("jax_disable_most_optimizations", True)
    preset = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or preset.steps
    ndev = jax.device_count()  # of all processes (multi-host: each loads the global batch)
    batch_size = args.batch_size or max(preset.batch_size, ndev)
    if batch_size % ndev:
        raise SystemExit(f"--batch-size {batch_size} is not a multiple of the {ndev} devices")
    ocfg = preset.optim
    for field, value in (("base_lr", args.lr), ("warmup_steps", args.warmup),
                         ("clip_norm", args.clip)):
        if value is not None:
            ocfg = ocfg.replace(**{field: value})
    if args.milestones is not None:
        ocfg = ocfg.replace(milestones=tuple(args.milestones))
    if args.init and ocfg.frozen_prefixes == ():
        ocfg = ocfg.replace(frozen_prefixes=OptimConfig().frozen_prefixes)  # fine-tuning
    precision = "bfloat16" if args.bf16 else "float32"

    # ---------------------------------------------------------------- 2 data
    if args.synth:
        images_dir, ann = out / "synth" / "images", out / "synth" / "annotations.json"
        if not ann.is_file():  # generated once per run folder (deterministic in --seed)
            synth.generate(out / "synth", args.synth, seed=args.seed,
                           size_hw=(args.synth_size, args.synth_size))
    elif args.annotations and args.images:
        images_dir, ann = Path(args.images), Path(args.annotations)
    else:
        raise SystemExit("give --annotations and --images, or --synth N")
    val = None
    if args.val_annotations and args.val_images:
        val = Path(args.val_annotations), Path(args.val_images)
    elif args.synth and args.synth_val:
        val_ann = out / "synth_val" / "annotations.json"
        if not val_ann.is_file():  # a seed no training image uses
            synth.generate(out / "synth_val", args.synth_val, seed=args.seed + 10_000,
                           size_hw=(args.synth_size, args.synth_size))
        val = val_ann, out / "synth_val" / "images"
    dataset = read_coco(ann, images_dir)
    print(f"data: {len(dataset.records)} images, {dataset.num_classes - 1} classes "
          f"{dataset.names}; skipped {dict(dataset.skipped) or 'nothing'}")

    # ---------------------------------------------------------------- 3 model, init weights
    if args.init:
        ckpt = load_checkpoint(args.init)
        cfg, params = init_for_classes(ckpt.params, ckpt.config, dataset.num_classes,
                                       seed=args.seed)
    else:
        cfg = torchvision_maskrcnn_r50_fpn(dataset.num_classes)
        cfg = cfg.replace(**{part: dict(fields) for part, fields in preset.model})
        params = None
    cfg = cfg.replace(
        input=dict(min_size=preset.test_size, max_size=preset.max_size),
        rpn=dict(pre_nms_top_n=preset.rpn_test_top_n[0], post_nms_top_n=preset.rpn_test_top_n[1]),
        roi_heads=dict(detections_per_img=preset.detections_per_img))
    if params is None:
        params = scratch_params(cfg, seed=args.seed)

    # ---------------------------------------------------------------- 4 optimiser, step
    # jit over a 'data' mesh of all local devices: batch sharded, state replicated, the
    # gradient of the global-batch loss all-reduced by XLA. The state is donated.
    tx, step_fn = _compiled_step(cfg, preset.tcfg, ocfg, batch_size, precision,
                                 tuple(jax.devices()), None)
    schedule = lr_schedule(ocfg, batch_size)
    state = step_fn.replicate(init_state(params, tx))
    seed_key = jax.random.PRNGKey(args.seed)

    # ---------------------------------------------------------------- 5 resume
    # Order: (a) find the latest complete checkpoint (orbax writes to a temporary folder
    # and renames it: a crash never leaves a partial one visible), (b) restore state into
    # the shapes and shardings of the fresh one, (c) the loader resumes at the saved
    # position, (d) the step's RNG is fold_in(seed, step): nothing else to restore.
    lcfg = LoaderConfig(batch_size=batch_size, min_sizes=preset.min_sizes,
                        max_size=preset.max_size, buckets=preset.buckets,
                        max_gt=preset.max_gt, seed=args.seed, workers=args.workers)
    mngr = ocp.CheckpointManager(
        (out / "ckpt").resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=args.keep, create=True))
    loader_state = None
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = mngr.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], restored["meta"]
        if meta["seed"] != args.seed or meta["batch_size"] != batch_size:
            raise SystemExit(f"{out} holds a run with seed {meta['seed']} and batch "
                             f"{meta['batch_size']}; use another --out or the same values")
        loader_state = meta["loader"]
        print(f"resumed from step {latest} (data: epoch {loader_state['epoch']}, "
              f"batch {loader_state['batch']})")

    def save(step: int) -> None:
        meta = dict(seed=args.seed, batch_size=batch_size, loader=data_pos,
                    preset=args.preset, config=cfg.to_json())
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()

    # ---------------------------------------------------------------- 6 loop
    loader = Loader(dataset, cfg.input, lcfg, state=loader_state)
    data_pos = loader.state()  # the data position of `state` (the next batch it needs)
    start = int(jax.device_get(state["step"]))
    metrics_file = open(out / "metrics.jsonl", "a")  # noqa: SIM115 (closed in finally)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True)
    evaluator = Evaluator(*val) if val is not None else None
    classes, category_ids = dataset.classes()

    def run_eval(step: int) -> dict:
        params_np = jax.tree_util.tree_map(np.asarray, jax.device_get(state["params"]))
        t = time.perf_counter()
        ap = evaluator(cfg, params_np, classes, category_ids)
        record = dict(step=step, eval=ap, eval_time=time.perf_counter() - t)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        print(f"\neval at step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in ap.items()),
              flush=True)
        return ap

    status, step = 0, start
    try:
        t_last = time.perf_counter()
        while step < steps:
            if stop_after is not None and step - start >= stop_after:
                raise KeyboardInterrupt
            batch = next(loader)
            t0 = time.perf_counter()
            state, met = step_fn(state, step_fn.shard_batch({k: batch[k] for k in STEP_KEYS}),
                                 seed_key)
            met = jax.device_get(met)
            t1 = time.perf_counter()
            try:
                check_finite(met, step)
            except FloatingPointError as e:  # the state is still the last good one
                print(f"\nstopping: {e}; the last good checkpoint is step "
                      f"{mngr.latest_step()}", file=sys.stderr)
                status = 3
                break
            step += 1
            data_pos = loader.state()
            record = dict(step=step, lr=float(schedule(step - 1)),
                          **{k: float(v) for k, v in met.items() if k != "finite"},
                          step_time=t1 - t0, images_per_s=batch_size / (t1 - t_last))
            t_last = t1
            metrics_file.write(json.dumps(record) + "\n")
            if step % args.log_every == 0 or step == steps:
                metrics_file.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            elif step % args.log_every == 0:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in record.items()), flush=True)
            if step % args.save_every == 0 or step == steps:
                save(step)
            if evaluator is not None and args.eval_every and step % args.eval_every == 0 \
                    and step != steps:
                run_eval(step)
    except KeyboardInterrupt:
        # The interrupt may land before, inside or after the step call: the state's own
        # step counter says which, and data_pos (the position after the last recorded step)
        # follows it (a fetched, unused batch is fetched again on resume). Inside the call
        # the donated state may be gone: then the latest checkpoint stands.
        status = 130
        try:
            done = int(jax.device_get(state["step"]))
        except RuntimeError:  # donated buffers deleted mid-call
            done = None
        if done is None:
            print(f"\ninterrupted inside step {step}; the latest checkpoint is step "
                  f"{mngr.latest_step()}", file=sys.stderr)
        else:
            if done == step + 1:  # the step ran; its batch was the last one fetched
                step, data_pos = done, loader.state()
            print(f"\ninterrupted at step {step}: saving", file=sys.stderr)
            if mngr.latest_step() != step:
                save(step)
    finally:
        if bar is not None:
            bar.close()
        metrics_file.close()
        loader.close()
        skipped = {k: v for k, v in loader.skipped.items() if v}
        if skipped:
            print(f"skipped annotations/images: {skipped}")

    # ---------------------------------------------------------------- 7 final model
    if status == 0:
        if mngr.latest_step() != step:
            save(step)
        params_np = jax.tree_util.tree_map(np.asarray, jax.device_get(state["params"]))
        Checkpoint(config=cfg, params=params_np, classes=classes, category_ids=category_ids,
                   source=dict(format="jaxmrcnn-train", preset=args.preset, steps=step,
                               seed=args.seed, data=str(ann))).save(out / "model.msgpack")
        print(f"saved {out / 'model.msgpack'} (jaxmrcnn.load reads it)")
        if evaluator is not None:
            with open(out / "metrics.jsonl", "a") as metrics_file:
                run_eval(step)
    mngr.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
