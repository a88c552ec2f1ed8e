"""Memory per device of a rewritten Gemma on a (batch 2, model 4) mesh.

Builds a keras-hub `GemmaBackbone` of about 100M parameters under
`keras.distribution.ModelParallel` with the backbone's own layout map on 8
simulated CPU devices, rewrites it with `layerwise_decay` (a gradient scale
after each decoder block) and with the Adam reparametrisation of the
embedding, and counts, for each device, the bytes of every variable's shards
that live there (the sum of `addressable_shards`' sizes), before and after.
The floor: the rewritten model needs at most 1% more on any device.

Writes `docs/generated/mesh-memory.md`, included by `docs/mesh.md`:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax \\
        python benchmarks/mesh_memory.py
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import keras
import keras_hub
from _report import REPOSITORY, machine_description, publish, today

import stopgrad_lr

COMMAND = (
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax "
    "python benchmarks/mesh_memory.py"
)
OUTPUT = REPOSITORY / "docs" / "generated" / "mesh-memory.md"
CONFIG = dict(
    vocabulary_size=32000,
    num_layers=12,
    num_query_heads=8,
    num_key_value_heads=8,
    hidden_dim=512,
    intermediate_dim=8192,
    head_dim=64,
)
FLOOR = 0.01


def bytes_per_device(model: keras.Model) -> dict[int, int]:
    """Device id -> bytes of the model's variables stored on it."""
    found: collections.Counter[int] = collections.Counter()
    for variable in model.weights:
        for shard in variable.value.addressable_shards:
            found[shard.device.id] += shard.data.nbytes
    return dict(found)


def main() -> int:
    if keras.backend.backend() != "jax" or len(keras.distribution.list_devices()) != 8:
        print(f"Run it as: {COMMAND}", file=sys.stderr)
        return 2
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_hub.models.GemmaBackbone.get_layout_map(mesh),
        batch_dim_name="batch",
    )
    with distribution.scope():
        backbone = keras_hub.models.GemmaBackbone(**CONFIG)
        rewrites: dict[str, Any] = {
            "layerwise_decay": stopgrad_lr.layerwise_decay(
                backbone, "decoder_block_*", 0.8
            ),
            "reparametrize": stopgrad_lr.apply_lr_multipliers(
                backbone,
                {"token_embedding": 4.0},
                optimizer=keras.optimizers.Adam(),
                mechanism="reparametrize",
            ),
        }
    original = bytes_per_device(backbone)
    rows = []
    worst = 0.0
    for name, model in rewrites.items():
        after = bytes_per_device(model)
        for device in sorted(original):
            growth = after[device] / original[device] - 1
            worst = max(worst, growth)
            rows.append(
                f"| `{name}` | {device} | {original[device]:,} | {after[device]:,} "
                f"| {100 * growth:+.4f}% |"
            )
    parameters = backbone.count_params()
    settings = ", ".join(f"{key}={value}" for key, value in CONFIG.items())
    header = "| rewrite | device | original (bytes) | rewritten (bytes) | growth |"
    text = "\n".join(
        [
            f"Measured on {today()}: {machine_description()}; 8 simulated CPU "
            f"devices, mesh (batch 2, model 4), `GemmaBackbone` of "
            f"{parameters:,} parameters ({settings}) "
            f"with `GemmaBackbone.get_layout_map(mesh)`. Bytes of the model's "
            f"variables on each device. Regenerate with `{COMMAND}`.",
            "",
            header,
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"Largest growth on a device: {100 * worst:+.4f}% (floor: "
            f"{100 * FLOOR:+.0f}%). `reparametrize` replaces the embedding by "
            f"a copy, so the input model and the rewritten one together hold "
            f"it twice until the input model is dropped; the table counts the "
            f"rewritten model alone.",
            "",
        ]
    )
    status = publish(OUTPUT, text)
    if worst > FLOOR:
        print(f"Growth {worst:.4%} is over the floor {FLOOR:.0%}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
