"""The chart of effective multipliers shown in the docs, from a real ResNet50.

Draws `stopgrad_lr.plot_multipliers` for a Keras ResNet50 (`weights=None`:
the architecture is what matters, not the weights) in two panels:

- top: `apply_lr_multipliers` with the README's groups, the stem at 0.01 and
  the `conv2` stage at 0.1 of the base rate, cuts marked;
- bottom: one scale put inside a residual block with `on_bypass="ignore"`:
  the skip connection bypasses it, so every layer before the block gets a
  mix of two multipliers (`nan`, hatched).

Writes `docs/images/multipliers.png`, shown by `docs/cookbook.md`:

    python benchmarks/plot_multipliers_figure.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

import stopgrad_lr

REPOSITORY = Path(__file__).resolve().parent.parent
OUTPUT = REPOSITORY / "docs" / "images" / "multipliers.png"
MULTIPLIERS = {"conv1_*": 0.01, "conv2_*": 0.1}
INSIDE_A_BLOCK = {"conv4_block1_2_conv": 0.5}


def draw() -> plt.Figure:
    """The two-panel figure."""
    resnet = keras.applications.ResNet50(weights=None)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(16, 9.5), layout="constrained")
    tuned = stopgrad_lr.apply_lr_multipliers(resnet, MULTIPLIERS)
    stopgrad_lr.plot_multipliers(tuned, top, mark_cuts=True)
    top.set_title(
        f"stopgrad_lr.apply_lr_multipliers(resnet, {MULTIPLIERS}): "
        f"scales at the cuts between the groups"
    )
    misplaced = stopgrad_lr.insert_gradient_scales(
        resnet, INSIDE_A_BLOCK, on_bypass="ignore"
    )
    stopgrad_lr.plot_multipliers(misplaced, bottom)
    bottom.set_title(
        f"stopgrad_lr.insert_gradient_scales(resnet, {INSIDE_A_BLOCK}, "
        f"on_bypass='ignore'): the skip connection bypasses the scale"
    )
    return figure


def save_atomically(figure: plt.Figure, path: Path) -> None:
    """Saves through a temporary file, so an interrupted run leaves the old
    image; without the matplotlib version in the metadata, so the image only
    changes when the chart does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(descriptor)
    try:
        figure.savefig(temporary, dpi=100, metadata={"Software": None})
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def main(output: Path = OUTPUT) -> int:
    figure = draw()
    save_atomically(figure, output)
    plt.close(figure)
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
