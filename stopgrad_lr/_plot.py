"""A chart of the effective learning-rate multiplier of each layer."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import keras

from stopgrad_lr._analysis import SummaryRow, effective_multipliers, summary
from stopgrad_lr._layers import SCALE_LAYERS, GradientStop
from stopgrad_lr._patterns import iter_layers

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# The y axis is logarithmic when the nonzero multipliers span at least a
# decade: on a linear axis a 0.01 bar next to a 1.0 bar is invisible.
LOG_SCALE_RATIO = 10.0
# Beyond this many layers every k-th one is labelled, so labels stay legible.
MAX_TICK_LABELS = 120
CLEAN_LABEL = "effective multiplier"
MIXED_LABEL = "mixed paths (nan): range"
ZERO_LABEL = "no gradient (0)"
SCALE_LABEL = "gradient scale"
CUT_LABEL = "cut"


def plot_multipliers(
    model: keras.Model, ax: Axes | None = None, *, mark_cuts: bool = False
) -> Figure:
    """Draws the effective learning-rate multiplier of each trainable layer.

    One bar per layer with weights, in topological order (the
    order of `stopgrad_lr.summary`), as tall as the multiplier that
    `stopgrad_lr.effective_multipliers` reports. The y axis is logarithmic
    when the nonzero multipliers span a decade or more (symmetric-log if one
    is negative, as below a `GradientReversal`); change it afterwards with
    `ax.set_yscale`. A layer whose paths disagree (multiplier `nan`, such as
    a layer before a scale that a residual connection bypasses) is a
    hatched bar spanning the products found; a layer that no gradient
    reaches or a frozen one (multiplier 0, such as one before a
    `GradientStop`, or with `trainable = False`) is a cross on the x axis.
    Each gradient-scale layer is a red vertical line, between the bars of
    the layers before and after it, labelled with its scale.

    Needs matplotlib, which is imported only here.

    Args:
        model: A built functional or Sequential model; nested models are
            expanded.
        ax: The matplotlib axes to draw on. Defaults to new axes in a new
            figure (`matplotlib.pyplot.subplots()`), sized to the number of
            layers.
        mark_cuts: Also draw a dotted vertical line at each cut, a place
            where a gradient scale would give every layer before it one
            clean multiplier (`stopgrad_lr.gradient_cuts`). Defaults to
            False.

    Returns:
        The matplotlib `Figure` that holds the axes.

    Raises:
        ImportError: If matplotlib is not installed.
        ValueError: If `model` is not a built functional or Sequential
            model, or has no layer with weights.

    Examples:
        >>> import keras, stopgrad_lr
        >>> inputs = keras.Input((4,))
        >>> hidden = keras.layers.Dense(8, name="body")(inputs)
        >>> hidden = stopgrad_lr.GradientScale(0.01, name="body_lr")(hidden)
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
        >>> figure = stopgrad_lr.plot_multipliers(model)
        >>> ax = figure.axes[0]
        >>> [float(bar.get_height()) for bar in ax.containers[0]], ax.get_yscale()
        ([0.01, 1.0], 'log')
        >>> figure.savefig("multipliers.png")  # doctest: +SKIP
        >>> import matplotlib.pyplot as plt
        >>> plt.close(figure)
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "stopgrad_lr.plot_multipliers needs matplotlib, which is not "
            "installed. Install it with `pip install matplotlib`, or install "
            "stopgrad_lr with its plot extra: `pip install 'stopgrad-lr[plot]'`."
        ) from error

    # The analysis runs before drawing: a model it refuses leaves no figure.
    chart = _Chart(model)
    if ax is None:
        width = min(max(6.0, 0.15 * len(chart.bars) + 2.0), 24.0)
        _, ax = plt.subplots(figsize=(width, 4.5), layout="constrained")
    chart.draw(ax, mark_cuts)
    ax.set_title(f"Effective learning-rate multipliers of '{model.name}'")
    # An Axes always belongs to a figure; the stubs allow None.
    return cast("Figure", ax.get_figure(root=True))


class _Chart:
    """What to draw: bars, and the positions of scales and cuts between them.

    A position `i - 0.5` lies between bar `i - 1` and bar `i`.
    """

    def __init__(self, model: keras.Model) -> None:
        rows = summary(model, print_fn=None)
        trainable = effective_multipliers(model)
        layers = dict(iter_layers(model))
        self.bars: list[SummaryRow] = []
        self.scales: list[tuple[float, str]] = []
        cuts: set[float] = set()
        for row in rows:
            layer = layers.get(row.layer)
            if row.layer in trainable:
                self.bars.append(row)
            elif isinstance(layer, SCALE_LAYERS):
                text = (
                    "stop"
                    if isinstance(layer, GradientStop)
                    else f"\N{MULTIPLICATION SIGN}{layer.scale:g}"
                )
                self.scales.append((len(self.bars) - 0.5, text))
            if row.is_cut:
                cuts.add(len(self.bars) - 0.5)
        if not self.bars:
            raise ValueError(
                f"Cannot plot the model '{model.name}': it has no layer with "
                f"weights, so no learning rate to show."
            )
        # A cut after the last layer bounds nothing.
        self.cuts = sorted(x for x in cuts if x < len(self.bars) - 0.5)

    def draw(self, ax: Axes, mark_cuts: bool) -> None:
        clean: list[tuple[int, float]] = []
        mixed: list[tuple[int, float, float]] = []
        zero: list[int] = []
        for x, row in enumerate(self.bars):
            value = row.multiplier
            if math.isnan(value):
                mixed.append((x, min(row.multipliers), max(row.multipliers)))
            elif value == 0:
                zero.append(x)
            else:
                clean.append((x, value))
        logarithmic = self._set_yscale(ax)
        if clean:
            xs, heights = zip(*clean, strict=True)
            ax.bar(xs, heights, color="tab:blue", label=CLEAN_LABEL)
        if mixed:
            xs, lows, highs = zip(*mixed, strict=True)
            ax.bar(
                xs,
                [high - low for low, high in zip(lows, highs, strict=True)],
                bottom=lows,
                color="none",
                edgecolor="tab:orange",
                hatch="///",
                label=MIXED_LABEL,
            )
        # In axes coordinates along y: on the axis whatever the scale.
        along_x = ax.get_xaxis_transform()
        if zero:
            ax.plot(
                zero,
                [0.0] * len(zero),
                "x",
                color="black",
                transform=along_x,
                clip_on=False,
                label=ZERO_LABEL,
            )
        if mark_cuts and self.cuts:
            ax.vlines(
                self.cuts,
                0,
                1,
                transform=along_x,
                colors="gray",
                linestyles=":",
                linewidth=0.8,
                label=CUT_LABEL,
            )
        if self.scales:
            positions = [x for x, _ in self.scales]
            ax.vlines(
                positions, 0, 1, transform=along_x, colors="tab:red", label=SCALE_LABEL
            )
            for position, text in self.scales:
                ax.text(
                    position,
                    0.98,
                    text,
                    transform=along_x,
                    rotation=90,
                    ha="right",
                    va="top",
                    fontsize=8,
                    color="tab:red",
                )
        if not logarithmic:
            ax.axhline(0.0, color="black", linewidth=0.8)
        # The base learning rate, for reference.
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        count = len(self.bars)
        step = max(1, math.ceil(count / MAX_TICK_LABELS))
        ticks = list(range(0, count, step))
        ax.set_xticks(
            ticks,
            [self.bars[i].layer for i in ticks],
            rotation=90,
            fontsize=8 if count <= 40 else 6,
        )
        ax.set_xlim(-0.75, count - 0.25)
        ax.set_xlabel("layers with weights, in topological order")
        ax.set_ylabel("learning-rate multiplier")
        # Outside the axes: the bars of a deep model leave no free corner.
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)

    def _set_yscale(self, ax: Axes) -> bool:
        """Sets a log or symmetric-log scale when the values span a decade;
        returns whether the scale is log."""
        values = [v for row in self.bars for v in row.multipliers]
        magnitudes = [abs(v) for v in values if v != 0]
        if not magnitudes:
            return False
        smallest, largest = min(magnitudes), max(magnitudes)
        if largest / smallest < LOG_SCALE_RATIO:
            return False
        if min(values) < 0:
            # Linear only inside +-smallest, where no value lies but 0.
            ax.set_yscale("symlog", linthresh=smallest)
            return False
        ax.set_yscale("log")
        # Bars start at 0, which a log axis cannot show: give the smallest
        # bar a visible height, and room above the largest.
        ax.set_ylim(smallest / 3, max(largest, 1.0) * 3)
        return True
