"""The torchvision model a converted checkpoint came from, rebuilt from its params.

Used by `eval/coco.py --reference torchvision` to run the original framework on the same
weights: every tensor is mapped back through the inverse of the converter's layout transform
(computed exactly, as an index permutation), so the torchvision model holds bit-identical
weights.
"""

from __future__ import annotations

import numpy as np

from jaxmrcnn.converters.torchvision import ConversionError, key_map
from jaxmrcnn.layers.resnet import BLOCKS


def _inverse(fn, torch_shape) -> np.ndarray:
    """Index permutation P with fn(x).ravel() == x.ravel()[P] for x of `torch_shape`."""
    idx = np.arange(int(np.prod(torch_shape)), dtype=np.int64).reshape(torch_shape)
    return np.asarray(fn(idx)).ravel()


def _param(params: dict, path: tuple[str, ...]) -> np.ndarray:
    node = params
    for p in path:
        node = node[p]
    return np.asarray(node)


def torchvision_model(checkpoint):
    """An eval-mode torchvision Mask R-CNN holding `checkpoint`'s weights and preprocessing."""
    import torch
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection._utils import overwrite_eps
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.ops import misc as misc_nn_ops

    cfg = checkpoint.config
    if checkpoint.source.get("format") != "torchvision":
        raise ConversionError(
            f"the reference mode needs a checkpoint converted from torchvision; this one came "
            f"from {checkpoint.source.get('format', 'an unknown source')}"
        )
    v2 = checkpoint.source.get("version") == "v2"
    k = cfg.roi_heads.num_classes
    size = dict(min_size=cfg.input.min_size, max_size=cfg.input.max_size)
    if v2:
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=k, **size)
    else:
        b = cfg.backbone
        blocks = list(BLOCKS[b.depth])
        body = ResNet(Bottleneck, blocks, groups=b.groups, width_per_group=b.width_per_group,
                      norm_layer=misc_nn_ops.FrozenBatchNorm2d)
        model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=k, **size)
        overwrite_eps(model, b.norm_eps)
    sd = model.state_dict()
    info = dict(v2=v2, depth=cfg.backbone.depth, old_fpn_keys=False, old_rpn_keys=False,
                old_mask_keys=False)
    new_sd = {}
    for key, (path, fn) in key_map(info, sd).items():
        want = tuple(sd[key].shape)
        ours = _param(checkpoint.params, path).ravel()
        flat = np.empty_like(ours)
        flat[_inverse(fn, want)] = ours
        new_sd[key] = torch.from_numpy(flat.reshape(want).copy())
    missing, unexpected = model.load_state_dict(new_sd, strict=False)
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConversionError(f"cannot rebuild the torchvision model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval()
