"""stopgrad_lr: per-block learning rates for Keras by scaling gradients in the graph.

The public names are imported on first use, so that `import stopgrad_lr` (and
the `stopgrad-lr` command's `--help`) does not import Keras and its backend.
The layers must still be registered with Keras before a `.keras` file that
holds them is loaded: every module of the package is imported as soon as Keras
is, whether Keras was imported before or after this package.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import importlib.machinery
    from collections.abc import Sequence
    from types import ModuleType

    from stopgrad_lr._analysis import (
        SummaryRow,
        effective_multipliers,
        gradient_cuts,
        summary,
    )
    from stopgrad_lr._callbacks import ScaleSchedule
    from stopgrad_lr._check import (
        OptimizerCheck,
        OptimizerGroup,
        OptimizerMismatchWarning,
        OptimizerReport,
        check_optimizer,
    )
    from stopgrad_lr._layers import (
        GradientReversal,
        GradientScale,
        GradientStop,
        ParameterScale,
    )
    from stopgrad_lr._lr_finder import LRFinder, find_lr
    from stopgrad_lr._multi_optimizer import MultipliedSchedule, multi_optimizer
    from stopgrad_lr._ops import scale_gradient
    from stopgrad_lr._per_variable import variable_multipliers
    from stopgrad_lr._plot import plot_multipliers
    from stopgrad_lr._rewrite import (
        apply_lr_multipliers,
        insert_gradient_scales,
        layerwise_decay,
        layerwise_decay_multipliers,
        strip_gradient_scales,
    )
    from stopgrad_lr._schedules import dann_ramp, gradual_unfreeze, linear_warmup

__version__ = "0.1.0"

# Each public name and the private module that defines it.
_MODULES = {
    "stopgrad_lr._analysis": (
        "SummaryRow",
        "effective_multipliers",
        "gradient_cuts",
        "summary",
    ),
    "stopgrad_lr._callbacks": ("ScaleSchedule",),
    "stopgrad_lr._check": (
        "OptimizerCheck",
        "OptimizerGroup",
        "OptimizerMismatchWarning",
        "OptimizerReport",
        "check_optimizer",
    ),
    "stopgrad_lr._layers": (
        "GradientReversal",
        "GradientScale",
        "GradientStop",
        "ParameterScale",
    ),
    "stopgrad_lr._lr_finder": ("LRFinder", "find_lr"),
    "stopgrad_lr._multi_optimizer": ("MultipliedSchedule", "multi_optimizer"),
    "stopgrad_lr._ops": ("scale_gradient",),
    "stopgrad_lr._per_variable": ("variable_multipliers",),
    "stopgrad_lr._plot": ("plot_multipliers",),
    "stopgrad_lr._rewrite": (
        "apply_lr_multipliers",
        "insert_gradient_scales",
        "layerwise_decay",
        "layerwise_decay_multipliers",
        "strip_gradient_scales",
    ),
    "stopgrad_lr._schedules": ("dann_ramp", "gradual_unfreeze", "linear_warmup"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "GradientReversal",
    "GradientScale",
    "GradientStop",
    "LRFinder",
    "MultipliedSchedule",
    "OptimizerCheck",
    "OptimizerGroup",
    "OptimizerMismatchWarning",
    "OptimizerReport",
    "ParameterScale",
    "ScaleSchedule",
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
    "variable_multipliers",
]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def _import_all() -> None:
    """Imports every module, which registers the layers with Keras."""
    for module in _MODULES:
        importlib.import_module(module)


class _ImportAllAfterKeras:
    """Runs `_import_all` right after `import keras` has finished.

    A `sys.meta_path` finder (by duck typing: `importlib.abc` costs 20 ms of
    start-up) that finds nothing itself: it asks the other finders for
    Keras's spec, wraps the loader's `exec_module`, and leaves the path.
    """

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "keras":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _import_all()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "keras" in sys.modules:
    _import_all()
else:
    sys.meta_path.insert(0, _ImportAllAfterKeras())
