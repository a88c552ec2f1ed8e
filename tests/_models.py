"""Small real Keras models of every shape the rewrite must handle.

Each builder returns `(model, inputs)`: a built model and a batch for it;
`bert_backbone` returns the model alone and `bert_inputs` a batch for it.
"""

import keras
import numpy as np

RNG = np.random.default_rng(0)


def _images(size=32, channels=3, batch=2):
    return RNG.standard_normal((batch, size, size, channels)).astype("float32")


def sequential_mlp():
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="block1"),
            keras.layers.Dense(8, activation="tanh", name="block2"),
            keras.layers.Dense(3, name="head"),
        ],
        name="mlp",
    )
    return model, RNG.standard_normal((4, 6)).astype("float32")


def residual_cnn(size=16, stem_bias=True):
    """Two residual blocks, BatchNormalization, a projection shortcut."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=stem_bias, name="stem_conv")(
        inputs
    )
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_out")(x)
    for block, filters in (("block1", 8), ("block2", 12)):
        shortcut = x
        y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{block}_conv1")(x)
        y = keras.layers.ReLU(name=f"{block}_relu")(y)
        y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{block}_conv2")(y)
        if filters != shortcut.shape[-1]:
            shortcut = keras.layers.Conv2D(filters, 1, name=f"{block}_proj")(shortcut)
        x = keras.layers.Add(name=f"{block}_add")([shortcut, y])
        x = keras.layers.ReLU(name=f"{block}_out")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    return keras.Model(inputs, outputs, name="residual_cnn"), _images(size)


def functional_in_sequential():
    inner_in = keras.Input((6,))
    inner_hidden = keras.layers.Dense(8, activation="relu", name="inner_dense")(
        inner_in
    )
    inner = keras.Model(
        inner_in, keras.layers.Dense(8, name="inner_out")(inner_hidden), name="backbone"
    )
    model = keras.Sequential(
        [keras.Input((6,)), inner, keras.layers.Dense(3, name="head")], name="outer"
    )
    return model, RNG.standard_normal((4, 6)).astype("float32")


def sequential_in_functional():
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="inner_dense"),
            keras.layers.Dense(8, name="inner_out"),
        ],
        name="backbone",
    )
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(6, name="pre")(inputs)
    outputs = keras.layers.Dense(3, name="head")(inner(hidden))
    return keras.Model(inputs, outputs, name="outer"), RNG.standard_normal(
        (4, 6)
    ).astype("float32")


def shared_layers():
    """A siamese encoder shared by two inputs, and a layer called twice in a row."""
    left, right = keras.Input((6,), name="left"), keras.Input((6,), name="right")
    encoder = keras.layers.Dense(8, activation="tanh", name="encoder")
    twice = keras.layers.Dense(8, activation="tanh", name="twice")
    merged = keras.layers.Concatenate(name="merge")([encoder(left), encoder(right)])
    hidden = keras.layers.Dense(8, name="mix")(merged)
    outputs = keras.layers.Dense(2, name="head")(twice(twice(hidden)))
    data = [RNG.standard_normal((4, 6)).astype("float32") for _ in range(2)]
    return keras.Model([left, right], outputs, name="siamese"), data


def multi_input_output():
    image, meta = keras.Input((8, 8, 1), name="image"), keras.Input((3,), name="meta")
    x = keras.layers.Conv2D(4, 3, name="conv")(image)
    x = keras.layers.Flatten(name="flat")(x)
    features = keras.layers.Dense(8, name="features")(x)
    joined = keras.layers.Concatenate(name="join")(
        [features, keras.layers.Dense(4, name="meta_dense")(meta)]
    )
    trunk = keras.layers.Dense(8, activation="relu", name="trunk")(joined)
    outputs = {
        "label": keras.layers.Dense(3, name="label")(trunk),
        "score": keras.layers.Dense(1, name="score")(trunk),
    }
    data = {
        "image": RNG.standard_normal((4, 8, 8, 1)).astype("float32"),
        "meta": RNG.standard_normal((4, 3)).astype("float32"),
    }
    return keras.Model({"image": image, "meta": meta}, outputs, name="multi"), data


def masked_lstm():
    tokens = keras.Input((7,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(20, 6, mask_zero=True, name="embed")(tokens)
    x = keras.layers.LSTM(5, return_sequences=True, name="lstm1")(x)
    x = keras.layers.LSTM(4, name="lstm2")(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    data = np.array(
        [[3, 5, 9, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7], [8, 0, 0, 0, 0, 0, 0]]
    )
    return keras.Model(tokens, outputs, name="masked"), data.astype("int32")


# keras-hub backbones of tiny dimensions, built without weights. Pass
# dropout=0.0 where two runs must compute the same network.
TINY_TRANSFORMER = {
    "vocabulary_size": 100,
    "num_heads": 2,
    "hidden_dim": 16,
    "intermediate_dim": 32,
    "max_sequence_length": 16,
}


def bert_backbone(num_layers=2, **kwargs):
    import keras_hub

    return keras_hub.models.BertBackbone(
        num_layers=num_layers, **{**TINY_TRANSFORMER, **kwargs}
    )


def gpt2_backbone(num_layers=2, **kwargs):
    import keras_hub

    return keras_hub.models.GPT2Backbone(
        num_layers=num_layers, **{**TINY_TRANSFORMER, **kwargs}
    )


def roberta_backbone(num_layers=2, **kwargs):
    import keras_hub

    return keras_hub.models.RobertaBackbone(
        num_layers=num_layers, **{**TINY_TRANSFORMER, **kwargs}
    )


def gemma_backbone(num_layers=2):
    import keras_hub

    return keras_hub.models.GemmaBackbone(
        vocabulary_size=100,
        num_layers=num_layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )


def bert_inputs(batch=3, length=8):
    """Token ids for `bert_backbone`; the first sequence is padded after 5."""
    padding = np.ones((batch, length), "int32")
    padding[0, 5:] = 0
    return {
        "token_ids": RNG.integers(1, 100, (batch, length)).astype("int32"),
        "segment_ids": np.zeros((batch, length), "int32"),
        "padding_mask": padding,
    }


def resnet50():
    return keras.applications.ResNet50(
        weights=None, input_shape=(32, 32, 3), classes=4
    ), _images(32)


def mobilenet_v2():
    return keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=4
    ), _images(32)


# A scale at a cut of each model, for the exactness and gradient tests.
ZOO = {
    "sequential_mlp": (sequential_mlp, {"block1": 0.1, "block2": 0.5}),
    "residual_cnn": (residual_cnn, {"stem_out": 0.1, "block1_out": 0.5}),
    "functional_in_sequential": (
        functional_in_sequential,
        {"backbone/inner_dense": 0.1, "backbone": 0.5},
    ),
    "sequential_in_functional": (
        sequential_in_functional,
        {"pre": 0.1, "inner_out": 0.5},
    ),
    "shared_layers": (shared_layers, {"encoder": 0.1, "mix": 0.5}),
    "multi_input_output": (
        multi_input_output,
        {"features": 0.1, "meta_dense": 0.25, "trunk": 0.5},
    ),
    "masked_lstm": (masked_lstm, {"embed": 0.1, "lstm1": 0.5}),
    "resnet50": (resnet50, {"conv2_block3_out": 0.1, "conv4_block6_out": 0.5}),
    "mobilenet_v2": (mobilenet_v2, {"block_2_add": 0.1, "block_13_expand_relu": 0.5}),
}
