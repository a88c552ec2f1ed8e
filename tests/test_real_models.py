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
from _backend import BACKEND, forward, relative_error, weight_gradients
from _models import bert_backbone, bert_inputs, gemma_backbone

import stopgrad_lr

RNG = np.random.default_rng(0)


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
        # The same layer, or (a task's new head) its twin at the same path.
        # One norm-wise error per layer: an attention layer's key bias has a
        # gradient of pure rounding noise (softmax ignores a shift shared by
        # all keys), whose ratio means nothing.
        pairs = list(
            zip(
                layer_variables(rewritten, path),
                layer_variables(original, path),
                strict=True,
            )
        )
        error = relative_error(
            np.concatenate([after[id(new)].ravel() for new, _ in pairs]),
            multiplier * np.concatenate([before[id(old)].ravel() for _, old in pairs]),
        )
        assert error <= 1e-5, f"{path}: {error:.2e}"
        checked += len(pairs)
    assert checked >= len(original.trainable_variables) // 2
    return reported


# keras.applications models are checked on TensorFlow: compiling their
# gradients on JAX and running them eagerly on torch takes minutes each, and
# the surgery is the same (test_rewrite runs ResNet50 on every backend).
BACKEND_MODELS = (
    list(MODELS) if BACKEND == "tensorflow" else ["bert_backbone", "gemma_backbone"]
)


@pytest.mark.parametrize("name", BACKEND_MODELS)
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


WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "was"]
VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def text_data(count=16):
    """Raw strings whose label is whether a positive word occurs."""
    rng = np.random.default_rng(1)
    positive = rng.integers(0, 2, count)
    texts = [
        f"the film was {WORDS[rng.integers(0, 3)] if p else WORDS[rng.integers(3, 6)]}"
        for p in positive
    ]
    return np.array(texts), positive.astype("int32")


def preprocessor():
    tokenizer = keras_hub.tokenizers.BertTokenizer(vocabulary=VOCABULARY)
    return keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)


def test_a_task_is_analysed_and_its_rewrite_points_to_the_backbone():
    task = bert_classifier()
    rows = stopgrad_lr.summary(task, print_fn=None)
    assert rows[-1].layer == "logits" and rows[-1].multiplier == 1.0
    assert "bert_backbone/transformer_layer_1" in stopgrad_lr.gradient_cuts(task)
    for rewrite in (
        lambda: stopgrad_lr.insert_gradient_scales(task, {"logits": 0.5}),
        lambda: stopgrad_lr.layerwise_decay(task, "transformer_layer_*", 0.5),
        lambda: stopgrad_lr.apply_lr_multipliers(task, {"transformer_*": 0.5}),
        lambda: stopgrad_lr.strip_gradient_scales(task),
    ):
        with pytest.raises(
            ValueError, match=r"keras-hub task .*task\.backbone"
        ) as info:
            rewrite()
        assert "\n" not in str(info.value)
        assert "BertTextClassifier(backbone=tuned" in str(info.value)


def test_a_task_built_around_a_rewritten_backbone_is_exact_and_measured():
    task = bert_classifier()
    decayed = stopgrad_lr.layerwise_decay(
        task.backbone, ["embeddings_layer_norm", "transformer_layer_*"], 0.5
    )
    tuned = keras_hub.models.BertTextClassifier(
        backbone=decayed, num_classes=2, preprocessor=None
    )
    tuned.get_layer("logits").set_weights(task.get_layer("logits").get_weights())
    data = bert_inputs()
    expected = forward(task, data, False)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(forward(tuned, data, False), expected, strict=True)
    )
    reported = assert_gradients_match_the_analysis(task, tuned, data)
    # The last block's output feeds the head: it trains at 0.5, the
    # embeddings at 0.5 ** 3 (three boundaries above them).
    assert reported["bert_backbone/transformer_layer_1"] == 0.5
    assert reported["bert_backbone/token_embedding"] == 0.125
    assert reported["logits"] == 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_layerwise_decay_of_a_text_classifier_trains_on_raw_strings(optimizer):
    backbone = bert_backbone()
    before = [np.array(w) for w in backbone.get_weights()]
    if optimizer == "sgd":
        # Gradient scales are learning-rate multipliers for SGD.
        tuned = stopgrad_lr.layerwise_decay(backbone, "transformer_layer_*", 0.5)
        classifier = keras_hub.models.BertTextClassifier(
            backbone=tuned, num_classes=2, preprocessor=preprocessor()
        )
        opt = keras.optimizers.SGD(0.05)
    else:
        # Adam cancels gradient scales, and a TransformerEncoder cannot be
        # reparametrised: one optimizer per group (the optimizer table).
        classifier = keras_hub.models.BertTextClassifier(
            backbone=backbone, num_classes=2, preprocessor=preprocessor()
        )
        opt = stopgrad_lr.multi_optimizer(
            classifier,
            {"transformer_layer_1": 0.5, "transformer_layer_0": 0.25},
            keras.optimizers.Adam(1e-3),
        )
    classifier.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    texts, labels = text_data()
    # keras-hub maps its preprocessor over a tf.data pipeline, which Keras
    # does not shuffle (it warns when asked to).
    history = classifier.fit(
        texts, labels, batch_size=8, epochs=1, shuffle=False, verbose=0
    )
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    assert classifier.predict(texts[:4], verbose=0).shape == (4, 2)
    # Every layer the rewrite did not copy is shared with the user's
    # backbone, so training the classifier trained it.
    after = backbone.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(after, before, strict=True))
    if optimizer == "sgd":
        multipliers = stopgrad_lr.effective_multipliers(classifier)
        assert multipliers["logits"] == 1.0
        assert multipliers["bert_backbone/transformer_layer_1"] == 0.5
        assert multipliers["bert_backbone/token_embedding"] == 0.25
    else:
        ratios = {
            round(float(inner.learning_rate) / 1e-3, 6)
            for inner in classifier.optimizer.optimizers
        }
        assert ratios == {1.0, 0.5, 0.25}
    assert stopgrad_lr.check_optimizer(classifier.optimizer, classifier).ok


def test_automatic_boundaries_close_each_block():
    resnet = keras.applications.ResNet50(
        weights=None, input_shape=(32, 32, 3), classes=3
    )
    blocks = [(2, 3), (3, 4), (4, 6), (5, 3)]  # (stage, residual blocks)
    outputs = [f"conv{s}_block{b}_out" for s, n in blocks for b in range(1, n + 1)]
    # The stem (`conv1_conv`, `conv1_bn`: one block by name) closes at the
    # last cut before conv2, the pool; the last residual block's boundary
    # moves to the pooling before the head: 17 levels.
    expected = ["pool1_pool", *outputs[:-1], "avg_pool"]
    assert len(expected) == 17
    decayed = stopgrad_lr.layerwise_decay(resnet, "auto", 0.5)
    scaled = [
        layer.name.removesuffix("_gradient_scale")
        for layer in decayed.layers
        if isinstance(layer, stopgrad_lr.GradientScale)
    ]
    assert scaled == expected
    multipliers = stopgrad_lr.effective_multipliers(decayed)
    assert multipliers["predictions"] == 1.0
    assert multipliers["conv5_block3_1_conv"] == 0.5
    # Reported to 7 significant digits, without drift over 17 boundaries.
    assert multipliers["conv1_conv"] == float(f"{0.5 ** len(expected):.7g}")

    bert = bert_backbone(num_layers=3)
    decayed = stopgrad_lr.layerwise_decay(bert, "auto", 0.5)
    multipliers = stopgrad_lr.effective_multipliers(decayed)
    # The embedding stage (the three embeddings and their LayerNormalization)
    # is one level, L + 1 boundaries below the pooler (the head).
    assert multipliers == {
        "token_embedding": 0.5**4,
        "position_embedding": 0.5**4,
        "segment_embedding": 0.5**4,
        "embeddings_layer_norm": 0.5**4,
        "transformer_layer_0": 0.5**3,
        "transformer_layer_1": 0.5**2,
        "transformer_layer_2": 0.5,
        "pooled_dense": 1.0,
    }
    data = bert_inputs()
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            forward(decayed, data, False), forward(bert, data, False), strict=True
        )
    )
    assert_gradients_match_the_analysis(bert, decayed, data)

    sequential = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, name="a"),
            keras.layers.Dropout(0.1, name="drop"),
            keras.layers.Dense(4, name="b"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    decayed = stopgrad_lr.layerwise_decay(sequential, "auto", 0.5)
    assert [layer.name for layer in decayed.layers] == [
        "a",
        "drop",
        "drop_gradient_scale",
        "b",
        "b_gradient_scale",
        "head",
    ]
    assert stopgrad_lr.effective_multipliers(decayed) == {
        "a": 0.25,
        "b": 0.5,
        "head": 1.0,
    }


def test_automatic_boundaries_need_two_blocks():
    single = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="only")])
    with pytest.raises(ValueError, match="found no block boundary"):
        stopgrad_lr.layerwise_decay(single, "auto", 0.5)


def t5_backbone():
    return keras_hub.models.T5Backbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        key_value_dim=4,
    )


def t5_inputs(batch=2, length=6):
    ones = np.ones((batch, length), "int32")
    return {
        "encoder_token_ids": RNG.integers(1, 50, (batch, length)).astype("int32"),
        "encoder_padding_mask": ones,
        "decoder_token_ids": RNG.integers(1, 50, (batch, length)).astype("int32"),
        "decoder_padding_mask": ones,
    }


def two_towers(kind):
    vision_kind, text_kind = {
        "clip": (keras_hub.models.CLIPVisionEncoder, keras_hub.models.CLIPTextEncoder),
        "siglip": (
            keras_hub.models.SigLIPVisionEncoder,
            keras_hub.models.SigLIPTextEncoder,
        ),
    }[kind]
    vision = vision_kind(
        patch_size=4,
        hidden_dim=8,
        num_layers=2,
        num_heads=2,
        intermediate_dim=16,
        image_shape=(16, 16, 3),
    )
    text = text_kind(
        vocabulary_size=50,
        embedding_dim=8,
        hidden_dim=8,
        num_layers=3,
        num_heads=2,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    if kind == "clip":
        return keras_hub.models.CLIPBackbone(vision, text, projection_dim=8)
    return keras_hub.models.SigLIPBackbone(vision, text)


def two_tower_inputs(model, batch=2):
    data = {"images": images(16, batch)}
    data["token_ids"] = RNG.integers(1, 50, (batch, 8)).astype("int32")
    if "padding_mask" in [t.name for t in model.inputs]:
        data["padding_mask"] = np.ones((batch, 8), "int32")
    return {name: data[name] for name in [t.name for t in model.inputs]}


def auto_levels(model):
    """How many boundaries "auto" puts in the model (the deepest level)."""
    decayed = stopgrad_lr.layerwise_decay(model, "auto", 0.5)
    return sum(isinstance(layer, stopgrad_lr.GradientScale) for layer in decayed.layers)


def test_automatic_blocks_follow_the_names_the_authors_gave():
    mobilenet = keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), classes=3
    )
    decayed = stopgrad_lr.layerwise_decay(mobilenet, "auto", 0.8)
    multipliers = stopgrad_lr.effective_multipliers(decayed)
    # The stem (Conv1, bn_Conv1 and the unindexed expanded_conv block),
    # block_1 ... block_16 and the top conv Conv_1: 18 levels, not one per
    # convolution and normalisation (54).
    assert multipliers["Conv1"] == float(f"{0.8**18:.7g}")
    assert multipliers["expanded_conv_project_BN"] == multipliers["Conv1"]
    for block in range(1, 17):
        names = [f"block_{block}_{part}" for part in ("depthwise", "project_BN")]
        assert {multipliers[name] for name in names} == {
            float(f"{0.8 ** (18 - block):.7g}")
        }
    assert multipliers["Conv_1"] == 0.8 and multipliers["predictions"] == 1.0
    lines = []
    stopgrad_lr.summary(decayed, print_fn=lines.append)
    assert lines[-2].startswith("Learning-rate levels: 19 multipliers, 1 down to")

    # A block split across names: MobileNet's `conv_dw_i` and `conv_pw_i`
    # (stem + 13), ResNet50V2's pre-activation `convN_blockM_preact_*`
    # before `convN_blockM_1_conv` (stem + 16).
    for build, expected in (
        (keras.applications.MobileNet, 14),
        (keras.applications.ResNet50V2, 17),
    ):
        model = build(weights=None, input_shape=(32, 32, 3), classes=3)
        assert auto_levels(model) == expected

    for kind in (keras_hub.models.ElectraBackbone, keras_hub.models.FNetBackbone):
        arguments = {"num_heads": 2} if kind is keras_hub.models.ElectraBackbone else {}
        if kind is keras_hub.models.ElectraBackbone:
            arguments |= {"vocab_size": 50, "embedding_dim": 8}
        else:
            arguments |= {"vocabulary_size": 50}
        backbone = kind(
            num_layers=3,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=16,
            **arguments,
        )
        # L transformer layers and one embedding stage.
        assert auto_levels(backbone) == 4


def test_automatic_blocks_decay_each_tower_by_its_own_depth():
    for kind in ("clip", "siglip"):
        model = two_towers(kind)
        decayed = stopgrad_lr.layerwise_decay(model, "auto", 0.5)
        multipliers = stopgrad_lr.effective_multipliers(decayed)
        vision, text = (
            f"{'clip' if kind == 'clip' else 'sig_lip'}_{tower}_encoder"
            for tower in ("vision", "text")
        )
        # Vision: 2 blocks and the embedding stage; text: 3 and the
        # embeddings; the projections and the head train at 1.
        assert multipliers[f"{vision}/embedding"] == 0.5**3
        assert multipliers[f"{vision}/encoder_block_0"] == 0.5**2
        assert multipliers[f"{vision}/encoder_block_1"] == 0.5
        assert multipliers[f"{text}/embedding"] == 0.5**4
        assert multipliers[f"{text}/encoder_block_2"] == 0.5
        assert multipliers[f"{kind}_head"] == 1.0
        data = two_tower_inputs(model)
        assert_gradients_match_the_analysis(model, decayed, data)


# keras-hub's T5 layers warn when built and called (its attention refuses a mask).
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_shared_embedding_gets_its_multiplier_after_each_call():
    model = t5_backbone()
    data = t5_inputs()
    for value in (0.1, 0.0):
        tuned = stopgrad_lr.apply_lr_multipliers(model, {"token_embedding": value})
        kind = stopgrad_lr.GradientScale if value else stopgrad_lr.GradientStop
        assert [type(layer) for layer in tuned.layers].count(kind) == 1
        multipliers = stopgrad_lr.effective_multipliers(tuned)
        assert multipliers["token_embedding"] == value
        assert set(multipliers.values()) == {value, 1.0}
        if value:
            assert_gradients_match_the_analysis(model, tuned, data)
        expected = forward(model, data, False)
        got = forward(tuned, data, False)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_output_names_survive_a_keras_file_and_a_loss_dict(tmp_path):
    inputs = keras.Input((4,), name="x")
    features = keras.layers.Dense(3, name="features")(inputs)
    head = keras.layers.Dense(2, name="head")(features)
    model = keras.Model(inputs, [head, features])
    scaled = stopgrad_lr.insert_gradient_scales(model, {"features": 0.5})
    scaled.save(tmp_path / "scaled.keras")
    loaded = keras.saving.load_model(tmp_path / "scaled.keras")
    assert loaded.output_names == ["head", "features"]
    assert stopgrad_lr.effective_multipliers(loaded) == {"features": 0.5, "head": 1.0}
    loaded.compile("sgd", loss={"head": "mse", "features": "mse"})
    x = RNG.standard_normal((4, 4)).astype("float32")
    history = loaded.fit(
        x, {"head": np.zeros((4, 2)), "features": np.zeros((4, 3))}, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()
    # Stripped, it is a plain model again, which loads without stopgrad_lr.
    plain = stopgrad_lr.strip_gradient_scales(loaded)
    assert type(plain) is keras.Model or type(plain).__name__ == "Functional"
    assert plain.output_names == ["head", "features"]

    for backbone in (
        keras_hub.models.ElectraBackbone(
            vocab_size=50,
            num_layers=2,
            num_heads=2,
            hidden_dim=8,
            embedding_dim=8,
            intermediate_dim=16,
            max_sequence_length=16,
        ),
        keras_hub.models.FNetBackbone(
            vocabulary_size=50,
            num_layers=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=16,
        ),
    ):
        decayed = stopgrad_lr.layerwise_decay(backbone, "auto", 0.5)
        decayed.save(tmp_path / "decayed.keras")
        loaded = keras.saving.load_model(tmp_path / "decayed.keras")
        assert loaded.output_names == backbone.output_names


def bart_backbone():
    return keras_hub.models.BartBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=16,
    )


def whisper_backbone():
    return keras_hub.models.WhisperBackbone(
        vocabulary_size=50,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        num_mels=8,
        max_encoder_sequence_length=16,
        max_decoder_sequence_length=16,
    )


# keras-hub's T5 layers warn when built (its attention refuses a mask).
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("build", [t5_backbone, bart_backbone, whisper_backbone])
def test_an_encoder_and_a_decoder_are_decayed_each_by_its_depth(build):
    model = build()
    # An encoder's output enters every decoder layer (and T5 and Bart share
    # the token embedding): no gradient scale gives the towers their levels,
    # and the rewrite says so instead of decaying one tower only.
    with pytest.raises(ValueError, match=r"cannot decay each tower .*multi_optimizer"):
        stopgrad_lr.layerwise_decay(model, "auto", 0.5)
    multipliers = stopgrad_lr.layerwise_decay_multipliers(model, "auto", 0.5)
    for tower in ("encoder", "decoder"):
        assert multipliers[f"transformer_{tower}_layer_0"] == 0.25
        assert multipliers[f"transformer_{tower}_layer_1"] == 0.5
    embeddings = {
        path: value
        for path, value in multipliers.items()
        if "embedding" in path and model.get_layer(path).trainable
    }
    assert embeddings and set(embeddings.values()) == {0.125}
    if build is t5_backbone:
        # multi_optimizer selects variables by path, and T5's layers name
        # their relative position embeddings alike (`self_attention/embeddings`).
        return
    # Delivered by one optimizer per group, measured: one SGD step with a
    # gradient of ones moves each variable by its layer's rate.
    optimizer = stopgrad_lr.multi_optimizer(
        model, multipliers, keras.optimizers.SGD(0.5)
    )
    variables = model.trainable_variables
    before = [np.array(v) for v in variables]
    optimizer.apply_gradients(
        [(keras.ops.ones(v.shape, dtype=v.dtype), v) for v in variables]
    )
    moved = {
        id(v): (b - np.array(v)) / 0.5 for v, b in zip(variables, before, strict=True)
    }
    for path, value in multipliers.items():
        for variable in layer_variables(model, path):
            np.testing.assert_allclose(moved[id(variable)], value, rtol=1e-6)
