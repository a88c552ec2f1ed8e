"""Fine-tuning a keras-hub Gemma on a device mesh, against one device.

Run by `tests/test_distribution.py` in a fresh interpreter with
`KERAS_BACKEND=jax` and `XLA_FLAGS=--xla_force_host_platform_device_count=8`
(JAX reads the flag once, when it starts). Each case builds the same tiny
`GemmaBackbone` twice from the same seed: under `keras.distribution`
(`ModelParallel` on a (batch 2, model 4) mesh with the backbone's own layout
map, or `DataParallel` on all 8 devices) and on one device with no
distribution; rewrites both the same way, trains a few steps, and prints one
JSON line per case: the largest relative difference between the two runs'
trained weights, how far the frozen variables moved, the original variables
whose sharding changed and the layout each new variable got.

Usage: python tests/_mesh_script.py [case ...]   (default: all cases)
"""

import contextlib
import json
import sys

import keras
import keras_hub
import numpy as np

import stopgrad_lr

STEPS, BATCH, SEQUENCE = 3, 8, 8
MESH_SHAPE = (2, 4)


def distribution(kind):
    devices = keras.distribution.list_devices()
    if len(devices) != 8:
        raise RuntimeError(
            f"Expected 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)"
            f", found {len(devices)}: {devices}"
        )
    if kind == "data":
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh(MESH_SHAPE, ("batch", "model"), devices)
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    return keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )


def broad_layout_map_scales():
    """The layouts of the scales `layerwise_decay` adds under a layout map
    with a rule that also matches their paths (`decoder_block.*scale`, meant
    for the norms' scales)."""
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(MESH_SHAPE, ("batch", "model"), devices)
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    layout_map["decoder_block.*scale"] = ("model",)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        model = backbone(False)
        new = stopgrad_lr.layerwise_decay(model, "decoder_block_*", 0.5)
    return {v.path: sharding(v) for v in new.weights if "scale" in v.path}


def backbone(lora):
    keras.utils.set_random_seed(0)
    model = keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=4,
    )
    if lora:
        model.enable_lora(2)
        # LoRA's B starts at zero; give it values so that A has a gradient.
        rng = np.random.default_rng(1)
        for variable in model.trainable_variables:
            if variable.path.endswith("lora_kernel_b"):
                variable.assign(rng.normal(0, 0.1, variable.shape).astype("float32"))
    return model


def data():
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 64, (BATCH * STEPS, SEQUENCE)).astype("int32"),
        "padding_mask": np.ones((BATCH * STEPS, SEQUENCE), "int32"),
    }
    y = rng.normal(size=(BATCH * STEPS, SEQUENCE, 16)).astype("float32")
    return x, y


def with_head(model):
    """The backbone under a Dense head, for the reparametrisation."""
    inputs = {
        name: keras.Input((SEQUENCE,), dtype="int32", name=name)
        for name in ("token_ids", "padding_mask")
    }
    outputs = keras.layers.Dense(16, name="head")(model(inputs))
    return keras.Model(inputs, outputs)


def rewrite(case, model):
    """The rewritten model, its optimizer, the variable paths that must not
    move, and the variables the rewrite added (by path)."""
    sgd = keras.optimizers.SGD(0.05, momentum=0.9)
    if case in ("decay", "decay_outside_scope"):
        new = stopgrad_lr.layerwise_decay(model, "decoder_block_*", 0.5)
        return new, sgd, ()
    if case == "decay_copy":
        new = stopgrad_lr.layerwise_decay(model, "decoder_block_*", 0.5, copy=True)
        return new, sgd, ()
    if case == "lora_plus":
        lora = any(v.path.endswith("lora_kernel_b") for v in model.weights)
        multipliers = {"*/lora_kernel_b": 16.0} if lora else {"decoder_block_1": 4.0}
        optimizer = stopgrad_lr.multi_optimizer(
            model, multipliers, keras.optimizers.AdamW(1e-3, weight_decay=0.01)
        )
        return model, optimizer, ()
    if case == "freeze":
        new = stopgrad_lr.insert_gradient_scales(model, {"decoder_block_0": 0.0})
        frozen = [v.path for v in model.get_layer("decoder_block_0").weights] + [
            v.path for v in model.get_layer("token_embedding").weights
        ]
        return new, sgd, frozen
    if case == "reparametrize":
        lora = any(v.path.endswith("lora_kernel_b") for v in model.weights)
        adam = keras.optimizers.Adam(1e-3)
        # enable_lora freezes the embedding: then the head alone.
        multipliers = {"head": 0.5} if lora else {"token_embedding": 4.0, "head": 0.5}
        new = stopgrad_lr.apply_lr_multipliers(
            model, multipliers, optimizer=adam, mechanism="reparametrize"
        )
        return new, adam, ()
    raise ValueError(f"Unknown case {case}")


def sharding(variable):
    """A variable's layout: the mesh axis of each dimension (`None` for
    replicated), or the devices of an unsharded variable."""
    value = variable.value
    spec = getattr(value.sharding, "spec", None)
    if spec is not None:
        return str(tuple(spec) + (None,) * (len(variable.shape) - len(spec)))
    return f"devices {sorted(d.id for d in value.sharding.device_set)}"


def run(case, lora, kind):
    """Trains the case, under `kind`'s distribution or on one device (None).
    The model is built, rewritten and trained under the distribution's
    scope; `decay_outside_scope` rewrites it outside."""
    mesh = distribution(kind) if kind else None

    def scope(active=True):
        return mesh.scope() if mesh and active else contextlib.nullcontext()

    with scope():
        model = backbone(lora)
        if case == "reparametrize":
            model = with_head(model)
    before = {v.path: sharding(v) for v in model.weights}
    original_ids = {id(v) for v in model.weights}
    with scope(case != "decay_outside_scope"):
        new, optimizer, frozen = rewrite(case, model)
    start = {v.path: np.array(v.numpy()) for v in new.weights}
    with scope():
        new.compile(optimizer=optimizer, loss="mse")
        x, y = data()
        new.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    weights = {v.path: np.array(v.numpy()) for v in new.weights}
    after = {v.path: sharding(v) for v in new.weights}
    devices = len(keras.distribution.list_devices())
    return {
        "weights": weights,
        "moved": {p: float(np.max(np.abs(weights[p] - start[p]))) for p in frozen},
        "changed": sorted(p for p, s in before.items() if after.get(p, s) != s),
        "new": {
            v.path: after[v.path] for v in new.weights if id(v) not in original_ids
        },
        "unsharded": sorted(
            v.path
            for v in new.weights
            if mesh and len(v.value.sharding.device_set) != devices
        ),
    }


def run_lr_finder(lora, kind):
    scope = distribution(kind).scope() if kind else contextlib.nullcontext()
    with scope:
        model = stopgrad_lr.layerwise_decay(backbone(lora), "decoder_block_*", 0.5)
        model.compile(optimizer=keras.optimizers.SGD(momentum=0.9), loss="mse")
        x, y = data()
        finder = stopgrad_lr.find_lr(
            model, x, y, batch_size=BATCH, start_lr=1e-3, end_lr=1.0, num_steps=5
        )
    return {
        "weights": {"losses": np.array(finder.losses)},
        "moved": {},
        "changed": [],
        "new": {},
        "unsharded": [],
    }


def max_relative_difference(a, b):
    """The largest difference between a variable's two values, relative to
    the largest entry of its one-device value."""
    worst = 0.0
    for path, value in a.items():
        scale = max(float(np.max(np.abs(b[path]))), 1e-30)
        worst = max(worst, float(np.max(np.abs(value - b[path]))) / scale)
    return worst


CASES = [
    (case, lora, "model")
    for lora in (False, True)
    for case in ("decay", "lora_plus", "freeze", "reparametrize")
] + [
    ("lr_finder", False, "model"),
    ("decay_copy", False, "model"),
    ("decay_outside_scope", False, "model"),
    ("decay", True, "data"),
    ("broad_layout_map", False, "model"),
]


def main(selected):
    for case, lora, kind in CASES:
        name = f"{case}-{'lora' if lora else 'full'}-{kind}"
        if selected and name not in selected:
            continue
        try:
            if case == "broad_layout_map":
                result = {"case": name, "layouts": broad_layout_map_scales()}
                print(json.dumps(result), flush=True)
                continue
            if case == "lr_finder":
                mesh, single = run_lr_finder(lora, kind), run_lr_finder(lora, None)
            else:
                mesh, single = run(case, lora, kind), run(case, lora, None)
            result = {
                "case": name,
                "max_relative_difference": max_relative_difference(
                    mesh["weights"], single["weights"]
                ),
                "moved": mesh["moved"],
                "changed": mesh["changed"],
                "new": mesh["new"],
                "unsharded": mesh["unsharded"],
            }
        except Exception as error:  # reported, for the test to show
            result = {"case": name, "error": f"{type(error).__name__}: {error}"[:2000]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
