"""`scale_gradient`: exact forward values and scaled gradients, on every backend."""

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from _backend import JIT_MODES, bits, to_numpy, vjp

import stopgrad_lr
from stopgrad_lr import scale_gradient

METHODS = ["custom_gradient", "stop_gradient"]
FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]
SCALES = [1.0, 0.5, 0.1, 1e-3, 0.0, -1.0, 2.5]


def random_values(dtype, shape=(64, 33), seed=0):
    """Values spread over many binades, both signs, rounded to `dtype`."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3, shape)
    return values.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale", [0.1, 0.3, 0.77, 1e-3, -1.0, 0.0])
def test_forward_is_bit_exact(method, dtype, scale):
    x = random_values(dtype)
    y, _ = vjp(lambda t: scale_gradient(t, scale, method), x, x)
    assert y.dtype == x.dtype
    assert np.array_equal(bits(y), bits(x))


@pytest.mark.parametrize("jit", JIT_MODES)
@pytest.mark.parametrize("method", METHODS)
def test_forward_is_bit_exact_when_compiled(method, jit):
    x = random_values("float32")
    y, _ = vjp(lambda t: scale_gradient(t, 0.3, method), x, x, jit=jit)
    assert np.array_equal(bits(y), bits(x))


def test_seed_arrangement_is_not_exact():
    """`k*x + (1-k)*stop_gradient(x)`, the recipe we rearrange, rounds twice."""
    from keras import ops

    def seed_trick(t, k=0.1):
        return k * t + (1 - k) * ops.stop_gradient(t)

    x = random_values("float32")
    y, grad = vjp(seed_trick, x, np.ones_like(x))
    mismatched = np.mean(y != x)
    assert mismatched > 0.05, f"only {mismatched:.1%} of elements differ"
    # It does scale the gradient: the flaw is only in the forward pass.
    np.testing.assert_allclose(grad, 0.1, rtol=1e-6)


SPECIAL = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 1.0, -1.0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_custom_gradient_keeps_inf_nan_and_negative_zero(dtype):
    x = SPECIAL.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    y, _ = vjp(lambda t: scale_gradient(t, 0.1), x, np.ones_like(x))
    # A NaN's sign bit has no meaning (and Keras's torch bfloat16 conversion
    # drops it), so NaN is compared as NaN and everything else bit for bit.
    assert np.isnan(y[2])
    keep = ~np.isnan(x)
    assert np.array_equal(bits(y[keep]), bits(x[keep]))


def test_stop_gradient_method_documented_special_values():
    """Documented: +-inf become NaN, -0.0 becomes +0.0, NaN and finite stay."""
    x = SPECIAL.astype("float32")
    y, _ = vjp(lambda t: scale_gradient(t, 0.1, "stop_gradient"), x, np.ones_like(x))
    assert np.isnan(y[:3]).all()
    assert y[3] == 0.0 and not np.signbit(y[3])
    assert np.array_equal(bits(y[4:]), bits(x[4:]))


@pytest.mark.parametrize("jit", JIT_MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", SCALES)
def test_gradient_is_scaled(scale, method, jit):
    x = random_values("float32", seed=1)
    upstream = random_values("float32", seed=2)
    _, grad = vjp(lambda t: scale_gradient(t, scale, method), x, upstream, jit=jit)
    expected = scale * upstream.astype("float64")
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_gradient_is_scaled_in_float32(dtype, method):
    """The product is formed in float32 and rounded once, to the input dtype."""
    half = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    scale = 0.123456789
    x = random_values(dtype, seed=3)
    upstream = random_values(dtype, seed=4)
    _, grad = vjp(lambda t: scale_gradient(t, scale, method), x, upstream)
    assert grad.dtype == x.dtype
    expected = (upstream.astype(np.float32) * np.float32(scale)).astype(half)
    assert np.array_equal(bits(grad), bits(expected))
    # The check has teeth: rounding the scale to the half type first differs.
    rounded_first = (upstream * half(scale)).astype(half)
    assert not np.array_equal(bits(rounded_first), bits(expected))


def test_scale_may_be_a_variable():
    import keras

    scale = keras.Variable(0.25, trainable=False)
    x = random_values("float32")
    _, grad = vjp(lambda t: scale_gradient(t, scale), x, np.ones_like(x))
    assert np.all(grad == 0.25)


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "uint8"])
def test_non_float_inputs_pass_through(dtype):
    from keras import ops

    x = np.arange(12).reshape(3, 4).astype(dtype)
    y = scale_gradient(ops.convert_to_tensor(x), 0.5)
    assert np.array_equal(to_numpy(y), x)


@pytest.mark.parametrize("rank", range(6))
def test_any_rank(rank):
    x = random_values("float32", shape=(2,) * rank)
    y, grad = vjp(lambda t: scale_gradient(t, 0.5), x, np.ones_like(x))
    assert y.shape == x.shape and np.array_equal(y, x)
    assert np.all(grad == 0.5)


@pytest.mark.parametrize(
    ("scale", "reason"),
    [
        (True, "not a bool"),
        (np.bool_(False), "not a bool"),
        ("0.1", "type str"),
        (None, "type NoneType"),
        ([0.1], "type list"),
        (float("nan"), "finite in float32"),
        (float("inf"), "finite in float32"),
        (1e39, "finite in float32"),
    ],
)
def test_invalid_scale_is_rejected(scale, reason):
    with pytest.raises(
        ValueError, match="Invalid value received for argument `scale`"
    ) as info:
        scale_gradient(np.ones(3, "float32"), scale)
    assert reason in str(info.value)
    assert f"Received: scale={scale!r}" in str(info.value)


def test_numpy_scalars_are_accepted():
    for scale in (np.float16(0.5), np.float64(0.5), np.int64(2)):
        _, grad = vjp(
            lambda t, s=scale: scale_gradient(t, s),
            np.ones(3, "float32"),
            np.ones(3, "float32"),
        )
        assert np.all(grad == float(scale))


def test_unknown_method_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"Expected one of \('custom_gradient', 'stop_gradient'\). "
        r"Received: method='stopgrad'",
    ):
        scale_gradient(np.ones(3, "float32"), 0.5, method="stopgrad")


API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_public_api_is_deliberate():
    # The snapshot is the API reference: a name added to `__all__` must be
    # documented there, and a documented name must be exported.
    documented = re.findall(
        r"^::: stopgrad_lr\.(\w+)$", API_PAGE.read_text("utf-8"), re.M
    )
    assert len(documented) == len(set(documented)), "a name is documented twice"
    assert stopgrad_lr.__all__ == sorted([*documented, "__version__"])
