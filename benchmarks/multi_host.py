"""Fine-tuning on two hosts (two processes on this machine) equals one process.

Starts two worker processes that join one JAX cluster through
`keras.distribution.initialize` on 127.0.0.1 (a free local port), each with
4 simulated CPU devices, and trains a tiny keras-hub `GemmaBackbone`
rewritten by `layerwise_decay` under `DataParallel` over the 8 devices, each
process feeding its half of every batch; then the same training in one
process on one device. Prints the largest relative difference of the
trained weights and fails above 1e-4. Every process is bounded by a timeout.

    python benchmarks/multi_host.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 240
STEPS, BATCH, SEQUENCE = 3, 8, 8


def worker(process_id: int, num_processes: int, port: int, out: str) -> None:
    import keras
    import keras_hub
    import numpy as np

    import stopgrad_lr

    if num_processes > 1:
        keras.distribution.initialize(
            job_addresses=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
        )
        # Each process feeds its own share of the batches (below).
        distribution = keras.distribution.DataParallel(
            devices=keras.distribution.list_devices(), auto_shard_dataset=False
        )
        keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=4,
    )
    model = stopgrad_lr.layerwise_decay(backbone, "decoder_block_*", 0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (BATCH * STEPS, SEQUENCE)).astype("int32")
    y = rng.normal(size=(BATCH * STEPS, SEQUENCE, 16)).astype("float32")
    # Each process feeds its share of every global batch.
    share = BATCH // num_processes
    rows = np.concatenate(
        [
            np.arange(step * BATCH, (step + 1) * BATCH)[
                process_id * share : (process_id + 1) * share
            ]
            for step in range(STEPS)
        ]
    )
    x = {"token_ids": tokens[rows], "padding_mask": np.ones_like(tokens[rows])}
    model.fit(x, y[rows], batch_size=share, epochs=1, shuffle=False, verbose=0)
    if process_id == 0:
        np.savez(out, **{v.path: np.asarray(v.numpy()) for v in model.weights})


def launch(process_id: int, num_processes: int, port: int, out: str, devices: int):
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": os.pathsep.join(
            filter(
                None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]
            )
        ),
    }
    arguments = [str(process_id), str(num_processes), str(port), out]
    return subprocess.Popen(
        [sys.executable, __file__, "worker", *arguments],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def finish(process: subprocess.Popen[str]) -> str:
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        return f"timed out after {TIMEOUT_S} s: {stderr[-2000:]}"
    return "" if process.returncode == 0 else stderr[-3000:]


def main() -> int:
    import numpy as np

    with tempfile.TemporaryDirectory() as directory:
        two = str(Path(directory) / "two.npz")
        one = str(Path(directory) / "one.npz")
        port = free_port()
        workers = [launch(i, 2, port, two, devices=4) for i in range(2)]
        errors = [finish(process) for process in workers]
        single = finish(launch(0, 1, port, one, devices=1))
        if any(errors) or single:
            print(json.dumps({"errors": errors, "single": single}, indent=1))
            return 1
        a, b = np.load(two), np.load(one)
        worst = max(
            float(np.max(np.abs(a[k] - b[k])) / max(float(np.max(np.abs(b[k]))), 1e-30))
            for k in b.files
        )
    print(json.dumps({"variables": len(b.files), "max_relative_difference": worst}))
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(main())
