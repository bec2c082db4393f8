"""Trains `multi_worker_job`'s model on one JAX device, then data-parallel.

Run by `tests/test_jax_distribution.py` in a fresh process, because the two
CPU devices must be requested before JAX starts. Usage:
`python jax_data_parallel_job.py OUTPUT_DIR`; writes `single.npz` and
`parallel.npz` (weights, then averages) and the two snapshot directories.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax
import keras
import numpy as np
from multi_worker_job import build_model
from multi_worker_job import train


def main(output):
    assert len(jax.devices()) == 2, jax.devices()
    single = train(
        build_model(synchronized=False), os.path.join(output, "single")
    )
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices())
    )
    parallel = train(
        build_model(synchronized=False), os.path.join(output, "parallel")
    )
    np.savez(os.path.join(output, "single.npz"), *single)
    np.savez(os.path.join(output, "parallel.npz"), *parallel)


if __name__ == "__main__":
    main(sys.argv[1])
