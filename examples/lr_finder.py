"""# Choosing a learning rate with the range test

The learning-rate range test (Smith, 2017): train for a few dozen batches
while the learning rate grows exponentially from tiny to huge, record the
loss, and pick a rate from the part of the curve where the loss falls
fastest. `stopgrad_lr.find_lr(model, x, y)` runs it on a compiled model and
puts the weights and the optimizer state back afterwards, so the model is
ready to train for real. On a model with gradient scales it sweeps the base
rate; the scaled blocks sweep along at their multiples of it.

This script runs the test on scikit-learn's digits, prints every suggestion
rule (`finder.suggestions()`: `valley`, the default, halfway down the fall
of the loss; `steepest`, the steepest fall over a window; `min_div_10`, the
rate at the lowest loss divided by 10; `fastai_valley`, fastai's rule as
published), saves the plot with each marked, and then trains at each
suggestion and on a coarse grid, to see whether they are any good. The
rules are rules of thumb; `docs/lr-finder.md` measures them against known
answers. Treat a suggestion as the centre of a small sweep, not as the
answer.

Run it with `python examples/lr_finder.py [--out DIR] [--fast]`.
"""

import argparse
from pathlib import Path

import keras
import numpy as np
from matplotlib.figure import Figure
from sklearn.datasets import load_digits

import stopgrad_lr


def parse_args():
    parser = argparse.ArgumentParser(description="Learning-rate range test on digits.")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("build/examples"),
        help="folder for the plot (default: build/examples)",
    )
    parser.add_argument("--fast", action="store_true", help="a short sweep, 1 epoch")
    return parser.parse_args()


def build_model(learning_rate):
    keras.utils.set_random_seed(0)  # the same initial weights every time
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", name="hidden1"),
            keras.layers.Dense(64, activation="relu", name="hidden2"),
            keras.layers.Dense(10, name="head"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def main():
    args = parse_args()
    num_steps, epochs = (30, 1) if args.fast else (100, 10)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    model = build_model(learning_rate=0.01)  # the sweep overwrites this rate
    before = model.get_weights()
    finder = stopgrad_lr.find_lr(
        model, x_train, y_train, start_lr=1e-4, end_lr=10.0, num_steps=num_steps
    )
    restored = all(
        np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)
    )
    suggestions = finder.suggestions()
    print(
        f"Swept {len(finder.lrs)} batches from {finder.lrs[0]:.1e} to "
        f"{finder.lrs[-1]:.1e} (it stops early if the loss diverges)."
    )
    for rule, rate in suggestions.items():
        print(f"Suggestion, {rule + ':':<15} {rate:.3g}")
    print(f"Weights restored after the sweep: {restored}")

    figure = Figure(figsize=(6, 4), layout="constrained")
    finder.plot(ax=figure.subplots())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "lr_finder.png"
    figure.savefig(path, dpi=120)
    print(f"Plot: {path}")

    # Is a suggestion any good? Train at each, and at a coarse grid, for the
    # same number of epochs (the grid only in the full run: each rate traces).
    print(f"\nTraining {epochs} epoch(s) from the same initial weights:")
    candidates = {f"suggestion {rule}": rate for rule, rate in suggestions.items()}
    for rate in () if args.fast else (0.01, 0.1, 1.0):
        candidates[f"grid {rate:g}"] = rate
    for label, rate in candidates.items():
        trained = build_model(rate)
        trained.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
        _, accuracy = trained.evaluate(x_test, y_test, verbose=0)
        print(f"  {label:<25} lr {rate:<8.3g} held-out accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
