"""Per-variable truth: what the reports say each variable gets is what a
training step gives it.

The oracle measures it: for a model, an optimizer and a batch, one training
step of the rewritten model against one step of the model as it was, at the
base learning rate, from the same weights; a variable's measured multiplier
is the ratio of its two updates. A reparametrised layer stores `W / c`, so
its true weights' update is `c` times its stored weights' update. The
reports (`variable_multipliers` with and without the optimizer,
`effective_multipliers`) must agree: SGD to a relative 1e-5, the first
step of Adam-like optimizers to 2% (their epsilon). Runs on TensorFlow and
JAX, on real models: a residual CNN, keras.applications CNNs (TensorFlow
only, see `here`), keras-hub backbones with and without LoRA, and
keras-hub tasks built on a rewritten backbone.
"""

import math
import warnings

import _models
import keras
import numpy as np
import pytest

from stopgrad_lr import (
    apply_lr_multipliers,
    effective_multipliers,
    insert_gradient_scales,
    layerwise_decay,
    layerwise_decay_multipliers,
    multi_optimizer,
    summary,
    variable_multipliers,
)

RNG = np.random.default_rng(0)
SGD_RTOL, ADAM_RTOL = 1e-5, 0.02


def adam(learning_rate=1e-3, **kwargs):
    """Adam whose epsilon is small next to every gradient here: a gradient
    below epsilon (a tiny model's attention queries at initialisation get
    1e-7) makes Adam's step linear in it, and no longer scale-invariant."""
    return keras.optimizers.Adam(learning_rate, epsilon=1e-12, **kwargs)


# The oracle -------------------------------------------------------------------


def keyed_variables(model, prefix=""):
    """`"<layer path>/<variable path in the layer>"` -> variable, for every
    weight, walked here from `model.layers` (not by the package); a
    variable that two layers hold (a tied embedding) under the first."""
    found = {}
    for layer in model.layers:
        path = prefix + layer.name
        if isinstance(layer, keras.Model) and layer.inputs:
            inner = keyed_variables(layer, f"{path}/").items()
        else:
            inner = []
            for variable in layer.weights:
                parts = variable.path.split("/")
                starts = [i for i, part in enumerate(parts[:-1]) if part == layer.name]
                name = "/".join(parts[starts[-1] + 1 :]) if starts else variable.name
                inner.append((f"{path}/{name}", variable))
        known = {id(variable) for variable in found.values()}
        for key, variable in inner:
            if id(variable) not in known:
                found.setdefault(key, variable)
    return found


def output_scales(model):
    """Layer name -> `c` of the ParameterScale that follows it."""
    return {
        layer.name.removesuffix("_parameter_scale"): layer.scale
        for layer in model.layers
        if type(layer).__name__ == "ParameterScale"
    }


def step_updates(model, optimizer, x, y):
    """Each variable's update in one training step; the weights are put back."""
    variables = keyed_variables(model)
    before = {
        key: np.array(keras.ops.convert_to_numpy(v)) for key, v in variables.items()
    }
    # Eager: tracing a ResNet50's step costs ten times running it once. No
    # metrics: a keras-hub task's "auto" ones expect class labels.
    model.compile(
        optimizer=optimizer,
        loss="mse",
        metrics=[],
        weighted_metrics=[],
        run_eagerly=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Gradients do not exist")
        model.train_on_batch(x, y)
    updates = {}
    for key, variable in variables.items():
        updates[key] = np.array(keras.ops.convert_to_numpy(variable)) - before[key]
        variable.assign(before[key])
    return updates


def rms(array):
    return float(np.sqrt(np.mean(np.square(array, dtype="float64"))))


# A reference update this far below the step's largest is a gradient that
# is zero but for float64 rounding: a bias or a beta that only a
# training-mode BatchNormalization reads (ResNet50's convolution biases,
# MobileNetV2's project_BN betas: measured at most 1e-15 of the largest;
# the smallest real update on those models is 5e-6 of it).
ROUNDING = 1e-12


def measured_multipliers(model, optimizer, reference, reference_optimizer, x, y):
    """Variable key -> the measured ratio of its update to the reference's,
    for every trainable variable of `model`; `None` for a variable whose
    gradient is zero but for rounding, which has no ratio, and which must
    then not move beyond rounding in `model` either."""
    want = step_updates(reference, reference_optimizer, x, y)
    got = step_updates(model, optimizer, x, y)
    scales = output_scales(model)
    trains = {id(v) for v in model.trainable_variables}
    largest = max(rms(update) for update in want.values())
    result = {}
    for key, variable in keyed_variables(model).items():
        if id(variable) not in trains:
            continue
        update = got[key] * scales.get(key.split("/")[0], 1.0)
        if rms(want[key]) < ROUNDING * largest:
            assert rms(update) < ROUNDING * largest, (key, rms(update), largest)
            result[key] = None
            continue
        # The least-squares ratio: elements whose update is a sum that
        # cancels (a BatchNormalization's gamma) carry little weight, and
        # those are the ones that TensorFlow's threaded reductions round
        # differently from run to run.
        base = want[key].astype("float64")
        norm = float(np.sum(base * base))
        result[key] = float(np.sum(update * base) / norm) if norm else 0.0
    return result


def assert_reports_agree(measured, reported, rtol):
    assert measured.keys() == reported.keys()
    assert sum(value is None for value in measured.values()) < len(measured) / 3
    for key, value in measured.items():
        if value is None:
            continue
        assert math.isclose(value, reported[key], rel_tol=rtol, abs_tol=1e-7), (
            key,
            value,
            reported[key],
        )


def frozen_variables_do_not_move(model, optimizer, x, y):
    """Every variable of the layers reported frozen (moving statistics
    included) keeps its value in a step; there is at least one."""
    frozen = {k for k, v in effective_multipliers(model).items() if v == 0.0}
    updates = step_updates(model, optimizer, x, y)
    keys = [key for key in updates if key.split("/")[0] in frozen]
    return bool(keys) and not any(np.any(updates[key]) for key in keys)


# The models -------------------------------------------------------------------


def _with_head(backbone, output=None):
    features = backbone.output if output is None else backbone.output[output]
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(features)
    return keras.Model(backbone.input, keras.layers.Dense(2, name="head")(pooled))


def _tokens(model, batch=4):
    inputs = _models.bert_inputs(batch=batch)
    return {name: inputs[name] for name in model.input}


def _gemma(lora):
    backbone = _models.gemma_backbone(num_layers=3)
    if lora:
        backbone.enable_lora(2)
        # LoRA starts B at zero, so that A gets no gradient in a first step:
        # as after some training, give B values so that both are measured.
        for variable in backbone.trainable_variables:
            if variable.path.endswith("lora_kernel_b"):
                variable.assign(0.1 * RNG.standard_normal(variable.shape))
    return backbone


# Dropout off: each step would draw other masks, and the measured ratio
# would be that of two different networks.
def _bert():
    return _models.bert_backbone(dropout=0.0)


def _gpt2():
    return _models.gpt2_backbone(dropout=0.0)


def _images(size):
    return RNG.standard_normal((4, size, size, 3)).astype("float32")


def _application(constructor, **kwargs):
    return constructor(weights=None, input_shape=(32, 32, 3), classes=4, **kwargs)


def _vit():
    import keras_hub

    return keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )


# name -> (build: () -> model, the block boundaries to decay)
MODELS = {
    # No bias before a BatchNormalization: its gradient is 0 up to rounding,
    # far below Adam's epsilon, where Adam is linear in the gradient.
    "residual_cnn": (lambda: _models.residual_cnn(stem_bias=False)[0], "*_out"),
    "mobilenet_v2": (
        lambda: _application(keras.applications.MobileNetV2, alpha=0.35),
        "auto",
    ),
    "resnet50": (
        lambda: _application(keras.applications.ResNet50),
        "conv*_block*_out",
    ),
    "densenet121": (
        lambda: _application(keras.applications.DenseNet121),
        "pool*_pool",
    ),
    "bert": (lambda: _with_head(_bert(), "sequence_output"), "transformer_layer_*"),
    "gpt2": (lambda: _with_head(_gpt2()), "transformer_layer_*"),
    "gemma_lora": (lambda: _with_head(_gemma(lora=True)), "decoder_block_*"),
    # ViT's blocks are sublayers of one `vit_encoder` layer: the graph has
    # a cut after the patch embedding only.
    "vit": (lambda: _with_head(_vit()), "vit_patching_and_embedding"),
}


APPLICATIONS = ("mobilenet_v2", "resnet50", "densenet121")


def here(names):
    """The models to measure on this backend. JAX runs an eager step one
    operation at a time: with the keras.applications models this file took
    540 s on JAX, without them 122 s (2 cores, 2026-12-03; TensorFlow: 137 s
    with them), so they are measured on TensorFlow, and JAX measures every
    mechanism on the other models."""
    if keras.backend.backend() == "tensorflow":
        return list(names)
    return [name for name in names if name not in APPLICATIONS]


def _batch(model):
    if isinstance(model.input, dict):
        return _tokens(model)
    return _images(model.input.shape[1])


def build(name):
    """In float64: a gradient that is a sum that cancels (a query kernel's,
    under near-uniform attention; a gamma's in training mode) keeps its
    relative precision, which TensorFlow's threaded float32 reductions
    round differently from run to run (measured: 2e-3 on BERT's query)."""
    make, boundaries = MODELS[name]
    keras.config.set_dtype_policy("float64")  # the fixture puts float32 back
    model = make()
    x = _batch(model)
    y = RNG.standard_normal((4, *model.output.shape[1:])).astype("float32")
    return model, x, y, boundaries


# The tests --------------------------------------------------------------------


@pytest.mark.parametrize("name", here(MODELS))
def test_layerwise_decay_with_sgd_is_what_the_reports_say(name):
    model, x, y, boundaries = build(name)
    decayed = layerwise_decay(model, boundaries, 0.5)
    sgd = keras.optimizers.SGD(0.01, momentum=0.9)
    measured = measured_multipliers(
        decayed, sgd, model, keras.optimizers.SGD(0.01, momentum=0.9), x, y
    )
    # keras-hub's Gemma computes its RMS norms in float32 whatever the
    # policy, and TensorFlow's threaded float32 sums round differently from
    # run to run: measured up to 1.1e-4 relative on a LoRA kernel.
    rtol = 1e-3 if name == "gemma_lora" else SGD_RTOL
    assert_reports_agree(measured, variable_multipliers(decayed), rtol)
    assert_reports_agree(measured, variable_multipliers(decayed, sgd), rtol)
    # The decay is there to be measured.
    assert min(v for v in measured.values() if v is not None) <= 0.5
    # The per-layer view is the variables' common value, and the recipe's
    # dict is the same, frozen layers left out.
    layers = effective_multipliers(decayed)
    for key, value in variable_multipliers(decayed).items():
        layer = key.split("/")[0]
        assert layers[layer] == value
    recipe = layerwise_decay_multipliers(model, boundaries, 0.5)
    assert {k: v for k, v in layers.items() if v != 0.0}.items() <= recipe.items()
    assert 0.0 not in recipe.values()


def adamw(learning_rate=0.01, **kwargs):
    """AdamW with `adam`'s small epsilon, and decay to move every variable."""
    return keras.optimizers.AdamW(
        learning_rate, weight_decay=0.1, epsilon=1e-12, **kwargs
    )


# name -> the cut to freeze upstream of.
FREEZE_AT = {
    "residual_cnn": "stem_bn",
    "mobilenet_v2": "block_2_add",
    "resnet50": "conv2_block1_out",
    "densenet121": "pool2_pool",
    "bert": "transformer_layer_0",
    "gpt2": "transformer_layer_0",
    "gemma_lora": "decoder_block_0",
    "vit": "vit_patching_and_embedding",
}


@pytest.mark.parametrize("name", here(FREEZE_AT))
def test_a_freeze_is_reported_and_measured_as_zero(name):
    """What is upstream of the stop does not move, under AdamW's decay too,
    and is not reported; the rest trains as the model did."""
    model, x, y, _boundaries = build(name)
    frozen = insert_gradient_scales(model, {FREEZE_AT[name]: 0.0})
    assert frozen_variables_do_not_move(frozen, adamw(), x, y)
    measured = measured_multipliers(frozen, adamw(), model, adamw(), x, y)
    reported = variable_multipliers(frozen, adamw())
    assert_reports_agree(measured, reported, ADAM_RTOL)
    assert set(reported.values()) == {1.0}
    frozen_layers = {k for k, v in effective_multipliers(frozen).items() if v == 0.0}
    assert frozen_layers and not {key.split("/")[0] for key in reported} & frozen_layers


# name -> a layer to reparametrise.
REPARAMETRISE = {
    "residual_cnn": "stem_conv",
    "mobilenet_v2": "Conv1",
    # Not a convolution: each one's bias feeds a training-mode
    # BatchNormalization, a gradient of rounding only, far below Adam's
    # epsilon, where Adam is linear in the gradient.
    "resnet50": "predictions",
    "densenet121": "conv1_conv",
    "bert": "token_embedding",
    "gpt2": "token_embedding",
    "vit": "head",
}


@pytest.mark.parametrize("name", here(REPARAMETRISE))
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_the_reparametrisation_is_what_the_reports_say(name, kind):
    """Adam: c = m; SGD: c = sqrt(m). Reported as the multiplier, not 1."""
    model, x, y, _ = build(name)
    target = REPARAMETRISE[name]
    optimizers = {
        "adam": adam,
        "sgd": lambda: keras.optimizers.SGD(0.01),
    }
    rewritten = apply_lr_multipliers(
        model, {target: 0.25}, optimizer=optimizers[kind](), mechanism="reparametrize"
    )
    measured = measured_multipliers(
        rewritten, optimizers[kind](), model, optimizers[kind](), x, y
    )
    rtol = ADAM_RTOL if kind == "adam" else SGD_RTOL
    for report in (
        variable_multipliers(rewritten),
        variable_multipliers(rewritten, optimizers[kind]()),
    ):
        assert_reports_agree(measured, report, rtol)
    assert effective_multipliers(rewritten)[target] == 0.25
    assert {v for k, v in measured.items() if k.startswith(f"{target}/")} != {1.0}


# name -> multipliers by variable pattern, beyond what the graph can cut:
# ViT's blocks live inside one layer.
INSIDE = {
    "vit": {
        "vit_encoder/transformer_block_1/*": 0.25,
        "vit_encoder/transformer_block_2/*": 0.5,
    }
}


@pytest.mark.parametrize("name", here(MODELS))
def test_the_recipe_through_multi_optimizer_is_what_the_reports_say(name):
    """Layer-wise decay as learning rates, for AdamW: one group per rate."""
    model, x, y, boundaries = build(name)
    multipliers = layerwise_decay_multipliers(model, boundaries, 0.5)
    optimizer = multi_optimizer(model, {**multipliers, **INSIDE.get(name, {})}, adamw())
    measured = measured_multipliers(model, optimizer, model, adamw(), x, y)
    reported = variable_multipliers(model, optimizer)
    assert_reports_agree(measured, reported, ADAM_RTOL)
    assert len(set(reported.values())) >= 3
    if name == "vit":
        assert reported["vit_encoder/transformer_block_1/mha/query/kernel"] == 0.25


def test_adam_cancels_a_gradient_scale_and_the_report_says_so():
    model, x, y, boundaries = build("bert")
    decayed = layerwise_decay(model, boundaries, 0.5)
    measured = measured_multipliers(decayed, adam(), model, adam(), x, y)
    reported = variable_multipliers(decayed, adam())
    assert set(reported.values()) == {1.0}
    # A key's bias has no gradient but rounding (softmax ignores a shift),
    # far below any epsilon: Adam is linear there.
    for key in [k for k in measured if k.endswith("/key/bias")]:
        del measured[key], reported[key]
    assert_reports_agree(measured, reported, ADAM_RTOL)


def test_lora_plus_and_layerwise_decay_on_a_lora_gemma():
    """The issue's workflow: `enable_lora`, LoRA+ (B at 16x A's rate) and
    layer-wise decay through `multi_optimizer`, with AdamW."""
    model, x, y, boundaries = build("gemma_lora")
    decayed = layerwise_decay(model, boundaries, 0.5)
    layers = effective_multipliers(decayed)
    assert [layers[f"decoder_block_{i}"] for i in range(3)] == [0.125, 0.25, 0.5]
    assert layers["token_embedding"] == 0.0  # LoRA froze it
    recipe = layerwise_decay_multipliers(model, boundaries, 0.5)
    assert recipe == {
        "decoder_block_0": 0.125,
        "decoder_block_1": 0.25,
        "decoder_block_2": 0.5,
        "head": 1.0,
    }
    assert layerwise_decay(model, "auto", 0.5)  # finds the blocks
    lines = []
    summary(decayed, print_fn=lines.append)
    assert any(
        line.startswith("decoder_block_0 ") and "0.125" in line for line in lines
    )

    def adamw():
        return keras.optimizers.AdamW(1e-3, weight_decay=0.0, epsilon=1e-12)

    plus = multi_optimizer(model, {**recipe, "*/lora_kernel_b": 16.0}, adamw())
    measured = measured_multipliers(model, plus, model, adamw(), x, y)
    reported = variable_multipliers(model, plus)
    assert_reports_agree(measured, reported, ADAM_RTOL)
    assert reported["decoder_block_1/attention/query/lora_kernel_b"] == 16.0
    assert reported["decoder_block_1/attention/query/lora_kernel_a"] == 0.25
    assert reported["head/kernel"] == 1.0
    # The recipe trains end to end, base kernels frozen.
    frozen_before = np.array(
        keras.ops.convert_to_numpy(model.get_layer("token_embedding").embeddings)
    )
    model.compile(optimizer=plus, loss="mse")
    for _ in range(2):
        model.train_on_batch(x, y)
    after = keras.ops.convert_to_numpy(model.get_layer("token_embedding").embeddings)
    assert np.array_equal(after, frozen_before)


def test_a_freeze_of_a_lora_block_freezes_its_lora_kernels():
    model = _gemma(lora=True)
    frozen = insert_gradient_scales(model, {"decoder_block_0": 0.0})
    paths = [v.path for v in frozen.trainable_variables]
    assert paths and not [p for p in paths if p.startswith("decoder_block_0/")]
    assert effective_multipliers(frozen)["decoder_block_1"] == 1.0


def test_keras_hub_tasks_train_on_a_rewritten_backbone():
    """The rewrite keeps a backbone's public attributes (token_embedding,
    hidden_dim...), which the tasks read."""
    import keras_hub

    decayed = layerwise_decay(_gemma(lora=True), "decoder_block_*", 0.5)
    assert decayed.token_embedding is decayed.get_layer("token_embedding")
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=decayed, preprocessor=None)
    x = {
        "token_ids": RNG.integers(1, 100, (4, 8)).astype("int32"),
        "padding_mask": np.ones((4, 8), "int32"),
    }
    y = RNG.integers(1, 100, (4, 8)).astype("int32")
    sgd = keras.optimizers.SGD(0.01)
    causal_lm.compile(
        optimizer=sgd,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    causal_lm.train_on_batch(x, y)
    reported = variable_multipliers(causal_lm.backbone, sgd)
    assert reported["decoder_block_0/attention/query/lora_kernel_a"] == 0.125


def _opt():
    import keras_hub

    return keras_hub.models.OPTBackbone(
        num_layers=2, dropout=0.0, **_models.TINY_TRANSFORMER
    )


# task -> (its backbone, the block boundaries to decay, the task's arguments)
TASKS = {
    "BertTextClassifier": (_bert, "transformer_layer_*", {"num_classes": 2}),
    "RobertaTextClassifier": (
        lambda: _models.roberta_backbone(dropout=0.0),
        "transformer_layer_*",
        {"num_classes": 2},
    ),
    "GPT2CausalLM": (_gpt2, "transformer_layer_*", {}),
    "OPTCausalLM": (_opt, "transformer_layer_*", {}),
    "ViTImageClassifier": (_vit, "vit_patching_and_embedding", {"num_classes": 2}),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_a_keras_hub_task_on_a_rewritten_backbone_trains_as_reported(task):
    """The task's step against the same task on the original backbone,
    from the same weights: each variable's measured multiplier is the
    reported one, the task's own head (1) and a tied embedding included."""
    import keras_hub

    make, boundaries, arguments = TASKS[task]
    if task.endswith("Classifier"):
        arguments = {**arguments, "dropout": 0.0}
    keras.config.set_dtype_policy("float64")
    backbone = make()
    constructor = getattr(keras_hub.models, task)
    reference = constructor(backbone=backbone, preprocessor=None, **arguments)
    decayed = constructor(
        backbone=layerwise_decay(backbone, boundaries, 0.5),
        preprocessor=None,
        **arguments,
    )
    for layer in reference.layers:
        if layer is not reference.backbone:
            decayed.get_layer(layer.name).set_weights(layer.get_weights())
    x = _batch(reference)
    y = RNG.standard_normal(reference(x).shape).astype("float32")
    sgd = keras.optimizers.SGD(0.01, momentum=0.9)
    measured = measured_multipliers(
        decayed, sgd, reference, keras.optimizers.SGD(0.01, momentum=0.9), x, y
    )
    reported = variable_multipliers(decayed, sgd)
    # A causal LM projects back through its token embedding: the matrix
    # trains through the scaled input path and the unscaled output path, a
    # sum of two differently scaled gradients, and is reported as such.
    tied = [key for key, value in reported.items() if math.isnan(value)]
    embedding = [k for k in reported if k.endswith("token_embedding/embeddings")]
    assert tied == (embedding if task.endswith("LM") else [])
    for key in tied:
        ratio = measured.pop(key)
        assert not any(math.isclose(ratio, m, rel_tol=1e-3) for m in (0.25, 0.5, 1))
        del reported[key]
    assert_reports_agree(measured, reported, SGD_RTOL)
    assert min(v for v in measured.values() if v is not None) <= 0.5


def test_scales_that_compound_below_float32_are_refused():
    inputs = x = keras.Input((4,))
    for i in range(6):
        x = keras.layers.Dense(4, name=f"block{i}")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    with pytest.raises(
        ValueError, match=r"compound to multiplier 1e-60 for layer 'block0'"
    ):
        layerwise_decay(model, "block*", 1e-10)
    assert all(layer.trainable for layer in model.layers)


def test_a_frozen_layer_does_not_break_the_recipe():
    inputs = x = keras.Input((4,))
    for i in range(3):
        x = keras.layers.Dense(4, name=f"block{i}")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    model.get_layer("block0").trainable = False
    recipe = layerwise_decay_multipliers(model, "block*", 0.5)
    assert recipe == {"block1": 0.25, "block2": 0.5, "head": 1.0}
    optimizer = multi_optimizer(model, recipe, keras.optimizers.AdamW(1e-3))
    reported = variable_multipliers(model, optimizer)
    assert reported["block1/kernel"] == 0.25 and "block0/kernel" not in reported


class _TiedHead(keras.layers.Layer):
    """Projects back through an embedding's matrix, as a tied LM head."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, x):
        return keras.ops.matmul(x, keras.ops.transpose(self.embedding.embeddings))


def test_a_tied_embedding_is_no_one_multiplier_and_the_rewrite_says_so():
    ids = keras.Input((4,), dtype="int32")
    embedding = keras.layers.Embedding(10, 8, name="embedding")
    hidden = keras.layers.Dense(8, name="body")(embedding(ids))
    model = keras.Model(ids, _TiedHead(embedding, name="tied_head")(hidden))
    scaled = insert_gradient_scales(model, {"embedding": 0.5})
    assert math.isnan(variable_multipliers(scaled)["embedding/embeddings"])
    assert math.isnan(effective_multipliers(scaled)["embedding"])
    with pytest.raises(ValueError, match=r"'embedding' cannot get multiplier 0.5.*"):
        apply_lr_multipliers(model, {"embedding": 0.5})
