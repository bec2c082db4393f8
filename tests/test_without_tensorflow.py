"""On JAX the package needs no TensorFlow: only export and serving do.

A fresh process where `import tensorflow` fails trains a model with the
layers that touch the distribution helpers and the callbacks that write
files, as a JAX user without TensorFlow installed would.
"""

import subprocess
import sys
import textwrap

import keras
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="runs in the JAX pass of the suite (KERAS_BACKEND=jax)",
)

SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    os.environ["KERAS_BACKEND"] = "jax"
    sys.modules["tensorflow"] = None  # `import tensorflow` now fails

    import keras
    import numpy as np

    import keras_regkit as kr

    inputs = keras.Input((4,))
    x = kr.layers.DropPath(0.3, seed=1)(keras.layers.Dense(4)(inputs))
    x = kr.layers.DebiasedBatchNormalization()(x)
    x = kr.layers.StochasticDepth(keras.layers.Dense(4), 0.5, seed=2)(x)
    x = kr.layers.DropConnectDense(3, mask="sample", seed=3)(x)
    model = keras.Model(inputs, x)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    directory = sys.argv[1]
    model.fit(
        np.ones((32, 4)),
        np.ones((32, 3)),
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[
            kr.callbacks.SnapshotEnsemble(2, 0.1, directory),
            kr.callbacks.PolyakAveraging(0.9),
        ],
    )
    assert "tensorflow" not in {m.split(".")[0] for m in sys.modules
                                if sys.modules[m] is not None}
    print(sorted(os.listdir(directory)))
    """
)


def test_trains_and_writes_snapshots_without_tensorflow(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "snapshot-002.weights.h5" in result.stdout
