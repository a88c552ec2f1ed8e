"""The analysis: what the graph reader says each layer's multiplier is,
where the cuts are, and the summary, checked against measured gradients."""

import math

import _models
import keras
import numpy as np
import pytest
from _backend import assert_measured_multipliers, relative_error, weight_gradients

import stopgrad_lr
from stopgrad_lr import effective_multipliers, gradient_cuts, insert_gradient_scales


@pytest.mark.parametrize("name", list(_models.ZOO))
def test_measured_gradients_match_the_analysis(name):
    build, scales = _models.ZOO[name]
    model, data = build()
    rewritten = insert_gradient_scales(model, scales)
    reported = assert_measured_multipliers(model, rewritten, data)
    # At least one layer got a product of two scales (they compound).
    products = {round(a * b, 12) for a in scales.values() for b in scales.values()}
    assert any(round(v, 12) in products for v in reported.values())


def test_resnet50_block_output_is_a_cut_and_the_inner_conv_is_not():
    model, data = _models.resnet50()
    cuts = gradient_cuts(model)
    assert "conv2_block3_out" in cuts and "conv2_block3_2_conv" not in cuts
    before = weight_gradients(model, data)
    upstream = ["conv1_conv", "conv2_block1_1_conv", "conv2_block3_1_conv"]

    def ratios(rewritten):
        after = weight_gradients(rewritten, data)
        result = []
        for name in upstream:
            kernel = model.get_layer(name).kernel
            b, a = before[id(kernel)], after[id(kernel)]
            result.append(float(np.vdot(a, b) / np.vdot(b, b)))
        return result

    at_cut = insert_gradient_scales(model, {"conv2_block3_out": 0.1})
    np.testing.assert_allclose(ratios(at_cut), 0.1, rtol=1e-5)
    inside = insert_gradient_scales(
        model, {"conv2_block3_2_conv": 0.1}, on_bypass="ignore"
    )
    # The skip path carries most of the gradient around the scale.
    measured = ratios(inside)
    assert all(r > 0.5 for r in measured[:2]), measured
    reported = effective_multipliers(inside)
    assert math.isnan(reported["conv1_conv"]) and reported["conv2_block3_1_conv"] == 0.1


def test_gradient_cuts_agree_with_measurement_on_every_layer():
    """For each layer: insert 0.5 after it and measure every upstream layer."""
    model, data = _models.residual_cnn()
    cuts = set(gradient_cuts(model))
    before = weight_gradients(model, data)
    upstream_of = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        rewritten = insert_gradient_scales(model, {layer.name: 0.5}, on_bypass="ignore")
        after = weight_gradients(rewritten, data)
        changed = [
            (v, relative_error(after[id(v)], 0.5 * before[id(v)]))
            for v in model.trainable_variables
            if relative_error(after[id(v)], before[id(v)]) > 1e-6
        ]
        upstream_of[layer.name] = bool(changed)
        clean = bool(changed) and all(error <= 1e-5 for _, error in changed)
        assert clean == (layer.name in cuts), layer.name
    assert {"stem_out", "block1_out", "block2_add", "head"} <= cuts
    assert "block1_conv2" not in cuts and "block2_proj" not in cuts


def test_a_shared_layer_feeding_itself_is_not_a_cut():
    model, _ = _models.shared_layers()
    assert "twice" not in gradient_cuts(model)
    assert "encoder" in gradient_cuts(model)
    with pytest.raises(ValueError, match="feeds another call of the same layer"):
        insert_gradient_scales(model, {"twice": 0.5})


def test_summary_prints_and_returns_rows():
    model, _ = _models.residual_cnn()
    rewritten = insert_gradient_scales(model, {"block1_out": 0.5})
    rewritten = insert_gradient_scales(
        rewritten, {"block1_conv2": 0.1}, on_bypass="ignore"
    )
    lines = []
    rows = stopgrad_lr.summary(rewritten, print_fn=lines.append)
    by_name = {row.layer: row for row in rows}
    assert by_name["stem_conv"].multipliers == (0.05, 0.5)
    assert math.isnan(by_name["stem_conv"].multiplier)
    assert by_name["block1_conv1"].multiplier == 0.05
    assert by_name["head"].is_cut and not by_name["block1_conv2"].is_cut
    assert by_name["stem_conv"].trainable_params == 3 * 3 * 3 * 8 + 8
    stem_line = next(line for line in lines if line.startswith("stem_conv "))
    assert "mixed: 0.05, 0.5" in stem_line and " yes " in stem_line
    assert (
        lines[-1] == f"Total trainable params: {sum(r.trainable_params for r in rows)}"
    )


def test_each_output_of_a_nested_model_is_its_own_path():
    # Found by the property test: output i of a nested model is its inner
    # output i alone, so a scale after one output scales only that branch.
    x = keras.Input((4,))
    sub = keras.Model(
        x,
        [keras.layers.Dense(3, name="a")(x), keras.layers.Dense(3, name="b")(x)],
        name="sub",
    )
    inputs = keras.Input((4,))
    a, b = sub(inputs)
    model = keras.Model(
        inputs,
        [
            keras.layers.Dense(2, name="head_a")(a),
            keras.layers.Dense(2, name="head_b")(b),
        ],
    )
    assert {"head_a", "sub"} <= set(gradient_cuts(model))
    data = np.random.default_rng(0).standard_normal((3, 4)).astype("float32")
    scaled = insert_gradient_scales(model, {"head_a": 0.5})
    reported = assert_measured_multipliers(model, scaled, data)
    assert reported == {"sub/a": 0.5, "sub/b": 1.0, "head_a": 0.5, "head_b": 1.0}
