"""jaxmrcnn: Mask R-CNN in JAX/Flax with the numbers of the framework the weights came from.

    import jaxmrcnn
    det = jaxmrcnn.load("model.jaxmrcnn.msgpack")   # from converters/from_torch.py
    outs = det([image])                              # HxWx3 uint8 RGB
"""

from jaxmrcnn.detector import Detections, Detector, load

__version__ = "0.1.0"
__all__ = ["Detections", "Detector", "load"]
