"""# Layer-wise learning-rate decay on a small transformer encoder

Fine-tuning recipes for BERT, ViT and their relatives use layer-wise
learning-rate decay: the head trains at the base rate, the top encoder block
at `decay` times it, the block below at `decay**2`, down to the embeddings at
`decay**(depth + 1)`. Lower blocks hold the most general features, so they
move the least.

`stopgrad_lr.layerwise_decay(model, "block*_out", decay)` puts a
`GradientScale(decay)` after the output of every block. Scales compound on
the way back, so block `i` from the top gets exactly `decay**i`, with no
change to the model's outputs and no per-variable bookkeeping in the
optimizer.

This works when a block is written as a block: its last layer (here the
residual `Add` named `block<i>_out`) is where all of the block's output
leaves, so every gradient reaching the layers below passes through it (a
*cut*). Most layers inside a block are not cuts: the residual connections
carry gradient around them. (The residual stream between the attention and
the MLP halves of a pre-LayerNorm block is a cut too, but a scale there would
split a block in two.)

The script builds a pre-LayerNorm encoder from Keras layers
(`MultiHeadAttention`, `LayerNormalization`, `Dense`), checks which layers are
cuts, applies the decay, verifies with one plain SGD step that each block's
update is `decay**i` times the update of the same step without the scales,
and trains the decayed model on a toy task generated here: which of four
marker tokens occurs most often in a sequence of 16 tokens.

The multipliers are exact for SGD with or without momentum. Transformers are
usually fine-tuned with AdamW, which divides each gradient by its own running
size and cancels a constant scale; with AdamW, give each block its own
optimizer with `keras.optimizers.MultiOptimizer` instead.

Run it with `python examples/transformer_llrd.py [--fast]`.
"""

import argparse

import keras
import numpy as np

import stopgrad_lr

VOCABULARY = 12  # tokens 0-3 are the markers, 4-11 are filler
MARKERS = 4
LENGTH = 16
WIDTH = 32
DEPTH = 4
DECAY = 0.7


def parse_args():
    parser = argparse.ArgumentParser(
        description="Layer-wise learning-rate decay on a transformer encoder."
    )
    parser.add_argument("--fast", action="store_true", help="little data, 1 epoch")
    return parser.parse_args()


def encoder_block(x, index):
    """A pre-LayerNorm transformer block; its output layer is `block<i>_out`."""
    name = f"block{index}"
    attended = keras.layers.LayerNormalization(name=f"{name}_attention_norm")(x)
    attended = keras.layers.MultiHeadAttention(
        num_heads=2, key_dim=WIDTH // 2, name=f"{name}_attention"
    )(attended, attended)
    x = keras.layers.Add(name=f"{name}_attention_residual")([x, attended])
    transformed = keras.layers.LayerNormalization(name=f"{name}_mlp_norm")(x)
    transformed = keras.layers.Dense(
        2 * WIDTH, activation="gelu", name=f"{name}_mlp_expand"
    )(transformed)
    transformed = keras.layers.Dense(WIDTH, name=f"{name}_mlp_project")(transformed)
    return keras.layers.Add(name=f"{name}_out")([x, transformed])


def build_encoder():
    """Embeddings, DEPTH blocks, a final norm and a classification head. The
    task does not depend on token order, so there is no position embedding."""
    tokens = keras.Input((LENGTH,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, WIDTH, name="embedding")(tokens)
    for index in range(1, DEPTH + 1):
        x = encoder_block(x, index)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(MARKERS, name="head")(x)
    return keras.Model(tokens, outputs, name="encoder")


def majority_task(count, seed):
    """Sequences with one marker token strictly more frequent than the others;
    the label is that marker."""
    rng = np.random.default_rng(seed)
    sequences = rng.integers(MARKERS, VOCABULARY, (count, LENGTH))
    labels = rng.integers(0, MARKERS, count)
    for row, label in enumerate(labels):
        counts = rng.integers(0, 4, MARKERS)
        counts[label] = counts.max() + rng.integers(1, 3)
        markers = np.repeat(np.arange(MARKERS), counts)
        positions = rng.choice(LENGTH, len(markers), replace=False)
        sequences[row, positions] = rng.permutation(markers)
    return sequences.astype("int32"), labels


def blocks_below_head(group):
    """The `i` of `decay**i`: 0 above the top block, DEPTH + 1 for the
    embeddings."""
    if group.startswith("block"):
        return DEPTH + 1 - int(group[len("block") :])
    return DEPTH + 1 if group == "embedding" else 0


def weights_of(model):
    return {
        layer.name: [keras.ops.convert_to_numpy(w) for w in layer.trainable_weights]
        for layer in model.layers
        if layer.trainable_weights
    }


def measured_multipliers(plain, decayed, tokens, labels):
    """Per layer, how far one plain SGD step (no momentum: the first step of
    momentum SGD is the same) moves the decayed model's weights, relative to
    the plain model's. Both start from the same weights and end with them."""
    moved = []
    for model in (plain, decayed):
        model.compile(
            # A large rate, so that the update stands well above the float32
            # rounding of the weights; the step is undone below anyway.
            optimizer=keras.optimizers.SGD(learning_rate=1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before, saved = weights_of(model), model.get_weights()
        model.train_on_batch(tokens, labels)
        after = weights_of(model)
        model.set_weights(saved)  # undo the measuring step
        moved.append(
            {
                name: np.sqrt(
                    sum(
                        np.sum((a - b) ** 2)
                        for a, b in zip(after[name], old, strict=True)
                    )
                )
                for name, old in before.items()
            }
        )
    plain_moved, decayed_moved = moved
    return {name: decayed_moved[name] / plain_moved[name] for name in plain_moved}


def main():
    args = parse_args()
    keras.utils.set_random_seed(0)
    model = build_encoder()  # stands in for a pretrained encoder

    cuts = stopgrad_lr.gradient_cuts(model)
    print("Cuts:", ", ".join(cuts))
    inside = [layer.name for layer in model.layers[1:] if layer.name not in cuts]
    print(
        f"Not cuts (inside a residual block): {len(inside)} layers, e.g. {inside[:3]}"
    )

    # A boundary after the embeddings too, which then get one more step of
    # decay than the lowest block, as in the BERT recipe. copy=True gives the
    # decayed model weights of its own, so the plain model stays a reference.
    decayed = stopgrad_lr.layerwise_decay(
        model, ["embedding", "block*_out"], DECAY, copy=True
    )
    multipliers = stopgrad_lr.effective_multipliers(decayed)
    tokens, labels = majority_task(64, seed=1)
    measured = measured_multipliers(model, decayed, tokens, labels)

    print(f"\nEffective learning-rate multipliers with decay {DECAY}, per group:")
    print(
        f"  {'group':<10} {'layers':>6} {'reported':>9} {'decay**i':>9} {'measured':>9}"
    )
    groups = {}
    for name in multipliers:
        group = name.split("_")[0] if name.startswith("block") else name
        groups.setdefault(group, []).append(name)
    for group, names in reversed(groups.items()):
        (reported,) = {multipliers[name] for name in names}
        print(
            f"  {group:<10} {len(names):>6} {reported:>9.4f} "
            f"{DECAY ** blocks_below_head(group):>9.4f} "
            f"{np.mean([measured[name] for name in names]):>9.4f}"
        )
    worst = max(abs(measured[n] / multipliers[n] - 1) for n in multipliers)
    print(f"Largest relative gap between measured and reported: {worst:.1e}")

    samples, epochs = (256, 1) if args.fast else (4000, 8)
    train_tokens, train_labels = majority_task(samples, seed=2)
    test_tokens, test_labels = majority_task(1000, seed=3)
    decayed.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    decayed.fit(train_tokens, train_labels, batch_size=32, epochs=epochs, verbose=0)
    _, accuracy = decayed.evaluate(test_tokens, test_labels, verbose=0)
    print(
        f"\nTrained with layer-wise decay: {epochs} epochs of {samples} sequences, "
        f"test accuracy {accuracy:.3f} (chance: {1 / MARKERS:.2f})."
    )


if __name__ == "__main__":
    main()
