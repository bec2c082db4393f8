"""Test-time augmentation: a model's average over views of each image."""

import numbers

import keras
import numpy as np
from keras import ops

from keras_regkit._validation import argument_error
from keras_regkit._validation import check_bool
from keras_regkit._validation import check_choice
from keras_regkit.models._combine import check_average
from keras_regkit.models._combine import combine_outputs

__all__ = ["TestTimeAugmentation"]

_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
_REGIONS = ("full", "center") + _CORNERS
VIEW_NAMES = _REGIONS + tuple(f"{region}_flip" for region in _REGIONS)
_FIVE = _CORNERS + ("center",)
PRESETS = {
    "ten_crop": _FIVE + tuple(f"{region}_flip" for region in _FIVE),
    "five_crop": _FIVE,
    "flip": ("full", "full_flip"),
}
_VIEWS_EXPECTED = (
    f"one of {', '.join(repr(p) for p in PRESETS)}, a view name, or a "
    "non-empty list of view names (one of "
    f"{', '.join(repr(v) for v in VIEW_NAMES)}) and callables"
)


def _is_registered(view):
    name = keras.saving.get_registered_name(view)
    return keras.saving.get_registered_object(name) is view


def _check_views(views):
    if isinstance(views, str):
        if views in PRESETS:
            return views, PRESETS[views]
        if views in VIEW_NAMES:
            return views, (views,)
        raise argument_error("views", _VIEWS_EXPECTED, views)
    if not isinstance(views, (list, tuple)) or not views:
        raise argument_error("views", _VIEWS_EXPECTED, views)
    for view in views:
        if isinstance(view, str):
            if view not in VIEW_NAMES:
                raise argument_error("views", _VIEWS_EXPECTED, views)
        elif not callable(view):
            raise argument_error("views", _VIEWS_EXPECTED, views)
    return list(views), tuple(views)


def _check_crop_size(crop_size):
    size = (
        (crop_size, crop_size)
        if isinstance(crop_size, numbers.Integral)
        else crop_size
    )
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(
            isinstance(s, numbers.Integral)
            and not isinstance(s, (bool, np.bool_))
            and s > 0
            for s in size
        )
    ):
        raise argument_error(
            "crop_size",
            "None, a positive int, or a pair of positive ints (height, width)",
            crop_size,
        )
    return tuple(int(s) for s in size)


@keras.saving.register_keras_serializable(package="keras_regkit")
class TestTimeAugmentation(keras.Model):
    """Averages a model's outputs over deterministic views of each image.

    The test half of the data-augmentation recipe of Krizhevsky et al.
    (2012): trained on random crops (and scales) and horizontal flips, the
    network is evaluated on the `V = 10` views "ten_crop" (the four corner
    crops and the center crop, then the same five of the flipped image)
    and its outputs are averaged, `mean_v f(view_v(x))`. Simonyan &
    Zisserman (2015) average over flips and scales the same way. In one
    call (a `predict`, or a served SavedModel), the wrapper stacks the `V`
    views of the batch along the batch axis, runs `model` once on the
    `V * B` images (so it holds `V` times the activations; lower the batch
    size if memory is short) and averages the `V` blocks of each output in
    float32 (views of different shapes run one by one). It has no weights
    of its own: it is meant for inference, not for `fit`.

    A crop of size `(h, w)` of an image of size `(H, W)` starts at row
    `0` (top) or `H - h` (bottom), column `0` (left) or `W - w` (right),
    or, for the center, at `((H - h) // 2, (W - w) // 2)` as Keras's
    `CenterCrop` does (torchvision rounds half to even, which differs by a
    pixel when `(H - h) / 2` is an odd number plus a half). A flip reverses
    the width axis. `average` and `from_logits` choose what is averaged:
    `mean_v f_v` (`"probabilities"`, or `"logits"`), or
    `mean_v softmax(f_v)` (`"probabilities"` with `from_logits=True`).

    Args:
        model: `keras.Model`. The network; it takes a batch of images (one
            input tensor) of the crop size, or of any size for
            fully convolutional networks.
        views: str or list. A preset, `"ten_crop"` (the paper's 10 views
            in torchvision's `TenCrop` order: `top_left`, `top_right`,
            `bottom_left`, `bottom_right`, `center`, then each `_flip`),
            `"five_crop"` (the first five) or `"flip"` (`full`,
            `full_flip`); one view name; or a list of views, each a name
            (`"full"`, `"center"`, `"top_left"`, `"top_right"`,
            `"bottom_left"`, `"bottom_right"`, each also with `"_flip"`) or
            a callable mapping the image batch to the model's input (a
            `keras.layers.Layer`, or a function of `keras.ops`). Defaults
            to `"ten_crop"`.
        crop_size: int, pair of ints or `None`. The crops' `(h, w)`.
            Defaults to `None`: the model's input size.
        average: str. `"probabilities"` or `"logits"`. Defaults to
            `"probabilities"`.
        from_logits: bool. Softmax each view's output (last axis) before
            averaging. Defaults to `False`.
        return_spread: bool. Also return the standard deviation across
            views, as `[mean, spread]`. Defaults to `False`.
        data_format: str or `None`. `"channels_last"` or
            `"channels_first"`. Defaults to `None`:
            `keras.config.image_data_format()`.
        **kwargs: Base model keyword arguments (`name`, ...).

    Call arguments:
        inputs: A batch of images of size at least the crop size, or any
            input the callable views take.
        training: bool or `None`. Passed on to `model`.

    Saving: named views, `keras.layers.Layer` views and functions
    registered with `keras.saving.register_keras_serializable` are saved
    in the config; other callables work in memory and in an exported
    SavedModel, but `get_config` (and so `.keras` saving) raises. A model
    whose views all keep the model's input size is built on creation and
    can be exported at once; otherwise call it (`predict`) first.

    Example:

    >>> import numpy as np
    >>> net = keras.Sequential([
    ...     keras.Input((4, 4, 1)),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(3, activation="softmax"),
    ... ])
    >>> tta = TestTimeAugmentation(net, views="ten_crop")
    >>> images = np.random.default_rng(0).normal(size=(2, 6, 5, 1))
    >>> crops = [images[:, :4, :4], images[:, :4, 1:], images[:, 2:, :4],
    ...          images[:, 2:, 1:], images[:, 1:5, :4]]
    >>> views = crops + [crop[:, :, ::-1] for crop in crops]
    >>> expected = keras.ops.mean(keras.ops.stack([net(v) for v in views]), 0)
    >>> bool(np.allclose(tta.predict(images, verbose=0), expected, atol=1e-6))
    True

    Reference:
    - [Krizhevsky et al., 2012](https://papers.nips.cc/paper/4824)
    - [Simonyan & Zisserman, 2015](https://arxiv.org/abs/1409.1556)
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        model,
        views="ten_crop",
        crop_size=None,
        average="probabilities",
        from_logits=False,
        return_spread=False,
        data_format=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise argument_error("model", "a keras.Model", model)
        self.model = model
        self.views, view_list = _check_views(views)
        self.average, self.from_logits = check_average(average, from_logits)
        self.return_spread = check_bool("return_spread", return_spread)
        if data_format is None:
            data_format = keras.config.image_data_format()
        self.data_format = check_choice(
            "data_format", data_format, ("channels_last", "channels_first")
        )
        self.view_list = view_list
        image_shape = self._model_image_shape()
        crops = any(
            isinstance(v, str) and not v.startswith("full") for v in view_list
        )
        if crop_size is not None:
            crop_size = _check_crop_size(crop_size)
        elif crops:
            if image_shape is None or None in self._size(image_shape):
                raise argument_error(
                    "crop_size",
                    "a positive int or a pair of positive ints when the "
                    "model's input has no fixed height and width (the crop "
                    "views need a size)",
                    crop_size,
                )
            crop_size = self._size(image_shape)
        self.crop_size = crop_size
        if image_shape is not None and all(
            isinstance(v, str) and v.startswith("full") for v in view_list
        ):
            # A symbolic call builds the wrapper and records its input
            # signature, so `export` works before any call on data.
            self(keras.KerasTensor(image_shape, dtype=model.inputs[0].dtype))

    def _model_image_shape(self):
        inputs = (
            getattr(self.model, "inputs", None) if self.model.built else None
        )
        if not inputs or len(inputs) != 1 or len(inputs[0].shape) != 4:
            return None
        return tuple(inputs[0].shape)

    def _size(self, shape):
        if self.data_format == "channels_last":
            return tuple(shape[1:3])
        return tuple(shape[2:4])

    def build(self, input_shape):
        named = [v for v in self.view_list if isinstance(v, str)]
        if named:
            if len(input_shape) != 4:
                raise ValueError(
                    "TestTimeAugmentation's named views take a batch of "
                    f"images of rank 4 ({self.data_format}); received "
                    f"inputs of shape {tuple(input_shape)}."
                )
            image_size = self._size(input_shape)
            model_shape = self._model_image_shape()
            for view in named:
                exact = view.startswith("full")
                if exact:
                    if model_shape is None:
                        continue
                    size, what = self._size(model_shape), "the model's input"
                else:
                    size, what = self.crop_size, "crop_size"
                if any(
                    actual is not None
                    and needed is not None
                    and (actual != needed if exact else actual < needed)
                    for actual, needed in zip(image_size, size)
                ):
                    raise ValueError(
                        f"TestTimeAugmentation's view {view!r} needs images "
                        f"{'of' if exact else 'at least as large as'} {what} "
                        f"size {tuple(size)} (height, width); received "
                        f"images of size {image_size} (inputs of shape "
                        f"{tuple(input_shape)})."
                    )
        if not self.model.built:
            self.model.build(input_shape)

    def _view(self, view, images):
        if not isinstance(view, str):
            return view(images)
        region = view.removesuffix("_flip")
        height_axis = 1 if self.data_format == "channels_last" else 2
        if region != "full":
            shape = ops.shape(images)
            height, width = shape[height_axis], shape[height_axis + 1]
            h, w = self.crop_size
            top = {"top": 0, "bottom": height - h}.get(
                region.partition("_")[0], (height - h) // 2
            )
            left = {"left": 0, "right": width - w}.get(
                region.partition("_")[2], (width - w) // 2
            )
            start = [0, 0, 0, 0]
            size = list(shape)
            start[height_axis : height_axis + 2] = [top, left]
            size[height_axis : height_axis + 2] = [h, w]
            images = ops.slice(images, start, size)
        if view.endswith("_flip"):
            images = ops.flip(images, axis=height_axis + 1)
        return images

    def call(self, inputs, training=None):
        views = [self._view(view, inputs) for view in self.view_list]
        count = len(views)
        shapes = [
            [tuple(t.shape[1:]) for t in keras.tree.flatten(v)] for v in views
        ]
        static = all(None not in s for shape in shapes for s in shape)
        if count > 1 and static and all(s == shapes[0] for s in shapes):
            stacked = keras.tree.map_structure(
                lambda *ts: ops.concatenate(ts, axis=0), *views
            )
            output = self.model(stacked, training=training)
            blocks = keras.tree.map_structure(
                lambda y: ops.reshape(y, (count, -1) + tuple(ops.shape(y)[1:])),
                output,
            )
            outputs = [
                keras.tree.map_structure(lambda y, i=i: y[i], blocks)
                for i in range(count)
            ]
        else:
            outputs = [self.model(v, training=training) for v in views]
        result = combine_outputs(
            outputs,
            self.average,
            self.from_logits,
            return_spread=self.return_spread,
        )
        return list(result) if self.return_spread else result

    def get_config(self):
        config = super().get_config()
        views = self.views
        if not isinstance(views, str):
            views = []
            for view in self.views:
                if isinstance(view, str):
                    views.append(view)
                elif isinstance(view, keras.layers.Layer) or _is_registered(
                    view
                ):
                    views.append(keras.saving.serialize_keras_object(view))
                else:
                    raise ValueError(
                        f"TestTimeAugmentation cannot save the view {view!r}"
                        ": only view names, keras.layers.Layer instances "
                        "and functions registered with "
                        "`keras.saving.register_keras_serializable` can be "
                        "written in a config (and so in a `.keras` file). "
                        "Wrap it in a Layer or register it, or export the "
                        "model with `model.export` instead."
                    )
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "views": views,
                "crop_size": None
                if self.crop_size is None
                else list(self.crop_size),
                "average": self.average,
                "from_logits": self.from_logits,
                "return_spread": self.return_spread,
                "data_format": self.data_format,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        views = config.get("views", "ten_crop")
        if isinstance(views, list):
            config["views"] = [
                v
                if isinstance(v, str)
                else keras.saving.deserialize_keras_object(v)
                for v in views
            ]
        if config.get("crop_size") is not None:
            config["crop_size"] = tuple(config["crop_size"])
        return cls(**config)
