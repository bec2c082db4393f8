"""Test-time averaging of a model's stochastic passes (Monte Carlo dropout)."""

import math
import random

import keras
import numpy as np
from keras import ops

from keras_regkit._batch_norm import sublayers
from keras_regkit._batch_norm import walk_layers
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_bool
from keras_regkit._validation import check_int
from keras_regkit._validation import check_seed
from keras_regkit.layers.drop_connect import DropConnectConv2D
from keras_regkit.layers.drop_connect import DropConnectDense
from keras_regkit.layers.drop_connect import keep_mask
from keras_regkit.layers.drop_path import DropPath
from keras_regkit.layers.fractional_max_pooling import FractionalMaxPooling2D
from keras_regkit.layers.stochastic_depth import StochasticDepth
from keras_regkit.models._combine import check_average
from keras_regkit.models._combine import combine_outputs

__all__ = ["STOCHASTIC_LAYERS", "MonteCarloAverage", "pass_seed"]

STOCHASTIC_LAYERS = (
    keras.layers.Dropout,  # SpatialDropout1D/2D/3D are Dropout subclasses.
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    DropConnectDense,
    DropConnectConv2D,
    DropPath,
    StochasticDepth,
    FractionalMaxPooling2D,
)
"""The layer classes `MonteCarloAverage` samples by default (subclasses too)."""


def pass_seed(seed, index):
    """The seed of the `index`-th seed generator in every prediction.

    `SeedSequence((seed, index))`'s first 32-bit word halved, so that it
    fits every backend's seed dtype: generator `index` starts each
    prediction in the state `keras.random.SeedGenerator(pass_seed(seed,
    index))` starts in.
    """
    state = np.random.SeedSequence([seed, index]).generate_state(1)[0]
    return int(state) >> 1


class _Unsaved:
    """Holds the averaging copy of the model out of Keras's tracking: its
    weights are the wrapped model's, which are saved with it."""

    def __init__(self, model, generators=(), seeds=()):
        self.model = model
        self.generators = list(generators)
        self.seeds = list(seeds)


class _Sampled(keras.layers.Layer):
    """Calls `layer` in training mode, whatever the mode of the call."""

    def __init__(self, layer):
        super().__init__(name=f"{layer.name}_sampled", dtype=layer.dtype_policy)
        self.layer = layer
        self.supports_masking = layer.supports_masking
        self.built = True

    def call(self, inputs, training=None, **kwargs):
        return self.layer(inputs, training=True, **kwargs)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def compute_output_spec(self, inputs, training=None, **kwargs):
        return self.layer.compute_output_spec(inputs, **kwargs)


def _shared_shape(inputs, noise_shape=None):
    """`(1,) + inputs.shape[1:]`, or `noise_shape` with its `None` entries
    read from `inputs` and its batch entry 1."""
    shape = ops.shape(inputs)
    if noise_shape is None:
        return (1,) + tuple(shape[1:])
    return (1,) + tuple(
        shape[i] if size is None else size
        for i, size in enumerate(noise_shape)
        if i > 0
    )


def _dropout_pass(layer, inputs):
    # `keras.layers.Dropout.call`, with the mask's batch entry 1.
    return keras.random.dropout(
        inputs,
        layer.rate,
        noise_shape=_shared_shape(inputs, layer.noise_shape),
        seed=layer.seed_generator,
    )


def _spatial_dropout_pass(layer, inputs):
    # One draw per channel: `SpatialDropout*D`'s noise shape, batch entry 1.
    shape = ops.shape(inputs)
    ndim = len(inputs.shape)
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        noise_shape = (1, shape[1]) + (1,) * (ndim - 2)
    else:
        noise_shape = (1,) * (ndim - 1) + (shape[-1],)
    return keras.random.dropout(
        inputs, layer.rate, noise_shape=noise_shape, seed=layer.seed_generator
    )


def _gaussian_dropout_pass(layer, inputs):
    stddev = math.sqrt(layer.rate / (1.0 - layer.rate))
    return inputs * keras.random.normal(
        _shared_shape(inputs),
        mean=1.0,
        stddev=stddev,
        dtype=layer.compute_dtype,
        seed=layer.seed_generator,
    )


def _gaussian_noise_pass(layer, inputs):
    return inputs + keras.random.normal(
        _shared_shape(inputs),
        mean=0.0,
        stddev=layer.stddev,
        dtype=layer.compute_dtype,
        seed=layer.seed_generator,
    )


def _alpha_dropout_pass(layer, inputs):
    # `keras.layers.AlphaDropout.call`: dropped units are set to the SELU
    # saturation `alpha' = -scale * alpha`, then `a x + b` restores the
    # mean and variance.
    alpha = 1.6732632423543772848170429916717
    scale = 1.0507009873554804934193349852946
    alpha_p = -alpha * scale
    rate = layer.rate
    kept = ops.greater_equal(
        keras.random.uniform(
            _shared_shape(inputs, layer.noise_shape), seed=layer.seed_generator
        ),
        rate,
    )
    kept = ops.cast(kept, inputs.dtype)
    a = ((1 - rate) * (1 + rate * alpha_p**2)) ** -0.5
    b = -a * alpha_p * rate
    return a * (inputs * kept + alpha_p * (1 - kept)) + b


def _drop_connect_pass(layer, inputs):
    # The `mask="batch"` training output of `DropConnectDense` and
    # `DropConnectConv2D` (one kernel mask, then one bias mask, each from
    # one key of the layer's generator), whatever the layer's `mask`.
    keep = 1.0 - layer.rate
    kernel = layer.kernel

    def kept(shape, dtype):
        mask = keep_mask(shape, layer.rate, layer.seed_generator)
        return ops.cast(mask, dtype) / ops.cast(keep, dtype)

    kernel = kernel * kept(tuple(kernel.shape), kernel.dtype)
    if isinstance(layer, DropConnectConv2D):
        outputs = layer.convolution_op(inputs, kernel)
    else:
        outputs = ops.matmul(inputs, kernel)
    if layer.use_bias:
        bias = layer.bias
        if layer.drop_bias:
            # The hash counts entries in row-major order, so a mask of the
            # bias's own shape is the layer's broadcastable one.
            bias = bias * kept(tuple(bias.shape), bias.dtype)
        if isinstance(layer, DropConnectConv2D) and (
            layer.data_format == "channels_first"
        ):
            bias = ops.reshape(bias, (1, -1, 1, 1))
        outputs = outputs + bias
    if layer.activation is not None:
        outputs = layer.activation(outputs)
    return outputs


def _drop_path_pass(layer, inputs):
    # One gate for the whole batch, scaled as `DropPath.call` scales.
    keep = 1.0 - layer.rate
    gate = (
        keras.random.uniform(
            (1,) * len(inputs.shape), seed=layer.seed_generator
        )
        < keep
    )
    return inputs * ops.cast(gate, inputs.dtype) / ops.cast(keep, inputs.dtype)


def _is_off(layer):
    rate = getattr(layer, "rate", None)
    stddev = getattr(layer, "stddev", None)
    return rate == 0 or stddev == 0


_BATCH_SHARED_PASSES = {
    keras.layers.Dropout: _dropout_pass,
    keras.layers.SpatialDropout1D: _spatial_dropout_pass,
    keras.layers.SpatialDropout2D: _spatial_dropout_pass,
    keras.layers.SpatialDropout3D: _spatial_dropout_pass,
    keras.layers.GaussianDropout: _gaussian_dropout_pass,
    keras.layers.GaussianNoise: _gaussian_noise_pass,
    keras.layers.AlphaDropout: _alpha_dropout_pass,
    DropConnectDense: _drop_connect_pass,
    DropConnectConv2D: _drop_connect_pass,
    DropPath: _drop_path_pass,
}
"""Layer class -> `pass(layer, inputs)`: one pass of the layer in training
mode with its noise drawn once for the batch (shape `(1, ...)`, broadcast),
from `layer.seed_generator`. `StochasticDepth` (one gate per batch) and
`FractionalMaxPooling2D` (one set of regions per batch) already draw so.
"""


def _batch_shared_pass(layer):
    """The registered pass of `layer`'s class (or of the nearest registered
    base class whose `call` it keeps), else `None`."""
    for cls in type(layer).__mro__:
        if cls in _BATCH_SHARED_PASSES:
            if type(layer).call is not cls.call:
                return None
            return _BATCH_SHARED_PASSES[cls]
    return None


class _BatchShared(_Sampled):
    """One pass of `layer` with its noise shared across the batch."""

    def __init__(self, layer, function):
        super().__init__(layer)
        self.function = function

    def call(self, inputs, training=None, **kwargs):
        if _is_off(self.layer):
            return self.layer(inputs, training=False, **kwargs)
        return self.function(self.layer, inputs)


class _GatedBranch(keras.layers.Layer):
    """One training-mode draw of a `StochasticDepth` gate, `x + b * f(x)`,
    with the branch `f` in inference mode but for its own sampled layers."""

    def __init__(self, layer, steps):
        super().__init__(name=f"{layer.name}_sampled", dtype=layer.dtype_policy)
        self.layer = layer
        self.steps = steps
        self.built = True

    def call(self, inputs, training=None):
        branch = inputs
        for step in self.steps:
            branch = step(branch, training=False)
        probability = self.layer.survival_probability
        if probability == 1.0:
            return inputs + branch
        # The draw of `StochasticDepth.call` in training, from its generator.
        gate = (
            keras.random.uniform((), seed=self.layer.seed_generator)
            < probability
        )
        return inputs + ops.cast(gate, branch.dtype) * branch

    def compute_output_shape(self, input_shape):
        return input_shape


def _public_generators(layer):
    """The `SeedGenerator`s in public attributes of `layer` and its
    sublayers, in attribute order."""
    found = []
    for inner in walk_layers(layer):
        for name, value in vars(inner).items():
            if not name.startswith("_") and isinstance(
                value, keras.random.SeedGenerator
            ):
                found.append(value)
    return found


def _class_name(cls):
    return keras.saving.get_registered_name(cls)


def _resolve_class(name):
    cls = keras.saving.get_registered_object(name)
    if cls is None:
        cls = getattr(keras.layers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise TypeError(
            f"Could not find the layer class {name!r} listed in "
            "`stochastic_layers`. Register it with "
            "`@keras.saving.register_keras_serializable()` or pass it in "
            "`custom_objects` when loading."
        )
    return cls


@keras.saving.register_keras_serializable(package="keras_regkit")
class MonteCarloAverage(keras.Model):
    """Averages `num_passes` stochastic passes of a model at test time.

    Monte Carlo dropout (Gal & Ghahramani, 2016) and DropConnect's sampled
    inference (Wan et al., 2013) as one `keras.Model`: in inference the
    prediction is `y(x) = (1/N) sum_{i=1..N} f(x; xi_i)`, `N = num_passes`,
    where `xi_i` are the masks, noise, gates or pooling regions that the
    stochastic layers of `f` draw in pass `i`, with the training-mode math
    of each layer. Pass `i` draws `xi_i` once and applies it to every
    example of the batch: one dropout mask of shape `(1, ...)` broadcast
    over the batch (a `Dropout`'s `noise_shape` with batch entry 1, one
    mask per channel for `SpatialDropout*D`), one noise tensor for
    `GaussianNoise`, `GaussianDropout` and `AlphaDropout`, one DropConnect
    weight mask (as `mask="batch"` draws, whatever the layer's `mask`), one
    `DropPath` or `StochasticDepth` gate, one set of fractional pooling
    regions. Each pass is thus one sampled subnetwork `f(.; xi_i)`, and `y`
    is the ensemble of `N` of them, for each example `k` the Monte Carlo
    estimate `y(x)[k] = (1/N) sum_i f(x[k]; xi_i) ~ E_xi[f(x[k]; xi)]`
    with `xi_1, ..., xi_N` independent: `predict(x)[k]` depends on `x[k]`
    only, not on the batch size, the other examples or `k`'s position, so
    an exported model serves `predict`'s numbers for any batch size. (In
    training the layers draw per example; the mean of a pass over examples
    is the same expectation.) A layer of a class listed in
    `stochastic_layers` (or a subclass of a default class that overrides
    `call`) is called as it is in training, `layer(x, training=True)`: its
    noise depends on the batch (size and position) unless the layer draws
    it once per batch. Every other layer runs in inference mode: batch
    normalization uses (and never updates) its moving statistics, and a
    `StochasticDepth` gate is drawn as in training, `x + b * block(x)` with
    `b ~ Bernoulli(survival_probability)`, while its block stays in
    inference mode (but for sampled layers inside it). With `from_logits=True` the
    passes' softmaxes are averaged, `mean_i softmax(f_i)`; with
    `return_spread=True` the wrapper also returns the spread across passes,
    `sqrt((1/N) sum_i (f_i - y)^2)`, a measure of uncertainty. In training
    (`fit`) the wrapper calls `model` once, unchanged.

    The draws are fixed: every prediction starts the `j`-th seed generator
    of the sampled layers (depth first in the order of `model.layers`) in
    the state `keras.random.SeedGenerator(pass_seed(seed, j))` starts in,
    and puts back its previous state afterwards. So `predict` is
    deterministic, an exported model serves the same numbers, and training
    draws are not disturbed. The passes are `N` calls of a copy of `model`
    that shares all its layers and weights, in one graph; a prediction
    costs `N` predictions. `keras_regkit.layers.FractionalPoolingAverage`
    is the case of this wrapper that averages fractional max poolings over
    a fixed lattice of pooling regions instead of random ones.

    Args:
        model: A Functional or Sequential `keras.Model` (nested ones
            included), with at least one stochastic layer in its graph: a
            layer of `STOCHASTIC_LAYERS` (Keras's dropout and noise layers,
            and keras_regkit's `DropConnectDense`, `DropConnectConv2D`,
            `DropPath`, `StochasticDepth`, `FractionalMaxPooling2D`) or of
            `stochastic_layers`.
        num_passes: int >= 1. Number of passes `N` averaged. Defaults to
            `10`.
        seed: int >= 0 or `None`. Seed of the passes' draws; `None` picks
            one when the wrapper is created (kept in its config). Defaults
            to `None`.
        average: str. `"probabilities"` or `"logits"`, as for ensembles.
            Defaults to `"probabilities"`.
        from_logits: bool. Softmax each pass's output before averaging.
            Defaults to `False`.
        return_spread: bool. Return `(mean, spread)` in inference. Defaults
            to `False`.
        stochastic_layers: list of `keras.layers.Layer` classes sampled
            besides `STOCHASTIC_LAYERS` (called whole in training mode, so
            their noise is shared across the batch only if they draw it so).
            Their layers must draw from `keras.random.SeedGenerator`s held
            in public attributes. Defaults to `None`.
        **kwargs: Base model keyword arguments (`name`, ...).

    Call arguments:
        inputs: The model's inputs (any structure).
        training: bool. `True` calls `model` once, in training mode.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> net = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(8, activation="relu"),
    ...     keras.layers.Dropout(0.5),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> averaged = MonteCarloAverage(net, num_passes=20, seed=0)
    >>> x = np.random.default_rng(0).normal(size=(2, 4))
    >>> probabilities = averaged.predict(x, verbose=0)
    >>> bool(np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5))
    True
    >>> bool(np.array_equal(probabilities, averaged.predict(x, verbose=0)))
    True

    Reference:

    - [Gal & Ghahramani, 2016](https://arxiv.org/abs/1506.02142)
    - [Wan et al., 2013](http://proceedings.mlr.press/v28/wan13.html)
    - [Graham, 2014](https://arxiv.org/abs/1412.6071)
    """

    def __init__(
        self,
        model,
        num_passes=10,
        seed=None,
        average="probabilities",
        from_logits=False,
        return_spread=False,
        stochastic_layers=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise argument_error("model", "a keras.Model", model)
        self.num_passes = check_int("num_passes", num_passes, minimum=1)
        seed = check_seed("seed", seed)
        self.seed = random.randint(0, 2**31 - 1) if seed is None else seed
        self.average, self.from_logits = check_average(average, from_logits)
        self.return_spread = check_bool("return_spread", return_spread)
        self.stochastic_layers = self._check_classes(stochastic_layers)
        self.model = model
        copy, generators = self._inference_copy(model)
        seeds = [pass_seed(self.seed, j) for j in range(len(generators))]
        self._averaging = _Unsaved(copy, generators, seeds)
        inputs = getattr(model, "inputs", None) if model.built else None
        if inputs and len(inputs) == 1:
            # A symbolic call builds the wrapper and records its input
            # signature, so `export` works before any call on data.
            self(keras.KerasTensor(inputs[0].shape, inputs[0].dtype))

    @staticmethod
    def _check_classes(classes):
        expected = "None or a list of keras.layers.Layer subclasses"
        if classes is None:
            return ()
        if not isinstance(classes, (list, tuple)) or not all(
            isinstance(c, type) and issubclass(c, keras.layers.Layer)
            for c in classes
        ):
            raise argument_error("stochastic_layers", expected, classes)
        return tuple(classes)

    def _is_sampled(self, layer):
        return isinstance(layer, STOCHASTIC_LAYERS + self.stochastic_layers)

    def _pass_layer(self, layer):
        """What stands for `layer` in the copy run for each pass."""
        if isinstance(layer, StochasticDepth):
            steps = [self._pass_layer(inner) for inner in layer.block]
            return _GatedBranch(layer, steps)
        if self._is_sampled(layer):
            function = _batch_shared_pass(layer)
            if function is None:
                return _Sampled(layer)
            return _BatchShared(layer, function)
        return layer

    def _inference_copy(self, model):
        """`(copy, generators)`: `model` with its sampled layers replaced
        by training-mode calls of them (every other layer, and every weight,
        shared), and the seed generators they draw from."""

        def replace(layer):
            if isinstance(layer, keras.Model) and not self._is_sampled(layer):
                # Models deeper than `clone_model` recurses into.
                try:
                    return keras.models.clone_model(
                        layer, clone_function=replace, recursive=True
                    )
                except ValueError:
                    return layer
            return self._pass_layer(layer)

        copy = self._clone(model, replace, "stochastic layers")
        sampled, hidden = [], []
        stack = list(reversed(sublayers(copy)))
        seen = set()
        while stack:
            layer = stack.pop()
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, _Sampled):
                sampled.append(layer.layer)
            elif isinstance(layer, _GatedBranch):
                sampled.append(layer.layer)
                stack.extend(reversed(layer.steps))
            elif self._is_sampled(layer):
                hidden.append(layer.name)
            else:
                stack.extend(reversed(sublayers(layer)))
        if hidden:
            raise argument_error(
                "model",
                "stochastic layers in the graph of a Functional or "
                "Sequential model, not inside a custom layer (found: "
                f"{hidden}); list a custom layer's class in "
                "`stochastic_layers` to sample it whole",
                model,
            )
        if not sampled:
            names = sorted(
                {c.__name__ for c in STOCHASTIC_LAYERS + self.stochastic_layers}
            )
            raise argument_error(
                "model",
                f"a model with a stochastic layer (one of {names}, "
                "subclasses included, or a class listed in "
                "`stochastic_layers`); it has none, so every pass would be "
                "the same",
                model,
            )
        generators = []
        for layer in sampled:
            if isinstance(layer, StochasticDepth):
                found = [layer.seed_generator]
            else:
                found = _public_generators(layer)
            if not found and not isinstance(layer, STOCHASTIC_LAYERS):
                raise argument_error(
                    "stochastic_layers",
                    "classes whose layers draw from a "
                    "keras.random.SeedGenerator held in a public attribute "
                    f"(layer {layer.name!r} holds none), so that predictions "
                    "are reproducible",
                    [c.__name__ for c in self.stochastic_layers],
                )
            for generator in found:
                if all(generator is not g for g in generators):
                    generators.append(generator)
        return copy, generators

    @staticmethod
    def _clone(model, clone_function, what):
        """`clone_model(model, clone_function, recursive=True)`, refusing a
        model it cannot clone with the wrapper's message."""
        try:
            return keras.models.clone_model(
                model, clone_function=clone_function, recursive=True
            )
        except ValueError:
            raise argument_error(
                "model",
                "a Functional or Sequential keras.Model (nested ones "
                f"included), whose {what} the wrapper can replace",
                model,
            ) from None

    @property
    def jit_compile(self):
        # TensorFlow's XLA draws other random numbers than its graph mode,
        # in which an exported SavedModel runs: predict without XLA there.
        if keras.backend.backend() == "tensorflow":
            return False
        return keras.Model.jit_compile.fget(self)

    @jit_compile.setter
    def jit_compile(self, value):
        keras.Model.jit_compile.fset(self, value)

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)

    def _passes(self, inputs):
        """The `num_passes` outputs of the copy, from the fixed states."""
        generators = self._averaging.generators
        # `* 1` copies: the variable's own value would follow the assigns.
        saved = [g.state.value * 1 for g in generators]
        for generator, seed in zip(generators, self._averaging.seeds):
            generator.state.assign(
                ops.convert_to_tensor(
                    np.array([seed, 0]), dtype=generator.state.dtype
                )
            )
        outputs = [
            self._averaging.model(inputs, training=False)
            for _ in range(self.num_passes)
        ]
        for generator, state in zip(generators, saved):
            generator.state.assign(state)
        return outputs

    def call(self, inputs, training=None):
        if training:
            if self.return_spread:
                raise ValueError(
                    "A MonteCarloAverage with return_spread=True returns "
                    "(mean, spread) in inference only; it cannot be trained. "
                    "Train the wrapped model (or a wrapper with "
                    "return_spread=False) and wrap it again to predict."
                )
            return self.model(inputs, training=True)
        return combine_outputs(
            self._passes(inputs),
            self.average,
            self.from_logits,
            return_spread=self.return_spread,
        )

    def compute_output_spec(self, inputs, training=None):
        spec = self.model.compute_output_spec(inputs)
        return (spec, spec) if self.return_spread else spec

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "num_passes": self.num_passes,
                "seed": self.seed,
                "average": self.average,
                "from_logits": self.from_logits,
                "return_spread": self.return_spread,
                "stochastic_layers": [
                    _class_name(c) for c in self.stochastic_layers
                ],
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        if config.get("stochastic_layers"):
            config["stochastic_layers"] = [
                _resolve_class(name) for name in config["stochastic_layers"]
            ]
        return cls(**config)
