"""Flax (linen) modules of Mask R-CNN, NHWC throughout."""
