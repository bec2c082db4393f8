import numpy as np
import pytest
from keras import ops
from layer_checks import run_layer_checks

from keras_regkit.layers import DropPath


def test_harness():
    run_layer_checks(
        DropPath,
        {"rate": 0.5, "seed": 1},
        (6, 5, 3, 2),
        expected_output_shape=(6, 5, 3, 2),
    )


@pytest.mark.parametrize("rate", [0.2, 0.7])
def test_per_example_all_or_nothing_and_frequency(rate):
    layer = DropPath(rate, seed=0)
    x = np.ones((500, 3, 4), "float32")
    y = ops.convert_to_numpy(layer(x, training=True))
    per_example = y.reshape(len(y), -1)
    for row in per_example:
        assert np.all(row == row[0]), "mask is not all-or-nothing per example"
    assert set(np.unique(per_example)) <= {0.0, np.float32(1 / (1 - rate))}
    dropped = np.mean(per_example[:, 0] == 0)
    assert abs(dropped - rate) < 4 * np.sqrt(rate * (1 - rate) / len(y))


def test_identity_at_inference_and_rate_zero():
    x = np.random.default_rng(0).normal(size=(3, 2)).astype("float32")
    np.testing.assert_array_equal(ops.convert_to_numpy(DropPath(0.9)(x)), x)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(DropPath(0.0)(x, training=True)), x
    )


@pytest.mark.parametrize("rate", [1.0, -0.5])
def test_bad_rate(rate):
    with pytest.raises(
        ValueError, match=rf"argument `rate`.*\[0, 1\).*rate={rate}"
    ):
        DropPath(rate)
