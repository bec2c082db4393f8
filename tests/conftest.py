import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import keras
import pytest


def backend_is_tensorflow():
    return keras.backend.backend() == "tensorflow"


# Two logical CPU devices for the `tf.distribute` tests. They must be made
# before TensorFlow initializes its devices, so here, before any test runs;
# ops still run on the first device unless a strategy spreads them.
NUM_LOGICAL_CPUS = 2
if backend_is_tensorflow():
    import tensorflow as tf

    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS,
    )


requires_tensorflow = pytest.mark.skipif(
    not backend_is_tensorflow(),
    reason="needs the TensorFlow backend (SavedModel export and serving)",
)


@pytest.fixture(autouse=True)
def _clear_session():
    # free_memory=False skips a full garbage collection per test (about
    # 0.4 s each); the session state itself is still cleared.
    keras.utils.clear_session(free_memory=False)
    yield
