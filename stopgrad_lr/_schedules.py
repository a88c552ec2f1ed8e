"""Scale schedules: plain functions from training progress to a gradient scale.

`dann_ramp` maps progress in [0, 1] to a value; `linear_warmup` and
`gradual_unfreeze` return a function of the step or epoch, ready to pass to
`stopgrad_lr.ScaleSchedule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from stopgrad_lr._validation import (
    invalid,
    validate_count,
    validate_real,
    validate_scale,
    validate_time,
)


def dann_ramp(progress: float, gamma: float = 10.0) -> float:
    """The DANN ramp `2 / (1 + exp(-gamma * progress)) - 1`, from 0 towards 1.

    Ganin & Lempitsky (2015, "Unsupervised Domain Adaptation by
    Backpropagation") ramp the strength of gradient reversal with this
    function of the training progress, so the domain classifier's noisy early
    gradient does not disturb the feature extractor. It is 0 at progress 0,
    rises steeply (to 0.76 at progress 0.2 with the default gamma) and
    reaches `tanh(gamma / 2)`, 0.9999 for the default gamma of 10, at
    progress 1.

    Args:
        progress: The fraction of training done, in [0, 1], for example
            `epoch / epochs` or `step / total_steps`.
        gamma: How fast the ramp rises, a finite float > 0. Defaults to 10.0,
            the value of the paper.

    Returns:
        The ramp value, a float in [0, 1].

    Raises:
        ValueError: If `progress` is not in [0, 1] or `gamma` is not a
            finite positive number.

    Examples:
        >>> import stopgrad_lr
        >>> stopgrad_lr.dann_ramp(0.0), round(stopgrad_lr.dann_ramp(1.0), 4)
        (0.0, 0.9999)

        As the strength of a `GradientReversal` layer over 20 epochs:

        >>> epochs = 20
        >>> schedule = lambda epoch: stopgrad_lr.dann_ramp(epoch / (epochs - 1))
        >>> callback = stopgrad_lr.ScaleSchedule(
        ...     "reversal", schedule, attribute="strength")
    """
    value = validate_real(progress, "progress")
    if not 0.0 <= value <= 1.0:
        raise invalid(
            "progress",
            "a number in [0, 1], the fraction of training done",
            progress,
        )
    rate = validate_real(gamma, "gamma")
    if not 0.0 < rate < math.inf:
        raise invalid("gamma", "a finite number > 0", gamma)
    # 2 / (1 + exp(-z)) - 1 == tanh(z / 2); tanh keeps full relative precision
    # for small z, where the literal form loses digits to the subtraction.
    return math.tanh(rate * value / 2.0)


def linear_warmup(start: float, end: float, steps: int) -> Callable[[float], float]:
    """A schedule that moves linearly from `start` to `end`, then stays at `end`.

    The returned function gives `start + (end - start) * step / steps` for
    `step < steps` and exactly `end` from `steps` on.

    Args:
        start: The value at step 0, a finite float.
        end: The value from step `steps` on, a finite float.
        steps: How many steps the ramp takes, an integer >= 1.

    Returns:
        A function of the step (a number >= 0) that returns a float.

    Raises:
        ValueError: If `start` or `end` is not finite or `steps` is not an
            integer >= 1; the returned function raises it for a negative or
            non-numeric step.

    Examples:
        >>> import stopgrad_lr
        >>> warmup = stopgrad_lr.linear_warmup(0.0, 1.0, steps=4)
        >>> warmup(0), warmup(1), warmup(2), warmup(4), warmup(100)
        (0.0, 0.25, 0.5, 1.0, 1.0)
    """
    first = validate_scale(start, argument="start")
    last = validate_scale(end, argument="end")
    length = validate_count(steps, "steps", minimum=1)

    def warmup(step: float) -> float:
        time = validate_time(step, "step")
        if time >= length:
            return last
        return first + (last - first) * (time / length)

    return warmup


def gradual_unfreeze(epoch: int) -> Callable[[float], float]:
    """A schedule that is 0.0 before `epoch` and 1.0 from `epoch` on.

    With a `GradientScale` after a pretrained backbone, the backbone stays
    frozen (its gradient is zero) for the first `epoch` epochs while the new
    head trains, then trains at the full rate.

    Args:
        epoch: The first epoch (0-based) with scale 1.0, an integer >= 0.

    Returns:
        A function of the epoch (a number >= 0) that returns 0.0 or 1.0.

    Raises:
        ValueError: If `epoch` is not an integer >= 0; the returned function
            raises it for a negative or non-numeric epoch.

    Examples:
        >>> import stopgrad_lr
        >>> unfreeze = stopgrad_lr.gradual_unfreeze(2)
        >>> unfreeze(0), unfreeze(1), unfreeze(2), unfreeze(3)
        (0.0, 0.0, 1.0, 1.0)
    """
    first_trained = validate_count(epoch, "epoch", minimum=0)

    def unfreeze(current: float) -> float:
        time = validate_time(current, "epoch")
        return 1.0 if time >= first_trained else 0.0

    return unfreeze
