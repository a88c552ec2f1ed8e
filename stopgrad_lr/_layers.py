"""The package's Keras layers: `GradientScale`, `GradientReversal`,
`GradientStop` and `ParameterScale`.

Each is pure: its `call` does only its arithmetic, so it costs what the
arithmetic costs, in eager mode, in a traced step or in a custom loop.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import numpy as np
from keras import ops

from stopgrad_lr._ops import scale_gradient, validate_method
from stopgrad_lr._optimizer_kinds import SCALE_INVARIANT, validate_update_rule
from stopgrad_lr._validation import invalid, validate_scale


def _replicated() -> contextlib.AbstractContextManager[Any]:
    """A scope in which a new variable is replicated over the active
    `keras.distribution.ModelParallel`'s mesh, whatever its layout map says:
    a pattern meant for the model's weights (`"decoder_block.*scale"`) may
    match a scale's path (`"decoder_block_0_gradient_scale/scale"`), and a
    layout for a weight does not fit a scalar. A no-op otherwise
    (`DataParallel` replicates every variable)."""
    current = keras.distribution.distribution()
    if not isinstance(current, keras.distribution.ModelParallel):
        return contextlib.nullcontext()
    return keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(current.device_mesh),
        batch_dim_name=current.batch_dim_name,
        auto_shard_dataset=False,
    ).scope()


@keras.saving.register_keras_serializable(package="stopgrad_lr")
class GradientScale(keras.layers.Layer):
    """Identity in the forward pass; multiplies the gradient by `scale`.

    Put it after a block of a network and, with an SGD-like optimizer,
    everything upstream of it trains with its learning rate multiplied by
    `scale` (scales compound: two layers with 0.1 give 0.01 to what lies
    before both). `scale=0` stops the gradient, a negative scale reverses it.
    The output is bit-identical to the input in every dtype.

    The scale lives in a non-trainable float32 variable that is never
    autocast, so assigning `layer.scale = value` takes effect at the next
    training step of an already compiled and traced model, without
    retracing. The layer does not cast its input: it returns the same dtype
    it receives, whatever the dtype policy. That variable is one of the
    model's (non-trainable) weights: `model.set_weights` or `load_weights`
    from a snapshot taken before an assignment puts the old scale back, so
    assign the scale again after restoring weights (see "The scale is one
    of the model's weights" in docs/how-it-works.md).

    On the JAX backend, `fit` carries the variables outside the model during
    an epoch; a callback that changes the scale must reach the layer through
    `self.model` (which syncs that state first), as in
    `self.model.get_layer("boundary").scale = 0.5`.

    The scale is a learning-rate multiplier only for optimizers whose update
    is linear in the gradient (SGD, momentum, Nesterov);
    `stopgrad_lr.check_optimizer` says whether an optimizer cancels or
    bypasses the scales (Adam, weight decay, clipping...), and the
    `stopgrad_lr.OptimizerCheck` callback checks when training starts. The
    layer itself does only its arithmetic.

    Args:
        scale: The gradient multiplier, a finite float. Defaults to 1.0.
        method: `"custom_gradient"` (default) or `"stop_gradient"`; see
            `stopgrad_lr.scale_gradient`. Both are exact in the forward pass
            for finite values; only `"custom_gradient"` also keeps +-inf and
            -0.0.
        **kwargs: Base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: A tensor of any rank and dtype. Non-floating tensors pass
            through without a gradient.

    Returns:
        The input, unchanged.

    Raises:
        ValueError: If `scale` (in the constructor or on `layer.scale = v`)
            is not a finite number, or is a nonzero number that float32
            rounds to zero, or if `method` is unknown.

    Examples:
        >>> import numpy as np
        >>> import stopgrad_lr
        >>> layer = stopgrad_lr.GradientScale(0.1)
        >>> layer.scale
        0.1
        >>> x = np.array([[1.0, 2.0]], dtype="float32")
        >>> bool(np.array_equal(keras.ops.convert_to_numpy(layer(x)), x))
        True
        >>> layer.scale = 0.5
        >>> layer.scale
        0.5
    """

    def __init__(
        self, scale: float = 1.0, method: str = "custom_gradient", **kwargs: Any
    ) -> None:
        # A pass-through layer must not cast its input to the policy's
        # compute dtype: under mixed_float16 that would round float32 inputs.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        scale = validate_scale(scale)
        self.method = validate_method(method)
        self.supports_masking = True
        with _replicated():
            self._scale = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(scale),
                dtype="float32",
                trainable=False,
                autocast=False,
                name="scale",
            )
        self._last_set = scale
        self._build_at_init()

    @property
    def scale(self) -> float:
        """The current gradient multiplier, as a Python float.

        The value is stored in float32; this returns the shortest decimal
        that identifies it (so a scale set to 0.1 reads back as 0.1).
        """
        try:
            value = keras.ops.convert_to_numpy(self._scale)
        except TypeError:
            # On JAX, `fit` moves the values of the model's variables into
            # its training state for an epoch, and an emptied variable fails
            # to read. The scale is then the one last set here.
            value = self._last_set
        return float(str(np.float32(value)))

    @scale.setter
    def scale(self, value: float) -> None:
        value = validate_scale(value)
        self._scale.assign(value)
        self._last_set = value

    def call(self, inputs: Any) -> Any:
        return scale_gradient(inputs, self._scale, method=self.method)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def compute_output_spec(self, inputs: Any) -> Any:
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale, "method": self.method}


@keras.saving.register_keras_serializable(package="stopgrad_lr")
class GradientReversal(GradientScale):
    """Identity in the forward pass; multiplies the gradient by `-strength`.

    The gradient reversal layer of domain-adversarial training (DANN): the
    feature extractor below it learns to confuse the domain classifier above
    it. It is a `GradientScale` whose scale is `-strength`; `strength` can be
    changed during training (for example ramped from 0 to 1) without
    retracing.

    Args:
        strength: How strongly to reverse, a finite float. Defaults to 1.0.
        method: `"custom_gradient"` (default) or `"stop_gradient"`.
        **kwargs: Base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: A tensor of any rank and dtype.

    Returns:
        The input, unchanged.

    Raises:
        ValueError: If `strength` is not a finite number, or is a nonzero
            number that float32 rounds to zero, or if `method` is unknown.

    Examples:
        >>> import stopgrad_lr
        >>> layer = stopgrad_lr.GradientReversal(0.3)
        >>> layer.strength, layer.scale
        (0.3, -0.3)
    """

    def __init__(
        self, strength: float = 1.0, method: str = "custom_gradient", **kwargs: Any
    ) -> None:
        strength = validate_scale(strength, argument="strength")
        # `0.0 - x` rather than `-x`: a strength of 0 must not read back as -0.0.
        super().__init__(scale=0.0 - strength, method=method, **kwargs)

    @property
    def strength(self) -> float:
        """The current reversal strength: the gradient is multiplied by -strength."""
        return 0.0 - self.scale

    @strength.setter
    def strength(self, value: float) -> None:
        self.scale = 0.0 - validate_scale(value, argument="strength")

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["strength"] = 0.0 - config.pop("scale")
        return config


@keras.saving.register_keras_serializable(package="stopgrad_lr")
class GradientStop(keras.layers.Layer):
    """Identity in the forward pass; no gradient flows back through it.

    Unlike `GradientScale(0.0)`, which multiplies the gradient by zero and
    still runs the whole backward pass upstream, a stop cuts the backward
    graph: nothing upstream of it is differentiated, so that part of a
    training step costs only its forward pass. A stop is fixed; use
    `GradientScale(0.0)` for a zero that a schedule raises later (gradual
    unfreezing). A stop alone does not freeze: the layers upstream stay
    trainable, so on JAX (zero gradients) momentum and weight decay still
    move them, the optimizer keeps slots for them, and BatchNormalization
    layers stay in training mode. A zero in
    `stopgrad_lr.insert_gradient_scales` inserts a stop and also freezes
    copies of the layers upstream (`trainable=False`).

    Args:
        **kwargs: Base layer keyword arguments, such as `name`.

    Call arguments:
        inputs: A tensor of any rank and dtype.

    Returns:
        The input, unchanged (bit for bit, including +-inf and -0.0).

    Raises:
        ValueError: On `layer.scale = value` with a value other than 0.

    Examples:
        >>> import numpy as np
        >>> import stopgrad_lr
        >>> x = np.array([1.0, -0.0, np.inf], dtype="float32")
        >>> y = keras.ops.convert_to_numpy(stopgrad_lr.GradientStop()(x))
        >>> bool(np.array_equal(y.view("uint32"), x.view("uint32")))
        True
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.supports_masking = True
        self._build_at_init()

    @property
    def scale(self) -> float:
        """Always 0.0, read by the analysis like `GradientScale.scale`.

        A stop is fixed: assigning any other value raises a `ValueError`
        rather than being reported upstream while no gradient flows.
        """
        return 0.0

    @scale.setter
    def scale(self, value: float) -> None:
        if validate_scale(value) != 0.0:
            raise invalid(
                "scale",
                "0.0: a GradientStop always stops the gradient and cannot scale it. "
                "For a scale that changes during training, insert GradientScale(0.0) "
                "instead (stop_at_zero=False in insert_gradient_scales / "
                "apply_lr_multipliers)",
                value,
            )

    def call(self, inputs: Any) -> Any:
        return keras.ops.stop_gradient(inputs)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def compute_output_spec(self, inputs: Any) -> Any:
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)


# Every layer this package inserts, for analysis and stripping.
@keras.saving.register_keras_serializable(package="stopgrad_lr")
class ParameterScale(keras.layers.Layer):
    """Multiplies its input by a constant: the output scale of a reparametrised layer.

    `stopgrad_lr.apply_lr_multipliers(..., mechanism="reparametrize")` stores
    a layer's parameters divided by `scale` and puts this layer right after
    it, so that the pair computes what the layer computed while the optimizer
    sees the parameters' gradient multiplied by `scale`. An optimizer that
    normalises the gradient (Adam, Lion, Muon...) then trains the layer with
    its learning rate multiplied by `scale`; SGD multiplies it by
    `scale**2`. `update_rule` records which of the two the scale was chosen
    for, and `multiplier` is the resulting learning-rate multiplier.

    The product is computed in the layer's compute dtype. With a power of two
    as `scale` it is exact, and so is the division of the weights.
    `stopgrad_lr.strip_gradient_scales` folds the scale back into the layer's
    weights. The scale is fixed: the stored weights depend on it.

    Args:
        scale: The output scale `c`, a finite float > 0.
        update_rule: `"scale_invariant"` (default) when `c` was chosen for an
            optimizer that normalises the gradient (`multiplier == c`), or
            `"linear"` when it was chosen for SGD (`multiplier == c**2`).
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: A floating tensor, the output of the reparametrised layer.

    Returns:
        `inputs * scale`.

    Raises:
        ValueError: If `scale` is not a finite float > 0 or `update_rule` is
            unknown.

    Examples:
        >>> import numpy as np
        >>> from stopgrad_lr import ParameterScale
        >>> layer = ParameterScale(0.125)
        >>> layer.multiplier
        0.125
        >>> x = np.array([[8.0, -2.0]], dtype="float32")
        >>> keras.ops.convert_to_numpy(layer(x)).tolist()
        [[1.0, -0.25]]
        >>> ParameterScale(0.25, update_rule="linear").multiplier
        0.0625
    """

    def __init__(
        self, scale: float, update_rule: str = SCALE_INVARIANT, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        scale = validate_scale(scale)
        if scale <= 0:
            raise invalid(
                "scale",
                "a float > 0 (the stored weights are divided by it)",
                scale,
            )
        self.scale = scale
        self.update_rule = validate_update_rule(update_rule)
        self.supports_masking = True
        self._build_at_init()

    @property
    def multiplier(self) -> float:
        """The learning-rate multiplier the layer before it gets from an
        optimizer of kind `update_rule`."""
        return self.scale if self.update_rule == SCALE_INVARIANT else self.scale**2

    def call(self, inputs: Any) -> Any:
        return ops.multiply(inputs, ops.cast(self.scale, inputs.dtype))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "scale": self.scale,
            "update_rule": self.update_rule,
        }


# The layers that set a gradient multiplier in the graph.
SCALE_LAYERS = (GradientScale, GradientStop)
