"""The Matterport family: pytorch-mask-rcnn (Matterport's Mask R-CNN, PyTorch port) inference.

config.py (MatterportConfig, presets), ops.py (anchors, box decoding, TF crop_and_resize),
model.py (the network, one jit), preprocess.py / postprocess.py (the port's host-side
square canvas and unmolding), detector.py (MatterportDetector). Converter:
jaxmrcnn/converters/matterport.py.
"""

from jaxmrcnn.matterport.config import (
    FAMILY,
    PRESETS,
    MatterportConfig,
    matterport_maskrcnn_r50_fpn,
    matterport_maskrcnn_r101_fpn,
)

__all__ = ["FAMILY", "PRESETS", "MatterportConfig", "matterport_maskrcnn_r101_fpn",
           "matterport_maskrcnn_r50_fpn"]
