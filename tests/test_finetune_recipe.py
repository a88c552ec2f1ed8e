"""The fine-tuning recipe, exact: AdamW + layer-wise decay + weight-decay
groups + kernel/bias multipliers, through `multi_optimizer`.

Every training run is compared with a reference written here: one AdamW per
group of variables, with the rates and decays this file states by hand,
applied in a `tf.GradientTape` loop. The groups are never read from the code
under test.
"""

import re

import keras
import numpy as np
import pytest
from _models import residual_cnn

import stopgrad_lr
from stopgrad_lr import check_optimizer, layerwise_decay_multipliers, multi_optimizer

tf = pytest.importorskip("tensorflow")
if keras.backend.backend() != "tensorflow":
    pytest.skip("the reference loop uses tf.GradientTape", allow_module_level=True)

OPT = keras.optimizers
RATE, DECAY, WEIGHT_DECAY, STEPS = 1e-3, 0.75, 0.05, 20
# What each comparison must meet: the largest, over variables, of
# |trained - reference| / |reference - initial| (the update, not the weight).
UPDATE_RTOL = 1e-5
RNG = np.random.default_rng(1)


class PositionEmbedding(keras.layers.Layer):
    """A learned position embedding added to the patch embeddings."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=input_shape[1:], initializer="random_normal", name="embeddings"
        )

    def call(self, x):
        return x + self.embeddings


def transformer(blocks=4, tokens=5, width=8):
    """A small ViT-style encoder: patch embedding, pre-norm blocks, head."""
    inputs = keras.Input((tokens, 6))
    x = keras.layers.Dense(width, name="patch_proj")(inputs)
    x = PositionEmbedding(name="pos_embedding")(x)
    for k in range(1, blocks + 1):
        y = keras.layers.LayerNormalization(name=f"block{k}_norm1")(x)
        y = keras.layers.MultiHeadAttention(
            2, 4, use_bias=False, name=f"block{k}_attention"
        )(y, y)
        x = keras.layers.Add(name=f"block{k}_add")([x, y])
        y = keras.layers.LayerNormalization(name=f"block{k}_norm2")(x)
        y = keras.layers.Dense(16, activation="gelu", name=f"block{k}_ff1")(y)
        y = keras.layers.Dense(width, name=f"block{k}_ff2")(y)
        x = keras.layers.Add(name=f"block{k}_out")([x, y])
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    data = RNG.standard_normal((4, tokens, 6)).astype("float32")
    target = RNG.standard_normal((4, 3)).astype("float32")
    return keras.Model(inputs, outputs), data, target


def transformer_rate(layer_name):
    """Layer-wise decay by hand: block k of 4 gets 0.75**(5 - k), the
    embeddings 0.75**5, the final norm and head 1."""
    if layer_name in ("patch_proj", "pos_embedding"):
        return DECAY**5
    found = re.match(r"block(\d)_", layer_name)
    return DECAY ** (5 - int(found.group(1))) if found else 1.0


TRANSFORMER_BOUNDARIES = ["pos_embedding", "block*_out"]


def cnn():
    """`_models.residual_cnn` on 8x8 images. The stem conv has no bias, as
    usual before a BatchNormalization: that bias would get an exactly zero
    gradient, which Adam turns into lr-sized steps of float noise, different
    in any two runs."""
    model, _ = residual_cnn(size=8, stem_bias=False)
    data = RNG.standard_normal((4, 8, 8, 3)).astype("float32")
    target = RNG.standard_normal((4, 5)).astype("float32")
    return model, data, target


def cnn_rate(layer_name):
    """stem 0.75**3, block1 0.75**2, block2 0.75, head 1."""
    power = {"stem": 3, "block1": 2, "block2": 1}.get(layer_name.split("_")[0], 0)
    return DECAY**power


CNN_BOUNDARIES = ["stem_out", "block*_out"]


def variable_table(model):
    """(layer name, variable name, variable) for each trainable variable."""
    return [
        (layer.name, variable.path.rsplit("/", 1)[-1], variable)
        for layer in model.layers
        for variable in layer.trainable_variables
    ]


# The normalisation and embedding layers of each model, by hand.
EXEMPT_LAYERS = {
    "transformer": {
        "pos_embedding",
        "final_norm",
        *(f"block{k}_norm{i}" for k in range(1, 5) for i in (1, 2)),
    },
    "cnn": {"stem_bn"},
}


def reference_run(model, data, target, group_of):
    """Trains `model` STEPS steps with one AdamW per group, where
    `group_of(layer name, variable name) -> (rate multiplier, weight decay)`."""
    groups = {}
    for layer_name, variable_name, variable in variable_table(model):
        groups.setdefault(group_of(layer_name, variable_name), []).append(variable)
    optimizers = {}
    for (rate, decay), variables in groups.items():
        optimizers[rate, decay] = OPT.AdamW(RATE * rate, weight_decay=decay)
        optimizers[rate, decay].build(variables)
    ordered = [variable for variables in groups.values() for variable in variables]
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(target, model(data, training=True))
        grads = tape.gradient(loss, ordered)
        start = 0
        for key, variables in groups.items():
            optimizers[key].apply(grads[start : start + len(variables)], variables)
            start += len(variables)

    for _ in range(STEPS):
        step()
    return [np.array(v.numpy()) for v in model.trainable_variables]


def fit_run(model, data, target, optimizer):
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    for _ in range(STEPS):
        model.train_on_batch(data, target)
    return [np.array(v.numpy()) for v in model.trainable_variables]


def relative_update_error(trained, expected, start):
    return max(
        float(np.linalg.norm(t - e) / np.linalg.norm(e - s))
        for t, e, s in zip(trained, expected, start, strict=True)
    )


def update_error(model, build_optimizer, group_of, data, target, other=None):
    """The largest relative update error of the multi_optimizer run against
    the reference; with `other` (another `group_of`), also against that."""
    initial = model.get_weights()
    start = [np.array(v.numpy()) for v in model.trainable_variables]
    expected = reference_run(model, data, target, group_of)
    if other is not None:
        model.set_weights(initial)
        different = reference_run(model, data, target, other)
    model.set_weights(initial)
    trained = fit_run(model, data, target, build_optimizer(model))
    error = relative_update_error(trained, expected, start)
    if other is None:
        return error
    return error, relative_update_error(trained, different, start)


MODELS = {
    "transformer": (transformer, transformer_rate, TRANSFORMER_BOUNDARIES),
    "cnn": (cnn, cnn_rate, CNN_BOUNDARIES),
}


@pytest.mark.parametrize("name", MODELS)
def test_layerwise_decay_multipliers_are_the_decay_by_hand(name):
    builder, rate, boundaries = MODELS[name]
    model, data, _ = builder()
    before = model.predict(data, verbose=0)
    layers = list(model.layers)
    multipliers = layerwise_decay_multipliers(model, boundaries, DECAY)
    expected = {
        layer.name: rate(layer.name)
        for layer in model.layers
        if layer.trainable_weights
    }
    # effective_multipliers reports 7 significant digits (0.2373047).
    assert multipliers == pytest.approx(expected, rel=5e-7)
    assert list(multipliers) == [n for n in multipliers if n in expected]
    # The input model is unchanged.
    assert list(model.layers) == layers
    np.testing.assert_array_equal(model.predict(data, verbose=0), before)


@pytest.mark.parametrize("name", MODELS)
def test_adamw_with_layerwise_decay_equals_one_adamw_per_group(name):
    builder, rate, boundaries = MODELS[name]
    model, data, target = builder()

    def build(model):
        return multi_optimizer(
            model,
            layerwise_decay_multipliers(model, boundaries, DECAY),
            OPT.AdamW(RATE, weight_decay=WEIGHT_DECAY),
        )

    error = update_error(
        model, build, lambda layer, _: (rate(layer), WEIGHT_DECAY), data, target
    )
    assert error <= UPDATE_RTOL


def no_decay_group(name, rate, kernel_and_bias=None):
    """The reference groups of the recipe: no decay on biases, norms and
    embeddings; `kernel_and_bias` gives one layer's kernel and bias rates."""

    def group_of(layer, variable):
        exempt = variable == "bias" or layer in EXEMPT_LAYERS[name]
        decay = 0.0 if exempt else WEIGHT_DECAY
        if kernel_and_bias and layer == kernel_and_bias[0]:
            return kernel_and_bias[1][variable], decay
        return rate(layer), decay

    return group_of


@pytest.mark.parametrize("name", MODELS)
def test_kernel_and_bias_rates_and_no_weight_decay_on_biases_norms_embeddings(name):
    builder, rate, boundaries = MODELS[name]
    model, data, target = builder()
    # One layer's kernel and bias get rates of their own (the transformer).
    apart = (
        ("block2_ff1", {"kernel": 0.3, "bias": 3.0}) if name == "transformer" else None
    )

    def build(model):
        multipliers = layerwise_decay_multipliers(model, boundaries, DECAY)
        if apart:
            multipliers.update({f"{apart[0]}/{k}": v for k, v in apart[1].items()})
        return multi_optimizer(
            model,
            multipliers,
            OPT.AdamW(RATE, weight_decay=WEIGHT_DECAY),
            weight_decay_multipliers={"@bias": 0, "@norm": 0, "@embedding": 0},
        )

    def all_decayed(layer, variable):
        return no_decay_group(name, rate, apart)(layer, variable)[0], WEIGHT_DECAY

    # On the CNN, also show that the comparison can tell: decaying those
    # variables too is far off. (Skipped on the transformer, to save a run.)
    other = all_decayed if name == "cnn" else None
    result = update_error(
        model, build, no_decay_group(name, rate, apart), data, target, other=other
    )
    error, off = result if other else (result, None)
    assert error <= UPDATE_RTOL
    assert off is None or off > 100 * UPDATE_RTOL


def test_the_base_optimizers_exclusions_are_kept_in_every_group():
    model, data, target = cnn()

    def build(model):
        base = OPT.AdamW(RATE, weight_decay=WEIGHT_DECAY)
        base.exclude_from_weight_decay(var_names=["bias"])
        multipliers = layerwise_decay_multipliers(model, CNN_BOUNDARIES, DECAY)
        return multi_optimizer(model, multipliers, base)

    def group_of(layer, variable):
        return cnn_rate(layer), 0.0 if variable == "bias" else WEIGHT_DECAY

    error, all_decayed = update_error(
        model,
        build,
        group_of,
        data,
        target,
        other=lambda layer, _: (cnn_rate(layer), WEIGHT_DECAY),
    )
    assert error <= UPDATE_RTOL
    # What the code did before: every group decayed the biases. They start
    # at zero, so decay moves them little, but far more than the tolerance.
    assert all_decayed > 10 * UPDATE_RTOL


# Keras's learning-rate callbacks, with and without a LossScaleOptimizer -----------


def small_mlp():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="block1")(inputs)
    hidden = keras.layers.Dense(8, activation="relu", name="block2")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    x = RNG.standard_normal((8, 6)).astype("float32")
    return model, x, RNG.standard_normal((8, 3)).astype("float32")


class GroupRates(keras.callbacks.Callback):
    """Records every group's learning rate at the start of each epoch, after
    the schedulers (which come first in the callback list) have set it."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_epoch_begin(self, epoch, logs=None):
        self.rates.append(group_rates(self.model.optimizer))

    def on_train_end(self, logs=None):
        self.rates.append(group_rates(self.model.optimizer))


def group_rates(optimizer):
    if isinstance(optimizer, OPT.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return {
        group.name: float(keras.ops.convert_to_numpy(group.learning_rate))
        for group in optimizer.optimizers
    }


def wrapped(base, loss_scale):
    return OPT.LossScaleOptimizer(base) if loss_scale else base


@pytest.mark.parametrize("loss_scale", [False, True], ids=["plain", "loss_scale"])
def test_learning_rate_scheduler_halves_every_group_at_epoch_2(loss_scale):
    model, x, y = small_mlp()
    optimizer = multi_optimizer(
        model, {"block1": 0.25, "block2": 0.5}, wrapped(OPT.AdamW(1e-3), loss_scale)
    )
    assert hasattr(optimizer, "optimizers")
    model.compile(optimizer, "mse", jit_compile=False)
    halve = keras.callbacks.LearningRateScheduler(
        lambda epoch, rate: rate * 0.5 if epoch == 2 else rate
    )
    recorder = GroupRates()
    model.fit(x, y, epochs=4, verbose=0, callbacks=[halve, recorder])
    first, *_ = recorder.rates
    assert first == pytest.approx(
        {"adam_w": 1e-3, "adam_w_x0.25": 2.5e-4, "adam_w_x0.5": 5e-4}, rel=1e-6
    )
    for epoch in range(1, 4):
        before, after = recorder.rates[epoch - 1], recorder.rates[epoch]
        expected = 0.5 if epoch == 2 else 1.0
        assert {name: after[name] / before[name] for name in before} == {
            name: expected for name in before
        }


@pytest.mark.parametrize("loss_scale", [False, True], ids=["plain", "loss_scale"])
def test_reduce_lr_on_plateau_reduces_every_group(loss_scale):
    model, x, y = small_mlp()
    optimizer = multi_optimizer(
        model, {"block1": 0.25}, wrapped(OPT.SGD(0.01), loss_scale)
    )
    model.compile(optimizer, "mse", jit_compile=False)
    # No epoch improves by 1e9: the rate is reduced after every second epoch.
    plateau = keras.callbacks.ReduceLROnPlateau(
        "loss", factor=0.5, patience=1, min_delta=1e9
    )
    recorder = GroupRates()
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[plateau, recorder])
    start, end = recorder.rates[0], recorder.rates[-1]
    assert {name: end[name] / start[name] for name in start} == {
        "sgd": 0.5,
        "sgd_x0.25": 0.5,
    }
    assert history.history["learning_rate_sgd_x0.25"] == pytest.approx([2.5e-3] * 2)


def test_mixed_precision_gives_a_loss_scale_optimizer_that_shows_its_groups(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    model, x, y = small_mlp()
    optimizer = multi_optimizer(model, {"block1": 0.5}, OPT.Adam(1e-3))
    assert isinstance(optimizer, OPT.LossScaleOptimizer)
    assert sorted(group.name for group in optimizer.optimizers) == ["adam", "adam_x0.5"]
    model.compile(optimizer, "mse", jit_compile=False)
    assert model.optimizer is optimizer  # compile did not wrap it again
    model.train_on_batch(x, y)
    path = tmp_path / "mixed.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is type(optimizer)
    assert group_rates(loaded.optimizer) == group_rates(optimizer)


# check_optimizer understands the MultiOptimizers built here -------------------------


def test_check_optimizer_reads_each_group_of_a_multi_optimizer():
    model, _, _ = small_mlp()
    sgd_groups = multi_optimizer(model, {"block1": 0.1}, OPT.SGD(0.1, momentum=0.9))
    assert check_optimizer(sgd_groups).ok
    report = check_optimizer(multi_optimizer(model, {"block1": 0.1}, OPT.Adam()))
    assert not report and report.recommended == "multi_optimizer"
    assert all("in the MultiOptimizer, group" in p for p in report.problems)
    assert not any("apply_lr_multipliers" in p for p in report.problems)


def test_gradient_scales_and_multi_optimizer_groups_compound_and_are_reported():
    model, x, y = small_mlp()
    decayed = stopgrad_lr.layerwise_decay(model, "block*", 0.5)
    optimizer = multi_optimizer(
        model, layerwise_decay_multipliers(model, "block*", 0.5), OPT.SGD(0.1)
    )
    report = check_optimizer(optimizer, decayed)
    # One sentence per group: block1's and block2's.
    block1, block2 = sorted(report.problems, key=lambda p: "'block2'" in p)
    assert "'block1' (multiplier 0.25 x 0.25 = 0.0625)" in block1
    assert "'block2' (multiplier 0.5 x 0.5 = 0.25)" in block2
    assert all("strip_gradient_scales" in problem for problem in report.problems)
    decayed.compile(optimizer, "mse", jit_compile=False)
    with pytest.warns(stopgrad_lr.OptimizerMismatchWarning, match="multiply"):
        decayed.fit(x, y, epochs=1, verbose=0, callbacks=[stopgrad_lr.OptimizerCheck()])
    # The same scales with a MultiOptimizer of plain rates: fine.
    plain = multi_optimizer(model, {}, OPT.SGD(0.1))
    assert check_optimizer(plain, decayed).ok


# Variable patterns ------------------------------------------------------------------


def test_the_most_specific_pattern_wins_and_equal_kinds_must_agree():
    model, _, _ = small_mlp()
    optimizer = multi_optimizer(
        model, {"block*": 0.5, "@bias": 2.0, "block1/bias": 3.0}, OPT.SGD(1.0)
    )
    by_variable = {
        v.path: optimizer._optimizer_map(v) for v in model.trainable_variables
    }
    rates = {path: float(group.learning_rate) for path, group in by_variable.items()}
    assert rates == {
        "block1/kernel": 0.5,
        "block1/bias": 3.0,
        "block2/kernel": 0.5,
        "block2/bias": 2.0,
        "head/kernel": 1.0,
        "head/bias": 2.0,
    }
    with pytest.raises(ValueError, match=r"Variable 'block1/bias' is selected by"):
        multi_optimizer(model, {"*/bias": 2.0, "block1/bias": 3.0}, OPT.SGD())
    with pytest.raises(ValueError, match=r"kind selectors \['@bias'"):
        multi_optimizer(model, {"@biases": 0.0}, OPT.SGD())
    with pytest.raises(ValueError, match=r"matched no layer .* and no variable"):
        multi_optimizer(model, {"head/kernal": 0.0}, OPT.SGD())


@pytest.mark.parametrize("pattern", ["head/bias", "*/bias", "@norm"])
def test_graph_mechanisms_point_variable_patterns_to_multi_optimizer(pattern):
    model, _, _ = small_mlp()
    with pytest.raises(
        ValueError, match=r"looks like a variable pattern.*multi_optimizer"
    ):
        stopgrad_lr.apply_lr_multipliers(model, {pattern: 0.1})


def test_weight_decay_multipliers_need_a_weight_decay():
    model, _, _ = small_mlp()
    with pytest.raises(ValueError, match=r"Set weight_decay on the base optimizer"):
        multi_optimizer(model, {}, OPT.Adam(), weight_decay_multipliers={"@bias": 0})
