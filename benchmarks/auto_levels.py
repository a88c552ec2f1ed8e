"""How many levels does `layerwise_decay(model, "auto", decay)` make?

Builds keras.applications models (weights=None, small inputs) and tiny
keras-hub backbones, counts the boundaries "auto" finds (the deepest group
trains at `decay ** levels`), and sets them against the blocks the model's
authors name. Writes `docs/generated/auto-levels.md`:

    KERAS_BACKEND=tensorflow python benchmarks/auto_levels.py

A representative subset of keras.applications (building all of them takes
longer than this benchmark's budget on a 2-core machine).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import keras
from _report import REPOSITORY, machine_description, publish, today

import stopgrad_lr

COMMAND = "KERAS_BACKEND=tensorflow python benchmarks/auto_levels.py"
OUTPUT = REPOSITORY / "docs" / "generated" / "auto-levels.md"


def application(name: str, size: int = 32) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        return getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classes=3
        )

    return build


def hub(name: str, **config: Any) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        import keras_hub

        return getattr(keras_hub.models, name)(**config)

    return build


def towers(kind: str) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        import keras_hub

        prefix = "CLIP" if kind == "clip" else "SigLIP"
        vision = getattr(keras_hub.models, f"{prefix}VisionEncoder")(
            patch_size=4,
            hidden_dim=8,
            num_layers=2,
            num_heads=2,
            intermediate_dim=16,
            image_shape=(16, 16, 3),
        )
        text = getattr(keras_hub.models, f"{prefix}TextEncoder")(
            vocabulary_size=50,
            embedding_dim=8,
            hidden_dim=8,
            num_layers=3,
            num_heads=2,
            intermediate_dim=16,
            max_sequence_length=8,
        )
        if kind == "clip":
            return keras_hub.models.CLIPBackbone(vision, text, projection_dim=8)
        return keras_hub.models.SigLIPBackbone(vision, text)

    return build


TEXT = {"num_heads": 2, "hidden_dim": 8, "intermediate_dim": 16}
# name -> (builder, the blocks its authors name)
MODELS: dict[str, tuple[Callable[[], keras.Model], str]] = {
    "ResNet50": (application("ResNet50"), "stem + 16 residual blocks = 17"),
    "ResNet101": (application("ResNet101"), "stem + 33 residual blocks = 34"),
    "ResNet50V2": (application("ResNet50V2"), "stem + 16 residual blocks = 17"),
    "MobileNet": (
        application("MobileNet"),
        "stem + 13 blocks (`conv_dw_i` + `conv_pw_i`) = 14",
    ),
    "MobileNetV2": (
        application("MobileNetV2"),
        "stem + `expanded_conv` + `block_1`..`block_16` + top conv = 19",
    ),
    "MobileNetV3Small": (
        application("MobileNetV3Small"),
        "stem + `expanded_conv`..`expanded_conv_10` (11) + top conv = 13",
    ),
    "EfficientNetB0": (
        application("EfficientNetB0"),
        "stem + 16 blocks (`block1a`..`block7a`) = 17, top conv in the head",
    ),
    "EfficientNetV2B0": (
        application("EfficientNetV2B0"),
        "stem + 21 blocks (`block1a`..`block6h`) = 22, top conv in the head",
    ),
    "InceptionV3": (
        application("InceptionV3", 75),
        "5 stem convolutions (`conv2d`..`conv2d_4`) + `mixed0`..`mixed10` = 16",
    ),
    "DenseNet121": (
        application("DenseNet121"),
        "stem + 58 dense-block layers + 3 transitions = 62",
    ),
    "VGG16": (
        application("VGG16"),
        "13 convolutions `block1_conv1`..`block5_conv3` + fc1, fc2 = 15",
    ),
    "VGG19": (
        application("VGG19"),
        "16 convolutions `block1_conv1`..`block5_conv4` + fc1, fc2 = 18",
    ),
    "ConvNeXtTiny": (
        application("ConvNeXtTiny"),
        "stem + 18 blocks + 3 downsampling blocks = 22",
    ),
    "Xception": (
        application("Xception", 71),
        "`block1` (2 convs), `block2`..`block13`, `block14` (2 convs) = 16",
    ),
    "BertBackbone (3 layers)": (
        hub(
            "BertBackbone",
            vocabulary_size=50,
            num_layers=3,
            max_sequence_length=16,
            **TEXT,
        ),
        "embeddings + 3 layers = 4",
    ),
    "ElectraBackbone (2 layers)": (
        hub(
            "ElectraBackbone",
            vocab_size=50,
            num_layers=2,
            embedding_dim=8,
            max_sequence_length=16,
            **TEXT,
        ),
        "embeddings + 2 layers = 3",
    ),
    "FNetBackbone (2 layers)": (
        hub(
            "FNetBackbone",
            vocabulary_size=50,
            num_layers=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=16,
        ),
        "embeddings + 2 layers = 3",
    ),
    "CLIPBackbone (vision 2, text 3)": (
        towers("clip"),
        "per tower: vision 1 + 2, text 1 + 3",
    ),
    "SigLIPBackbone (vision 2, text 3)": (
        towers("siglip"),
        "per tower: vision 1 + 2, text 1 + 3",
    ),
    "WhisperBackbone (2 + 2 layers)": (
        hub(
            "WhisperBackbone",
            vocabulary_size=50,
            num_layers=2,
            num_mels=8,
            max_encoder_sequence_length=16,
            max_decoder_sequence_length=16,
            **TEXT,
        ),
        "encoder 1 + 2, decoder 1 + 2",
    ),
    "T5Backbone (2 + 2 layers)": (
        hub("T5Backbone", vocabulary_size=50, num_layers=2, key_value_dim=4, **TEXT),
        "encoder 1 + 2, decoder 1 + 2",
    ),
    "BartBackbone (2 + 2 layers)": (
        hub(
            "BartBackbone",
            vocabulary_size=50,
            num_layers=2,
            max_sequence_length=16,
            **TEXT,
        ),
        "encoder 1 + 2, decoder 1 + 2",
    ),
}


def levels(model: keras.Model) -> str:
    try:
        decayed = stopgrad_lr.layerwise_decay(model, "auto", 0.5)
    except ValueError:
        # An encoder and a decoder: no gradient scale gives the towers their
        # levels; `layerwise_decay_multipliers` gives them from the names.
        multipliers = stopgrad_lr.layerwise_decay_multipliers(model, "auto", 0.5)
        deepest = min(multipliers.values())
        return (
            f"gradient scales: raises (no cut per tower); "
            f"`layerwise_decay_multipliers`: deepest layer at "
            f"decay^{-math.log2(deepest):.0f}"
        )
    rows = stopgrad_lr.summary(decayed, print_fn=None)
    # Nested models (CLIP's towers) hold scales too: count the graph's rows.
    count = sum(row.type == "GradientScale" for row in rows)
    deepest = min(row.multiplier for row in rows if row.trainable_params)
    depth = (
        "" if deepest == 0 else f", deepest layer at decay^{-math.log2(deepest):.0f}"
    )
    return f"{count} boundaries{depth}"


def render() -> str:
    rows = []
    for name, (build, authors) in MODELS.items():
        rows.append(f"| {name} | {levels(build())} | {authors} |")
        keras.backend.clear_session()
    return "\n".join(
        [
            "<!-- generated by benchmarks/auto_levels.py -->",
            f"`{COMMAND}`, {today()}, on {machine_description()}.",
            "",
            '| model | "auto" finds | blocks its authors name |',
            "|---|---|---|",
            *rows,
            "",
        ]
    )


def main() -> int:
    return publish(OUTPUT, render())


if __name__ == "__main__":
    sys.exit(main())
