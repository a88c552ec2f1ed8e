"""Training helpers shared by the layer, callback and LR finder tests.

A two-layer linear model with a scale layer between its layers, its data,
and a NumPy float64 simulation of SGD on it written out from the chain rule,
so that the reference shares no code with Keras or with this package.
"""

import keras
import numpy as np
from _backend import BACKEND

from stopgrad_lr import GradientScale

# How `fit` runs: eagerly, as a tf.function ("compiled", TensorFlow only: on
# JAX without jit it is eager), or XLA/jax.jit ("jit").
FIT_MODES = {
    "tensorflow": ["eager", "compiled", "jit"],
    "jax": ["eager", "jit"],
    "torch": ["eager"],
}[BACKEND]
BATCH, N_IN, N_HIDDEN, N_OUT = 8, 5, 4, 3


def two_layer_model(scale_layer, first_kernel):
    """x -> Dense(W1) -> scale_layer -> Dense(W2), linear, no biases."""
    second_kernel = np.random.default_rng(7).standard_normal((N_HIDDEN, N_OUT))
    inputs = keras.Input((N_IN,))
    hidden = keras.layers.Dense(N_HIDDEN, use_bias=False, name="first")(inputs)
    outputs = keras.layers.Dense(N_OUT, use_bias=False, name="second")(
        scale_layer(hidden)
    )
    model = keras.Model(inputs, outputs)
    model.get_layer("first").kernel.assign(np.asarray(first_kernel, "float32"))
    model.get_layer("second").kernel.assign(second_kernel.astype("float32"))
    return model


def data(steps=1, seed=0):
    """`steps` batches of random inputs and targets for the two-layer model."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((steps * BATCH, N_IN)).astype("float32")
    y = rng.standard_normal((steps * BATCH, N_OUT)).astype("float32")
    return x, y


def simulate_sgd(w1, w2, x, y, scales, lr):
    """Float64 SGD on mean squared error, the update of W1 times the scale.

    loss = mean((x W1 W2 - y)**2); dL/dpred = 2 (pred - y) / (batch * outputs).
    Batch `step` is rows `step * BATCH` to `(step + 1) * BATCH` of x and y.
    """
    w1, w2 = w1.astype("float64"), w2.astype("float64")
    for step, scale in enumerate(scales):
        xb = x[step * BATCH : (step + 1) * BATCH].astype("float64")
        yb = y[step * BATCH : (step + 1) * BATCH].astype("float64")
        d_pred = 2 * (xb @ w1 @ w2 - yb) / (BATCH * N_OUT)
        grad_w2 = (xb @ w1).T @ d_pred
        grad_w1 = xb.T @ (d_pred @ w2.T)
        w1, w2 = w1 - lr * scale * grad_w1, w2 - lr * grad_w2
    return w1, w2


def compile_for(model, mode, lr=1.0):
    """SGD on mean squared error, `fit` run in `mode` (see FIT_MODES)."""
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr),
        loss="mse",
        run_eagerly=mode == "eager",
        jit_compile=mode == "jit",
    )


class TraceCountingScale(GradientScale):
    """Counts how often `call` runs as Python: once per trace when compiled."""

    traces = 0

    def call(self, inputs):
        TraceCountingScale.traces += 1
        return super().call(inputs)


class BatchLogRecorder(keras.callbacks.Callback):
    """Keeps a copy of the logs of every training batch."""

    def __init__(self):
        super().__init__()
        self.batch_logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append(dict(logs))
