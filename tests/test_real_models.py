"""Today's real Keras models: keras-hub backbones and tasks, keras.applications.

Every model is built from its constructor with tiny dimensions and no weights
(nothing is downloaded). Runs on TensorFlow, JAX and torch: outputs of a
rewritten model are bit-identical to the original's, the original is left
alone, and each variable's measured gradient ratio (rewritten / original)
equals what `effective_multipliers` reports.
"""

import math

import keras
import keras_hub
import numpy as np
import pytest
from _backend import forward, relative_error, weight_gradients

import stopgrad_lr

RNG = np.random.default_rng(0)


def bert_backbone(num_layers=2):
    return keras_hub.models.BertBackbone(
        vocabulary_size=100,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
    )


def bert_inputs(batch=3, length=8):
    padding = np.ones((batch, length), "int32")
    padding[0, 5:] = 0
    return {
        "token_ids": RNG.integers(1, 100, (batch, length)).astype("int32"),
        "segment_ids": np.zeros((batch, length), "int32"),
        "padding_mask": padding,
    }


def gemma_backbone():
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=100,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )


def gemma_inputs(batch=3, length=8):
    return {
        "token_ids": RNG.integers(1, 100, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }


def bert_classifier():
    return keras_hub.models.BertTextClassifier(
        backbone=bert_backbone(), num_classes=2, preprocessor=None
    )


def images(size, batch=2):
    return RNG.standard_normal((batch, size, size, 3)).astype("float32")


def convnext_tiny():
    return keras.applications.ConvNeXtTiny(
        weights=None, input_shape=(32, 32, 3), classes=3
    )


def mobilenet_v3_small():
    return keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), classes=3
    )


# name -> (builder, inputs, scales at two nested cuts)
MODELS = {
    "bert_backbone": (
        bert_backbone,
        bert_inputs,
        {"embeddings_layer_norm": 0.1, "transformer_layer_0": 0.5},
    ),
    "gemma_backbone": (
        gemma_backbone,
        gemma_inputs,
        {"token_embedding": 0.1, "decoder_block_0": 0.5},
    ),
    "convnext_tiny": (
        convnext_tiny,
        lambda: images(32),
        {
            "convnext_tiny_downsampling_block_0": 0.1,
            "convnext_tiny_downsampling_block_2": 0.5,
        },
    ),
    "mobilenet_v3_small": (
        mobilenet_v3_small,
        lambda: images(32),
        {"expanded_conv_2_add": 0.1, "expanded_conv_7_add": 0.5},
    ),
}


def layer_variables(model, path):
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer.trainable_variables


def assert_gradients_match_the_analysis(original, rewritten, data):
    before = weight_gradients(original, data)
    after = weight_gradients(rewritten, data)
    reported = stopgrad_lr.effective_multipliers(rewritten)
    checked = 0
    for path, multiplier in reported.items():
        if math.isnan(multiplier):
            continue
        for variable in layer_variables(rewritten, path):
            error = relative_error(
                after[id(variable)], multiplier * before[id(variable)]
            )
            assert error <= 1e-5, f"{path}/{variable.name}: {error:.2e}"
            checked += 1
    assert checked >= len(original.trainable_variables) // 2
    return reported


@pytest.mark.parametrize("name", list(MODELS))
def test_rewrite_is_exact_and_measured_gradients_match(name):
    build, make_inputs, scales = MODELS[name]
    model, data = build(), make_inputs()
    expected = forward(model, data, False)
    weights = [np.array(w) for w in model.get_weights()]
    rewritten = stopgrad_lr.insert_gradient_scales(model, scales)

    got = forward(rewritten, data, False)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(forward(model, data, False), expected, strict=True)
    )
    assert all(
        np.array_equal(a, b) for a, b in zip(model.get_weights(), weights, strict=True)
    )
    assert not any(
        isinstance(layer, stopgrad_lr.GradientScale) for layer in model.layers
    )
    assert rewritten.output_names == model.output_names

    reported = assert_gradients_match_the_analysis(model, rewritten, data)
    values = set(reported.values())
    assert {0.05, 0.5, 1.0} <= values

    rows = stopgrad_lr.summary(rewritten, print_fn=None)
    paths = {row.layer for row in rows}
    assert set(reported) <= paths
    assert sum(row.trainable_params for row in rows) == sum(
        math.prod(v.shape) for v in rewritten.trainable_variables
    )
