"""Annealed ImageDataGenerator-style augmentation that runs inside the compiled step.

The UMBC HAET-2021 recipe (Hosseini et al., ICLR 2021 HAET workshop; code:
xmhosseini/HAET2021, HAET_CIFAR10_train.py) augments with Keras'
`ImageDataGenerator`: random shift, zoom, shear, rotation and horizontal flip, with
ranges that shrink as the wall-clock budget runs out, and a fill mode for
out-of-image pixels drawn at random each epoch from nearest/constant/wrap/reflect.

`ImageDataGenerator` runs on the host in NumPy/SciPy and Keras' own `Random*` image
layers declare `supports_jit = False`, which silently turns XLA off for the whole
model. This layer instead builds per-image sampling coordinates with `keras.ops` and
warps with `keras.ops.image.map_coordinates` (bilinear, `order=1`, as
`ImageDataGenerator`), which compiles under XLA on the TensorFlow and JAX backends.

Two values are state the compiled step reads rather than Python constants, so that
changing them neither recompiles nor needs a new model:
- `strength` (float in [0, 1]) scales every range; 0 is the exact identity.
- `fill_mode_index` (int) picks the fill mode through `keras.ops.switch`.
"""

import functools
import math

import keras
import numpy as np
from keras import ops

from haet import fields
from haet.fields import Field, Kind
from haet.schedules import PiecewiseConstant, check_range

# Order matters: `fill_mode_index` indexes this tuple.
FILL_MODES = ("nearest", "constant", "wrap", "reflect")

# RandomAffine's ranges: the largest value each may take, and its unit.
AFFINE_LIMITS = {
    "shift_range": (1.0, "fraction of image size"),
    "zoom_range": (0.99, "fraction"),
    "rotation_range": (180.0, "degrees"),
    "shear_range": (89.0, "degrees"),
}


def fill_mode_index(fill_mode):
    """Index of `fill_mode` in `FILL_MODES`.

    Raises:
        ValueError: if `fill_mode` is not one of `FILL_MODES`.
    """
    if fill_mode not in FILL_MODES:
        raise ValueError(
            f"Unknown fill mode {fill_mode!r}. Allowed: {', '.join(FILL_MODES)}."
        )
    return FILL_MODES.index(fill_mode)


def _check_range(name, value, upper, unit):
    if not isinstance(value, (int, float)) or not 0 <= value <= upper:
        raise ValueError(
            f"{name} must be a number in [0, {upper}] ({unit}). Received: {name}={value!r}"
        )


def affine_coordinates(
    height, width, rotation, shear, shift_rows, shift_cols, zoom_rows, zoom_cols, flip
):
    """Where each output pixel samples the input, for one affine transform per image.

    Follows `ImageDataGenerator.apply_transform`: the matrix
    `rotation @ shift @ shear @ zoom` maps output (row, col) coordinates, taken
    relative to the image centre `((height - 1) / 2, (width - 1) / 2)`, to input
    coordinates; a flip mirrors the output left-right afterwards.

    Args:
        height, width: image size in pixels (ints).
        rotation, shear: float tensors `(B,)`, angles in radians.
        shift_rows, shift_cols: float tensors `(B,)`, in pixels (positive samples
            further down/right, so the content moves up/left).
        zoom_rows, zoom_cols: float tensors `(B,)`; > 1 samples a larger area, so
            the content shrinks.
        flip: bool tensor `(B,)`.

    Returns:
        `(rows, cols)`: float32 tensors `(B, height, width)` of input coordinates.
    """
    cos, sin = ops.cos(rotation), ops.sin(rotation)
    shear_sin, shear_cos = -ops.sin(shear), ops.cos(shear)
    # A = rotation @ shear @ zoom; offset = rotation @ shift.
    a00 = cos * zoom_rows
    a01 = (cos * shear_sin - sin * shear_cos) * zoom_cols
    a10 = sin * zoom_rows
    a11 = (sin * shear_sin + cos * shear_cos) * zoom_cols
    b0 = cos * shift_rows - sin * shift_cols
    b1 = sin * shift_rows + cos * shift_cols

    center_row, center_col = (height - 1) / 2.0, (width - 1) / 2.0
    rows = ops.arange(height, dtype="float32")[None, :, None] - center_row
    cols = ops.arange(width, dtype="float32")[None, None, :] - center_col
    cols = ops.where(flip[:, None, None], -cols, cols)

    def per_image(v):
        return v[:, None, None]

    in_rows = per_image(a00) * rows + per_image(a01) * cols + per_image(b0 + center_row)
    in_cols = per_image(a10) * rows + per_image(a11) * cols + per_image(b1 + center_col)
    return in_rows, in_cols


def sample(images, rows, cols, fill_mode):
    """Bilinear samples of `images` at per-image coordinates.

    Args:
        images: float `(B, H, W, C)` with static H, W, C.
        rows, cols: float `(B, H, W)` input coordinates for each output pixel.
        fill_mode: one of `FILL_MODES` or "mirror", for coordinates outside the image
            ("constant" fills with 0).

    Returns:
        `(B, H, W, C)` tensor, the dtype of `images`.
    """
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    if fill_mode == "reflect":
        # Keras' TensorFlow map_coordinates reflects negative coordinates about 0, not
        # -0.5 (at -1 it read pixel 1, JAX and scipy pixel 0; Keras 3.15): the
        # coordinates are folded here, the same under every backend.
        rows, cols, fill_mode = _reflect(rows, height), _reflect(cols, width), "nearest"
    channel = ops.broadcast_to(
        ops.arange(channels, dtype="float32")[None, None, :], (height, width, channels)
    )

    # Per image (vectorized over the batch): the TensorFlow map_coordinates needs
    # every input dimension static, and the batch is not.
    def one(args):
        image, r, c = args
        coordinates = [
            ops.broadcast_to(r[..., None], (height, width, channels)),
            ops.broadcast_to(c[..., None], (height, width, channels)),
            channel,
        ]
        return ops.image.map_coordinates(image, coordinates, order=1, fill_mode=fill_mode, fill_value=0.0)

    return ops.vectorized_map(one, (images, rows, cols))


@keras.saving.register_keras_serializable(package="haet")
class RandomAffine(keras.layers.Layer):
    """Random shift/zoom/shear/rotation/horizontal flip, scaled by a strength.

    Per image, with `s = strength`, draws uniformly (as `ImageDataGenerator`):
    rotation in `[-s*rotation_range, s*rotation_range]` degrees; vertical and
    horizontal shifts in `[-s*shift_range, s*shift_range]` times the image height
    and width; shear angle in `[-s*shear_range, s*shear_range]` degrees; zoom
    factors (rows and columns independently) in `[1 - s*zoom_range, 1 + s*zoom_range]`;
    and, when `horizontal_flip` is true and `s > 0`, a left-right flip with
    probability 0.5. The transform maps each output pixel to an input location
    around the image centre (as `ImageDataGenerator.apply_transform`), sampled with
    bilinear interpolation; out-of-image locations follow the current fill mode
    (`"constant"` fills with 0, which is the mean pixel when inputs are
    mean-subtracted, as in the UMBC recipe).

    Only active when called with `training=True`; inference is the identity.

    Deviation from UMBC: their flips stay on after the ranges reach zero; here
    strength 0 is the exact identity, flips included, so the last part of a budget
    trains on clean images.

    Args:
        shift_range: maximum shift as a fraction of the image size, in [0, 1].
        zoom_range: maximum zoom deviation from 1, in [0, 1).
        rotation_range: maximum rotation in degrees, in [0, 180].
        shear_range: maximum shear angle in degrees, in [0, 89].
        horizontal_flip: whether to flip left-right with probability 0.5.
        seed: int seed for the layer's random draws, or None.

    Input: float tensor of shape `(batch, height, width, channels)`.
    Output: same shape and dtype.

    Raises:
        ValueError: for a range outside its allowed interval.
    """

    def __init__(
        self,
        shift_range=0.2,
        zoom_range=0.2,
        rotation_range=15.0,
        shear_range=15.0,
        horizontal_flip=True,
        seed=None,
        **kwargs,
    ):
        # Warp coordinates in float32 whatever the mixed-precision policy: at 16-bit,
        # pixel positions lose sub-pixel precision.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        for name, value in (("shift_range", shift_range), ("zoom_range", zoom_range),
                            ("rotation_range", rotation_range), ("shear_range", shear_range)):
            _check_range(name, value, *AFFINE_LIMITS[name])
        self.shift_range = float(shift_range)
        self.zoom_range = float(zoom_range)
        self.rotation_range = float(rotation_range)
        self.shear_range = float(shear_range)
        self.horizontal_flip = _flag(horizontal_flip, "horizontal_flip")
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.strength = self.add_weight(
            name="strength",
            shape=(),
            dtype="float32",
            initializer="ones",
            trainable=False,
        )
        self.fill_mode_index = self.add_weight(
            name="fill_mode_index",
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
        )

    def set_strength(self, strength):
        """Sets the strength, a float in [0, 1]. Raises ValueError outside it."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(
                f"Augmentation strength must be in [0, 1]. Received: strength={strength!r}"
            )
        self.strength.assign(float(strength))

    def set_fill_mode(self, fill_mode):
        """Sets the fill mode, one of `FILL_MODES`. Raises ValueError otherwise."""
        self.fill_mode_index.assign(fill_mode_index(fill_mode))

    def _input_coordinates(self, batch, height, width):
        """Input (row, col) sampled for each output pixel: two (B, H, W) tensors."""
        s = ops.cast(self.strength, "float32")
        gen = self.seed_generator

        def uniform(limit):
            return keras.random.uniform((batch,), -1.0, 1.0, seed=gen) * (s * limit)

        if self.horizontal_flip:
            flip = ops.logical_and(keras.random.uniform((batch,), seed=gen) < 0.5, s > 0.0)
        else:
            flip = ops.zeros((batch,), dtype="bool")
        return affine_coordinates(
            height,
            width,
            rotation=uniform(math.radians(self.rotation_range)),
            shear=uniform(math.radians(self.shear_range)),
            shift_rows=uniform(self.shift_range * height),
            shift_cols=uniform(self.shift_range * width),
            zoom_rows=1.0 + uniform(self.zoom_range),
            zoom_cols=1.0 + uniform(self.zoom_range),
            flip=flip,
        )

    def call(self, images, training=False):
        if not training:
            return images
        shape = ops.shape(images)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        if height is None or width is None or channels is None:
            raise ValueError(
                f"RandomAffine needs a known height, width and channels. Received shape {shape}"
            )
        in_rows, in_cols = self._input_coordinates(batch, height, width)
        return ops.switch(
            ops.convert_to_tensor(self.fill_mode_index),
            [functools.partial(sample, images, in_rows, in_cols, mode) for mode in FILL_MODES],
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            shift_range=self.shift_range,
            zoom_range=self.zoom_range,
            rotation_range=self.rotation_range,
            shear_range=self.shear_range,
            horizontal_flip=self.horizontal_flip,
            seed=self.seed,
        )
        return config


def _reflect(coordinates, size):
    """Float coordinates folded into [-0.5, size - 0.5] by reflection about the image's
    edges (scipy's and NumPy's "reflect" of the interpolated neighbours: d c b a | a
    b c d | d c b a). A reflection about -0.5 maps the pixel grid onto itself, so
    bilinear sampling of the folded coordinates, with the neighbours past the edge
    taken as the nearest pixel, is that of the reflected image."""
    period = 2.0 * size
    folded = ops.mod(coordinates + 0.5, period)
    return ops.where(folded > size, period - folded, folded) - 0.5


def _flag(value, name):
    """`value` as a bool: True, False (or NumPy's); a string ("no" was True) is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False. Received: {value!r}")
    return bool(value)


def _mirror(coordinates, size):
    """Mirror padding of whole-pixel coordinates (NumPy's "reflect": d c b | a b c d | c b a).

    Done here because Keras' TensorFlow `map_coordinates` maps some coordinates past
    the last pixel out of range in its "mirror" mode (Keras 3.15).
    """
    if size == 1:  # one pixel mirrors onto itself (a period of 0: nan)
        return ops.zeros_like(coordinates)
    period = 2.0 * (size - 1)
    folded = ops.mod(ops.abs(coordinates), period)
    return ops.where(folded > size - 1, period - folded, folded)


@keras.saving.register_keras_serializable(package="haet")
class RandomCropFlipCutout(keras.layers.Layer):
    """Random crop after padding, horizontal flip and cutout, per image, on the accelerator.

    The augmentation of David Page's ResNet-9 (davidcpage/cifar10-fast): pad by
    `pad` pixels (mirror padding, NumPy's "reflect"), crop back to the input size at a
    uniformly drawn offset, flip left-right with probability 0.5, then set a
    `cutout_size` x `cutout_size` square, drawn uniformly inside the image, to 0
    (the mean pixel for mean-subtracted inputs; DeVries & Taylor 2017).
    Only active with `training=True`.

    Args:
        pad: crop offset range in pixels, >= 0 (0 disables cropping).
        horizontal_flip: flip left-right with probability 0.5.
        cutout_size: side of the cutout square in pixels, >= 0 (0 disables it).
        seed: int seed or None.

    Input: float `(batch, height, width, channels)`; output: same shape and dtype.

    Raises:
        ValueError: negative `pad` or `cutout_size`.
    """

    def __init__(self, pad=4, horizontal_flip=True, cutout_size=8, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        for name, value in (("pad", pad), ("cutout_size", cutout_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer (pixels). Received: {name}={value!r}")
        self.pad = pad
        self.horizontal_flip = _flag(horizontal_flip, "horizontal_flip")
        self.cutout_size = cutout_size
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        if not training:
            return images
        batch = ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        gen = self.seed_generator

        def offsets(limit):
            return ops.cast(keras.random.randint((batch,), 0, limit + 1, seed=gen), "float32")

        rows = ops.arange(height, dtype="float32")[None, :, None]
        cols = ops.arange(width, dtype="float32")[None, None, :]
        if self.horizontal_flip:
            flip = keras.random.uniform((batch,), seed=gen) < 0.5
            cols = ops.where(flip[:, None, None], (width - 1) - cols, cols)
        in_rows = _mirror(rows + (offsets(2 * self.pad) - self.pad)[:, None, None], height) + 0.0 * cols
        in_cols = _mirror(cols + (offsets(2 * self.pad) - self.pad)[:, None, None], width) + 0.0 * rows
        # Coordinates are whole pixels inside the image: the samples are exact copies.
        out = sample(images, in_rows, in_cols, "nearest")
        if self.cutout_size:
            size = self.cutout_size
            top = offsets(height - size)[:, None, None]
            left = offsets(width - size)[:, None, None]
            r = ops.arange(height, dtype="float32")[None, :, None]
            c = ops.arange(width, dtype="float32")[None, None, :]
            inside = (r >= top) & (r < top + size) & (c >= left) & (c < left + size)
            out = ops.where(inside[..., None], ops.zeros_like(out), out)
        return out

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "pad": self.pad, "horizontal_flip": self.horizontal_flip,
                "cutout_size": self.cutout_size, "seed": self.seed}


def precompute_epochs(images, layer, epochs, mean, chunk_size=1000):
    """Augmented copies of `images`, one per epoch, computed ahead of training.

    As in "Are 1000 seconds enough to train?" (HAET 2021), which precomputes its
    augmentations offline. `layer` (e.g. `RandomCropFlipCutout`) runs on the images
    minus `mean`, so that its zero fill (cutout, constant fill) becomes the mean
    pixel, as when it runs inside the model on mean-subtracted inputs; the result is
    rounded back to uint8.

    Args:
        images: uint8 `(N, H, W, C)`.
        layer: an augmentation layer, called with `training=True`.
        epochs: number of augmented copies (>= 1).
        mean: float array broadcastable to `(H, W, C)`, on the 0-255 scale.
        chunk_size: images per call of `layer`.

    Returns:
        A list of `epochs` uint8 arrays shaped like `images`.

    Raises:
        ValueError: `epochs < 1`.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1. Received: epochs={epochs!r}")
    mean = np.asarray(mean, dtype=np.float32)
    views = []
    for _ in range(epochs):
        out = np.empty_like(images)
        for start in range(0, len(images), chunk_size):
            chunk = images[start:start + chunk_size].astype(np.float32) - mean
            augmented = ops.convert_to_numpy(layer(chunk, training=True)) + mean
            out[start:start + chunk_size] = np.clip(np.rint(augmented), 0, 255).astype(np.uint8)
        views.append(out)
    return views


def _affine(shift_range, zoom_range, rotation_range, shear_range, horizontal_flip, seed):
    return RandomAffine(shift_range, zoom_range, rotation_range, shear_range, horizontal_flip, seed=seed,
                        name="augmentation")


def _crop_flip_cutout(crop_padding, horizontal_flip, cutout_size, seed):
    return RandomCropFlipCutout(crop_padding, horizontal_flip, cutout_size, seed=seed, name="augmentation")


def _none():
    return None


def strength_schedule(config):
    """The affine augmentation's strength over the budget fraction (`PiecewiseConstant`
    of `augment_strength_boundaries` / `augment_strengths`, values in [0, 1])."""
    schedule = PiecewiseConstant(config.augment_strength_boundaries, config.augment_strengths,
                                 name="augmentation strength")
    return check_range(schedule, 0.0, 1.0)


def _check_affine(config, image_shape):
    strength_schedule(config)


def _check_crop_flip_cutout(config, image_shape):
    side = min(image_shape[:2])
    if config.cutout_size > side:
        raise ValueError(
            f"cutout_size={config.cutout_size} is larger than the {image_shape[0]}x{image_shape[1]} images: "
            f"use at most {side} pixels (0: no cutout).")


# The augmentations the `--augmentation` flag names: builder (a layer named
# "augmentation", or None), the config fields it takes, its check `check(config,
# image_shape)`. The layer runs inside the model, in the compiled training step.
AUGMENTATIONS = {
    "affine": Kind(_affine, ("shift_range", "zoom_range", "rotation_range", "shear_range", "horizontal_flip", "seed"),
                   _check_affine, "UMBC's shift/zoom/shear/rotation/flip, annealed over the budget"),
    "crop_flip_cutout": Kind(_crop_flip_cutout, ("crop_padding", "horizontal_flip", "cutout_size", "seed"),
                             _check_crop_flip_cutout, "Page's random crop, flip and cutout"),
    "none": Kind(_none, (), None, "none"),
}


def _affine_limit(name):
    upper, unit = AFFINE_LIMITS[name]
    return lambda value, field: _check_range(field, value, upper, unit)


def _fill_modes(value, name):
    if not value:
        raise ValueError(f"{name} must name at least one of {', '.join(FILL_MODES)}.")
    for mode in value:
        fill_mode_index(mode)


FIELDS = (
    Field("augmentation", "affine", "Training augmentation, inside the compiled step. "
          + fields.table_help(AUGMENTATIONS) + ".", fields.one_of(AUGMENTATIONS, "augmentation")),
    Field("shift_range", 0.2, "affine: largest shift, a fraction of the image height and width, in [0, 1].",
          _affine_limit("shift_range")),
    Field("zoom_range", 0.2, "affine: zoom factors drawn in [1 - z, 1 + z], z in [0, 0.99].",
          _affine_limit("zoom_range")),
    Field("rotation_range", 15.0, "affine: largest rotation in degrees, in [0, 180].",
          _affine_limit("rotation_range")),
    Field("shear_range", 15.0, "affine: largest shear angle in degrees, in [0, 89].", _affine_limit("shear_range")),
    Field("horizontal_flip", True, "Random left-right flips (affine, crop_flip_cutout)."),
    Field("fill_modes", FILL_MODES, "affine: fill modes for pixels from outside the image, one drawn each "
          f"epoch; of {', '.join(FILL_MODES)}.", _fill_modes),
    Field("augment_strength_boundaries", (0.3, 0.65, 0.75, 0.8, 0.85, 0.9),
          "affine: fractions of the budget where the augmentation strength steps."),
    Field("augment_strengths", (1.0, 0.87, 0.73, 0.6, 0.47, 0.33, 0.0),
          "affine: strength in [0, 1] multiplying every range, per interval (one more than the boundaries)."),
    Field("alternating_flip", False, "airbench's flips: the training set is mirrored at random once (seeded), "
          "and the whole set every other epoch, so each image is seen both ways in turn; replaces the random "
          "flip (--nohorizontal_flip)."),
    Field("crop_padding", 4, "crop_flip_cutout: largest crop offset in pixels (mirror padding).",
          fields.at_least(0, integer=True)),
    Field("cutout_size", 8, "crop_flip_cutout: side of the cutout square in pixels, at most the image "
          "side; 0: off.", fields.at_least(0, integer=True)),
    Field("precomputed_augmentation_epochs", 0, "crop_flip_cutout: > 0 augments this many copies of the "
          "training set before training (the time counts toward the budget) instead of in the step.",
          fields.at_least(0, integer=True)),
)


def check_config(config, image_shape):
    """Checks the augmentation settings of a run config for images of `image_shape`
    `(H, W, C)`.

    Raises:
        ValueError: naming the bad value.
    """
    kind = fields.choose(AUGMENTATIONS, "augmentation", config.augmentation)
    if kind.check:
        kind.check(config, image_shape)
    if config.alternating_flip and config.horizontal_flip and config.augmentation != "none":
        raise ValueError("alternating_flip replaces the random flip: pass --nohorizontal_flip.")
    if config.alternating_flip and config.precomputed_augmentation_epochs:
        raise ValueError("alternating_flip and precomputed_augmentation_epochs each hold copies of the training "
                         "set; set one of them.")
    if config.precomputed_augmentation_epochs and config.augmentation != "crop_flip_cutout":
        raise ValueError(
            "precomputed_augmentation_epochs needs --augmentation=crop_flip_cutout (affine augmentation "
            f"follows the clock). Received: augmentation={config.augmentation!r}")


def alternating_flip_copies(images, seed):
    """airbench's alternating flip as two copies of the training set: `images` each
    mirrored left-right with probability 0.5 (`np.random.default_rng((seed, 2))`), then
    the whole of that mirrored; epoch `k` reads copy `k % 2` (`haet.engine.Engine`'s
    `copies`). uint8 `(N, H, W, C)` in, `(2N, H, W, C)` out."""
    flip = np.random.default_rng((seed, 2)).random(len(images)) < 0.5
    once = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return np.concatenate([once, once[:, :, ::-1]])


def build_augmentation(config):
    """The training augmentation layer of `config` (named "augmentation"), or None."""
    return fields.build(AUGMENTATIONS, "augmentation", config.augmentation, config)
