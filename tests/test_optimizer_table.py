"""The optimizer table's verdicts, measured live for a representative subset.

`benchmarks/` is a folder of scripts, not a package: this module puts it on
`sys.path` and imports `benchmarks/optimizer_table.py` as `optimizer_table`.
"""

import math
import sys
from pathlib import Path

import keras
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import optimizer_table

CASES = {case.label: case for case in optimizer_table.optimizer_cases()}
GRADIENT_SCALE = {"gradient_scale": optimizer_table.gradient_scale_mechanism}


def measure(label):
    return optimizer_table.measure(CASES[label], GRADIENT_SCALE)


@pytest.mark.parametrize(
    "label", ["SGD", "SGD(momentum=0.9)", "LossScaleOptimizer(SGD)"]
)
def test_sgd_like_optimizers_are_exact(label):
    comparison = measure(label).comparisons["gradient_scale"]
    assert comparison.verdict == "exact", comparison
    assert abs(comparison.update_ratio - 1.0) <= 1e-5


def test_adam_cancels_the_scale():
    row = measure("Adam")
    comparison = row.comparisons["gradient_scale"]
    assert comparison.verdict == "wrong"
    # Adam normalises the gradient: block1 moves about 1/m times as far as
    # with the learning rate lr * m.
    assert comparison.update_ratio > 0.5 / optimizer_table.MULTIPLIER
    assert math.isfinite(row.reference_loss)


def test_adagrad_is_not_exact():
    comparison = measure("Adagrad").comparisons["gradient_scale"]
    assert comparison.verdict in ("approximate", "wrong")
    assert abs(comparison.update_ratio - 1.0) > 1e-3


def test_weight_decay_is_not_scaled():
    comparison = measure("SGD(weight_decay=0.01)").comparisons["gradient_scale"]
    assert comparison.verdict == "wrong"
    # The unscaled decay moves block1 further than the reference.
    assert comparison.update_ratio > 1.15


def test_every_stock_optimizer_has_a_row():
    classes = {case.optimizer_class for case in CASES.values()}
    for name in dir(keras.optimizers):
        value = getattr(keras.optimizers, name)
        if (
            isinstance(value, type)
            and issubclass(value, keras.optimizers.Optimizer)
            and value is not keras.optimizers.Optimizer
            and name not in optimizer_table.WRAPPERS
        ):
            assert value in classes, name
    assert any(case.loss_scale for case in CASES.values())


@pytest.mark.parametrize(
    ("numbers", "verdict"),
    [
        ((1.0, 0.0, 0.0), "exact"),
        ((1.0 + 5e-6, 1e-5, 1e-5), "exact"),
        ((1.0 + 2e-5, 0.0, 0.0), "approximate"),
        ((1.0, 2e-5, 0.0), "approximate"),
        ((0.86, 0.15, 0.15), "approximate"),
        ((1.2, 0.0, 0.0), "wrong"),
        ((1.0, 0.0, 0.2), "wrong"),
        ((math.nan, 0.0, 0.0), "wrong"),
        ((1.0, math.inf, 0.0), "wrong"),
    ],
)
def test_classify(numbers, verdict):
    assert optimizer_table.classify(*numbers) == verdict


def test_main_writes_the_page(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(optimizer_table, "optimizer_cases", lambda: [CASES["SGD"]])
    output = tmp_path / "docs" / "optimizers.md"
    assert optimizer_table.main(["--output", str(output)]) == 0
    page = output.read_text(encoding="utf-8")
    assert optimizer_table.COMMAND in page
    assert "Measured on " in page
    assert "| `SGD` |" in page and "**exact**" in page
    assert [path.name for path in output.parent.iterdir()] == ["optimizers.md"]
    assert "| `SGD` |" in capsys.readouterr().out
