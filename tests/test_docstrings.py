"""Runs every docstring example in keras_regkit, as the style guide asks."""

import doctest
import importlib
import pkgutil

import keras
import pytest

import keras_regkit


def _modules():
    names = [keras_regkit.__name__]
    for info in pkgutil.walk_packages(
        keras_regkit.__path__, prefix="keras_regkit."
    ):
        names.append(info.name)
    return sorted(names)


# Examples that show a TensorFlow-only feature, with the reason.
TENSORFLOW_ONLY = {}


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    if name in TENSORFLOW_ONLY and keras.backend.backend() != "tensorflow":
        pytest.skip(TENSORFLOW_ONLY[name])
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    for test in finder.find(module, name, globs=dict(vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed"
