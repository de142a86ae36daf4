"""The train step: losses -> gradients -> optax update, one jit, optionally data parallel.

Optimiser (torchvision's detection reference, references/detection/train.py):
  SGD, momentum 0.9, weight decay 1e-4 (added to the gradient before momentum, as
  torch.optim.SGD does; here only on conv / linear kernels, never on norms or biases),
  LR = 0.02 x global batch / 16, linear warm-up from LR x warmup_factor over warmup_steps
  (torch LinearLR), then x gamma at each milestone (MultiStepLR); optional global-norm
  gradient clipping.
Frozen params: the stem and the first stage (torchvision's trainable_backbone_layers=3)
  and every FrozenNorm (weight, bias, mean, var) get zero updates: `optax.multi_transform`
  with a "frozen" label (`optax.set_to_zero`), so they also carry no optimiser state.
RNG: the step's key is fold_in(seed key, step); example i of the global batch gets
  fold_in(step key, i), so samples do not depend on how the batch is split over devices.
  The forward is vmapped over examples (each with its own key) and the losses are reduced
  over the whole global batch exactly as torchvision does (losses.py).
Data parallel: `jax.jit` over a Mesh whose 'data' axis shards the batch; params and
  optimiser state are replicated. The loss is a mean over the global batch, so the
  gradient XLA computes (with its own all-reduce) is that of the global batch.
Multi-host: after `jax.distributed.initialize`, the default mesh spans every process'
  devices (`jax.devices()`); `shard_batch` builds the global batch array from each
  process' rows (see make_train_step). Replicated outputs (state, metrics) are fully
  replicated, so `np.asarray` / `jax.device_get` read them in every process.
Compute "bfloat16": the forward runs on bfloat16 copies of the params and images (convs and
  dots in bfloat16; gradients flow back to the float32 params through the casts), while
  boxes, targets, ROIAlign sampling and the losses stay float32 (forward.py).
Non-finite loss: the step returns the old state unchanged and `finite=False` with every
  loss term, so the loop can stop naming the step and the term (`check_finite`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmrcnn.config import ModelConfig
from jaxmrcnn.model import MaskRCNN
from jaxmrcnn.train.config import TrainConfig
from jaxmrcnn.train.forward import training_forward
from jaxmrcnn.train.losses import fastrcnn_losses, mask_loss, rpn_losses

TERMS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
# torchvision's trainable_backbone_layers=3: conv1 / bn1 (the stem) and layer1 are frozen.
FROZEN_PREFIXES = ("backbone/conv1", "backbone/bn1", "backbone/layer1_")
# Params whose shape depends on the class count (re-initialised for a new dataset).
CLASS_HEADS = ("box_predictor/", "mask_head/logits_")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 0.02  # at reference_batch images per step; scaled linearly
    reference_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 1000  # torchvision: min(1000, len(loader) - 1)
    warmup_factor: float = 1e-3
    milestones: tuple[int, ...] = ()  # steps at which the LR is multiplied by gamma
    gamma: float = 0.1
    clip_norm: float | None = None  # global-norm gradient clipping
    frozen_prefixes: tuple[str, ...] = FROZEN_PREFIXES
    compute: str = "float32"  # matmul/conv precision: "float32" | "bfloat16" (model.PRECISIONS)

    def lr(self, global_batch: int) -> float:
        return self.base_lr * global_batch / self.reference_batch

    def replace(self, **changes) -> OptimConfig:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- param masks

def _paths(tree, prefix=""):
    """{leaf path "a/b/c": leaf} with the tree's own structure kept (for tree_map)."""
    if isinstance(tree, Mapping):
        return {k: _paths(v, f"{prefix}/{k}" if prefix else k) for k, v in tree.items()}
    return prefix


def _is_norm(path: str, params) -> bool:
    """A FrozenNorm's param: its module holds `weight` and no `kernel`."""
    node = params
    *parents, _ = path.split("/")
    for p in parents:
        node = node[p]
    return "weight" in node and "kernel" not in node


def param_labels(params, frozen_prefixes=FROZEN_PREFIXES) -> dict:
    """Same tree as `params`: "frozen" (FrozenNorm params, `frozen_prefixes`), "decay"
    (trainable kernels: weight decay) or "no_decay" (trainable biases)."""
    def label(path):
        if _is_norm(path, params) or path.startswith(tuple(frozen_prefixes)):
            return "frozen"
        return "decay" if path.rsplit("/", 1)[-1].endswith("kernel") else "no_decay"
    return jax.tree_util.tree_map(label, _paths(params))


def lr_schedule(ocfg: OptimConfig, global_batch: int) -> optax.Schedule:
    """Linear warm-up (factor -> 1 over warmup_steps), then x gamma at each milestone."""
    lr = ocfg.lr(global_batch)
    decay = optax.piecewise_constant_schedule(
        lr, {max(m - ocfg.warmup_steps, 0): ocfg.gamma for m in ocfg.milestones})
    if ocfg.warmup_steps <= 0:
        return decay
    warm = optax.linear_schedule(lr * ocfg.warmup_factor, lr, ocfg.warmup_steps)
    return optax.join_schedules([warm, decay], [ocfg.warmup_steps])


def make_optimizer(ocfg: OptimConfig, global_batch: int, params) -> optax.GradientTransformation:
    """SGD + momentum with decoupled masks (see the module docstring)."""
    sgd = optax.sgd(lr_schedule(ocfg, global_batch), momentum=ocfg.momentum)
    clip = [optax.clip_by_global_norm(ocfg.clip_norm)] if ocfg.clip_norm else []

    def chain(decay: bool):
        wd = [optax.add_decayed_weights(ocfg.weight_decay)] if decay and ocfg.weight_decay else []
        return optax.chain(*wd, sgd)

    trainable = optax.multi_transform(
        {"decay": chain(True), "no_decay": chain(False), "frozen": optax.set_to_zero()},
        param_labels(params, ocfg.frozen_prefixes))
    # Clipping sees only trainable gradients (frozen ones are zeroed first).
    zero_frozen = optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(
        lambda lab: lab == "frozen", param_labels(params, ocfg.frozen_prefixes)))
    return optax.chain(zero_frozen, *clip, trainable)


# --------------------------------------------------------------------------- initial weights

def scratch_params(cfg: ModelConfig, seed: int = 0, residual_scale: float = 0.2) -> dict:
    """Random params for training from scratch, made on the host with numpy from the
    shapes alone (model.init traces and compiles the whole inference graph: ~40 s on CPU).

    Kernels He-normal (fan_in; the predictors 0.01, the RPN 0.01 as torchvision), biases 0,
    FrozenNorm identity (weight 1, bias 0, mean 0, var 1) except each bottleneck's last
    norm, whose weight is `residual_scale`: with frozen norms nothing rescales activations,
    so a small residual branch keeps 16 blocks from blowing the signal up."""
    from jaxmrcnn.model import param_shapes

    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)

    def make(path, shape):
        leaf = path.rsplit("/", 1)[-1]
        if leaf.endswith("kernel"):
            fan_in = int(np.prod(shape[:-1]))
            std = np.sqrt(2.0 / fan_in)
            if path.startswith(("box_predictor/cls_score", "rpn_head/")):
                std = 0.01
            elif path.startswith("box_predictor/bbox_pred"):
                std = 0.001
            return (rng.standard_normal(shape) * std).astype(np.float32)
        if leaf in ("weight", "var"):
            scale = residual_scale if path.endswith(("bn3/weight",)) else 1.0
            return np.full(shape, scale if leaf == "weight" else 1.0, np.float32)
        return np.zeros(shape, np.float32)

    return jax.tree_util.tree_map(make, _paths(shapes), shapes,
                                  is_leaf=lambda x: isinstance(x, tuple))


def init_for_classes(ckpt_params, ckpt_cfg: ModelConfig, num_classes: int, seed: int = 0):
    """(cfg, params) for `num_classes` (background included) from a converted checkpoint's:
    every param is the checkpoint's, except the class-dependent predictors (box predictor
    cls/bbox, mask logits), which are freshly initialised when the class count differs."""
    cfg = ckpt_cfg.replace(roi_heads=dict(num_classes=num_classes))
    params = jax.tree_util.tree_map(np.asarray, ckpt_params)
    if num_classes == ckpt_cfg.roi_heads.num_classes:
        return cfg, params
    fresh = scratch_params(cfg, seed)
    paths = _paths(fresh)

    def pick(path, new, old):
        if path.startswith(CLASS_HEADS) or old is None or np.shape(old) != np.shape(new):
            return np.asarray(new)
        return old

    def get(tree, path):
        for p in path.split("/"):
            if not isinstance(tree, Mapping) or p not in tree:
                return None
            tree = tree[p]
        return tree

    params = jax.tree_util.tree_map(lambda pa, new: pick(pa, new, get(params, pa)), paths, fresh)
    return cfg, params


# --------------------------------------------------------------------------- the step

def _to_bf16(x):
    return x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x


def batch_losses(params, batch, key, cfg: ModelConfig, tcfg: TrainConfig, precision="float32"):
    """Losses of a global batch, each example sampled with fold_in(key, its index).

    batch: images `[B, H, W, 3]`, image_hw / padded_hw `[B, 2]`, gt_boxes `[B, G, 4]`,
    gt_classes `[B, G]`, gt_masks `[B, G, H, W]`, gt_valid `[B, G]`.
    -> (losses dict: TERMS and "loss", out of the forward with the batch axis first)
    """
    model = MaskRCNN(cfg, precision=precision)
    images = batch["images"]
    if precision == "bfloat16":  # real bfloat16 convs / dots, float32 master params
        params = jax.tree_util.tree_map(_to_bf16, params)
        images = images.astype(jnp.bfloat16)
    b = images.shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))

    def one(image, image_hw, padded_hw, boxes, classes, masks, valid, k):
        info = dict(image_hw=image_hw[None], padded_hw=padded_hw[None])
        gt = dict(boxes=boxes[None], classes=classes[None], masks=masks[None], valid=valid[None])
        out = model.apply({"params": params}, image[None], info, gt, k, tcfg,
                          method=training_forward)
        return jax.tree_util.tree_map(lambda x: x[0], out)

    out = jax.vmap(one)(images, batch["image_hw"], batch["padded_hw"],
                        batch["gt_boxes"], batch["gt_classes"], batch["gt_masks"],
                        batch["gt_valid"], keys)
    losses = {}
    losses.update(rpn_losses(out, tcfg.rpn_box_beta))
    losses.update(fastrcnn_losses(out, tcfg.roi_box_beta))
    losses.update(mask_loss(out))
    losses["loss"] = sum(losses[k] for k in TERMS)
    return losses, out


def init_state(params, tx) -> dict:
    """{"step", "params", "opt_state"}: everything the step updates (a pytree)."""
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(state, batch, seed_key, *, cfg: ModelConfig, tcfg: TrainConfig, tx,
               precision: str = "float32"):
    """One update. -> (new state, metrics: TERMS, "loss", "grad_norm", "finite").
    A non-finite loss or gradient leaves the state unchanged (finite=False)."""
    key = jax.random.fold_in(seed_key, state["step"])

    def total(p):
        losses, _ = batch_losses(p, batch, key, cfg, tcfg, precision)
        return losses["loss"], losses

    (_, losses), grads = jax.value_and_grad(total, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(losses["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(step=state["step"] + 1, params=params, opt_state=opt_state)
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
    return new, dict(losses, grad_norm=grad_norm, finite=finite)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) with axis 'data'."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def make_train_step(cfg: ModelConfig, tcfg: TrainConfig, tx, mesh: Mesh | None = None,
                    precision: str = "float32", donate: bool = True):
    """jit(train_step) with cfg/tcfg/tx bound. With `mesh` (default: every device of every
    process): the batch is sharded over 'data' (its leading axis must divide evenly), state
    and key replicated. The jitted step carries two helpers:

    shard_batch(batch, process_local=False): host arrays -> global arrays on the mesh.
      process_local=False: `batch` is the whole global batch, the same in every process
      (e.g. every process runs the same deterministic loader); each process places the rows
      of its own devices. process_local=True: `batch` holds only this process' rows, a
      contiguous block of the global batch in process order (process p of n holds rows
      [p * B / n, (p + 1) * B / n)); with one process both are the same.
    replicate(tree): host tree -> replicated on the mesh (every process passes the same).
    """
    def step(state, batch, seed_key):
        return train_step(state, batch, seed_key, cfg=cfg, tcfg=tcfg, tx=tx, precision=precision)

    mesh = data_mesh() if mesh is None else mesh
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    jitted = jax.jit(step, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                     donate_argnums=(0,) if donate else ())
    n_dev = mesh.devices.size
    n_local = len(mesh.local_devices)

    def shard_batch(batch, process_local: bool = False):
        rows = len(batch["images"])
        if process_local:
            if rows % n_local:
                raise ValueError(f"this process' batch of {rows} does not split over its "
                                 f"{n_local} devices of the mesh")
            return {k: jax.make_array_from_process_local_data(data, np.asarray(v))
                    for k, v in batch.items()}
        if rows % n_dev:
            raise ValueError(f"global batch {rows} does not split over {n_dev} devices")
        if jax.process_count() == 1:
            return {k: jax.device_put(np.asarray(v), data) for k, v in batch.items()}
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            out[k] = jax.make_array_from_callback(v.shape, data, lambda idx, v=v: v[idx])
        return out

    def replicate(tree):
        if jax.process_count() == 1:
            return jax.device_put(tree, rep)
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_callback(np.shape(x), rep,
                                                   lambda idx, x=x: np.asarray(x)[idx]), tree)

    jitted.shard_batch = shard_batch  # type: ignore[attr-defined]
    jitted.replicate = replicate  # type: ignore[attr-defined]
    return jitted


def check_finite(metrics, step: int) -> None:
    """Raises FloatingPointError naming the step and the non-finite loss terms."""
    bad = [k for k in (*TERMS, "loss", "grad_norm") if k in metrics
           and not np.isfinite(np.asarray(metrics[k])).all()]
    if bad or not bool(np.asarray(metrics.get("finite", True))):
        raise FloatingPointError(
            f"non-finite values at step {step}: " + ", ".join(
                f"{k}={float(np.asarray(metrics[k])):g}" for k in bad or ("grad_norm",)))
