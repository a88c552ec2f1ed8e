"""`scale_gradient`: identity forward, gradient multiplied by a scale backward.

This module is the one place where the gradient trick lives. Both methods are
bit-exact in the forward pass (see `docs/how-it-works.md`) and both apply the
scale in float32 (float64 for float64 inputs), so a scale such as 1e-3 is
never rounded to float16 under mixed precision.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from stopgrad_lr._validation import validate_choice, validate_scale

METHODS = ("custom_gradient", "stop_gradient")


def validate_tensor_scale(scale: Any) -> None:
    """Raises a Keras-style `ValueError` unless a tensor or variable `scale`
    is a scalar and, where its value is known (eager tensors), finite.

    A non-scalar scale would broadcast, scaling the gradient element by
    element; its shape is known even while tracing. A traced value cannot be
    read, so a NaN there is only caught when the scale is concrete. A
    `keras.Variable` is not read: its value changes between steps, and the
    layers validate every value they assign to theirs.
    """
    shape = tuple(scale.shape)
    if shape != ():
        raise ValueError(
            "Invalid value received for argument `scale`. Expected a scalar "
            "(shape ()): a tensor of another shape would scale the gradient "
            "element by element. Reduce it to one number, or reshape a "
            "one-element tensor with keras.ops.reshape(scale, ()). Received: "
            f"scale with shape {shape}"
        )
    if isinstance(scale, keras.Variable):
        return
    try:
        value = ops.convert_to_numpy(scale)
    except Exception:
        # A symbolic tensor (tf.function graph, JAX tracer): no value yet.
        return
    if not np.isfinite(value):
        raise ValueError(
            f"Invalid value received for argument `scale`. Expected a finite "
            f"scalar tensor. Received: scale with value {value.item()!r}"
        )


def validate_method(method: Any) -> str:
    """Returns `method` if it names a known method, else raises `ValueError`."""
    return validate_choice(method, "method", METHODS)


def _product_dtype(dtype: str) -> str:
    # float64 inputs keep their precision; every narrower float type is
    # scaled in float32 so that the scale itself is never rounded to 16 bits.
    return "float64" if dtype == "float64" else "float32"


def _scale(upstream: Any, scale: Any) -> Any:
    """`upstream * scale`, computed in float32/float64, cast back."""
    product = ops.multiply(ops.cast(upstream, scale.dtype), scale)
    return ops.cast(product, upstream.dtype)


@ops.custom_gradient
def _identity_with_scaled_gradient(x: Any, scale: Any) -> Any:
    def grad(*args: Any, upstream: Any = None) -> Any:
        # TensorFlow and JAX call grad(upstream); torch calls
        # grad(x, scale, upstream=upstream).
        if upstream is None:
            (upstream,) = args
        return _scale(upstream, scale), ops.zeros_like(scale)

    # Return the input tensor itself: the backends add their own identity
    # node, and `ops.identity` would not be a no-op here.
    return x, grad


def _stop_gradient_identity(x: Any, scale: Any) -> Any:
    # `s + scale * (x - s)` with `s = stop_gradient(x)`: forward, `x - s` is
    # exactly zero for finite x, so the result is exactly `s`, which equals x.
    # Backward, only the `x` term carries gradient, multiplied by `scale`.
    # The literal `scale*x + (1-scale)*stop_gradient(x)` rounds twice and is
    # off by an ulp in 10-30% of elements.
    frozen = ops.stop_gradient(x)
    return ops.add(frozen, _scale(ops.subtract(x, frozen), scale))


def scale_gradient(x: Any, scale: Any, method: str = "custom_gradient") -> Any:
    """Identity in the forward pass; multiplies the gradient by `scale`.

    The output equals `x` bit for bit. During backpropagation the gradient
    flowing into `x` is `scale` times the gradient flowing out. With SGD-like
    optimizers this multiplies the learning rate of everything upstream of
    `x` by `scale` (adaptive optimizers such as Adam cancel it: see the
    optimizers page of the docs). `scale=0` stops the gradient; a negative
    scale reverses it.

    The product is computed in float32 (float64 for float64 inputs) and cast
    back to the dtype of the gradient, so a small scale is not rounded to
    float16 under mixed precision. Non-floating inputs are returned as is.

    Args:
        x: A tensor of any rank and dtype.
        scale: The gradient multiplier: a finite Python or NumPy number, or a
            scalar tensor or Keras variable (which may change between steps
            without retracing).
        method: `"custom_gradient"` (default), an identity whose gradient
            is defined with `keras.ops.custom_gradient`; it keeps +-inf, NaN
            and -0.0. `"stop_gradient"` computes
            `s + scale * (x - s)` with `s = stop_gradient(x)`, which uses only
            differentiable primitives; it is exact for finite values, but
            turns +-inf into NaN and -0.0 into +0.0.

    Returns:
        A tensor equal to `x`, of the same shape and dtype.

    Raises:
        ValueError: If `scale` is a bool, not a number, not finite, or a
            nonzero number that float32 rounds to zero; if a tensor `scale`
            is not a scalar, or is NaN or infinite where its value is known
            (eager execution); or if `method` is unknown.

    Examples:
        >>> import numpy as np
        >>> import stopgrad_lr
        >>> x = keras.Variable(np.array([1.0, -2.0, 3.0], dtype="float32"))
        >>> y = stopgrad_lr.scale_gradient(x, 0.5)
        >>> bool(np.array_equal(keras.ops.convert_to_numpy(y), [1.0, -2.0, 3.0]))
        True
    """
    method = validate_method(method)
    if ops.is_tensor(scale) or isinstance(scale, keras.Variable):
        validate_tensor_scale(scale)
    else:
        scale = validate_scale(scale)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if not keras.backend.is_float_dtype(dtype):
        return x
    scale = ops.cast(scale, _product_dtype(dtype))
    if method == "custom_gradient":
        return _identity_with_scaled_gradient(x, scale)
    return _stop_gradient_identity(x, scale)
