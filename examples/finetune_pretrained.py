"""# Per-stage learning rates for a pretrained MobileNetV2, then deployment

The usual way to fine-tune an ImageNet network on a new task: keep the
pretrained body, put a new head on it, and train the early stages (generic
edges and textures) more slowly than the late ones and the head. This script
does that with `stopgrad_lr` on Keras's MobileNetV2, step by step:

1. **Inspect.** `stopgrad_lr.gradient_cuts` lists the layers where a gradient
   scale gives a clean multiplier. Inside a residual block the skip
   connection carries part of the gradient around the block's layers, so
   they are not cuts, and the toolkit refuses to put a scale there.
2. **Rewrite.** `stopgrad_lr.apply_lr_multipliers` takes the multiplier you
   want per stage, finds the cuts between the stages, inserts scales with the
   right ratios, and checks the result; `stopgrad_lr.summary` shows it.
3. **Train** a few epochs of SGD with momentum. A gradient scale is a learning-rate
   multiplier for SGD-like optimizers only: Adam would cancel it.
4. **Deploy.** `stopgrad_lr.strip_gradient_scales` removes the scale layers;
   the outputs are bit-identical, and the saved `.keras` file has no
   `stopgrad_lr` layer in it.

`weights=None` stands in for `weights="imagenet"`, which needs a download:
nothing here depends on the values of the weights, and the images are
generated. With real weights the code is the same.

Run it with `python examples/finetune_pretrained.py [--out DIR] [--fast]`.
"""

import argparse
import re
from pathlib import Path

import keras
import numpy as np

import stopgrad_lr

IMAGE_SHAPE = (64, 64, 3)  # small images keep this quick; MobileNetV2 takes >= 32
CLASSES = 5

# The stages of MobileNetV2 end where a block changes the resolution or the
# width (blocks 6 and 13 have stride 2), which is where a block has no skip
# connection. Layers matched by no pattern (the head) get 1.0.
STAGE_MULTIPLIERS = {
    re.compile(r"Conv1|bn_Conv1|expanded_conv_.*|block_[1-5]_.*"): 0.01,
    re.compile(r"block_([6-9]|1[0-2])_.*"): 0.1,
    re.compile(r"block_1[3-6]_.*|Conv_1.*"): 0.3,
}


def parse_args():
    parser = argparse.ArgumentParser(
        description="Per-stage learning rates for MobileNetV2, then strip."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("build/examples"),
        help="folder for the deployable .keras file (default: build/examples)",
    )
    parser.add_argument("--fast", action="store_true", help="1 epoch of 2 steps")
    return parser.parse_args()


def build_model():
    """A MobileNetV2 body (a nested model) with a new 5-class head."""
    body = keras.applications.MobileNetV2(
        input_shape=IMAGE_SHAPE,
        include_top=False,
        weights=None,  # stands in for "imagenet"
        pooling="avg",
        name="mobilenet_v2",
    )
    inputs = keras.Input(IMAGE_SHAPE)
    outputs = keras.layers.Dense(CLASSES, name="head")(body(inputs))
    return keras.Model(inputs, outputs, name="classifier")


def generated_images(count, seed):
    """Noise images whose class shifts the mean colour: easy to learn, so the
    loss visibly falls within a few epochs."""
    rng = np.random.default_rng(seed)
    colours = rng.standard_normal((CLASSES, 1, 1, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, count)
    images = rng.standard_normal((count, *IMAGE_SHAPE)).astype("float32")
    return images + colours[labels], labels


def inspect(model):
    cuts = stopgrad_lr.gradient_cuts(model)
    layers = stopgrad_lr.summary(model, print_fn=None)
    print(
        f"{len(cuts)} of the {len(layers)} layers are cuts. Block outputs among them:"
    )
    block_ends = [c for c in cuts if re.search(r"_add$|block_\d+_project_BN$", c)]
    print("  " + ", ".join(name.split("/")[-1] for name in block_ends))

    # A layer inside a residual block is bypassed by the skip connection: a
    # scale after it would give the layers before it a mix of two rates.
    try:
        stopgrad_lr.insert_gradient_scales(model, {"block_2_project_BN": 0.1})
    except ValueError as error:
        print(f"\nA scale inside a residual block is refused:\n  {error}")


def rewrite(model):
    tuned = stopgrad_lr.apply_lr_multipliers(model, STAGE_MULTIPLIERS)
    print("\nScales inserted by apply_lr_multipliers (at the last cut of each stage):")
    for path, layer in all_layers(tuned):
        if isinstance(layer, (stopgrad_lr.GradientScale, stopgrad_lr.GradientStop)):
            print(f"  {path:<45} scale {layer.scale:g}")

    lines = []
    rows = stopgrad_lr.summary(tuned, print_fn=lines.append)
    print("\nstopgrad_lr.summary(tuned), around the first boundary:")
    first = next(i for i, line in enumerate(lines) if "block_5_project_BN" in line)
    for line in [lines[0], "...", *lines[first : first + 5], "..."]:
        print("  " + line)

    print("\nEffective multipliers (stopgrad_lr.effective_multipliers), by stage:")
    params = {row.layer: row.trainable_params for row in rows}
    stages = {}
    for path, multiplier in stopgrad_lr.effective_multipliers(tuned).items():
        stages.setdefault(multiplier, []).append(path)
    for multiplier, paths in sorted(stages.items()):
        first, last = paths[0].split("/")[-1], paths[-1].split("/")[-1]
        print(
            f"  {multiplier:>5g}: {len(paths):>3} layers with "
            f"{sum(params[path] for path in paths):>9,} weights ({first} ... {last})"
        )
    return tuned


def all_layers(model, prefix=""):
    """(path, layer) for every layer, nested models' layers included."""
    for layer in model.layers:
        path = prefix + layer.name
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer, prefix=f"{path}/")


def main():
    args = parse_args()
    count, epochs = (32, 1) if args.fast else (64, 6)
    keras.utils.set_random_seed(0)
    model = build_model()
    inspect(model)
    tuned = rewrite(model)

    tuned.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    images, labels = generated_images(count, seed=1)
    history = tuned.fit(images, labels, batch_size=16, epochs=epochs, verbose=0)
    losses = ", ".join(f"{loss:.3f}" for loss in history.history["loss"])
    print(f"\nTrained {epochs} epoch(s) on {count} generated images; loss per epoch:")
    print(f"  {losses}")

    # For deployment: no custom layer left, the same outputs bit for bit.
    deployable = stopgrad_lr.strip_gradient_scales(tuned)
    batch = generated_images(8, seed=2)[0]
    trained_outputs = tuned.predict_on_batch(batch)
    identical = np.array_equal(trained_outputs, deployable.predict_on_batch(batch))
    remaining = sum(
        isinstance(layer, (stopgrad_lr.GradientScale, stopgrad_lr.GradientStop))
        for _, layer in all_layers(deployable)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "mobilenet_v2_deployable.keras"
    deployable.save(path)
    reloaded = keras.saving.load_model(path)
    reloaded_identical = np.array_equal(
        trained_outputs, reloaded.predict_on_batch(batch)
    )
    print(f"\nStripped: {remaining} stopgrad_lr layers left.")
    print(f"Stripped outputs bit-identical to the trained model's: {identical}")
    print(f"Saved to {path}; reloaded outputs bit-identical: {reloaded_identical}")


if __name__ == "__main__":
    main()
