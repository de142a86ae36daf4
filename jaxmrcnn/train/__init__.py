"""Training: targets (matching, balanced sampling, box and mask targets), the training-mode
forward of MaskRCNN (same params tree) and torchvision-normalised losses, all static-shape
and jit-able. See losses.maskrcnn_losses for the entry point."""

from jaxmrcnn.train.config import TrainConfig
from jaxmrcnn.train.forward import training_forward
from jaxmrcnn.train.losses import maskrcnn_losses
from jaxmrcnn.train.targets import pad_ground_truth

__all__ = ["TrainConfig", "maskrcnn_losses", "pad_ground_truth", "training_forward"]
