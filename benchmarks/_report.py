"""What each benchmark stamps on its output: machine, date; and an atomic write."""

from __future__ import annotations

import datetime
import os
import platform
import tempfile
from pathlib import Path

import keras
import numpy as np

import stopgrad_lr

REPOSITORY = Path(__file__).resolve().parent.parent


def machine_description() -> str:
    """CPU model and count, OS, and the versions that produced the numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = [
        f"Python {platform.python_version()}",
        f"Keras {keras.__version__} ({keras.backend.backend()} backend)",
    ]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        versions.append(f"TensorFlow {tf.__version__}")
    versions += [f"NumPy {np.__version__}", f"stopgrad_lr {stopgrad_lr.__version__}"]
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}; " + ", ".join(versions)
    )


def today() -> str:
    """Today's date in UTC, ISO format."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` via a temporary file in the same directory.

    A reader (or an interrupted run) never sees a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False
    ) as temporary:
        temporary.write(text)
    try:
        os.replace(temporary.name, path)
    except BaseException:
        os.unlink(temporary.name)
        raise


def publish(path: Path, text: str) -> int:
    """Writes a benchmark's page to `path`, prints it, and returns the exit
    status 0 for `sys.exit`."""
    write_atomically(path, text)
    print(text)
    print(f"wrote {path}")
    return 0
