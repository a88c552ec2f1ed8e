"""stopgrad_lr: per-block learning rates for Keras by scaling gradients in the graph."""

from stopgrad_lr._callbacks import LRFinder, ScaleSchedule, find_lr
from stopgrad_lr._graph import SummaryRow, effective_multipliers, gradient_cuts, summary
from stopgrad_lr._layers import GradientReversal, GradientScale, GradientStop
from stopgrad_lr._ops import scale_gradient
from stopgrad_lr._optimizers import (
    OptimizerMismatchWarning,
    OptimizerReport,
    ScaledSchedule,
    check_optimizer,
    multi_optimizer,
)
from stopgrad_lr._plot import plot_multipliers
from stopgrad_lr._reparam import ParameterScale
from stopgrad_lr._rewrite import (
    apply_lr_multipliers,
    insert_gradient_scales,
    layerwise_decay,
    layerwise_decay_multipliers,
    strip_gradient_scales,
)
from stopgrad_lr._schedules import dann_ramp, gradual_unfreeze, linear_warmup

__version__ = "0.1.0"

__all__ = [
    "GradientReversal",
    "GradientScale",
    "GradientStop",
    "LRFinder",
    "OptimizerMismatchWarning",
    "OptimizerReport",
    "ParameterScale",
    "ScaleSchedule",
    "ScaledSchedule",
    "SummaryRow",
    "__version__",
    "apply_lr_multipliers",
    "check_optimizer",
    "dann_ramp",
    "effective_multipliers",
    "find_lr",
    "gradient_cuts",
    "gradual_unfreeze",
    "insert_gradient_scales",
    "layerwise_decay",
    "layerwise_decay_multipliers",
    "linear_warmup",
    "multi_optimizer",
    "plot_multipliers",
    "scale_gradient",
    "strip_gradient_scales",
    "summary",
]
