"""Backend-agnostic helpers for the tests: gradients by each backend's own autodiff."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

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
