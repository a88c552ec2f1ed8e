"""What each optimizer does with the multipliers: the table, the check, the
warning at `fit`, and the `MultiOptimizer` fallback.

The training runs reuse `benchmarks/optimizer_table.py` (its MLP, data and
`keras.optimizers.MultiOptimizer` reference), which `benchmarks/` keeps on
`sys.path` as a folder of scripts.
"""

import re
import sys
import warnings
from pathlib import Path

import _models
import keras
import numpy as np
import pytest

from stopgrad_lr import (
    GradientReversal,
    GradientScale,
    OptimizerMismatchWarning,
    ScaledSchedule,
    apply_lr_multipliers,
    check_optimizer,
    multi_optimizer,
)
from stopgrad_lr._optimizers import OPTIMIZER_TABLE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import optimizer_table

CASES = {case.label: case for case in optimizer_table.optimizer_cases()}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "optimizers.md"
OPT = keras.optimizers


def auto_mechanism(model_builder, optimizer_factory, m):
    """The public API end to end: `apply_lr_multipliers(..., optimizer=...)`."""
    optimizer = optimizer_factory(1.0)
    model = apply_lr_multipliers(
        model_builder(None), {optimizer_table.BLOCK: m}, optimizer=optimizer
    )
    assert any(isinstance(layer, GradientScale) for layer in model.layers)
    return optimizer_table.train(model, optimizer)


@pytest.mark.parametrize(
    "label",
    [
        "SGD",
        "SGD(momentum=0.9)",
        "SGD(momentum=0.9, nesterov=True)",
        "LossScaleOptimizer(SGD)",
    ],
)
def test_gradient_scales_are_exact_for_sgd_like_optimizers(label):
    row = optimizer_table.measure(CASES[label], {"auto": auto_mechanism})
    comparison = row.comparisons["auto"]
    assert comparison.verdict == "exact", comparison
    assert abs(comparison.update_ratio - 1.0) <= 1e-5


def test_the_c_rule_reparametrisation_with_c_m_gives_sgd_m_squared():
    comparison = optimizer_table.measure(
        CASES["SGD"],
        {"c = m": optimizer_table.reparametrize_m_mechanism},
    ).comparisons["c = m"]
    # SGD moves the true weights c**2 = m**2 times as far: ratio m.
    assert comparison.update_ratio == pytest.approx(
        optimizer_table.MULTIPLIER, rel=0.05
    )


# The table and the page ------------------------------------------------------------


def test_every_stock_optimizer_is_in_the_table():
    for name in dir(OPT):
        value = getattr(OPT, name)
        if (
            isinstance(value, type)
            and issubclass(value, OPT.Optimizer)
            and value is not OPT.Optimizer
            and name not in optimizer_table.WRAPPERS
        ):
            assert value in OPTIMIZER_TABLE, name


def guide_rows():
    """`{label: use cell}` from the page's 'Which mechanism to use' table."""
    text = DOCS.read_text("utf-8")
    section = text.split("## Which mechanism to use", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_the_page_recommends_what_the_code_recommends_and_the_measurement_agrees():
    rows = guide_rows()
    assert set(rows) == set(CASES), "regenerate docs/optimizers.md"
    for label, cell in rows.items():
        chosen = optimizer_table.recommendation(CASES[label])
        title = optimizer_table.TITLES.get(chosen)
        assert cell == (f"**{title}**" if title else f"`{chosen}`"), label


@pytest.mark.parametrize(
    ("optimizer", "recommended"),
    [
        (OPT.SGD(0.1, momentum=0.9, nesterov=True), "gradient_scale"),
        (OPT.LossScaleOptimizer(OPT.SGD()), "gradient_scale"),
        (OPT.Adam(), "reparametrize"),
        (OPT.Lion(), "reparametrize"),
        (OPT.Muon(weight_decay=0.0), "reparametrize"),
        (OPT.LossScaleOptimizer(OPT.Adam()), "reparametrize"),
        (OPT.RMSprop(), "multi_optimizer"),  # epsilon under the root: 3e-4
        (OPT.RMSprop(epsilon=1e-12), "reparametrize"),
        (OPT.Adam(epsilon=1.0), "multi_optimizer"),
        (OPT.AdamW(), "multi_optimizer"),  # weight_decay=0.004
        (OPT.Adafactor(), "multi_optimizer"),
        (OPT.SGD(clipnorm=1.0), "multi_optimizer"),
    ],
)
def test_recommendations(optimizer, recommended):
    assert check_optimizer(optimizer).recommended == recommended


# check_optimizer ----------------------------------------------------------------


def scaled_mlp(**dense):
    model, _ = _models.sequential_mlp()
    if dense:
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(8, name="block1", **dense)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    return apply_lr_multipliers(model, {"block1": 0.1})


def test_check_optimizer_reports_what_breaks_and_the_fix():
    model = scaled_mlp()
    assert check_optimizer(OPT.SGD(0.1, momentum=0.9), model).ok
    assert check_optimizer(OPT.LossScaleOptimizer(OPT.SGD()), model).ok
    report = check_optimizer(OPT.Adam(), model)
    assert not report.ok and report.optimizer == "Adam"
    (problem,) = report.problems
    assert "cancels a constant gradient scale" in problem
    assert "'block1' (multiplier 0.1)" in problem
    assert "multi_optimizer" in problem and "apply_lr_multipliers" in problem
    assert str(report).startswith("Adam does not give the layers")
    assert str(check_optimizer(OPT.SGD(), model)).startswith("SGD gives the layers")


@pytest.mark.parametrize(
    ("optimizer", "words"),
    [
        (OPT.SGD(weight_decay=0.01), "weight_decay=0.01 shrinks"),
        (OPT.SGD(clipnorm=1.0), "clipnorm=1 clips the norm"),
        (OPT.SGD(clipvalue=0.5), "clipvalue=0.5 clips each element"),
        (OPT.SGD(global_clipnorm=1.0), "global_clipnorm=1 clips by a global norm"),
        (OPT.Adafactor(), "neither a gradient scale nor a reparametrisation"),
        (OPT.Adam(epsilon=1.0), "between SGD's and Adam's"),
    ],
)
def test_settings_and_optimizers_that_break_the_multipliers(optimizer, words):
    report = check_optimizer(optimizer, scaled_mlp())
    assert not report.ok
    assert any(words in problem for problem in report.problems), report.problems


def test_a_regularizer_on_a_gradient_scaled_layer_is_a_problem():
    model = scaled_mlp(kernel_regularizer=keras.regularizers.L2(0.01))
    (problem,) = check_optimizer(OPT.SGD(), model).problems
    assert "'block1' (kernel_regularizer)" in problem
    assert "mechanism='reparametrize'" in problem


def test_reparametrisations_are_checked_against_the_optimizer_kind():
    model, _ = _models.sequential_mlp()
    for_adam = apply_lr_multipliers(model, {"block1": 0.1}, optimizer=OPT.Adam())
    assert check_optimizer(OPT.Adam(), for_adam).ok
    assert check_optimizer(OPT.Lion(), for_adam).ok
    (problem,) = check_optimizer(OPT.SGD(), for_adam).problems
    assert "'block1' (c = 0.1: multiplier 0.01 instead of 0.1)" in problem
    assert "Adam-like optimizers (c = m)" in problem
    (problem,) = check_optimizer(OPT.Adafactor(), for_adam).problems
    assert "no output scale is a multiplier" in problem
    for_sgd = apply_lr_multipliers(
        model, {"block1": 0.25}, optimizer=OPT.SGD(), mechanism="reparametrize"
    )
    (problem,) = check_optimizer(OPT.Adam(), for_sgd).problems
    assert "(c = 0.5: multiplier 0.5 instead of 0.25)" in problem


def test_stops_and_mixed_paths_are_fine_with_any_optimizer():
    model, _ = _models.residual_cnn()
    frozen = apply_lr_multipliers(model, {"stem_*": 0.0})
    assert check_optimizer(OPT.AdamW(), frozen).ok  # no gradient, no decay
    # A reversal on one branch weighs two gradient paths: Adam keeps that.
    inputs = keras.Input((4,))
    features = keras.layers.Dense(4, name="features")(inputs)
    domain = keras.layers.Dense(1, name="domain")(GradientReversal(0.3)(features))
    label = keras.layers.Dense(1, name="label")(features)
    assert check_optimizer(OPT.Adam(), keras.Model(inputs, [label, domain])).ok


def test_a_multi_optimizer_is_checked_per_layer():
    model = scaled_mlp()
    sgd_for_block1 = OPT.MultiOptimizer(
        OPT.OptimizerMap(OPT.Adam(), {".*block1/.*": OPT.SGD(0.1)})
    )
    assert check_optimizer(sgd_for_block1, model).ok
    adam_for_block1 = OPT.MultiOptimizer(
        OPT.OptimizerMap(OPT.SGD(), {".*block1/.*": OPT.Adam()})
    )
    (problem,) = check_optimizer(adam_for_block1, model).problems
    assert problem.startswith("Adam (in the MultiOptimizer, group ")


def test_check_optimizer_rejects_what_is_not_an_optimizer():
    with pytest.raises(ValueError, match=r"Expected a keras\.optimizers\.Optimizer"):
        check_optimizer("adam")


# The warning at fit ---------------------------------------------------------------


def fit_and_record(model, optimizer, epochs=2, **compile_kwargs):
    """Fits two epochs of three steps; returns the OptimizerMismatchWarnings."""
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    x = np.random.default_rng(0).standard_normal((12, 6)).astype("float32")
    y = np.zeros((12, 3), "float32")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=4, epochs=epochs, verbose=0)
    return [r for r in records if r.category is OptimizerMismatchWarning]


def test_fit_with_adam_warns_once_naming_the_problem_and_the_fix():
    (record,) = fit_and_record(scaled_mlp(), OPT.Adam())
    message = str(record.message)
    assert "Adam divides the gradient by a running estimate" in message
    assert "'block1' (multiplier 0.1)" in message
    assert "apply_lr_multipliers" in message and "multi_optimizer" in message


@pytest.mark.parametrize(
    "optimizer",
    [
        OPT.SGD(0.01),
        OPT.SGD(0.01, momentum=0.9),
        OPT.SGD(0.01, momentum=0.9, nesterov=True),
        OPT.LossScaleOptimizer(OPT.SGD(0.01)),
    ],
    ids=["sgd", "momentum", "nesterov", "loss_scale"],
)
def test_fit_with_an_exact_optimizer_does_not_warn(optimizer):
    assert not fit_and_record(scaled_mlp(), optimizer, run_eagerly=True)


def test_the_warning_survives_save_and_load(tmp_path):
    model = scaled_mlp()
    path = tmp_path / "scaled.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert len(fit_and_record(loaded, OPT.Nadam(), run_eagerly=True)) == 1


def test_hand_inserted_nested_and_reparametrised_models_are_checked():
    # A GradientScale put in by hand, inside a model nested in another.
    inner_inputs = keras.Input((6,))
    hidden = GradientScale(0.1)(keras.layers.Dense(8, name="body")(inner_inputs))
    backbone = keras.Model(inner_inputs, hidden, name="backbone")
    inputs = keras.Input((6,))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="head")(backbone(inputs)))
    (record,) = fit_and_record(outer, OPT.RMSprop(), run_eagerly=True)
    assert "'backbone/body' (multiplier 0.1)" in str(record.message)
    # Reparametrised for Adam, trained with SGD: the multiplier would be m**2.
    model, _ = _models.sequential_mlp()
    for_adam = apply_lr_multipliers(model, {"block1": 0.1}, optimizer=OPT.Adam())
    (record,) = fit_and_record(for_adam, OPT.SGD(), run_eagerly=True)
    assert "multiplier 0.01 instead of 0.1" in str(record.message)
    assert not fit_and_record(for_adam, OPT.Adam(), run_eagerly=True)


def test_apply_lr_multipliers_chooses_the_mechanism_from_the_optimizer():
    model, _ = _models.sequential_mlp()

    def kinds(tuned):
        return {type(layer).__name__ for layer in tuned.layers} & {
            "GradientScale",
            "ParameterScale",
        }

    assert kinds(apply_lr_multipliers(model, {"block1": 0.1})) == {"GradientScale"}
    assert kinds(apply_lr_multipliers(model, {"block1": 0.1}, optimizer=OPT.SGD())) == {
        "GradientScale"
    }
    assert kinds(
        apply_lr_multipliers(model, {"block1": 0.1}, optimizer=OPT.Adam())
    ) == {"ParameterScale"}
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, kernel_regularizer="l2", name="block1")(inputs)
    with_l2 = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    # A gradient scale would miss the regularizer's gradient.
    assert kinds(
        apply_lr_multipliers(with_l2, {"block1": 0.1}, optimizer=OPT.SGD())
    ) == {"ParameterScale"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": OPT.Adafactor()}, r"found no mechanism.*multi_optimizer"),
        ({"optimizer": OPT.AdamW()}, r"weight_decay=0\.004 shrinks"),
        ({"mechanism": "reparametrize"}, r"Received: optimizer=None"),
        (
            {"mechanism": "reparametrize", "optimizer": OPT.Lamb()},
            r"Cannot reparametrise for Lamb",
        ),
        ({"mechanism": "fast"}, r"argument `mechanism`.*Received: mechanism='fast'"),
        ({"optimizer": "adam"}, r"argument `optimizer`"),
        (
            {"optimizer": OPT.MultiOptimizer(OPT.OptimizerMap(OPT.SGD()))},
            r"not a MultiOptimizer",
        ),
    ],
)
def test_apply_lr_multipliers_errors(kwargs, message):
    model, _ = _models.sequential_mlp()
    with pytest.raises(ValueError, match=message):
        apply_lr_multipliers(model, {"block1": 0.1}, **kwargs)


# multi_optimizer ------------------------------------------------------------------


def test_multi_optimizer_gives_each_group_its_learning_rate():
    model, data = _models.residual_cnn()
    base = OPT.Adam(1e-3, beta_1=0.8, clipnorm=2.0)
    optimizer = multi_optimizer(model, {"stem_*": 0.0, "block1_*": 0.1}, base)
    rates = {
        opt.name: round(float(keras.ops.convert_to_numpy(opt.learning_rate)), 9)
        for opt in optimizer.optimizers
    }
    assert rates == {"adam": 1e-3, "adam_x0": 0.0, "adam_x0.1": 1e-4}
    assert all(
        opt.beta_1 == 0.8 and opt.clipnorm == 2.0 for opt in optimizer.optimizers
    )
    # One Adam step moves each weight by about lr: the groups move 0, 0.1, 1.
    before = {v.path: np.array(v.numpy()) for v in model.trainable_variables}
    model.compile(optimizer=optimizer, loss="mse")
    model.train_on_batch(data, np.zeros((len(data), 5), "float32"))
    moved = {
        path: float(np.max(np.abs(variable.numpy() - before[path])))
        for path, variable in ((v.path, v) for v in model.trainable_variables)
    }
    assert moved["stem_conv/kernel"] == 0.0
    assert moved["block1_conv1/kernel"] == pytest.approx(1e-4, rel=1e-3)
    assert moved["head/kernel"] == pytest.approx(1e-3, rel=1e-3)


def test_multi_optimizer_scales_a_schedule_and_keeps_loss_scaling():
    model, _ = _models.sequential_mlp()
    schedule = OPT.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    optimizer = multi_optimizer(
        model, {"block1": 0.5}, OPT.LossScaleOptimizer(OPT.SGD(schedule, momentum=0.9))
    )
    assert isinstance(optimizer, OPT.LossScaleOptimizer)
    groups = optimizer.inner_optimizer.optimizers
    rates = sorted(
        float(keras.ops.convert_to_numpy(opt.learning_rate)) for opt in groups
    )
    assert rates == pytest.approx([0.05, 0.1])
    assert all(opt.momentum == 0.9 for opt in groups)
    assert float(ScaledSchedule(schedule, 0.5)(10)) == pytest.approx(0.025)


def test_a_compiled_model_with_a_multi_optimizer_survives_save_and_load(tmp_path):
    model, data = _models.sequential_mlp()
    schedule = OPT.schedules.CosineDecay(0.05, decay_steps=20)
    model.compile(
        optimizer=multi_optimizer(model, {"block1": 0.1}, OPT.Adam(schedule)),
        loss="mse",
    )
    target = np.ones((len(data), 3), "float32")
    model.train_on_batch(data, target)
    path = tmp_path / "compiled.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, OPT.MultiOptimizer)
    for trained in (model, loaded):
        trained.train_on_batch(data, target)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def constant_rate():
    return 0.1


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("adam", r"argument `base_optimizer`"),
        (OPT.MultiOptimizer(OPT.OptimizerMap(OPT.SGD())), r"not a MultiOptimizer"),
        (OPT.SGD(constant_rate), r"a plain function"),
    ],
)
def test_multi_optimizer_errors(base, message):
    model, _ = _models.sequential_mlp()
    with pytest.raises(ValueError, match=message):
        multi_optimizer(model, {"block1": 0.1}, base)


def test_multi_optimizer_refuses_paths_it_cannot_tell_apart():
    # Two layers named "dense", built on their own: both paths "dense/kernel".
    twins = []
    for name in ("first", "second"):
        dense = keras.layers.Dense(3, name="dense")
        dense.build((None, 3))
        twins.append(keras.Sequential([keras.Input((3,)), dense], name=name))
    inputs = keras.Input((3,))
    model = keras.Model(inputs, twins[1](twins[0](inputs)))
    with pytest.raises(ValueError, match=re.escape("'dense/kernel' (multiplier 1)")):
        multi_optimizer(model, {"first/dense": 0.1}, OPT.SGD())
