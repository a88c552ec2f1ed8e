"""Scale schedules against their formulas, computed here another way."""

import math

import numpy as np
import pytest

from stopgrad_lr import dann_ramp, gradual_unfreeze, linear_warmup


@pytest.mark.parametrize("gamma", [10.0, 1.0, 3.5])
def test_dann_ramp_is_the_paper_formula(gamma):
    progress = np.linspace(0.0, 1.0, 101)
    # The formula as printed in Ganin & Lempitsky (2015), in float64 NumPy.
    expected = 2.0 / (1.0 + np.exp(-gamma * progress)) - 1.0
    actual = np.array([dann_ramp(float(p), gamma) for p in progress])
    np.testing.assert_allclose(actual, expected, rtol=1e-13, atol=1e-16)
    assert dann_ramp(0.0, gamma) == 0.0
    assert np.all(np.diff(actual) > 0)


def test_dann_ramp_default_gamma_is_ten():
    assert dann_ramp(0.3) == dann_ramp(0.3, gamma=10.0)
    assert dann_ramp(0.3) != dann_ramp(0.3, gamma=5.0)
    assert dann_ramp(1.0) == pytest.approx(2.0 / (1.0 + math.exp(-10.0)) - 1.0)


def test_dann_ramp_keeps_precision_near_zero():
    # The literal formula loses digits to the final subtraction here; the
    # ramp's slope at 0 is gamma / 2, so the value is 5e-12 to 12 digits.
    assert dann_ramp(1e-12) == pytest.approx(5e-12, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"progress": -0.01}, "progress"),
        ({"progress": 1.01}, "progress"),
        ({"progress": float("nan")}, "progress"),
        ({"progress": True}, "progress"),
        ({"progress": "0.5"}, "progress"),
        ({"progress": 0.5, "gamma": 0.0}, "gamma"),
        ({"progress": 0.5, "gamma": -1.0}, "gamma"),
        ({"progress": 0.5, "gamma": float("inf")}, "gamma"),
    ],
)
def test_dann_ramp_rejects_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError) as info:
        dann_ramp(**kwargs)
    message = str(info.value)
    assert message.startswith(f"Invalid value received for argument `{argument}`.")
    assert f"Received: {argument}={kwargs[argument]!r}" in message


@pytest.mark.parametrize(
    ("start", "end", "steps"),
    [(0.0, 1.0, 4), (1.0, 0.1, 3), (-0.5, 2.0, 7), (0.25, 0.25, 1)],
)
def test_linear_warmup_interpolates_then_holds(start, end, steps):
    warmup = linear_warmup(start, end, steps)
    for step in range(steps + 4):
        fraction = min(step, steps) / steps
        assert warmup(step) == pytest.approx(
            start * (1 - fraction) + end * fraction, rel=1e-15, abs=1e-15
        )
    # Exactly `end` from `steps` on, and exactly `start` at 0.
    assert warmup(steps) == end and warmup(10 * steps) == end
    assert warmup(0) == start
    # A fractional step interpolates too.
    assert warmup(steps / 2) == pytest.approx((start + end) / 2)


@pytest.mark.parametrize(
    ("args", "argument", "value"),
    [
        ((0.0, 1.0, 0), "steps", 0),
        ((0.0, 1.0, 2.5), "steps", 2.5),
        ((0.0, 1.0, True), "steps", True),
        ((float("nan"), 1.0, 3), "start", float("nan")),
        ((0.0, float("inf"), 3), "end", float("inf")),
    ],
)
def test_linear_warmup_rejects_invalid_arguments(args, argument, value):
    with pytest.raises(ValueError) as info:
        linear_warmup(*args)
    assert str(info.value).startswith(
        f"Invalid value received for argument `{argument}`."
    )
    assert f"Received: {argument}={value!r}" in str(info.value)


def test_linear_warmup_rejects_a_negative_step():
    with pytest.raises(ValueError, match="Received: step=-1"):
        linear_warmup(0.0, 1.0, 3)(-1)


@pytest.mark.parametrize("epoch", [0, 1, 3, np.int64(2)])
def test_gradual_unfreeze_steps_at_the_epoch(epoch):
    unfreeze = gradual_unfreeze(epoch)
    values = [unfreeze(e) for e in range(6)]
    assert values == [0.0] * int(epoch) + [1.0] * (6 - int(epoch))
    assert all(type(v) is float for v in values)


@pytest.mark.parametrize("epoch", [-1, 1.5, None, False])
def test_gradual_unfreeze_rejects_invalid_epochs(epoch):
    with pytest.raises(ValueError, match=f"Received: epoch={epoch!r}"):
        gradual_unfreeze(epoch)
    with pytest.raises(ValueError, match="Received: epoch=-2"):
        gradual_unfreeze(1)(-2)
