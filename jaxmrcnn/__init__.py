"""jaxmrcnn: Mask R-CNN in JAX/Flax with the numbers of the framework the weights came from."""

__version__ = "0.1.0"
