"""# Quickstart: a slower backbone with one GradientScale

Train a small network on scikit-learn's bundled handwritten digits (real
data, no download) with plain SGD, once as is and once with a
`GradientScale(0.1)` between the backbone and the head. Then measure what
the scale did: the backbone's first update is exactly 0.1 times what it is
without the scale, while the head's is unchanged, and the forward pass is
bit-identical.

Run it with `make demo` or `python examples/quickstart.py`.
"""

import keras
import numpy as np
from sklearn.datasets import load_digits

import stopgrad_lr

digits = load_digits()
x = (digits.data / 16.0).astype("float32")
y = digits.target


def build(scale):
    keras.utils.set_random_seed(0)  # identical initial weights in both runs
    inputs = keras.Input((64,))
    features = keras.layers.Dense(64, activation="relu", name="backbone")(inputs)
    if scale is not None:
        features = stopgrad_lr.GradientScale(scale, name="backbone_lr")(features)
    outputs = keras.layers.Dense(10, name="head")(features)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def first_update(model, name):
    """How far one SGD step moves a layer's kernel."""
    before = keras.ops.convert_to_numpy(model.get_layer(name).kernel)
    model.train_on_batch(x[:64], y[:64])
    after = keras.ops.convert_to_numpy(model.get_layer(name).kernel)
    return np.linalg.norm(after - before)


plain, scaled = build(None), build(0.1)
exact = np.array_equal(plain.predict(x, verbose=0), scaled.predict(x, verbose=0))
print(f"forward pass bit-identical with the scale layer: {exact}")
for name in ("backbone", "head"):
    ratio = first_update(build(0.1), name) / first_update(build(None), name)
    print(f"first-step update of {name!r} with / without the scale: {ratio:.6f}")

print(
    "\neffective learning-rate multipliers:", stopgrad_lr.effective_multipliers(scaled)
)
for label, model in (("plain SGD", plain), ("backbone at 0.1x", scaled)):
    history = model.fit(x[:1400], y[:1400], epochs=10, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x[1400:], y[1400:], verbose=0)
    print(
        f"{label:>17}: train loss {history.history['loss'][-1]:.3f}, "
        f"held-out accuracy {accuracy:.3f}"
    )
