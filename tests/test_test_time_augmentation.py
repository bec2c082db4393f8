import re

import keras
import numpy as np
import pytest
from conftest import requires_tensorflow

import keras_regkit  # noqa: F401  (registers the classes for loading)
from keras_regkit.models.test_time_augmentation import TestTimeAugmentation

CROP = (4, 3)
IMAGE = (7, 6)  # odd, H != W: the center crop starts at (1, 1)


def _net(data_format="channels_last", size=CROP, activation=None, seed=0):
    shape = (*size, 2) if data_format == "channels_last" else (2, *size)
    return keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Conv2D(
                3,
                2,
                data_format=data_format,
                kernel_initializer=keras.initializers.GlorotUniform(seed),
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(
                5,
                activation=activation,
                kernel_initializer=keras.initializers.GlorotUniform(seed + 1),
            ),
        ]
    )


def _images(batch=3, size=IMAGE, data_format="channels_last", seed=0):
    shape = (
        (batch, *size, 2)
        if data_format == "channels_last"
        else (
            batch,
            2,
            *size,
        )
    )
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _numpy_views(x, names, crop=CROP, data_format="channels_last"):
    """The named views, cut in NumPy on channels_last arrays."""
    if data_format == "channels_first":
        x = x.transpose(0, 2, 3, 1)
    h, w = crop
    height, width = x.shape[1:3]
    corners = {
        "top_left": (0, 0),
        "top_right": (0, width - w),
        "bottom_left": (height - h, 0),
        "bottom_right": (height - h, width - w),
        "center": ((height - h) // 2, (width - w) // 2),
    }
    views = []
    for name in names:
        region = name.removesuffix("_flip")
        if region == "full":
            view = x
        else:
            top, left = corners[region]
            view = x[:, top : top + h, left : left + w]
        if name.endswith("_flip"):
            view = view[:, :, ::-1]
        if data_format == "channels_first":
            view = view.transpose(0, 3, 1, 2)
        views.append(np.ascontiguousarray(view))
    return views


TEN = [
    "top_left",
    "top_right",
    "bottom_left",
    "bottom_right",
    "center",
    "top_left_flip",
    "top_right_flip",
    "bottom_left_flip",
    "bottom_right_flip",
    "center_flip",
]


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def _predictions(net, views):
    """The model's predictions on each view, stacked on a new first axis."""
    if all(v.shape == views[0].shape for v in views):
        batch = len(views[0])
        f = net.predict(np.concatenate(views), verbose=0)
        return f.reshape(len(views), batch, *f.shape[1:])
    return np.stack([keras.ops.convert_to_numpy(net(v)) for v in views])


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_ten_crop_is_the_numpy_average_of_the_ten_explicit_views(
    data_format,
):
    net = _net(data_format)
    x = _images(data_format=data_format)
    f = _predictions(net, _numpy_views(x, TEN, data_format=data_format))
    assert not np.allclose(f[0], f[4], atol=1e-3)  # the views differ
    tta = TestTimeAugmentation(net, data_format=data_format)
    np.testing.assert_allclose(
        tta.predict(x, verbose=0), f.mean(0), rtol=1e-5, atol=1e-6
    )
    for kwargs, expected in [
        ({"from_logits": True}, _softmax(f).mean(0)),
        ({"average": "logits"}, f.mean(0)),
    ]:
        tta = TestTimeAugmentation(net, data_format=data_format, **kwargs)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(tta(x)), expected, rtol=1e-5, atol=1e-6
        )


def test_data_format_defaults_to_the_keras_setting():
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        net = _net("channels_first")
        tta = TestTimeAugmentation(net, views="five_crop")
    finally:
        keras.config.set_image_data_format(previous)
    assert tta.data_format == "channels_first"
    x = _images(data_format="channels_first")
    views = _numpy_views(x, TEN[:5], data_format="channels_first")
    np.testing.assert_allclose(
        tta.predict(x, verbose=0),
        _predictions(net, views).mean(0),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "views, names",
    [
        ("five_crop", TEN[:5]),
        ("center", ["center"]),
        (["center", "top_right_flip"], ["center", "top_right_flip"]),
    ],
)
def test_presets_and_named_views(views, names):
    net = _net()
    x = _images(batch=1)
    tta = TestTimeAugmentation(net, views=views, crop_size=CROP)
    np.testing.assert_allclose(
        tta.predict(x, verbose=0),
        _predictions(net, _numpy_views(x, names)).mean(0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_flip_preset_on_images_of_the_model_size_and_spread():
    net = _net(activation="softmax")
    x = _images(size=CROP)
    tta = TestTimeAugmentation(net, views="flip", return_spread=True)
    mean, spread = tta.predict(x, verbose=0)
    f = _predictions(net, _numpy_views(x, ["full", "full_flip"]))
    np.testing.assert_allclose(mean, f.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spread, f.std(0), rtol=1e-4, atol=1e-6)
    assert spread.min() >= 0 and spread.max() > 1e-3


def test_custom_views_callables_and_layers_of_several_sizes():
    # Fully convolutional: the views may have different sizes, and run
    # one by one.
    net = keras.Sequential(
        [
            keras.Input((None, None, 2)),
            keras.layers.Conv2D(4, 2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )

    def darker(images):
        return 0.5 * images

    views = [
        "full",
        darker,
        keras.layers.Cropping2D(((1, 0), (0, 2))),
        "center_flip",
    ]
    tta = TestTimeAugmentation(net, views=views, crop_size=(3, 3))
    x = _images()
    explicit = [
        x,
        0.5 * x,
        x[:, 1:, :-2],
        _numpy_views(x, ["center_flip"], crop=(3, 3))[0],
    ]
    np.testing.assert_allclose(
        tta.predict(x, verbose=0),
        _predictions(net, explicit).mean(0),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(
        ValueError,
        match=r"cannot save the view <function .*darker.*only view names, "
        r"keras.layers.Layer instances and functions registered",
    ):
        tta.get_config()


@keras.saving.register_keras_serializable(package="test_tta")
def brighter_corner(images):
    return images[:, 1:5, 2:5] + 1.0


def _plain(config):
    """The config, with nested objects reduced to their class names."""
    views = config["views"]
    if not isinstance(views, str):
        views = [v if isinstance(v, str) else v["class_name"] for v in views]
    return {**config, "model": config["model"]["class_name"], "views": views}


def test_keras_file_round_trip(tmp_path):
    net = _net()
    x = _images()
    for views in [
        "ten_crop",
        ["top_left", brighter_corner, keras.layers.CenterCrop(*CROP)],
    ]:
        tta = TestTimeAugmentation(net, views=views, from_logits=True)
        expected = tta.predict(x, verbose=0)
        path = str(tmp_path / "tta.keras")
        tta.save(path)
        reloaded = keras.saving.load_model(path)
        assert _plain(reloaded.get_config()) == _plain(tta.get_config())
        np.testing.assert_allclose(
            reloaded.predict(x, verbose=0), expected, rtol=1e-6, atol=1e-7
        )
    assert tta.get_config()["crop_size"] == list(CROP)


def test_saved_model_serves_what_predict_returns(tmp_path):
    tf = pytest.importorskip("tensorflow")
    x = _images()
    tta = TestTimeAugmentation(_net(), from_logits=True)
    expected = tta.predict(x, verbose=0)
    tta.export(str(tmp_path / "tta"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "tta"))
    served = reloaded.serve(tf.constant(x))
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-6)
    # Views that keep the model's size: exportable without a call first.
    flip = TestTimeAugmentation(_net(), views="flip")
    flip.export(str(tmp_path / "flip"), verbose=False)
    x = _images(size=CROP)
    reloaded = tf.saved_model.load(str(tmp_path / "flip"))
    served = reloaded.serve(tf.constant(x))
    np.testing.assert_allclose(
        served.numpy(), flip.predict(x, verbose=0), atol=1e-6
    )


@requires_tensorflow
def test_functional_wrapper_serves_images_of_any_size(tmp_path):
    import tensorflow as tf

    tta = TestTimeAugmentation(_net(), from_logits=True)
    images = keras.Input((None, None, 2))
    wrapper = keras.Model(images, tta(images))
    wrapper.export(str(tmp_path / "any_size"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "any_size"))
    for size in [IMAGE, (9, 4)]:
        x = _images(size=size)
        f = _predictions(wrapper.layers[1].model, _numpy_views(x, TEN))
        np.testing.assert_allclose(
            reloaded.serve(tf.constant(x)).numpy(),
            _softmax(f).mean(0),
            rtol=1e-5,
            atol=1e-6,
        )


def _message(name, expected, value):
    return re.escape(
        f"Invalid value received for argument `{name}`. Expected {expected}. "
        f"Received: {name}={value!r}"
    )


def test_bad_arguments():
    net = _net()
    views = (
        "one of 'ten_crop', 'five_crop', 'flip', a view name, or a non-empty "
        "list of view names (one of 'full', 'center', 'top_left', "
        "'top_right', 'bottom_left', 'bottom_right', 'full_flip', "
        "'center_flip', 'top_left_flip', 'top_right_flip', "
        "'bottom_left_flip', 'bottom_right_flip') and callables"
    )
    for value in ["twelve_crop", [], ["center", "middle"], [3], None]:
        with pytest.raises(ValueError, match=_message("views", views, value)):
            TestTimeAugmentation(net, views=value)
    crop = "None, a positive int, or a pair of positive ints (height, width)"
    for value in [0, (4,), (4, 0), (4.0, 3), True, "4"]:
        with pytest.raises(
            ValueError, match=_message("crop_size", crop, value)
        ):
            TestTimeAugmentation(net, crop_size=value)
    for kwargs, name, expected, value in [
        ({"model": "net"}, "model", "a keras.Model", "net"),
        (
            {"average": "median"},
            "average",
            "one of 'probabilities', 'logits'",
            "median",
        ),
        ({"return_spread": 1}, "return_spread", "a bool", 1),
        (
            {"data_format": "NHWC"},
            "data_format",
            "one of 'channels_last', 'channels_first'",
            "NHWC",
        ),
    ]:
        kwargs = {"model": net, **kwargs}
        with pytest.raises(ValueError, match=_message(name, expected, value)):
            TestTimeAugmentation(**kwargs)
    with pytest.raises(ValueError, match="False with average='logits'"):
        TestTimeAugmentation(net, average="logits", from_logits=True)
    fully_convolutional = keras.Sequential(
        [keras.Input((None, None, 2)), keras.layers.Conv2D(3, 2)]
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected a positive int or a pair of positive ints when the "
            "model's input has no fixed height and width"
        ),
    ):
        TestTimeAugmentation(fully_convolutional)
    assert TestTimeAugmentation(fully_convolutional, views="flip")
    assert TestTimeAugmentation(net, crop_size=np.int64(4))


def test_images_too_small_or_of_the_wrong_size_are_refused_when_built():
    net = _net()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "view 'top_left' needs images at least as large as crop_size "
            "size (4, 3) (height, width); received images of size (3, 6) "
            "(inputs of shape (2, 3, 6, 2))."
        ),
    ):
        TestTimeAugmentation(net).predict(_images(2, (3, 6)), verbose=0)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "view 'full' needs images of the model's input size (4, 3)"
        ),
    ):
        TestTimeAugmentation(net, views=["full", "center"]).predict(
            _images(), verbose=0
        )
    with pytest.raises(ValueError, match="named views take a batch of images"):
        TestTimeAugmentation(net).predict(np.zeros((2, 7, 6)), verbose=0)
