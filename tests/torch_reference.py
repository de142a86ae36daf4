"""The PyTorch reference for parity tests: torchvision Mask R-CNN models with seeded random
weights, calibrated so that every stage produces non-trivial outputs (spread proposals, many
detections with distinct scores, masks that are neither empty nor full).

Random init leaves a Mask R-CNN degenerate (the RPN head is N(0, 0.01): every objectness is
~0.5; the classifier's softmax is ~1/91 everywhere). `calibrate` runs the model on real
images and sets, in execution order, every BatchNorm's running statistics to the batch
statistics of its input (with random affine weights), then rescales the prediction layers
to target output spreads. The result is deterministic for a seed and images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import misc as misc_nn_ops


def build(
    version: str, *, seed: int = 0, min_size: int = 800, max_size: int = 1333, bn_eps: float = 0.0
):
    """An eval-mode torchvision Mask R-CNN ("v1": FrozenBatchNorm2d with eps `bn_eps`, as the
    COCO_V1 weights; "v2": maskrcnn_resnet50_fpn_v2 with BatchNorm2d)."""
    torch.manual_seed(seed)
    if version == "v1":
        body = resnet50(weights=None, norm_layer=misc_nn_ops.FrozenBatchNorm2d)
        backbone = _resnet_fpn_extractor(body, 3)
        model = MaskRCNN(backbone, num_classes=91, min_size=min_size, max_size=max_size)
        overwrite_eps(model, bn_eps)
    elif version == "v2":
        model = maskrcnn_resnet50_fpn_v2(
            weights=None, weights_backbone=None, num_classes=91,
            min_size=min_size, max_size=max_size,
        )
    else:
        raise ValueError(version)
    return model.eval()


def _norm_modules(model):
    norm_types = (misc_nn_ops.FrozenBatchNorm2d, nn.BatchNorm2d)
    return [m for m in model.modules() if isinstance(m, norm_types)]


@torch.no_grad()
def calibrate(model, images: list[torch.Tensor], *, seed: int = 0):
    """images: float [3, H, W] in [0, 1]. Modifies the model in place, stage by stage."""
    g = torch.Generator().manual_seed(seed + 1)

    def set_stats(mod, inputs):
        x = inputs[0]
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        mod.running_mean.copy_(x.mean(dim=dims))
        mod.running_var.copy_(x.var(dim=dims) + 1e-2)
        mod.weight.copy_(0.6 + 0.8 * torch.rand(mod.weight.shape, generator=g))
        mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))

    def calibrate_norms(module, run):
        """Sets every norm inside `module` from its input statistics during one `run()`."""
        handles = [m.register_forward_pre_hook(set_stats) for m in _norm_modules(module)]
        run()
        for h in handles:
            h.remove()

    def outputs(module, run):
        """All outputs of `module` during `run()`, flattened and concatenated."""
        seen = []

        def hook(mod, inputs, output):
            seen.append(output.detach().reshape(-1))

        h = module.register_forward_hook(hook)
        run()
        h.remove()
        return torch.cat(seen)

    def scale_layer(layer, run, target_std, target_mean=None):
        std = outputs(layer, run).std().clamp_min(1e-12)
        layer.weight.mul_(target_std / std)
        if layer.bias is not None:
            layer.bias.mul_(target_std / std)
            if target_mean is not None:
                layer.bias.add_(target_mean - outputs(layer, run).mean())

    il, _ = model.transform(images)
    calibrate_norms(model.backbone, lambda: model.backbone(il.tensors))
    feats = model.backbone(il.tensors)
    flist = list(feats.values())

    head = model.rpn.head
    run_rpn = lambda: head(flist)  # noqa: E731
    for conv in [m for m in head.conv.modules() if isinstance(m, nn.Conv2d)]:
        scale_layer(conv, run_rpn, 1.0)
    scale_layer(head.cls_logits, run_rpn, 2.5, -1.0)
    scale_layer(head.bbox_pred, run_rpn, 0.3, 0.0)
    proposals, _ = model.rpn(il, feats)

    rh = model.roi_heads
    # A quarter of the proposals is plenty for statistics and keeps v2's conv box head cheap.
    pooled = rh.box_roi_pool(feats, [p[::4] for p in proposals], il.image_sizes)
    run_box = lambda: rh.box_predictor(rh.box_head(pooled))  # noqa: E731
    calibrate_norms(rh.box_head, run_box)
    for lin in [m for m in rh.box_head.modules() if isinstance(m, nn.Linear)]:
        scale_layer(lin, run_box, 1.0)
    scale_layer(rh.box_predictor.cls_score, run_box, 1.5)
    scale_layer(rh.box_predictor.bbox_pred, run_box, 1.0, 0.0)

    dets, _ = rh(feats, proposals, il.image_sizes)
    mpooled = rh.mask_roi_pool(feats, [d["boxes"] for d in dets], il.image_sizes)
    run_mask = lambda: rh.mask_predictor(rh.mask_head(mpooled))  # noqa: E731
    calibrate_norms(rh.mask_head, run_mask)
    scale_layer(rh.mask_predictor.conv5_mask, run_mask, 1.0)
    scale_layer(rh.mask_predictor.mask_fcn_logits, run_mask, 3.0, 0.0)
    return model


def load_image(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW / 255, as torchvision's to_tensor."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
