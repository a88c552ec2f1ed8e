"""plot_multipliers: the chart shows exactly what the analysis reports."""

import math
import sys
from pathlib import Path

import _models
import keras
import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import stopgrad_lr
from stopgrad_lr import (
    GradientReversal,
    GradientScale,
    apply_lr_multipliers,
    effective_multipliers,
    insert_gradient_scales,
    plot_multipliers,
)
from stopgrad_lr._plot import (
    CLEAN_LABEL,
    CUT_LABEL,
    MIXED_LABEL,
    SCALE_LABEL,
    ZERO_LABEL,
)


@pytest.fixture(autouse=True)
def _close_new_figures():
    before = set(plt.get_fignums())
    yield
    for number in set(plt.get_fignums()) - before:
        plt.close(number)


def bars(ax, label):
    """(x, bottom, height) of each bar of the container with `label`."""
    (container,) = [c for c in ax.containers if c.get_label() == label]
    return [
        (round(bar.get_x() + bar.get_width() / 2, 9), bar.get_y(), bar.get_height())
        for bar in container
    ]


def artist(artists, label):
    (found,) = [a for a in artists if a.get_label() == label]
    return found


def tick_labels(ax):
    return [label.get_text() for label in ax.get_xticklabels()]


def test_bar_heights_are_the_multipliers_on_a_log_axis():
    model, _ = _models.residual_cnn()
    tuned = apply_lr_multipliers(model, {"stem_*": 0.01, "block1_*": 0.1})
    expected = effective_multipliers(tuned)
    figure = plot_multipliers(tuned)
    (ax,) = figure.axes
    assert tick_labels(ax) == list(expected)
    assert bars(ax, CLEAN_LABEL) == [
        (x, 0.0, value) for x, value in enumerate(expected.values())
    ]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low < 0.01 and high > 1.0
    assert [c for c in ax.containers if c.get_label() == MIXED_LABEL] == []
    # The two inserted scales, between the groups, labelled with their value.
    lines = artist(ax.collections, SCALE_LABEL)
    assert [segment[0][0] for segment in lines.get_segments()] == [1.5, 3.5]
    assert [text.get_text() for text in ax.texts] == ["\N{MULTIPLICATION SIGN}0.1"] * 2
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert sorted(legend) == sorted([CLEAN_LABEL, SCALE_LABEL])


def test_a_linear_axis_within_a_decade():
    model, _ = _models.sequential_mlp()
    figure = plot_multipliers(insert_gradient_scales(model, {"block1": 0.5}))
    ax = figure.axes[0]
    assert ax.get_yscale() == "linear"
    assert [height for _, _, height in bars(ax, CLEAN_LABEL)] == [0.5, 1.0, 1.0]


def test_mixed_paths_are_hatched_ranges():
    model, _ = _models.residual_cnn()
    with pytest.warns(UserWarning, match="bypassed"):
        scaled = insert_gradient_scales(model, {"block1_conv1": 0.1}, on_bypass="warn")
    multipliers = effective_multipliers(scaled)
    ax = plot_multipliers(scaled).axes[0]
    mixed = [x for x, value in enumerate(multipliers.values()) if math.isnan(value)]
    assert mixed == [0, 1]  # stem_conv, stem_bn
    assert bars(ax, MIXED_LABEL) == [(0, 0.1, 0.9), (1, 0.1, 0.9)]
    clean = bars(ax, CLEAN_LABEL)
    assert [x for x, _, _ in clean] == list(range(2, len(multipliers)))
    assert [height for _, _, height in clean] == list(multipliers.values())[2:]
    (container,) = [c for c in ax.containers if c.get_label() == MIXED_LABEL]
    assert all(bar.get_hatch() == "///" for bar in container)
    assert MIXED_LABEL in [text.get_text() for text in ax.get_legend().get_texts()]


def test_a_stopped_layer_is_a_cross_on_the_axis():
    model, _ = _models.sequential_mlp()
    frozen = insert_gradient_scales(model, {"block1": 0.0})
    ax = plot_multipliers(frozen).axes[0]
    crosses = artist(ax.lines, ZERO_LABEL)
    assert list(crosses.get_xdata()) == [0]
    assert [x for x, _, _ in bars(ax, CLEAN_LABEL)] == [1, 2]
    assert [text.get_text() for text in ax.texts] == ["stop"]


def test_a_layer_frozen_by_hand_is_a_cross_too():
    model, _ = _models.sequential_mlp()
    model.get_layer("block2").trainable = False
    ax = plot_multipliers(model).axes[0]
    assert list(artist(ax.lines, ZERO_LABEL).get_xdata()) == [1]
    assert [x for x, _, _ in bars(ax, CLEAN_LABEL)] == [0, 2]


def test_a_reversed_gradient_spanning_decades_is_symlog():
    inputs = keras.Input((4,))
    features = keras.layers.Dense(8, name="features")(inputs)
    reversed_features = GradientReversal(0.05, name="reversal")(features)
    model = keras.Model(inputs, keras.layers.Dense(2, name="domain")(reversed_features))
    ax = plot_multipliers(model).axes[0]
    assert ax.get_yscale() == "symlog"
    assert bars(ax, CLEAN_LABEL) == [(0, 0.0, -0.05), (1, 0.0, 1.0)]


def test_cuts_are_marked_on_request():
    model, _ = _models.sequential_mlp()
    scaled = insert_gradient_scales(model, {"block1": 0.1})
    ax = plot_multipliers(scaled, mark_cuts=True).axes[0]
    # block1 and block2 are cuts; the head's cut, after the last bar, is not shown.
    cuts = artist(ax.collections, CUT_LABEL)
    assert [segment[0][0] for segment in cuts.get_segments()] == [0.5, 1.5]
    assert [c.get_label() for c in plot_multipliers(scaled).axes[0].collections] == [
        SCALE_LABEL
    ]


def test_draws_on_given_axes_with_nested_paths():
    model, _ = _models.functional_in_sequential()
    figure, (left, right) = plt.subplots(1, 2)
    assert plot_multipliers(model, right) is figure
    assert not left.containers
    assert tick_labels(right) == ["backbone/inner_dense", "backbone/inner_out", "head"]


def test_errors_leave_no_figure(monkeypatch):
    model, _ = _models.sequential_mlp()
    weightless = keras.Sequential([keras.Input((3,)), keras.layers.ReLU()])
    before = plt.get_fignums()
    with pytest.raises(ValueError, match="has no layer with weights"):
        plot_multipliers(weightless)
    with pytest.raises(ValueError, match=r"Expected a built keras\.Model"):
        plot_multipliers(GradientScale(0.1))
    assert plt.get_fignums() == before

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'stopgrad-lr\[plot\]'"):
        stopgrad_lr.plot_multipliers(model)


def test_the_docs_figure_script_writes_a_png(tmp_path, monkeypatch, capsys):
    # benchmarks/ is a folder of scripts, not a package.
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    import plot_multipliers_figure

    output = tmp_path / "images" / "multipliers.png"
    assert plot_multipliers_figure.main(output) == 0
    assert output.read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out == f"Wrote {output}\n"
    assert sorted(p.name for p in output.parent.iterdir()) == ["multipliers.png"]
