"""Fine-tuning under `keras.distribution` on 8 simulated CPU devices (JAX).

JAX reads `XLA_FLAGS` once, when it starts, and the rest of the test session
runs on one device, so the mesh runs happen in a fresh interpreter
(`tests/_mesh_script.py`), which prints one JSON line per case; this file
asserts on them. A keras-hub `GemmaBackbone` under `ModelParallel` with its
own layout map on a (batch 2, model 4) mesh, LoRA on and off, and once under
`DataParallel` on all 8 devices: layer-wise decay (gradient scales and
`multi_optimizer`), LoRA+ with AdamW, a freeze, the Adam reparametrisation
and the LR finder, each against the same run on one device. Nothing here
skips: missing devices fail the run.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("_mesh_script.py")
RTOL = 1e-4
CASES = [
    f"{case}-{lora}-model"
    for lora in ("full", "lora")
    for case in ("decay", "lora_plus", "freeze", "reparametrize")
] + [
    "lr_finder-full-model",
    "decay_copy-full-model",
    "decay_outside_scope-full-model",
    "decay-lora-data",
    "broad_layout_map-full-model",
]
TRAINED = [c for c in CASES if "outside" not in c and "broad" not in c]


@functools.cache
def mesh_results():
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "JAX_PLATFORMS": "cpu",
        # The package of this checkout, not an installed copy.
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(SCRIPT.parent.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line]
    return {line["case"]: line for line in lines}


def result(case):
    found = mesh_results()
    assert case in found, f"{case} did not run; ran {sorted(found)}"
    assert "error" not in found[case], found[case]["error"]
    return found[case]


def test_every_case_ran():
    assert sorted(mesh_results()) == sorted(CASES)


@pytest.mark.parametrize("case", TRAINED)
def test_mesh_training_equals_one_device(case):
    assert result(case)["max_relative_difference"] < RTOL


@pytest.mark.parametrize("case", TRAINED)
def test_original_variables_keep_their_sharding_on_every_device(case):
    outcome = result(case)
    assert outcome["changed"] == []
    assert outcome["unsharded"] == []


@pytest.mark.parametrize("lora", ["full", "lora"])
def test_frozen_block_moves_by_exactly_zero(lora):
    moved = result(f"freeze-{lora}-model")["moved"]
    assert "decoder_block_0/ffw_linear/kernel" in moved
    assert "token_embedding/embeddings" in moved
    if lora == "lora":
        assert "decoder_block_0/attention/query/lora_kernel_a" in moved
    assert set(moved.values()) == {0.0}


@pytest.mark.parametrize("case", ["decay-full-model", "decay-lora-model"])
def test_gradient_scales_are_replicated_scalars(case):
    assert result(case)["new"] == {
        "decoder_block_0_gradient_scale/scale": "()",
        "decoder_block_1_gradient_scale/scale": "()",
    }


def test_reparametrised_copies_take_the_layout_map_layout():
    # The copy of the embedding has the original's path, so the layout map
    # shards it as it sharded the original; the head has no rule: replicated.
    assert result("reparametrize-full-model")["new"] == {
        "token_embedding/embeddings": "('model', 'batch')",
        "head/kernel": "(None, None)",
        "head/bias": "(None,)",
    }


def test_gradient_scales_stay_replicated_when_a_layout_rule_matches_them():
    layouts = result("broad_layout_map-full-model")["layouts"]
    assert layouts["decoder_block_0/pre_ffw_norm/scale"] == "('model',)"
    assert layouts["decoder_block_0_gradient_scale/scale"] == "()"
    assert layouts["decoder_block_1_gradient_scale/scale"] == "()"


def test_two_processes_equal_one():
    """Two JAX processes joined by keras.distribution.initialize on
    127.0.0.1, DataParallel over their 8 devices, against one process."""
    script = SCRIPT.parent.parent / "benchmarks" / "multi_host.py"
    run = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    outcome = json.loads(run.stdout.splitlines()[-1])
    assert outcome["variables"] == 22
    assert outcome["max_relative_difference"] < RTOL


def test_multi_optimizer_adds_no_model_variable():
    assert result("lora_plus-lora-model")["new"] == {}


def test_copy_keeps_layouts():
    new = result("decay_copy-full-model")["new"]
    assert new["token_embedding/embeddings"] == "('model', 'batch')"
    assert new["decoder_block_0/ffw_gating/kernel"] == "('batch', 'model')"


def test_rewrite_outside_the_distribution_is_an_error():
    error = mesh_results()["decay_outside_scope-full-model"]["error"]
    assert error.startswith("ValueError: The variables of model"), error
    assert "no keras.distribution is active" in error
