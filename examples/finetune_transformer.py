"""# The BEiT/MAE fine-tuning recipe at small scale: AdamW + layer-wise decay

Most fine-tuning of pretrained transformers today uses AdamW with weight
decay, no weight decay on biases and normalisation parameters, and
layer-wise learning-rate decay: block `i` below the head trains at `decay**i`
times the head's rate (BEiT and MAE use 0.65-0.75, ELECTRA 0.8, timm's
default is 0.75). A gradient scale cannot deliver that with AdamW, which
cancels it; `stopgrad_lr.multi_optimizer` can, with one AdamW per group:

```python
optimizer = stopgrad_lr.multi_optimizer(
    model,
    stopgrad_lr.layerwise_decay_multipliers(model, ["pos_embed", "block*_out"], 0.75),
    keras.optimizers.AdamW(1e-3, weight_decay=0.05),
    weight_decay_multipliers={"@bias": 0.0, "@norm": 0.0, "@embedding": 0.0},
)
```

**Data.** scikit-learn's bundled digits (8x8 pixels, offline), cut into 16
patches of 2x2 pixels. A small ViT-style encoder (patch embedding, learned
position embedding, 4 pre-norm blocks of attention and MLP, a final norm) is
pretrained on the digits 0-4. The new task is the digits 5-9 with 10
labelled images per class for training and 20 per class for choosing the
learning rate; a fixed half of the 5-9 images is the test set.

**The sweep.** Layer decay in {1.0, 0.9, 0.8, 0.75, 0.65}; for each, the
base rate from {3e-4, 1e-3, 3e-3} with the best validation accuracy averaged
over the seeds; 5 seeds (labelled images, new head, batch order). The table
reports test accuracy at the chosen rate. The optimizer is built once, at
decay 0.75: its groups (the embeddings, each block, the head; with and
without weight decay) are the same for every decay, so the sweep sets each
group's learning rate to `rate * decay**depth` through
`optimizer.optimizers`, as Keras's `LearningRateScheduler` does, instead of
compiling and tracing the training step again for each decay.

Run it with `python examples/finetune_transformer.py [--out DIR]`; `--fast`
runs a reduced version in seconds, for the tests.
"""

import argparse
import time
from pathlib import Path

import keras
import numpy as np
from matplotlib.figure import Figure
from sklearn.datasets import load_digits

import stopgrad_lr

DECAYS = [1.0, 0.9, 0.8, 0.75, 0.65]
BOUNDARIES = ["pos_embed", "block*_out"]
BUILT_AT = 0.75  # the decay the optimizer is built with; the sweep sets the others
NO_DECAY = {"@bias": 0.0, "@norm": 0.0, "@embedding": 0.0}
WEIGHT_DECAY = 0.05
TRAIN_PER_CLASS, VAL_PER_CLASS, BATCH_SIZE = 10, 20, 25
WIDTH, BLOCKS = 32, 4


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0][2:])
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    parser.add_argument(
        "--fast", action="store_true", help="1 seed, 1 rate, few steps: a smoke test"
    )
    return parser.parse_args()


# Data ------------------------------------------------------------------------


def patches(images):
    """(n, 8, 8) -> (n, 16, 4): 2x2 patches, row by row."""
    n = len(images)
    blocks = images.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(n, 16, 4).astype("float32")


def load_tasks():
    digits = load_digits()
    x, y = patches(digits.images / 16.0), digits.target
    old, new = y < 5, y >= 5
    return (x[old], y[old]), (x[new], y[new] - 5)


def split(labels, seed):
    """Fixed test half; per seed, labelled training and validation images."""
    order = np.random.default_rng(1234).permutation(len(labels))
    test = np.concatenate(
        [order[labels[order] == d][: (labels == d).sum() // 2] for d in range(5)]
    )
    pool = np.setdiff1d(np.arange(len(labels)), test)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for d in range(5):
        chosen = rng.permutation(pool[labels[pool] == d])
        train += list(chosen[:TRAIN_PER_CLASS])
        val += list(chosen[TRAIN_PER_CLASS : TRAIN_PER_CLASS + VAL_PER_CLASS])
    return np.array(train), np.array(val), test


# The network -----------------------------------------------------------------


class PositionEmbedding(keras.layers.Layer):
    """A learned position embedding added to the patch embeddings."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=input_shape[1:], initializer="random_normal", name="embeddings"
        )

    def call(self, x):
        return x + self.embeddings


def build_encoder():
    """Each block ends in an `Add` named `block<k>_out`: the residual stream
    there is a cut, so the blocks are clean groups for layer-wise decay."""
    inputs = keras.Input((16, 4))
    x = keras.layers.Dense(WIDTH, name="patch_proj")(inputs)
    x = PositionEmbedding(name="pos_embed")(x)
    for k in range(1, BLOCKS + 1):
        y = keras.layers.LayerNormalization(name=f"block{k}_norm1")(x)
        y = keras.layers.MultiHeadAttention(2, WIDTH // 2, name=f"block{k}_attn")(y, y)
        x = keras.layers.Add(name=f"block{k}_add")([x, y])
        y = keras.layers.LayerNormalization(name=f"block{k}_norm2")(x)
        y = keras.layers.Dense(2 * WIDTH, activation="gelu", name=f"block{k}_mlp1")(y)
        y = keras.layers.Dense(WIDTH, name=f"block{k}_mlp2")(y)
        x = keras.layers.Add(name=f"block{k}_out")([x, y])
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    return keras.Model(inputs, outputs, name="digits_vit")


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def pretrain(x, y, epochs):
    """The pretrained weights and the final training accuracy; with 0 epochs
    (the fast mode) random weights, and no training to trace."""
    keras.utils.set_random_seed(0)
    model = build_encoder()
    if not epochs:
        return model.get_weights(), float("nan")
    model.compile(
        keras.optimizers.AdamW(1e-3, weight_decay=WEIGHT_DECAY),
        LOSS,
        metrics=["accuracy"],
        jit_compile=False,
    )
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model.get_weights(), history.history["accuracy"][-1]


def starting_weights(pretrained, seed):
    """The pretrained backbone with a new head drawn with `seed`."""
    keras.utils.set_random_seed(seed)
    fresh = build_encoder()
    head = fresh.get_layer("head").get_weights()
    return pretrained[:-2] + head


# One fine-tuning run -----------------------------------------------------------


def fine_tune(model, depths, decay, weights, rate, data, seed, steps):
    """Trains from `weights` with a fresh optimizer state: each group of
    `depth` blocks below the head at `rate * decay**depth`.

    Every run reuses one compiled model (a new compile would retrace the
    step): the weights, every group's AdamW state and the groups' learning
    rates are reset in place, through `optimizer.optimizers`.
    """
    (x_train, y_train), (x_eval, y_eval), n_val = data
    model.set_weights(weights)
    for variable in model.optimizer.variables:
        variable.assign(keras.ops.zeros(variable.shape, variable.dtype))
    for group, depth in zip(model.optimizer.optimizers, depths, strict=True):
        group.learning_rate = rate * decay**depth
    rng = np.random.default_rng(seed)
    order = np.zeros(0, dtype=int)
    for _ in range(steps):
        if len(order) < BATCH_SIZE:
            order = np.concatenate([order, rng.permutation(len(y_train))])
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        model.train_on_batch(x_train[batch], y_train[batch])
    # Validation and test images in one batch: one traced prediction.
    correct = np.argmax(model.predict_on_batch(x_eval), 1) == y_eval
    return float(correct[:n_val].mean()), float(correct[n_val:].mean())


def compiled(pretrained):
    """The recipe, built once at decay BUILT_AT, and each group's depth: the
    number of boundaries between it and the head."""
    model = build_encoder()
    model.set_weights(pretrained)
    multipliers = stopgrad_lr.layerwise_decay_multipliers(model, BOUNDARIES, BUILT_AT)
    optimizer = stopgrad_lr.multi_optimizer(
        model,
        multipliers,
        keras.optimizers.AdamW(1.0, weight_decay=WEIGHT_DECAY),
        weight_decay_multipliers=NO_DECAY,
    )
    depths = [
        round(
            np.log(float(keras.ops.convert_to_numpy(group.learning_rate)))
            / np.log(BUILT_AT)
        )
        for group in optimizer.optimizers
    ]
    model.compile(optimizer, LOSS, jit_compile=False)
    return model, depths, multipliers


# Reporting ---------------------------------------------------------------------


def table(best):
    rows = [("layer decay", "best base lr", "val acc", "test acc (mean ± std)")]
    for decay, (rate, runs) in best.items():
        val, test = np.array(runs).T
        std = test.std(ddof=1) if len(test) > 1 else 0.0
        rows.append(
            (
                f"{decay:g}",
                f"{rate:g}",
                f"{val.mean():.3f}",
                f"{test.mean():.3f} ± {std:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot(best, path):
    figure = Figure(figsize=(6, 3.6), layout="constrained")
    ax = figure.add_subplot()
    for position, (_, runs) in enumerate(best.values()):
        test = np.array(runs)[:, 1]
        ax.scatter([position] * len(test), test, alpha=0.6, s=18)
        ax.plot(position, test.mean(), "_", color="black", markersize=20)
    ax.set_xticks(range(len(best)), [f"{decay:g}" for decay in best])
    ax.set(
        xlabel="layer decay per block (1.0: none)",
        ylabel="test accuracy (dots: seeds, bar: mean)",
        title="Digits 5-9, 10 labels per class: AdamW + layer-wise decay",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main():
    args = parse_args()
    if args.fast:
        seeds, rates, steps, pretrain_epochs = [0], [1e-3], 4, 0
    else:
        seeds, rates, steps, pretrain_epochs = (
            [0, 1, 2, 3, 4],
            [3e-4, 1e-3, 3e-3],
            40,
            12,
        )
    started = time.perf_counter()
    (old_x, old_y), (new_x, new_y) = load_tasks()
    pretrained, train_accuracy = pretrain(old_x, old_y, pretrain_epochs)
    print(
        f"Pretrained on {len(old_y)} images of the digits 0-4 for "
        f"{pretrain_epochs} epochs (training accuracy {train_accuracy:.3f}, "
        f"{time.perf_counter() - started:.0f} s).\n"
        f"New task, digits 5-9: {TRAIN_PER_CLASS} training and {VAL_PER_CLASS} "
        f"validation images per class; {len(seeds)} seeds; AdamW, weight decay "
        f"{WEIGHT_DECAY} (none on biases, norms, embeddings), {steps} steps of "
        f"{BATCH_SIZE}; base rates swept: {rates}."
    )
    splits = {seed: split(new_y, seed) for seed in seeds}
    weights = {seed: starting_weights(pretrained, seed) for seed in seeds}
    model, depths, multipliers = compiled(pretrained)
    print(
        f"\nMultipliers at decay {BUILT_AT} (layerwise_decay_multipliers): "
        + ", ".join(
            f"{name} {value:g}"
            for name, value in multipliers.items()
            if name.endswith(("proj", "mlp2")) or name == "head"
        )
        + f"\n{len(depths)} AdamW groups, one per depth and weight decay."
    )
    best = {}
    for decay in DECAYS:
        runs = {rate: [] for rate in rates}
        for seed in seeds:
            train, val, test = splits[seed]
            evaluation = np.concatenate([val, test])
            data = (new_x[train], new_y[train]), (new_x[evaluation], new_y[evaluation])
            for rate in rates:
                runs[rate].append(
                    fine_tune(
                        model,
                        depths,
                        decay,
                        weights[seed],
                        rate,
                        (*data, len(val)),
                        seed,
                        steps,
                    )
                )
        rate = max(rates, key=lambda r: np.mean([run[0] for run in runs[r]]))
        best[decay] = (rate, runs[rate])
    print(
        f"\nTest accuracy on the digits 5-9 (mean ± sample std over {len(seeds)} "
        f"seeds) at each decay's best base rate (chosen on validation):\n"
    )
    print(table(best))
    winner = max(best, key=lambda d: np.mean(np.array(best[d][1])[:, 1]))
    print(f"\nBest layer decay: {winner:g} (the anchors use 0.65-0.85).")
    path = args.out / "finetune_transformer.png"
    plot(best, path)
    print(f"Plot: {path}")
    print(f"Total time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
