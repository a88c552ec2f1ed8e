"""`check_optimizer` on a MultiOptimizer: its groups, printable, and a
report that reads the groups of one built by hand."""

import math
import warnings

import keras

import stopgrad_lr
from stopgrad_lr import GradientScale, OptimizerGroup, check_optimizer, multi_optimizer


def mlp(scale=None):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, name="backbone")(inputs)
    if scale is not None:
        hidden = GradientScale(scale, name="backbone_scale")(hidden)
    hidden = keras.layers.LayerNormalization(name="norm")(hidden)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))


def test_the_groups_of_multi_optimizer_say_which_variable_went_where():
    model = mlp()
    optimizer = multi_optimizer(
        model,
        {"backbone": 0.1, "head/bias": 2.0},
        keras.optimizers.AdamW(1e-3, weight_decay=0.05),
        weight_decay_multipliers={"@norm": 0.0},
    )
    report = check_optimizer(optimizer, model)
    assert report.ok
    groups = {group.name: group for group in report.groups}
    assert groups == {
        "adam_w_x0.1": OptimizerGroup(
            "adam_w_x0.1",
            "AdamW",
            0.1,
            1e-4,
            0.05,
            ("backbone/kernel", "backbone/bias"),
        ),
        "adam_w_wd0": OptimizerGroup(
            "adam_w_wd0", "AdamW", 1.0, 1e-3, 0.0, ("norm/gamma", "norm/beta")
        ),
        "adam_w_x2": OptimizerGroup(
            "adam_w_x2", "AdamW", 2.0, 2e-3, 0.05, ("head/bias",)
        ),
        "adam_w": OptimizerGroup(
            "adam_w", "AdamW", 1.0, 1e-3, 0.05, ("head/kernel",), default=True
        ),
    }
    # Every trainable variable is in exactly one group.
    listed = [path for group in report.groups for path in group.variables]
    assert sorted(listed) == sorted(v.path for v in model.trainable_variables)
    text = str(report).splitlines()
    assert text[0] == (
        "MultiOptimizer gives the layers the learning-rate multipliers that the "
        "model's stopgrad_lr layers imply."
    )
    assert text[1].startswith("Groups (multiplier:")
    assert (
        "- 'adam_w_x0.1' (AdamW): multiplier 0.1, learning rate 0.0001, weight "
        "decay 0.05: backbone/kernel, backbone/bias"
    ) in text
    assert (
        "- 'adam_w' (AdamW, the default group): multiplier 1, learning rate "
        "0.001, weight decay 0.05: head/kernel"
    ) in text


def test_another_optimizer_has_no_groups():
    report = check_optimizer(keras.optimizers.SGD(), mlp())
    assert report.groups == []
    assert "Groups" not in str(report)


def test_a_multi_optimizer_built_by_hand_with_an_optimizer_map():
    model = mlp(scale=0.5)
    optimizer = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(
            keras.optimizers.SGD(0.1), {"head/.*": keras.optimizers.Adam(1e-3)}
        )
    )
    report = check_optimizer(optimizer, model)
    # The scaled backbone is SGD's: a gradient scale is its multiplier.
    assert report.ok, report
    (adam, sgd) = report.groups
    assert (adam.optimizer, adam.variables) == ("Adam", ("head/kernel", "head/bias"))
    assert math.isnan(adam.multiplier)  # another class: not a multiplier
    assert sgd.default and sgd.variables == (
        "backbone/kernel",
        "backbone/bias",
        "norm/gamma",
        "norm/beta",
    )


def test_a_multi_optimizer_that_selects_with_a_function():
    model = mlp(scale=0.5)

    def select(variable):
        return adam if variable.path.startswith("backbone") else sgd

    adam, sgd = keras.optimizers.Adam(), keras.optimizers.SGD()
    optimizer = keras.optimizers.MultiOptimizer(select)
    report = check_optimizer(optimizer, model)
    assert not report.ok
    (problem,) = report.problems
    assert "not in stopgrad_lr's optimizer table" not in problem
    assert "chooses each variable's optimizer with a function" in problem
    assert "optimizer.build(model.trainable_variables)" in problem

    # Built, its groups are known: an Adam group may cancel the scale.
    optimizer.build(model.trainable_variables)
    report = check_optimizer(optimizer, model)
    (problem,) = report.problems
    assert problem.startswith("Adam (in the MultiOptimizer, group 'adam')")
    assert "cancels a constant gradient scale" in problem
    assert "not in stopgrad_lr's optimizer table" not in str(report)
    assert report.groups == []  # which variable goes where, only the function knows


def test_the_mismatch_warning_lists_problems_not_groups():
    model = mlp(scale=0.5)
    optimizer = multi_optimizer(model, {"head": 0.5}, keras.optimizers.Adam())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile(optimizer=optimizer, loss="mse")
        callback = stopgrad_lr.OptimizerCheck()
        callback.set_model(model)
        callback.on_train_begin()
    (warning,) = [
        w for w in caught if w.category is stopgrad_lr.OptimizerMismatchWarning
    ]
    assert "cancels a constant gradient scale" in str(warning.message)
    assert "Groups" not in str(warning.message)
    assert "Groups" in str(check_optimizer(optimizer, model))
