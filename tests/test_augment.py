import math

import keras
import numpy as np
import pytest
from keras import ops

from haet.augment import FILL_MODES, RandomAffine, affine_coordinates, fill_mode_index


def _coords(height=4, width=4, **params):
    defaults = dict(rotation=0.0, shear=0.0, shift_rows=0.0, shift_cols=0.0,
                    zoom_rows=1.0, zoom_cols=1.0)
    defaults.update(params)
    tensors = {k: ops.convert_to_tensor([v], dtype="float32") for k, v in defaults.items()}
    flip = ops.convert_to_tensor([params.get("flip", False)])
    tensors.pop("flip", None)
    rows, cols = affine_coordinates(height, width, flip=flip, **tensors)
    return np.asarray(rows)[0], np.asarray(cols)[0]


def test_identity_coordinates_are_the_pixel_grid():
    rows, cols = _coords()
    np.testing.assert_array_equal(rows, np.repeat(np.arange(4.0)[:, None], 4, axis=1))
    np.testing.assert_array_equal(cols, np.repeat(np.arange(4.0)[None, :], 4, axis=0))


def test_shift_zoom_flip_rotation_known_answers():
    rows, cols = _coords(shift_rows=2.0, shift_cols=-1.0)
    np.testing.assert_allclose(rows[0, 0], 2.0)
    np.testing.assert_allclose(cols[0, 0], -1.0)
    # Zoom 2 about the centre (1.5, 1.5): output pixel 0 samples input 1.5 - 2 * 1.5 = -1.5.
    rows, cols = _coords(zoom_rows=2.0, zoom_cols=0.5)
    np.testing.assert_allclose(rows[0, 0], -1.5)
    np.testing.assert_allclose(cols[0, 0], 0.75)
    rows, cols = _coords(flip=True)
    np.testing.assert_array_equal(cols[0], [3.0, 2.0, 1.0, 0.0])
    # ImageDataGenerator's rotation matrix [[cos, -sin], [sin, cos]] on (row, col).
    rows, cols = _coords(rotation=math.pi / 2)
    np.testing.assert_allclose(rows[0, 0], 3.0, atol=1e-5)  # 1.5 - (-1.5)
    np.testing.assert_allclose(cols[0, 0], 0.0, atol=1e-5)  # 1.5 + (-1.5)
    # Shear by 45 degrees: input col = cos(45) * output col offset; row += -sin(45) * col offset.
    rows, cols = _coords(shear=math.pi / 4)
    np.testing.assert_allclose(rows[0, 3], 0.0 - math.sin(math.pi / 4) * 1.5, atol=1e-5)
    np.testing.assert_allclose(cols[0, 3], 1.5 + math.cos(math.pi / 4) * 1.5, atol=1e-5)


def _images(batch=8, size=12, channels=3, seed=0):
    # Values in [1, 2]: a 0 in the output can only come from constant fill.
    return np.random.default_rng(seed).uniform(1.0, 2.0, (batch, size, size, channels)).astype("float32")


@pytest.mark.parametrize("fill_mode", FILL_MODES)
def test_strength_zero_is_the_exact_identity(fill_mode):
    layer = RandomAffine(seed=1)
    layer.set_fill_mode(fill_mode)
    layer.set_strength(0.0)
    x = _images()
    np.testing.assert_array_equal(np.asarray(layer(x, training=True)), x)


def test_inference_is_the_identity():
    layer = RandomAffine(seed=1)
    x = _images()
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


@pytest.mark.parametrize("fill_mode", FILL_MODES)
def test_strength_one_changes_images_and_fills_by_mode(fill_mode):
    layer = RandomAffine(shift_range=0.4, zoom_range=0.3, rotation_range=30, shear_range=20, seed=2)
    layer.set_fill_mode(fill_mode)
    x = _images(batch=16)
    y = np.asarray(layer(x, training=True))
    assert y.shape == x.shape and y.dtype == np.float32
    changed = np.abs(y - x).max(axis=(1, 2, 3)) > 1e-3
    assert changed.all()
    zeros = (y == 0.0).mean()
    if fill_mode == "constant":
        assert zeros > 0.02  # shifted 40%: part of each image is fill
    else:
        assert zeros == 0.0
        # Bilinear samples of in-image pixels stay within the input's range.
        assert y.min() >= 1.0 - 1e-5 and y.max() <= 2.0 + 1e-5


def test_fill_modes_differ_on_the_same_draw():
    x = _images(batch=4)
    outputs = []
    for mode in FILL_MODES:
        layer = RandomAffine(shift_range=0.5, seed=7)  # same seed: same transforms
        layer.set_fill_mode(mode)
        outputs.append(np.asarray(layer(x, training=True)))
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert not np.allclose(outputs[i], outputs[j])


@pytest.mark.parametrize("fill_mode", ["reflect", "nearest", "wrap", "constant"])
def test_fill_modes_sample_as_numpy_pads(fill_mode):
    """Bilinear samples at coordinates up to two image sizes outside, against NumPy: each
    interpolated neighbour read from the image padded by np.pad's mode of the same name
    (constant: 0). Keras' TensorFlow map_coordinates reflected negative coordinates
    about 0 (at -1 it read pixel 1): the top and left edges were filled unlike the
    bottom and right ones and unlike JAX."""
    from haet.augment import sample

    rng = np.random.default_rng(0)
    height, width = 5, 4
    images = rng.uniform(0, 255, (2, height, width, 3)).astype("float32")
    rows = rng.uniform(-2 * height, 3 * height, (2, height, width)).astype("float32")
    cols = rng.uniform(-2 * width, 3 * width, (2, height, width)).astype("float32")
    rows[0, 0, :3], cols[0, 0, :3] = [-1.0, -1.0, height], [-1.0, width, -1.0]  # whole pixels past each edge
    pad = 4 * max(height, width)
    numpy_mode = {"nearest": "edge", "wrap": "wrap", "reflect": "symmetric", "constant": "constant"}[fill_mode]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=numpy_mode)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    b = np.arange(2)[:, None, None]

    def at(r, c):
        return padded[b, r + pad, c + pad]

    expected = ((1 - fr) * (1 - fc) * at(r0, c0) + (1 - fr) * fc * at(r0, c0 + 1)
                + fr * (1 - fc) * at(r0 + 1, c0) + fr * fc * at(r0 + 1, c0 + 1))
    got = np.asarray(sample(ops.convert_to_tensor(images), ops.convert_to_tensor(rows),
                            ops.convert_to_tensor(cols), fill_mode))
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_strength_scales_the_ranges():
    x = _images(batch=32)
    deltas = []
    for strength in (0.1, 1.0):
        layer = RandomAffine(seed=3, horizontal_flip=False)
        layer.set_strength(strength)
        deltas.append(np.abs(np.asarray(layer(x, training=True)) - x).mean())
    assert deltas[0] < 0.5 * deltas[1]


def test_flip_only():
    layer = RandomAffine(0.0, 0.0, 0.0, 0.0, horizontal_flip=True, seed=0)
    x = _images(batch=64)
    y = np.asarray(layer(x, training=True))
    flipped = np.array([np.array_equal(a, b[:, ::-1]) for a, b in zip(y, x)])
    same = np.array([np.array_equal(a, b) for a, b in zip(y, x)])
    assert (flipped | same).all() and 10 < flipped.sum() < 54


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="Unknown fill mode 'mirror'. Allowed: nearest, constant, wrap, reflect"):
        fill_mode_index("mirror")
    with pytest.raises(ValueError, match="rotation_range must be a number in \\[0, 180.0\\] \\(degrees\\). Received: rotation_range=200"):
        RandomAffine(rotation_range=200)
    with pytest.raises(ValueError, match="strength=1.5"):
        RandomAffine().set_strength(1.5)
    from haet.augment import RandomCropFlipCutout

    for layer in (RandomAffine, RandomCropFlipCutout):  # bool("no") was True: flips on
        with pytest.raises(ValueError, match="horizontal_flip must be True or False. Received: 'no'"):
            layer(horizontal_flip="no")
    with pytest.raises(ValueError, match="pad must be a non-negative integer"):
        RandomCropFlipCutout(pad=True)


def test_config_round_trip():
    layer = RandomAffine(0.1, 0.2, 3.0, 4.0, horizontal_flip=False, seed=5)
    clone = RandomAffine.from_config(layer.get_config())
    assert (clone.shift_range, clone.zoom_range, clone.rotation_range, clone.shear_range,
            clone.horizontal_flip, clone.seed) == (0.1, 0.2, 3.0, 4.0, False, 5)


class _CountingAffine(RandomAffine):
    """Counts Python executions of `call`, i.e. traces of the compiled step."""

    traces = 0

    def call(self, images, training=False):
        type(self).traces += 1
        return super().call(images, training=training)


def test_train_step_stays_xla_compiled_and_fill_mode_change_does_not_recompile():
    from haet.engine import make_engine

    inputs = keras.Input((8, 8, 3))
    layer = _CountingAffine(seed=0)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(layer(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    assert model.jit_compile is True
    images = np.random.default_rng(0).uniform(size=(16, 8, 8, 3)).astype("float32")
    engine = make_engine(model, images, np.zeros(16, dtype="int32"), 8)
    engine.start_epoch(0)
    engine.run(1)
    traces = _CountingAffine.traces
    for epoch, mode in enumerate(FILL_MODES, start=1):
        engine.assign(layer.fill_mode_index, FILL_MODES.index(mode))
        engine.assign(layer.strength, 0.5)
        engine.start_epoch(epoch)
        engine.run(2)
    assert _CountingAffine.traces == traces  # the compiled step was not traced again
    engine.sync()
    assert float(np.asarray(layer.strength)) == 0.5 and int(np.asarray(layer.fill_mode_index)) == 3


def test_crop_is_a_crop_of_the_mirror_padded_image():
    from haet.augment import RandomCropFlipCutout

    x = _images(batch=6, size=8)
    layer = RandomCropFlipCutout(pad=2, horizontal_flip=False, cutout_size=0, seed=4)
    y = np.asarray(layer(x, training=True))
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")  # NumPy reflect = mirror
    offsets = set()
    for k in range(len(x)):
        found = [(r, c) for r in range(5) for c in range(5)
                 if np.array_equal(y[k], padded[k, r:r + 8, c:c + 8])]
        assert found, f"image {k} is no crop of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 1
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


def test_crops_of_one_pixel_images_are_the_pixel():
    """The mirror padding of a 1-pixel side has a period of 0: every crop was nan."""
    from haet.augment import RandomCropFlipCutout

    images = np.full((4, 1, 1, 3), 7.0, "float32")
    out = np.asarray(RandomCropFlipCutout(pad=4, cutout_size=0, seed=0)(images, training=True))
    np.testing.assert_array_equal(out, images)


def test_flip_and_cutout():
    from haet.augment import RandomCropFlipCutout

    x = _images(batch=32, size=8)
    flipped = np.asarray(RandomCropFlipCutout(pad=0, cutout_size=0, seed=1)(x, training=True))
    is_flip = [np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped, x)]
    is_same = [np.array_equal(a, b) for a, b in zip(flipped, x)]
    assert all(f or s for f, s in zip(is_flip, is_same)) and 4 < sum(is_flip) < 28
    cut = np.asarray(RandomCropFlipCutout(pad=0, horizontal_flip=False, cutout_size=3, seed=1)(x, training=True))
    zero = (cut == 0).all(axis=-1)
    assert (zero.sum(axis=(1, 2)) == 9).all()  # exactly one 3x3 square per image
    for k in range(len(x)):
        rows, cols = np.nonzero(zero[k])
        assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2
    np.testing.assert_array_equal(cut[~zero], x[~zero])
    with pytest.raises(ValueError, match="cutout_size must be a non-negative integer"):
        RandomCropFlipCutout(cutout_size=-1)


def test_precomputed_epochs_are_crops_with_mean_colored_cutout():
    from haet.augment import RandomCropFlipCutout, precompute_epochs

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 8, 8, 3)).astype(np.uint8)
    mean = np.array([10.0, 20.0, 30.0])
    views = precompute_epochs(x, RandomCropFlipCutout(pad=0, horizontal_flip=False, cutout_size=2, seed=0),
                              epochs=2, mean=mean, chunk_size=2)
    assert len(views) == 2 and all(v.dtype == np.uint8 and v.shape == x.shape for v in views)
    assert not np.array_equal(views[0], views[1])
    for view in views:
        cut = (view != x).any(axis=-1)  # pixels the cutout changed
        assert (cut.sum(axis=(1, 2)) <= 4).all()
        np.testing.assert_array_equal(view[cut], np.broadcast_to(mean.astype(np.uint8), view[cut].shape))
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        precompute_epochs(x, RandomCropFlipCutout(), epochs=0, mean=mean)
