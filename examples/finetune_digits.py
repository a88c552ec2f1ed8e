"""# Fine-tuning a pretrained CNN with few labels: which learning rates?

`make demo` runs this script. It asks the question `stopgrad_lr` exists for,
on real data and offline: when you fine-tune a pretrained network on a new
task with few labels, should the pretrained blocks learn as fast as the new
head, not at all, or somewhere in between?

**Data.** scikit-learn's bundled handwritten digits (1797 images of 8x8
pixels, no download). A small CNN is pretrained on the digits 0-4. The new
task is the digits 5-9 with 20 labelled images per class for training and
another 20 per class for choosing the learning rate; a fixed half of the 5-9
images, never used for any choice, is the test set. Each seed draws other
labelled images, a new head and another batch order.

**Methods**, all with the same network, optimizer and number of steps:

- *from scratch*: the plain model from random weights;
- *fine-tune all*: the plain model from the pretrained weights, one rate;
- *frozen backbone*: only the head trains;
  `apply_lr_multipliers(net, {"block*": 0.0})` inserts a `GradientStop`;
- *discriminative rates*: the blocks train at 0.1 times the head's rate,
  `apply_lr_multipliers(net, {"block*": 0.1})`;
- *layer-wise decay*: block `i` from the top trains at `0.5**i` times the
  head's rate, `layerwise_decay(net, "block*_out", 0.5)`.

Each method gets its own base learning rate from a small sweep, the one with
the best validation accuracy averaged over the seeds; the table reports test
accuracy at that rate (mean and sample standard deviation over the seeds),
its difference from "fine-tune all" seed by seed (the runs of a seed share
their data and batches), and the time spent in training steps. A last line
names the best method and the ones the seeds cannot separate from it. The
multipliers themselves (0.1 and 0.5) are common defaults, not tuned.

**Why SGD with momentum.** A gradient scale `k` after a block multiplies the
gradient of everything upstream of it by `k`. SGD's update, with or without
momentum, is proportional to the gradient, so this is exactly a learning rate
of `k` times the base rate for those layers. Adam and the other adaptive
optimizers divide the gradient by its own running size and cancel a constant
scale almost entirely: the rewritten models would train like "fine-tune all"
(the optimizer table in the docs measures it).

Run it with `make demo` or `python examples/finetune_digits.py [--out DIR]`;
`--fast` runs a reduced version in a few seconds, for the tests. The numbers
are deterministic: the data splits, initial weights and batch orders are
seeded, and on TensorFlow the script turns on op determinism and fixes the
thread counts, so two runs on one machine print the same table except for
the times, which depend on the machine and its load.
"""

import argparse
import time
import warnings
from pathlib import Path

import keras
import numpy as np
from matplotlib.figure import Figure
from sklearn.datasets import load_digits

import stopgrad_lr

PER_CLASS = 20  # labelled images per new class, for training and for validation
BATCH_SIZE = 20
BASELINE = "fine-tune all (1x)"

# A frozen backbone sits behind a GradientStop, which removes its backward
# pass. Keras then finds no gradient for the backbone's weights and warns,
# guessing at a missing loss; here that is the point, not a mistake.
warnings.filterwarnings("ignore", message="Gradients do not exist for variables")


def make_deterministic():
    """Same numbers on every run: seeded Python, NumPy and backend random
    generators, and on TensorFlow deterministic kernels and fixed thread
    counts (a reduction split over another number of threads adds in another
    order and rounds differently). Must run before TensorFlow starts its
    thread pools, that is before the first operation."""
    keras.utils.set_random_seed(0)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(2)


def parse_args():
    parser = argparse.ArgumentParser(
        description="Compare fine-tuning methods on scikit-learn's digits."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("build/demo"),
        help="folder for the plot (default: build/demo)",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="2 seeds, 2 learning rates, a few steps: a smoke test, not a result",
    )
    return parser.parse_args()


# Data ------------------------------------------------------------------------


def load_tasks():
    """The old task (digits 0-4) and the new one (digits 5-9, labelled 0-4 so
    that the same head shape serves both)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target
    old, new = labels < 5, labels >= 5
    return (images[old], labels[old]), (images[new], labels[new] - 5)


def split_off_test(images, labels):
    """Half of each class for the test set, fixed for all seeds; the rest is
    the pool the few labelled images are drawn from."""
    order = np.random.default_rng(1234).permutation(len(labels))
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(5):
        of_digit = order[labels[order] == digit]
        is_test[of_digit[: len(of_digit) // 2]] = True
    return (images[~is_test], labels[~is_test]), (images[is_test], labels[is_test])


def draw_labelled(labels, seed):
    """Indices of PER_CLASS training and PER_CLASS validation images per class."""
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for digit in range(5):
        chosen = rng.permutation(np.flatnonzero(labels == digit))
        train += list(chosen[:PER_CLASS])
        validation += list(chosen[PER_CLASS : 2 * PER_CLASS])
    return np.array(train), np.array(validation)


# The network -----------------------------------------------------------------


def build_cnn():
    """Three conv blocks and a head.

    Each block ends in a layer named `block<i>_out` whose output is a cut: all
    of the gradient of the block, and of everything before it, passes through
    it, so a scale there is a clean multiplier. No BatchNormalization: its
    moving statistics would keep changing in a "frozen" backbone.
    """
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", name="block1_conv")(inputs)
    x = keras.layers.ReLU(name="block1_out")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", name="block2_conv")(x)
    x = keras.layers.ReLU(name="block2_relu")(x)
    x = keras.layers.MaxPooling2D(name="block2_out")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", name="block3_conv")(x)
    x = keras.layers.ReLU(name="block3_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="block3_out")(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def compile_with_sgd(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def pretrain(images, labels, epochs):
    """Trains on the old task; returns the weights of each layer, by name."""
    keras.utils.set_random_seed(0)
    model = compile_with_sgd(build_cnn(), learning_rate=0.05)
    model.fit(images, labels, batch_size=32, epochs=epochs, verbose=0)
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def starting_weights(pretrained, seed, from_scratch):
    """Random weights drawn with `seed`, with the pretrained blocks put in
    unless training from scratch. The head is always new: the task is new."""
    keras.utils.set_random_seed(seed)
    fresh = build_cnn()
    if not from_scratch:
        for layer in fresh.layers:
            if layer.weights and layer.name != "head":
                layer.set_weights(pretrained[layer.name])
    return fresh.get_weights()


def make_methods(net):
    """Method name -> (model to train, the plain network whose weights it
    shares, whether it starts from random weights).

    The rewritten models share their layers, and so their weights, with the
    network they were made from (the default `copy=False`): setting that
    network's weights sets theirs too. The frozen backbone gets a network of
    its own, because a freeze is Keras's `trainable = False` on those shared
    layers: made from `net`, it would freeze `net`'s blocks for every method.
    """
    frozen_net = build_cnn()
    return {
        "from scratch": (net, net, True),
        BASELINE: (net, net, False),
        "frozen backbone (0x)": (
            stopgrad_lr.apply_lr_multipliers(frozen_net, {"block*": 0.0}),
            frozen_net,
            False,
        ),
        "apply_lr_multipliers (0.1x)": (
            stopgrad_lr.apply_lr_multipliers(net, {"block*": 0.1}),
            net,
            False,
        ),
        "layerwise_decay (0.5**i)": (
            stopgrad_lr.layerwise_decay(net, "block*_out", 0.5),
            net,
            False,
        ),
    }


# One fine-tuning run -----------------------------------------------------------


def accuracy(net, images, labels):
    """Measured on `net`: the rewritten models compute bit-identical outputs
    with the same weights, and one model traces one prediction function."""
    predictions = np.argmax(net.predict_on_batch(images), axis=1)
    return float(np.mean(predictions == labels))


def fine_tune(model, net, weights, learning_rate, data, seed, steps, eval_every):
    """Trains from `weights` with a fresh optimizer state.

    Returns the final validation and test accuracy, the validation accuracy
    every `eval_every` steps, and the seconds spent in training steps.

    Every run of a method reuses one compiled model: compiling again would
    retrace the training step, which takes longer than a whole run of this
    small network. So the weights, the optimizer's momentum and step count,
    and the learning rate are reset in place instead.
    """
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data
    net.set_weights(weights)
    for variable in model.optimizer.variables:
        variable.assign(keras.ops.zeros(variable.shape, variable.dtype))
    model.optimizer.learning_rate = learning_rate
    rng = np.random.default_rng(seed)  # the same batches for every method and rate
    curve, seconds = [], 0.0
    order = np.zeros(0, dtype=int)
    for step in range(1, steps + 1):
        if len(order) < BATCH_SIZE:
            order = np.concatenate([order, rng.permutation(len(y_train))])
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        started = time.perf_counter()
        model.train_on_batch(x_train[batch], y_train[batch])
        seconds += time.perf_counter() - started
        if step % eval_every == 0:
            curve.append(accuracy(net, x_val, y_val))
    return curve[-1], accuracy(net, x_test, y_test), curve, seconds


# Reporting ---------------------------------------------------------------------


def format_table(best, all_runs):
    """A markdown table: one row per method at its chosen learning rate.

    The time is the median over all runs of the method: the first run also
    traces the training step, and the learning rate does not change the cost.
    """
    baseline = np.array([run[1] for run in best[BASELINE][1]])
    rows = [
        ("method", "best lr", "val acc", "test acc", "vs fine-tune all", "train s/run")
    ]
    for name, (rate, runs) in best.items():
        test = np.array([run[1] for run in runs])
        difference = test - baseline
        rows.append(
            (
                name,
                f"{rate:g}",
                f"{np.mean([run[0] for run in runs]):.3f}",
                f"{test.mean():.3f} ± {test.std(ddof=1):.3f}",
                "-"
                if name == BASELINE
                else f"{difference.mean():+.3f} ± {difference.std(ddof=1):.3f}",
                f"{np.median([run[3] for run in all_runs[name]]):.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| "
        + " | ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        + " |"
        for row in rows
    ]
    rule = "|" + "|".join(
        ":" + "-" * (width + 1) if i == 0 else "-" * (width + 1) + ":"
        for i, width in enumerate(widths)
    )
    return "\n".join([lines[0], rule + "|", *lines[1:]])


def verdict(best):
    """Which method has the best mean test accuracy, and which others the
    seeds cannot tell apart from it: their paired difference (same data and
    batches) is within two standard errors of zero."""
    tests = {
        name: np.array([run[1] for run in runs]) for name, (_, runs) in best.items()
    }
    winner = max(tests, key=lambda name: tests[name].mean())
    ties = []
    for name, accuracies in tests.items():
        difference = tests[winner] - accuracies
        standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
        if name != winner and difference.mean() < 2 * standard_error:
            ties.append(name)
    return (
        f"Best mean test accuracy: {winner} ({tests[winner].mean():.3f}). "
        f"Within two standard errors of it, seed by seed, so not separable "
        f"with {len(tests[winner])} seeds: {', '.join(ties) or 'none'}."
    )


def plot(best, eval_every, path):
    """Validation accuracy during training (mean and spread over the seeds),
    and each seed's test accuracy, per method at its chosen learning rate."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    curves_ax, test_ax = figure.subplots(1, 2, width_ratios=(3, 2))
    for position, (name, (rate, runs)) in enumerate(best.items()):
        curves = np.array([run[2] for run in runs])
        steps = eval_every * np.arange(1, curves.shape[1] + 1)
        mean, spread = curves.mean(axis=0), curves.std(axis=0, ddof=1)
        (line,) = curves_ax.plot(steps, mean, label=f"{name}, lr {rate:g}")
        curves_ax.fill_between(
            steps, mean - spread, mean + spread, color=line.get_color(), alpha=0.15
        )
        test = [run[1] for run in runs]
        test_ax.scatter(
            test, [position] * len(test), color=line.get_color(), alpha=0.6, s=18
        )
        test_ax.plot(np.mean(test), position, "|", color="black", markersize=16)
    curves_ax.set(
        xlabel="training step",
        ylabel="validation accuracy",
        title=f"Digits 5-9, {PER_CLASS} labels per class (mean ± std over seeds)",
    )
    curves_ax.legend(loc="lower right", fontsize="small")
    test_ax.set_yticks(range(len(best)), list(best), fontsize="small")
    test_ax.invert_yaxis()
    test_ax.set(xlabel="test accuracy (dots: seeds, bar: mean)", title="Test")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


# The experiment ----------------------------------------------------------------


def main():
    args = parse_args()
    make_deterministic()
    if args.fast:
        seeds, rates, steps, eval_every, pretrain_epochs = [0, 1], [0.03, 0.1], 10, 5, 1
    else:
        seeds, rates = [0, 1, 2, 3, 4], [0.01, 0.03, 0.1, 0.3]
        steps, eval_every, pretrain_epochs = 150, 10, 15
    started = time.perf_counter()
    (old_x, old_y), (new_x, new_y) = load_tasks()
    (pool_x, pool_y), (test_x, test_y) = split_off_test(new_x, new_y)
    pretrained = pretrain(old_x, old_y, pretrain_epochs)
    print(
        f"Pretrained on {len(old_y)} images of the digits 0-4 "
        f"({time.perf_counter() - started:.0f} s).\n"
        f"New task, digits 5-9: {PER_CLASS} training and {PER_CLASS} validation "
        f"images per class, {len(test_y)} test images; {len(seeds)} seeds.\n"
        f"SGD with momentum 0.9, {steps} steps of {BATCH_SIZE} images; base learning "
        f"rates swept: {rates}."
    )

    net = build_cnn()
    methods = make_methods(net)
    print("\nEffective learning-rate multipliers (stopgrad_lr.effective_multipliers):")
    for name, (model, _, _) in methods.items():
        multipliers = stopgrad_lr.effective_multipliers(model)
        print(f"  {name:<28}", "  ".join(f"{k} {v:g}" for k, v in multipliers.items()))
        compile_with_sgd(model, learning_rate=rates[0])

    # results[method][rate]: one (val acc, test acc, curve, seconds) per seed.
    results = {name: {rate: [] for rate in rates} for name in methods}
    for seed in seeds:
        train, validation = draw_labelled(pool_y, seed)
        data = (
            (pool_x[train], pool_y[train]),
            (pool_x[validation], pool_y[validation]),
            (test_x, test_y),
        )
        weights = {
            scratch: starting_weights(pretrained, seed, scratch)
            for scratch in (True, False)
        }
        for name, (model, plain, scratch) in methods.items():
            for rate in rates:
                run = fine_tune(
                    model, plain, weights[scratch], rate, data, seed, steps, eval_every
                )
                results[name][rate].append(run)

    # The learning rate is chosen on validation accuracy only; the test set
    # is looked at once, for the chosen rate.
    best = {}
    for name, by_rate in results.items():
        rate = max(rates, key=lambda r: np.mean([run[0] for run in by_rate[r]]))
        best[name] = (rate, by_rate[rate])
    print(
        f"\nTest accuracy on the digits 5-9 (mean ± sample std over {len(seeds)} "
        f"seeds) at each method's best base learning rate:\n"
    )
    all_runs = {
        name: [run for runs in by_rate.values() for run in runs]
        for name, by_rate in results.items()
    }
    print(format_table(best, all_runs))
    print("\n" + verdict(best))
    path = args.out / "finetune_digits.png"
    plot(best, eval_every, path)
    print(f"\nPlot: {path}")
    print(f"Total time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
