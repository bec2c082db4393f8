"""The parts under JAX's `keras.distribution.DataParallel` on two devices.

The same model and callbacks as the `MultiWorkerMirroredStrategy` test
(`multi_worker_job.py`: debiased batch norm, drop path, stochastic depth,
sample-mode DropConnect, EMA, snapshots, a cyclical learning rate), trained
on one device and data-parallel on two CPU devices, must end with the same
weights and averages (within 1e-5; float32 reordering) and the same files.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="runs in the JAX pass of the suite (KERAS_BACKEND=jax)",
)


def test_data_parallel_on_two_devices_matches_one_device(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "jax_data_parallel_job.py")
    result = subprocess.run(
        [sys.executable, script, str(tmp_path)],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    arrays = {}
    for name in ("single", "parallel"):
        with np.load(tmp_path / f"{name}.npz") as loaded:
            arrays[name] = [
                loaded[f"arr_{i}"] for i in range(len(loaded.files))
            ]
    assert len(arrays["single"]) == len(arrays["parallel"]) > 0
    for a, b in zip(arrays["single"], arrays["parallel"], strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert sorted(os.listdir(tmp_path / "parallel")) == sorted(
        os.listdir(tmp_path / "single")
    )
