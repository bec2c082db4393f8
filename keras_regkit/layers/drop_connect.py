"""DropConnect: dropping individual weights (Wan et al., 2013)."""

import math

import keras
import numpy as np
from keras import ops

from keras_regkit._distribute import replica_position
from keras_regkit._validation import argument_error
from keras_regkit._validation import check_bool
from keras_regkit._validation import check_choice
from keras_regkit._validation import check_float_in_range
from keras_regkit._validation import check_int
from keras_regkit._validation import check_seed

__all__ = ["MAX_SAMPLE_MASK_ELEMENTS", "DropConnectConv2D", "DropConnectDense"]

MAX_SAMPLE_MASK_ELEMENTS = 2**27
"""Largest per-sample mask (batch x kernel size elements) `mask="sample"`
accepts where the batch size is known: 2**27 float32 values are 512 MiB."""

_MASKS = ("batch", "sample")
_INFERENCES = ("mean", "gaussian")


def _check_kernel_size(kernel_size):
    """An int or a pair of ints (NumPy ints too), as Python ints."""
    if isinstance(kernel_size, (list, tuple)) and len(kernel_size) == 2:
        return tuple(
            check_int("kernel_size", k, minimum=1) for k in kernel_size
        )
    try:
        return check_int("kernel_size", kernel_size, minimum=1)
    except ValueError:
        raise argument_error(
            "kernel_size", "an int >= 1 or a tuple of 2 such ints", kernel_size
        ) from None


def _int32(value):
    """The int32 with the bits of the unsigned 32-bit `value`."""
    return np.int32(value - 2**32 if value >= 2**31 else value)


def _logical_right_shift(x, bits):
    return ops.bitwise_and(
        ops.right_shift(x, bits), _int32(2 ** (32 - bits) - 1)
    )


def _mix32(x):
    """Wellons's `lowbias32` integer hash: a bijection of 32-bit words in
    which every input bit flips every output bit with probability ~1/2."""
    x = ops.bitwise_xor(x, _logical_right_shift(x, 16))
    x = ops.multiply(x, _int32(0x7FEB352D))
    x = ops.bitwise_xor(x, _logical_right_shift(x, 15))
    x = ops.multiply(x, _int32(0x846CA68B))
    return ops.bitwise_xor(x, _logical_right_shift(x, 16))


def keep_mask(shape, rate, seed, start=0):
    """Boolean mask, each entry `True` with probability `1 - rate`.

    One `keras.random.randint` draw per call, a 32-bit key `k`; entry `i`
    (row-major, counted from `start`) is kept when the 32-bit hash
    `lowbias32((i * 0x9E3779B9) XOR k)` (wrapping 32-bit arithmetic), read
    as an unsigned integer, is at least `round(rate * 2**32)`.

    Why not `keras.random.uniform`: under XLA on CPU, TensorFlow's
    random-number kernels cost a hundred times their non-XLA cost (a
    kernel-sized mask of a million values takes about a second), and JAX's
    several times the hash, which is a few fused integer operations; see
    `benchmarks/bench_drop_connect.py`.

    Args:
        shape: tuple. The mask shape (its first entry may be a tensor).
        rate: float in [0, 1). Probability of `False`.
        seed: a `keras.random.SeedGenerator`.
        start: int or int32 scalar tensor. Counter of the first entry.
    """
    key = keras.random.randint(
        (), -(2**31), 2**31 - 1, dtype="int32", seed=seed
    )
    size = shape[0]
    for dim in shape[1:]:
        size = size * dim
    counters = ops.arange(size, dtype="int32") + ops.cast(start, "int32")
    # The odd multiplier spreads consecutive counters over all 32 bits
    # before the key is mixed in.
    counters = ops.multiply(counters, _int32(0x9E3779B9))
    bits = _mix32(ops.bitwise_xor(counters, key))
    threshold = min(round(rate * 2**32), 2**32 - 1)
    # Unsigned comparison on int32 words: flipping the sign bit maps the
    # unsigned order onto the signed one.
    keep = ops.bitwise_xor(bits, _int32(2**31)) >= np.int32(threshold - 2**31)
    return ops.reshape(keep, shape)


def _expected_relu(mean, std):
    """E[max(u, 0)] for u ~ N(mean, std^2), in closed form."""
    safe = ops.maximum(std, 1e-12)
    z = mean / safe
    cdf = 0.5 * (1.0 + ops.erf(z / math.sqrt(2.0)))
    pdf = ops.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return ops.where(std > 0, mean * cdf + std * pdf, ops.relu(mean))


class _DropConnectMixin:
    """Mask drawing and Gaussian inference shared by the DropConnect layers.

    A subclass provides `_linear(inputs, kernel)` (the layer's affine map
    without bias), `_per_sample_linear(inputs, kernels)` (the same with one
    kernel per example) and `_bias_shape(ndim)` (how the bias broadcasts
    against an output of rank `ndim`).
    """

    def _init_drop_connect(
        self, rate, mask, inference, gaussian_samples, drop_bias, seed
    ):
        self.rate = check_float_in_range("rate", rate, 0, 1, True, False)
        self.mask = check_choice("mask", mask, _MASKS)
        inference = check_choice("inference", inference, _INFERENCES)
        if inference == "gaussian" and self.activation in (
            None,
            keras.activations.linear,
        ):
            raise argument_error(
                "inference",
                "'mean' for a layer without a nonlinear `activation`: the "
                "Gaussian average of a linear pre-activation is its mean, so "
                "'gaussian' would change nothing. Pass the nonlinearity to "
                "the layer (e.g. `activation='relu'`) instead of a separate "
                "Activation layer",
                inference,
            )
        self._inference = inference
        self.gaussian_samples = check_int(
            "gaussian_samples", gaussian_samples, minimum=1
        )
        self.drop_bias = check_bool("drop_bias", drop_bias)
        self.seed = check_seed("seed", seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    @property
    def inference(self):
        """`"mean"` or `"gaussian"`, fixed at construction."""
        return self._inference

    @inference.setter
    def inference(self, value):
        # Keras caches the compiled predict function, which would keep
        # serving the old rule.
        raise AttributeError(
            "`inference` is fixed when the layer is created: a model that "
            "has already predicted keeps its compiled predict function. "
            "Create the layer again with the other rule, e.g. "
            "`type(layer).from_config({**layer.get_config(), 'inference': "
            f"{value!r}}})`, and copy the weights with `set_weights`."
        )

    def _drop_connect_config(self):
        return {
            "rate": self.rate,
            "mask": self.mask,
            "inference": self.inference,
            "gaussian_samples": self.gaussian_samples,
            "drop_bias": self.drop_bias,
            "seed": self.seed,
        }

    def _check_sample_mask_size(self, batch_size):
        per_example = math.prod(self.kernel.shape)
        if batch_size is None:
            batch_size = 1
        if batch_size * per_example > MAX_SAMPLE_MASK_ELEMENTS:
            raise ValueError(
                "Invalid value received for argument `mask`. "
                "mask='sample' draws one kernel mask per example: "
                f"{batch_size} x {per_example} = {batch_size * per_example} "
                f"values, above the limit of {MAX_SAMPLE_MASK_ELEMENTS} "
                "(keras_regkit.layers.drop_connect.MAX_SAMPLE_MASK_ELEMENTS). "
                "Use mask='batch', a smaller batch or a smaller layer. "
                "Received: mask='sample'"
            )

    def _keep_mask(self, shape, dtype, per_example=False):
        start = 0
        position = replica_position()
        if per_example and position is not None:
            # Replica r keeps rows r * B to (r + 1) * B of the global
            # batch's masks: the same counters one device would hash.
            per_row = math.prod(shape[1:])
            start = position[0] * ops.cast(shape[0], "int32") * per_row
        keep = keep_mask(shape, self.rate, self.seed_generator, start)
        return ops.cast(keep, dtype) / ops.cast(1.0 - self.rate, dtype)

    def _bias_term(self, ndim):
        return ops.reshape(self.bias, self._bias_shape(ndim))

    def _training_output(self, inputs):
        kernel = self.kernel
        ndim = len(inputs.shape)
        bias_mask_shape = self._bias_shape(ndim)
        if self.mask == "batch":
            mask = self._keep_mask(kernel.shape, kernel.dtype)
            outputs = self._linear(inputs, kernel * mask)
        else:
            batch_size = inputs.shape[0]
            position = replica_position()
            if position is not None and batch_size is not None:
                # Each replica draws the masks of the global batch.
                batch_size = batch_size * position[1]
            self._check_sample_mask_size(batch_size)
            batch = ops.shape(inputs)[0]
            masks = self._keep_mask(
                (batch,) + tuple(kernel.shape), kernel.dtype, per_example=True
            )
            outputs = self._per_sample_linear(inputs, masks * kernel)
            bias_mask_shape = (batch,) + bias_mask_shape[1:]
        if self.use_bias:
            bias = self._bias_term(ndim)
            if self.drop_bias:
                bias = bias * self._keep_mask(
                    bias_mask_shape, bias.dtype, self.mask == "sample"
                )
            outputs = outputs + bias
        return outputs

    def _gaussian_inference(self, inputs):
        # Moment matching (Wan et al., 2013, Sec. 3.1, with inverted scaling):
        # u = sum_j m_j w_j v_j / p, m_j ~ Bernoulli(p), so
        # E[u] = W v and Var[u] = (1 - p) / p * (W * W)(v * v).
        keep = 1.0 - self.rate
        x = ops.cast(inputs, "float32")
        kernel = ops.cast(self.kernel, "float32")
        mean = self._linear(x, kernel)
        variance = self._linear(x * x, kernel * kernel)
        if self.use_bias:
            bias = ops.cast(self._bias_term(len(inputs.shape)), "float32")
            mean = mean + bias
            if self.drop_bias:
                variance = variance + bias * bias
        variance = variance * ((1.0 - keep) / keep)
        std = ops.sqrt(variance)
        if self.activation is keras.activations.relu:
            outputs = _expected_relu(mean, std)
        else:
            # E[a(u)] = 1/sqrt(pi) sum_k w_k a(mean + sqrt(2) std x_k), the
            # Gauss-Hermite rule: exact for polynomials of degree < 2K and
            # within 1e-9 of the integral for a sigmoid at K = 16, where
            # random draws need millions for that.
            nodes, weights = np.polynomial.hermite.hermgauss(
                self.gaussian_samples
            )
            shape = (-1,) + (1,) * len(mean.shape)
            nodes = ops.reshape(ops.convert_to_tensor(nodes, "float32"), shape)
            weights = ops.convert_to_tensor(weights / math.sqrt(math.pi))
            points = mean[None] + (math.sqrt(2.0) * std)[None] * nodes
            outputs = ops.tensordot(
                ops.cast(weights, "float32"), self.activation(points), axes=1
            )
        return ops.cast(outputs, self.compute_dtype)

    def _drop_connect_call(self, inputs, training):
        if training and self.rate > 0:
            outputs = self._training_output(inputs)
        elif self.inference == "gaussian" and self.rate > 0:
            return self._gaussian_inference(inputs)
        else:
            outputs = self._linear(inputs, self.kernel)
            if self.use_bias:
                outputs = outputs + self._bias_term(len(inputs.shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


_CLASS_DOC_COMMON = """
    Args:
        rate: float in [0, 1). Probability of dropping each weight (the paper
            writes `1 - p` with `p` the keep probability). Defaults to `0.5`.
        mask: `"batch"` draws one mask per training step, shared by the whole
            batch (cheap: one kernel-sized mask). `"sample"` draws a fresh
            mask for every example, as the paper does; it materializes a
            `(batch,) + kernel.shape` mask, so memory grows as batch x kernel
            size, and it is refused where that exceeds
            `MAX_SAMPLE_MASK_ELEMENTS` (2**27 values, 512 MiB in float32) for
            a known batch size. Under a `tf.distribute` strategy, both
            modes draw on every replica what one device draws for the
            global batch (the shared mask; or the global batch's masks, of
            which each replica keeps its own examples' rows, so the limit
            then applies to the global batch). Defaults to `"batch"`.
        inference: `"mean"` uses the plain kernel (exact in expectation
            because training rescales kept weights by `1 / (1 - rate)`).
            `"gaussian"` is the paper's moment-matched inference: the
            pre-activation is modelled as `u ~ N(E[u], Var[u])` and the
            layer returns `E[a(u)]` (deterministic), which needs a nonlinear
            `activation` in the layer itself. Defaults to `"mean"`.
        gaussian_samples: int. Points at which `inference="gaussian"`
            evaluates the activation: the nodes of a Gauss-Hermite rule for
            `E[a(u)]` (a ReLU uses the closed form
            `E[u] Phi(E[u]/s) + s phi(E[u]/s)`, `s` the standard deviation).
            The paper averages random draws instead; the rule is
            deterministic and far more accurate for the same count.
            Defaults to `32`.
        drop_bias: bool. Whether the bias is masked too. The paper absorbs
            the bias into `W` (an input fixed at 1), so it is dropped like any
            weight. Defaults to `True`.
        seed: int or `None`. Seed of the layer's `SeedGenerator`. Each mask
            takes one 32-bit key from it and hashes every entry's index
            with the key (`keep_mask` in this module): under XLA a
            kernel-sized `keras.random.uniform` costs TensorFlow on CPU
            about 100 times its non-XLA cost, and JAX several times the
            hash. Defaults to `None`.
"""


@keras.saving.register_keras_serializable(package="keras_regkit")
class DropConnectDense(_DropConnectMixin, keras.layers.Dense):
    (
        """Densely-connected layer whose weights are dropped during training.

    In training, each kernel weight (and bias entry, with `drop_bias`) is
    kept with probability `p = 1 - rate` and scaled by `1 / p`:
    `r = a(((M * W) / p) v + (m_b * b) / p)` with `M ~ Bernoulli(p)`
    elementwise. In inference, `inference="mean"` computes `a(W v + b)`, and
    `inference="gaussian"` computes `E[a(u)]` for
    `u ~ N(W v + b, (1 - p) / p ((W * W)(v * v) + b * b))`, the paper's
    Algorithm 2 with the inverted scaling above (see `gaussian_samples`). With `rate=0` the
    layer is exactly `keras.layers.Dense`.

    The paper scales at inference instead (`E[u] = p W v`); the inverted
    form here gives the same network function and lets `inference="mean"`
    use the kernel unchanged, like `keras.layers.Dropout`.
    """
        + _CLASS_DOC_COMMON
        + """        units: int. Output size.
        **kwargs: Any other argument of `keras.layers.Dense` (`activation`,
            `use_bias`, initializers, regularizers, constraints, `name`...).

    Call arguments:
        inputs: A tensor of rank >= 2.
        training: bool. Whether to draw masks.

    Example:

    >>> import numpy as np
    >>> layer = DropConnectDense(4, rate=0.5, seed=1)
    >>> x = np.ones((2, 3), "float32")
    >>> tuple(layer(x, training=True).shape)
    (2, 4)
    >>> bool(np.allclose(layer(x), x @ layer.kernel + layer.bias))
    True

    Reference:
    - [Wan et al., 2013](https://proceedings.mlr.press/v28/wan13.html)
    """
    )

    def __init__(
        self,
        units,
        rate=0.5,
        mask="batch",
        inference="mean",
        gaussian_samples=32,
        drop_bias=True,
        seed=None,
        **kwargs,
    ):
        super().__init__(check_int("units", units, minimum=1), **kwargs)
        self._init_drop_connect(
            rate, mask, inference, gaussian_samples, drop_bias, seed
        )

    def build(self, input_shape):
        super().build(input_shape)
        if self.mask == "sample":
            self._check_sample_mask_size(input_shape[0])

    def _linear(self, inputs, kernel):
        return ops.matmul(inputs, kernel)

    def _per_sample_linear(self, inputs, kernels):
        shape = ops.shape(inputs)
        flat = ops.reshape(inputs, (shape[0], -1, shape[-1]))
        outputs = ops.einsum("bni,bio->bno", flat, kernels)
        return ops.reshape(outputs, tuple(shape[:-1]) + (self.units,))

    def _bias_shape(self, ndim):
        return (1,) * (ndim - 1) + (self.units,)

    def call(self, inputs, training=None):
        return self._drop_connect_call(inputs, training)

    def get_config(self):
        return {**super().get_config(), **self._drop_connect_config()}


@keras.saving.register_keras_serializable(package="keras_regkit")
class DropConnectConv2D(_DropConnectMixin, keras.layers.Conv2D):
    (
        """2D convolution whose kernel weights are dropped during training.

    The DropConnect rule of `DropConnectDense` applied to a convolution
    kernel: in training each kernel weight `W[i, j, c_in, c_out]` (and bias
    entry, with `drop_bias`) is kept with probability `p = 1 - rate` and
    scaled by `1 / p`; the kept kernel is shared by every spatial position,
    so one mask drops a connection everywhere in the image. In inference,
    `"mean"` convolves with the plain kernel and `"gaussian"` takes the expected
    activation `E[a(u)]` for `u ~ N(conv(v, W) + b,
    (1 - p) / p (conv(v * v, W * W) + b * b))`. With `rate=0` the layer is
    exactly `keras.layers.Conv2D`.

    `mask="sample"` convolves each example with its own masked kernel, as
    patches times kernel (`keras.ops.image.extract_patches`), which costs
    memory of batch x output positions x kernel height x width x input
    channels on top of the mask; it supports `groups=1` only.
    """
        + _CLASS_DOC_COMMON
        + """        filters: int. Number of output channels.
        kernel_size: int or tuple of 2 ints. Convolution window.
        **kwargs: Any other argument of `keras.layers.Conv2D` (`strides`,
            `padding`, `data_format`, `dilation_rate`, `activation`...).

    Call arguments:
        inputs: A 4D tensor.
        training: bool. Whether to draw masks.

    Example:

    >>> import numpy as np
    >>> layer = DropConnectConv2D(2, 3, rate=0.3, seed=1)
    >>> tuple(layer(np.ones((1, 5, 6, 3), "float32"), training=True).shape)
    (1, 3, 4, 2)

    Reference:
    - [Wan et al., 2013](https://proceedings.mlr.press/v28/wan13.html)
    """
    )

    def __init__(
        self,
        filters,
        kernel_size,
        rate=0.5,
        mask="batch",
        inference="mean",
        gaussian_samples=32,
        drop_bias=True,
        seed=None,
        **kwargs,
    ):
        super().__init__(
            check_int("filters", filters, minimum=1),
            _check_kernel_size(kernel_size),
            **kwargs,
        )
        self._init_drop_connect(
            rate, mask, inference, gaussian_samples, drop_bias, seed
        )
        if self.mask == "sample" and self.groups != 1:
            raise argument_error("groups", "1 when mask='sample'", self.groups)

    def build(self, input_shape):
        if self.data_format == "channels_last":
            spatial = input_shape[1:3]
        else:
            spatial = input_shape[2:4]
        if self.padding == "valid":
            for size, kernel, dilation in zip(
                spatial, self.kernel_size, self.dilation_rate
            ):
                span = (kernel - 1) * dilation + 1
                if size is not None and size < span:
                    raise ValueError(
                        "Invalid value received for argument `kernel_size`. "
                        "Expected a window no larger than the input's "
                        f"spatial size {tuple(spatial)} with padding='valid' "
                        f"(dilation_rate={self.dilation_rate}). Received: "
                        f"kernel_size={self.kernel_size}"
                    )
        super().build(input_shape)
        if self.mask == "sample":
            self._check_sample_mask_size(input_shape[0])

    def _linear(self, inputs, kernel):
        return self.convolution_op(inputs, kernel)

    def _per_sample_linear(self, inputs, kernels):
        channels_first = self.data_format == "channels_first"
        if channels_first:
            inputs = ops.transpose(inputs, (0, 2, 3, 1))
        patches = ops.image.extract_patches(
            inputs,
            self.kernel_size,
            strides=self.strides,
            dilation_rate=self.dilation_rate,
            padding=self.padding,
            data_format="channels_last",
        )
        batch = ops.shape(kernels)[0]
        flat_kernels = ops.reshape(kernels, (batch, -1, self.filters))
        outputs = ops.einsum("bhwk,bko->bhwo", patches, flat_kernels)
        if channels_first:
            outputs = ops.transpose(outputs, (0, 3, 1, 2))
        return outputs

    def _bias_shape(self, ndim):
        if self.data_format == "channels_last":
            return (1, 1, 1, self.filters)
        return (1, self.filters, 1, 1)

    def call(self, inputs, training=None):
        return self._drop_connect_call(inputs, training)

    def get_config(self):
        return {**super().get_config(), **self._drop_connect_config()}
