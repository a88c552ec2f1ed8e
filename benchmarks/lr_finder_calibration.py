"""Can the LR finder's suggestion be trusted? Measured where the answer is known.

Three problems, 5 seeds each; on each seed `stopgrad_lr.find_lr` runs the
default sweep but from a decade higher (1e-6 to 10, 100 steps, batch 32,
the default divergence test), and every suggestion rule is compared with
the truth:

1. linear least squares, `Dense(1, use_bias=False)` and plain SGD on a
   generated design matrix of 4 features of different scales, whose loss
   Hessian `(2/N) X^T X` has the eigenvalues 32, 4, 1, 0.25 (checked with
   `numpy.linalg.eigvalsh`). Gradient descent diverges above
   `2 / lambda_max` and converges fastest at `2 / (lambda_max + lambda_min)`;
2. the digits CNN of `examples/finetune_digits.py` (SGD with momentum 0.9),
   trained from scratch on scikit-learn's digits 0-4; the truth is a full
   training (8 epochs) at each rate of a grid, scored by validation loss;
3. a small transformer encoder (one attention block, Adam) that names the
   most frequent token of a sequence; the truth again a grid of full
   trainings (5 epochs).

The grids are trained once, from seed 0's initial weights (each training
costs as much as dozens of sweeps on 2 CPUs); the sweeps run on every seed.

On the grids, the best rate is the one of the lowest final validation loss,
and the divergence point the lowest rate whose training ends with a NaN or
with a validation loss above the initial one.

It writes `docs/lr-finder.md` whole (the page is generated: rerun rather
than edit):

    python benchmarks/lr_finder_calibration.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable

import keras
import numpy as np
from _report import REPOSITORY, machine_description, today, write_atomically

import stopgrad_lr

sys.path.insert(0, str(REPOSITORY / "examples"))
import finetune_digits  # the demo's CNN and data

COMMAND = "python benchmarks/lr_finder_calibration.py"
OUTPUT = REPOSITORY / "docs" / "lr-finder.md"
SWEEP = {"start_lr": 1e-6, "end_lr": 10.0, "num_steps": 100, "batch_size": 32}
RULES = ("valley", "steepest", "min_div_10", "fastai_valley")
DEFAULT_RULE = "valley"
EIGENVALUES = (32.0, 4.0, 1.0, 0.25)
# Factor sqrt(10) apart; each problem's grid brackets its best rate.
DIGITS_GRID = tuple(10.0 ** (k / 2) for k in range(-6, 2))  # 1e-3 ... 3.2
TRANSFORMER_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 0))  # 1e-4 ... 0.32


@dataclasses.dataclass
class Truth:
    divergence: float  # the lowest rate that diverges (inf if none)
    best: float  # the best constant rate
    how: str


@dataclasses.dataclass
class Run:
    seed: int
    truth: Truth
    suggestions: dict[str, float]
    seconds: float
    lrs: list[float]
    losses: list[float]


# Problem 1: linear least squares ----------------------------------------------


def least_squares(seed: int) -> tuple[np.ndarray, np.ndarray, Truth]:
    """X (4096 x 4) with (2/N) X^T X = V diag(EIGENVALUES) V^T, y = X w + noise."""
    rng = np.random.default_rng(seed)
    samples = 4096
    basis, _ = np.linalg.qr(rng.standard_normal((samples, 4)))
    rotation, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    x = basis @ np.diag(np.sqrt(np.array(EIGENVALUES) * samples / 2)) @ rotation.T
    y = x @ rng.standard_normal((4, 1)) + 0.5 * rng.standard_normal((samples, 1))
    eigenvalues = np.linalg.eigvalsh(2.0 / samples * x.T @ x)
    truth = Truth(
        divergence=2.0 / eigenvalues.max(),
        best=2.0 / (eigenvalues.max() + eigenvalues.min()),
        how="analytic: 2/λmax and 2/(λmax + λmin)",
    )
    return x.astype("float32"), y.astype("float32"), truth


def least_squares_run(seed: int) -> Run:
    x, y, truth = least_squares(seed)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=False)
    start = time.perf_counter()
    finder = stopgrad_lr.find_lr(model, x, y, seed=seed, **SWEEP)
    seconds = time.perf_counter() - start
    return Run(seed, truth, finder.suggestions(), seconds, finder.lrs, finder.losses)


# Problems 2 and 3: a grid of full trainings -----------------------------------


def grid_truth(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    epochs: int,
    grid: tuple[float, ...],
) -> Truth:
    """Trains from the model's current state at every rate of `grid`.

    The model, compiled with a float learning rate, is put back to its
    initial variables before each training, so one trace serves all rates.
    """
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    saved = [
        (v, keras.ops.convert_to_numpy(v))
        for v in [*model.variables, *optimizer.variables]
    ]
    initial = model.evaluate(*validation, verbose=0, batch_size=256)
    scores = {}
    for rate in grid:
        for variable, value in saved:
            variable.assign(value)
        optimizer.learning_rate = rate
        keras.utils.set_random_seed(0)
        model.fit(*train, batch_size=32, epochs=epochs, verbose=0)
        loss = model.evaluate(*validation, verbose=0, batch_size=256)
        scores[rate] = loss if math.isfinite(loss) else math.inf
    for variable, value in saved:
        variable.assign(value)
    diverged = [rate for rate, loss in scores.items() if not loss < initial]
    return Truth(
        divergence=min(diverged, default=math.inf),
        best=min(scores, key=lambda rate: scores[rate]),
        how=(
            f"{len(grid)} rates from {grid[0]:.2g} to {grid[-1]:.2g}, factor "
            f"√10 apart, {epochs} epochs each from seed 0's initial weights, "
            "scored by validation loss"
        ),
    )


def digits_data() -> tuple[
    tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]
]:
    (images, labels), _ = finetune_digits.load_tasks()  # digits 0-4
    order = np.random.default_rng(0).permutation(len(labels))
    train, validation = order[:600], order[600:]
    return (images[train], labels[train]), (images[validation], labels[validation])


def digits_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return finetune_digits.compile_with_sgd(finetune_digits.build_cnn(), 0.01)


@functools.cache
def digits_truth() -> Truth:
    train, validation = digits_data()
    return grid_truth(digits_model(0), train, validation, 8, DIGITS_GRID)


def digits_run(seed: int) -> Run:
    train, _ = digits_data()
    return measured_run(digits_model(seed), train, digits_truth(), seed)


def majority_data(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of 12 tokens of 8; the label is the most frequent token
    (3 to 5 positions are set to it, the others are random)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 8, (count, 12))
    labels = rng.integers(0, 8, count)
    for row, label in enumerate(labels):
        extra = rng.choice(12, rng.integers(3, 6), replace=False)
        tokens[row, extra] = label
    counts = np.stack([(tokens == t).sum(axis=1) for t in range(8)], axis=1)
    return tokens.astype("int32"), counts.argmax(axis=1)


def transformer(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12,), dtype="int32")
    x = keras.layers.Embedding(8, 16)(inputs)
    positions = keras.layers.Embedding(12, 16)(keras.ops.arange(12))
    x = x + positions
    attended = keras.layers.MultiHeadAttention(2, 8)(x, x)
    x = keras.layers.LayerNormalization()(x + attended)
    hidden = keras.layers.Dense(32, activation="relu")(x)
    x = keras.layers.LayerNormalization()(x + keras.layers.Dense(16)(hidden))
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(8)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    return model


@functools.cache
def transformer_truth() -> Truth:
    train, validation = majority_data(1024, 100), majority_data(512, 101)
    return grid_truth(transformer(0), train, validation, 5, TRANSFORMER_GRID)


def transformer_run(seed: int) -> Run:
    truth = transformer_truth()
    return measured_run(transformer(seed), majority_data(1024, 100), truth, seed)


def measured_run(
    model: keras.Model, train: tuple[np.ndarray, np.ndarray], truth: Truth, seed: int
) -> Run:
    start = time.perf_counter()
    finder = stopgrad_lr.find_lr(model, *train, seed=seed, **SWEEP)
    seconds = time.perf_counter() - start
    return Run(seed, truth, finder.suggestions(), seconds, finder.lrs, finder.losses)


PROBLEMS: dict[str, tuple[str, Callable[[int], Run]]] = {
    "least squares": (
        "Linear least squares, 4096 x 4, eigenvalues 32, 4, 1, 0.25; SGD",
        least_squares_run,
    ),
    "digits CNN": (
        "The digits CNN of examples/finetune_digits.py, digits 0-4, 600 "
        "training images; SGD, momentum 0.9",
        digits_run,
    ),
    "transformer": (
        "A one-block transformer encoder naming the majority token of 12, "
        "1024 training sequences; Adam",
        transformer_run,
    ),
}


# The page ---------------------------------------------------------------------

NOTES = {
    "least squares": [
        "With these eigenvalues 2/(λmax + λmin) is 99% of 2/λmax: the best",
        "constant rate sits at the cliff, so the floor leaves only the decade",
        "below the divergence point, and a rule that keeps a margin from",
        "divergence lands near the bottom of that decade. A rate 10 times",
        "lower still converges, 10 times slower along λmax.",
        "",
    ]
}


def passes(run: Run, rule: str) -> tuple[bool, bool]:
    """(below the divergence point, within a factor of 10 of the best rate)."""
    rate = run.suggestions[rule]
    return (
        rate < run.truth.divergence,
        run.truth.best / 10 <= rate <= run.truth.best * 10,
    )


def render(results: dict[str, list[Run]], seconds: float) -> str:
    seeds = len(next(iter(results.values())))
    lines = [
        "# The learning-rate finder",
        "",
        f"<!-- Generated by {COMMAND.split()[1]}. Do not edit: rerun it. -->",
        "",
        "`stopgrad_lr.find_lr(model, x, y)` runs the learning-rate range test",
        "(Smith, 2017): a few dozen to a few hundred batches of training while",
        "the learning rate grows from tiny to huge, recording the loss. It puts",
        "the model back exactly afterwards (weights, BatchNormalization",
        "statistics, random seeds, metric state, the optimizer's variables and",
        "step count, its learning rate or schedule), so a `fit` after it gives",
        "bit-identical weights to the same `fit` without it. It sweeps the base",
        "rate: blocks behind `GradientScale` layers follow at their multiples,",
        "and the groups of `stopgrad_lr.multi_optimizer` keep their ratios.",
        "",
        "## Which rule to use",
        "",
        "`finder.suggestion(rule)` reads a rate off `finder.curve()`: the",
        "recorded batch losses under a centred running median. Unlike the",
        "moving average of `smoothed_losses` (`beta=0.98`), it does not lag:",
        "that average rests on about the",
        "last 50 batches, half of a 100-step sweep, so its fall comes late and",
        "drawn out, and on the least-squares problem below the steepest slope",
        "of the average lands on the noise at the start (3e-6, four decades too",
        "low). `finder.suggestions()` gives every rule, and `finder.plot()`",
        "marks each.",
        "",
        "- **`valley`** (the default): the last rate, before the minimum of",
        "  the loss curve, at which the loss is still above the level halfway",
        "  down from its top to that minimum on a log scale,",
        "  `sqrt(top * minimum)`. Use it first: noise much smaller than the fall",
        "  cannot move a level crossing much.",
        "- **`steepest`**: the steepest slope of the loss curve against",
        "  `log10(lr)`, each slope fitted over a window of points, skipping",
        "  the first tenth and the last twentieth. Use it on a clean curve with",
        "  one clear drop; it sits high in the useful range.",
        "- **`min_div_10`**: the rate of the lowest loss of the curve, over 10.",
        "  Conservative; use it when the loss falls until it diverges, where the",
        "  best rate sits just below the divergence point.",
        "- **`fastai_valley`**: fastai's valley as published, halfway through the",
        "  longest strictly decreasing subsequence of the loss curve; shown",
        "  for comparison, since noise on a long plateau stretches that",
        "  subsequence into the plateau.",
        "",
        "Treat any suggestion as the centre of a small sweep, not as the answer.",
        "The rules' constants (the median's width, the valley's log-scale",
        "halfway level) were chosen while looking at these calibration",
        "sweeps, so the tables below flatter them somewhat.",
        "",
        'Options: `mode="linear"` for a linear sweep; `num_steps` may exceed',
        "an epoch (the data repeats); `validation_data=(x_val, y_val)` records",
        "the loss on held-out data after every step instead of the training",
        "batch's (less noisy, slower).",
        "",
        "## Where the sweep stops",
        "",
        "The sweep stops where the loss diverges: at the first batch where the",
        "median of the last 3 batch losses exceeds `diverge_factor` (default 4,",
        "as fastai) times the lowest such median so far, or where that median,",
        "after falling below the lowest of the first 10 losses by more than",
        "their range (a fall, not noise), climbs above the highest of them (a",
        "cross-entropy that only halves before it diverges never reaches 4",
        "times its minimum). A median of 3 ignores one spike up or",
        "down and trails the sweep by one batch; the moving average of",
        "`smoothed_losses` trails it by about 50 and, on a digits MLP with",
        "Adam, never reached 4 times its own lagged minimum before lr 10. It",
        "always stops on a NaN or infinite loss. `finder.divergence_lr` is",
        "where it diverged; every rule reads only the batches before it, and",
        "`finder.plot()` spans its loss axis over them and marks it dotted.",
        "`stop_on_divergence=False` records the whole sweep (the rules still",
        'stop at the divergence); `diverge_factor=float("inf")` turns the test',
        "off. A loss that does not change over the sweep (all within 0.1% of",
        "its mean) makes the rules warn (`UserWarning`): their answer would be",
        "arbitrary.",
        "",
        "## Calibration",
        "",
        f"Measured with `{COMMAND}` on {today()} in {seconds / 60:.1f} minutes.",
        f"Machine: {machine_description()}.",
        "",
        f"Each problem has a known answer, and each ran on {seeds} seeds (the",
        "initial weights, the sweep's shuffling and, for least squares, the",
        "data). The sweep: `find_lr(model, x, y, start_lr=1e-6, end_lr=10,",
        "num_steps=100, batch_size=32)`, the defaults but for `start_lr`, a",
        "decade above the default 1e-7 (that decade adds only plateau). A rule",
        "passes on a seed when its suggestion lies below the divergence point",
        "and within a factor of 10 of the best rate; **the floor is that the",
        "default rule passes on every seed of every problem.**",
        "",
    ]
    for name, runs in results.items():
        description = PROBLEMS[name][0]
        truth = runs[0].truth
        divergences = sorted({run.truth.divergence for run in runs})
        bests = sorted({run.truth.best for run in runs})
        lines += [
            f"### {name}",
            "",
            f"{description}. Truth ({truth.how}): divergence point "
            f"{span(divergences)}, best rate {span(bests)}. One sweep took "
            f"{statistics.median(run.seconds for run in runs):.1f} s (median).",
            "",
            *NOTES.get(name, []),
            "| rule | suggestion (median, min to max) | suggestion / best rate | "
            "below divergence | within 10x of best |",
            "|---|---:|---:|---:|---:|",
        ]
        for rule in RULES:
            rates = [run.suggestions[rule] for run in runs]
            ratios = [run.suggestions[rule] / run.truth.best for run in runs]
            below = sum(passes(run, rule)[0] for run in runs)
            within = sum(passes(run, rule)[1] for run in runs)
            label = f"**{rule}** (default)" if rule == DEFAULT_RULE else rule
            lines.append(
                f"| {label} | {statistics.median(rates):.2g} "
                f"({min(rates):.2g} to {max(rates):.2g}) | "
                f"{min(ratios):.2g} to {max(ratios):.2g} | "
                f"{below}/{len(runs)} | {within}/{len(runs)} |"
            )
        lines.append("")
    floor = all(
        all(passes(run, DEFAULT_RULE)) for runs in results.values() for run in runs
    )
    lines += [
        "## Verdict",
        "",
        f"The default rule (`{DEFAULT_RULE}`) "
        + (
            "meets the floor: below the divergence point and within a factor "
            "of 10 of the best rate on every seed of every problem."
            if floor
            else "does **not** meet the floor on every seed: it misses on "
            + "; ".join(
                f"{name} (seeds {', '.join(str(r.seed) for r in misses)})"
                for name, runs in results.items()
                if (misses := [r for r in runs if not all(passes(r, DEFAULT_RULE))])
            )
            + "."
        ),
        "",
    ]
    return "\n".join(lines)


def span(values: list[float]) -> str:
    if math.isinf(values[0]):
        return "beyond the grid (no rate of it diverged)"
    if len(values) == 1 or values[-1] / values[0] < 1.0001:
        return f"{values[0]:.3g}"
    return f"{values[0]:.3g} to {values[-1]:.3g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--problem", choices=list(PROBLEMS), action="append")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--save-runs", help="pickle the runs to this file")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {}
    for name in args.problem or PROBLEMS:
        results[name] = []
        for seed in range(args.seeds):
            run = PROBLEMS[name][1](seed)
            results[name].append(run)
            print(
                f"{name} seed {seed}: divergence {run.truth.divergence:.3g}, "
                f"best {run.truth.best:.3g}, "
                + ", ".join(f"{k} {v:.3g}" for k, v in run.suggestions.items())
                + f" ({run.seconds:.1f} s sweep)",
                flush=True,
            )
            keras.backend.clear_session()
    if args.save_runs:
        import pickle

        with open(args.save_runs, "wb") as file:
            pickle.dump(results, file)
    text = render(results, time.perf_counter() - start)
    if args.no_write:
        print(text)
    else:
        write_atomically(OUTPUT, text)
        print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
