"""stopgrad_lr: per-block learning rates for Keras by scaling gradients in the graph."""

from stopgrad_lr._layers import GradientReversal, GradientScale
from stopgrad_lr._ops import scale_gradient

__version__ = "0.1.0"

__all__ = [
    "GradientReversal",
    "GradientScale",
    "__version__",
    "scale_gradient",
]
