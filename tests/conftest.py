import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import keras  # noqa: E402
import pytest  # noqa: E402


def backend_is_tensorflow():
    return keras.backend.backend() == "tensorflow"


requires_tensorflow = pytest.mark.skipif(
    not backend_is_tensorflow(),
    reason="needs the TensorFlow backend (SavedModel export and serving)",
)


@pytest.fixture(autouse=True)
def _clear_session():
    keras.utils.clear_session()
    yield
