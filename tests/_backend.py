"""Backend-agnostic helpers for the tests: gradients by each backend's own autodiff."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

import stopgrad_lr

BACKEND = keras.backend.backend()

# Compilation modes each backend is tested in. torch's `jit_compile` means
# torch.compile, which needs a C++ toolchain and minutes per graph on CPU; the
# torch backend is tested eagerly.
JIT_MODES = {"tensorflow": [False, True], "jax": [False, True], "torch": [False]}[
    BACKEND
]


def to_numpy(x: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def vjp(
    fn: Callable[[Any], Any], x: np.ndarray, upstream: np.ndarray, jit: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(fn(x), upstream^T d fn / dx)` as NumPy arrays.

    The upstream gradient is fed in as is, so the gradient of an identity
    with a scaled gradient must be exactly `scale * upstream`.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def run(x: Any, upstream: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return y, tape.gradient(y, x, output_gradients=upstream)

        if jit:
            run = tf.function(run, jit_compile=True)
        y, grad = run(tf.constant(x), tf.constant(upstream))
    elif BACKEND == "jax":
        import jax

        def run(x: Any, upstream: Any) -> Any:
            y, pullback = jax.vjp(fn, x)
            return y, pullback(upstream)[0]

        if jit:
            run = jax.jit(run)
        y, grad = run(
            keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(upstream)
        )
    else:
        import torch

        if jit:
            raise ValueError("the torch backend is tested eagerly only")
        x_t = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
        y = fn(x_t)
        y.backward(keras.ops.convert_to_tensor(upstream))
        y, grad = y.detach(), x_t.grad
        assert isinstance(grad, torch.Tensor)
    return to_numpy(y), to_numpy(grad)


def bits(x: np.ndarray) -> np.ndarray:
    """The raw bit patterns of a float array, so -0.0 and NaN compare exactly."""
    x = np.ascontiguousarray(x)
    return x.view(f"uint{8 * x.dtype.itemsize}")


def weight_gradients(model: Any, inputs: Any, seed: int = 0) -> dict[int, np.ndarray]:
    """Gradients of a fixed random projection of the outputs, by variable id.

    loss = sum_i sum(output_i * w_i) with fixed random w_i, so every output
    element contributes with its own weight.
    """
    rng = np.random.default_rng(seed)
    # Shapes from a forward pass: a sequence model's outputs have `None` axes.
    projections = [
        keras.ops.convert_to_tensor(
            rng.standard_normal((1, *t.shape[1:])).astype("float32")
        )
        for t in forward(model, inputs, False)
    ]
    variables = model.trainable_variables

    def loss_of(outputs: Any) -> Any:
        return sum(
            keras.ops.sum(keras.ops.cast(o, "float32") * w)
            for o, w in zip(keras.tree.flatten(outputs), projections, strict=True)
        )

    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = loss_of(model(inputs, training=False))
        grads = tape.gradient(value, variables)
    elif BACKEND == "jax":
        import jax

        trainable = [v.value for v in variables]
        frozen = [v.value for v in model.non_trainable_variables]

        def pure(trainable: Any) -> Any:
            outputs, _ = model.stateless_call(trainable, frozen, inputs, training=False)
            return loss_of(outputs)

        # Compiled as a whole: eager JAX compiles every op of a big model.
        grads = jax.jit(jax.grad(pure))(trainable)
    else:
        import torch

        value = loss_of(model(inputs, training=False))
        grads = torch.autograd.grad(
            value, [v.value for v in variables], allow_unused=True
        )
    return {
        id(v): np.zeros(v.shape, "float32") if g is None else to_numpy(g)
        for v, g in zip(variables, grads, strict=True)
    }


def relative_error(actual: np.ndarray, desired: np.ndarray) -> float:
    """Norm-wise relative error of a whole gradient (see test_layers)."""
    desired = np.asarray(desired, "float64")
    scale = np.linalg.norm(desired)
    if scale == 0:
        return float(np.linalg.norm(actual))
    return float(np.linalg.norm(np.asarray(actual, "float64") - desired) / scale)


def forward(model: Any, inputs: Any, training: bool) -> list[np.ndarray]:
    """The model's outputs as a flat list of arrays (compiled on JAX)."""
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def run(trainable: Any, frozen: Any, inputs: Any) -> Any:
            return model.stateless_call(trainable, frozen, inputs, training=training)[0]

        result = run(trainable, frozen, inputs)
    else:
        result = model(inputs, training=training)
    return [to_numpy(t) for t in keras.tree.flatten(result)]


def layer_by_path(model, path):
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer


def assert_measured_multipliers(original, rewritten, data, tolerance=1e-5):
    """Each layer's gradient ratio equals what effective_multipliers says."""
    before, after = weight_gradients(original, data), weight_gradients(rewritten, data)
    reported = stopgrad_lr.effective_multipliers(rewritten)
    assert reported, "no trainable layer was analysed"
    for path, multiplier in reported.items():
        for variable in layer_by_path(original, path).trainable_variables:
            if math.isnan(multiplier):
                continue
            if id(variable) not in after:  # frozen: a copy that does not train
                assert multiplier == 0.0, path
                assert not layer_by_path(rewritten, path).trainable_variables
                continue
            error = relative_error(
                after[id(variable)], multiplier * before[id(variable)]
            )
            assert error <= tolerance, f"{path}: {error:.2e}"
    return reported
