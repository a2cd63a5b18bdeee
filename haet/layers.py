"""Small backend-neutral layers that Keras does not have."""

import keras
import numpy as np
from keras import ops

from haet import fields


@keras.saving.register_keras_serializable(package="haet")
class GhostBatchNormalization(keras.layers.Layer):
    """Batch normalization over "ghost" batches: the training batch is split into
    `num_splits` equal groups, each normalized with its own mean and variance.

    Hoffer, Hubara, Soudry, "Train longer, generalize better" (NeurIPS 2017); used
    with 16 groups of 32 at batch 512 in David Page's ResNet-9 ("How to train your
    ResNet", 2018; davidcpage/cifar10-fast). Keras 3's `BatchNormalization` has no
    `virtual_batch_size` (tf.keras 2 had), hence this layer.

    Training: statistics per group over (batch, height, width); the moving mean and
    variance move toward the mean of the group statistics with `momentum`.
    Inference: the moving statistics, as `BatchNormalization`. With `num_splits=1`
    it computes what `keras.layers.BatchNormalization` computes.

    Args:
        num_splits: groups per training batch; the batch size must be a multiple.
        momentum: moving-average momentum of the statistics.
        epsilon: added to the variance.
        center: learn a shift (beta).
        scale: learn a scale (gamma); `False` freezes it at 1 (Page's frozen scale).
        beta_regularizer: a regularizer of the shift, or None.

    Input: `(batch, ..., channels)`; output: same shape and dtype.

    Raises:
        ValueError: at construction, `num_splits` not a positive integer, `momentum`
            outside [0, 1] or `epsilon` not a finite number >= 0; when called in
            training, a batch (of known size) that is not a multiple of `num_splits`.
    """

    def __init__(self, num_splits=1, momentum=0.9, epsilon=1e-5, center=True, scale=True, beta_regularizer=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        fields.positive(integer=True)(num_splits, "num_splits")
        fields.in_range(0, 1)(momentum, "momentum")
        fields.at_least(0)(epsilon, "epsilon")  # (-1 normalized to nan)
        self.num_splits = num_splits
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale

    def build(self, input_shape):
        channels = input_shape[-1]
        # As keras.layers.BatchNormalization: no variable for a frozen scale or shift.
        self.gamma = self.add_weight(shape=(channels,), name="gamma", initializer="ones") if self.scale else None
        self.beta = self.add_weight(shape=(channels,), name="beta", initializer="zeros",
                                    regularizer=self.beta_regularizer) if self.center else None
        self.moving_mean = self.add_weight(shape=(channels,), name="moving_mean",
                                           initializer="zeros", trainable=False)
        self.moving_variance = self.add_weight(shape=(channels,), name="moving_variance",
                                               initializer="ones", trainable=False)

    def call(self, inputs, training=False):
        x = ops.cast(inputs, "float32")
        if training:
            shape = ops.shape(x)
            if isinstance(shape[0], int) and shape[0] % self.num_splits:
                raise ValueError(f"{self.name}: a training batch of {shape[0]} is not a multiple of num_splits="
                                 f"{self.num_splits} (ghost batches of equal size): use a batch size that is.")
            groups = ops.reshape(x, (self.num_splits, -1, *shape[1:]))
            axes = tuple(range(1, len(groups.shape) - 1))
            mean = ops.mean(groups, axis=axes, keepdims=True)
            variance = ops.var(groups, axis=axes, keepdims=True)
            normalized = ops.reshape((groups - mean) * ops.rsqrt(variance + self.epsilon), shape)
            m = self.momentum
            self.moving_mean.assign(m * self.moving_mean + (1 - m) * ops.reshape(ops.mean(mean, axis=0), (-1,)))
            self.moving_variance.assign(
                m * self.moving_variance + (1 - m) * ops.reshape(ops.mean(variance, axis=0), (-1,)))
        else:
            normalized = (x - self.moving_mean) * ops.rsqrt(self.moving_variance + self.epsilon)
        if self.gamma is not None:
            normalized = normalized * ops.cast(self.gamma, "float32")
        if self.beta is not None:
            normalized = normalized + ops.cast(self.beta, "float32")
        return ops.cast(normalized, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(num_splits=self.num_splits, momentum=self.momentum, epsilon=self.epsilon,
                      center=self.center, scale=self.scale,
                      beta_regularizer=keras.regularizers.serialize(self.beta_regularizer))
        return config


@keras.saving.register_keras_serializable(package="haet")
class CELU(keras.layers.Layer):
    """Continuously differentiable ELU, `max(0, x) + min(0, alpha * (exp(x / alpha) - 1))`
    (Barron 2017), as a layer with its `alpha` (Page's ResNet-9: 0.3).

    Raises:
        ValueError: `alpha <= 0`.
    """

    def __init__(self, alpha=1.0, **kwargs):
        super().__init__(**kwargs)
        if not alpha > 0:
            raise ValueError(f"CELU alpha must be positive. Received: alpha={alpha!r}")
        self.alpha = float(alpha)

    def call(self, inputs):
        return ops.celu(inputs, alpha=self.alpha)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="haet")
class PatchWhitening(keras.layers.Layer):
    """A frozen convolution that whitens the image's `k x k` patches: its filters are the
    eigenvectors of the patches' (uncentred) covariance, each divided by the square
    root of its eigenvalue plus `epsilon` (PCA whitening; filters sorted by
    decreasing eigenvalue). The covariance comes from training images through
    `adapt`; the filters are non-trainable weights, saved with the model.

    David Page's bag of tricks (davidcpage/cifar10-fast, bag_of_tricks.ipynb): 3x3
    patches, 27 filters, epsilon 1e-2, "same" padding, then a trained 1x1 conv.
    airbench (KellerJordan/cifar10-airbench, airbench94.py): 2x2 patches, epsilon
    5e-4, "valid" padding, each filter and its negative (`both_signs`, 24 filters),
    with a trained bias.

    Args:
        patch_size: `k`, the patch side in pixels (>= 1).
        epsilon: added to the eigenvalues (> 0), in squared input units.
        padding: "same" or "valid".
        both_signs: also output the negated filters (twice the channels).
        use_bias: add a trainable bias per output channel. airbench trains it for the
            first 3 epochs only: `set_bias_trainable(False)` (a variable the compiled
            step reads) stops its gradient from then on.

    Input: float `(batch, height, width, channels)` (normalized as the images given to
    `adapt`); output: `(batch, height', width', k * k * channels [* 2])`.

    Raises:
        ValueError: a bad patch size, epsilon or padding; `adapt` on images of
            another channel count or smaller than a patch.
    """

    def __init__(self, patch_size=3, epsilon=1e-2, padding="same", both_signs=False, use_bias=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        fields.positive(integer=True, unit=" (pixels)")(patch_size, "patch_size")
        fields.positive()(epsilon, "epsilon")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid'. Received: {padding!r}")
        self.patch_size, self.epsilon, self.padding = patch_size, float(epsilon), padding
        self.both_signs, self.use_bias = bool(both_signs), bool(use_bias)

    def build(self, input_shape):
        channels = input_shape[-1]
        k = self.patch_size
        filters = k * k * channels * (2 if self.both_signs else 1)
        self.kernel = self.add_weight(shape=(k, k, channels, filters), name="kernel", initializer="zeros",
                                      trainable=False)
        self.bias = self.add_weight(shape=(filters,), name="bias", initializer="zeros") if self.use_bias else None
        # 1.0: the bias learns; 0.0: its gradient is stopped (its value stays).
        self.bias_gate = self.add_weight(shape=(), name="bias_gate", initializer="ones", trainable=False) \
            if self.use_bias else None
        # Inputs of another channel count are refused: the convolution would take them
        # as a grouped one (4 channels into filters of 2: 8 outputs, not the 16 declared).
        self.input_spec = keras.InputSpec(ndim=4, axes={-1: channels})

    def set_bias_trainable(self, trainable):
        """Lets the bias learn (True) or stops its gradient (False), without recompiling.

        Raises:
            ValueError: the layer has no bias, or is not built yet (`adapt` builds it).
        """
        if not self.use_bias:
            raise ValueError("This PatchWhitening has no bias (use_bias=False).")
        if not self.built:
            raise ValueError("This PatchWhitening is not built yet: adapt it (or call it) first.")
        self.bias_gate.assign(1.0 if trainable else 0.0)

    @staticmethod
    def whitening_kernel(images, patch_size, epsilon, chunk_size=256):
        """The `(k, k, C, k * k * C)` float32 whitening filters of float `(N, H, W, C)` images
        (every `k x k` patch inside the images, no padding), computed in float64 chunks.

        Raises:
            ValueError: images smaller than a patch, or holding nan or inf.
        """
        images = np.asarray(images)
        k = patch_size
        n, height, width, channels = images.shape
        if height < k or width < k:
            raise ValueError(f"Images of {height}x{width} pixels are smaller than a {k}x{k} patch.")
        dims = k * k * channels
        covariance, count = np.zeros((dims, dims)), 0
        for start in range(0, n, chunk_size):
            chunk = images[start:start + chunk_size].astype(np.float64)
            windows = np.lib.stride_tricks.sliding_window_view(chunk, (k, k), axis=(1, 2))
            # (n, H-k+1, W-k+1, C, k, k) -> rows of (k, k, C) patches, the kernel's layout.
            patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dims)
            covariance += patches.T @ patches
            count += len(patches)
        if not np.isfinite(covariance).all():  # (here, not on the images: no copy of them)
            raise ValueError("The whitening images hold nan or inf.")
        covariance /= max(count - 1, 1)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + epsilon)
        return filters.reshape(k, k, channels, dims).astype(np.float32)

    def adapt(self, images):
        """Computes the filters from float `(N, H, W, C)` images (normalized as this layer's
        input will be: Page and airbench use the training images, unaugmented).

        Raises:
            ValueError: before the layer is built or changed: images that are not a
                non-empty `(N, H, W, C)` array of finite numbers (C the channels the
                layer was built for, if it was), or smaller than a patch.
        """
        images = np.asarray(images)
        channels = self.kernel.shape[2] if self.built else "C"
        if images.ndim != 4 or not len(images) or (self.built and images.shape[-1] != channels):
            raise ValueError(f"adapt takes (N, H, W, {channels}) images, N >= 1. Received shape {images.shape}")
        if not np.issubdtype(images.dtype, np.number):
            raise ValueError(f"adapt takes images of numbers. Received dtype {images.dtype}")
        kernel = self.whitening_kernel(images, self.patch_size, self.epsilon)
        if not self.built:
            self.build(images.shape)
        if self.both_signs:
            kernel = np.concatenate([kernel, -kernel], axis=-1)
        self.kernel.assign(kernel)

    def call(self, inputs):
        x = keras.ops.conv(keras.ops.cast(inputs, "float32"), self.kernel, padding=self.padding)
        if self.bias is not None:
            gate = self.bias_gate
            x = x + gate * self.bias + (1.0 - gate) * keras.ops.stop_gradient(self.bias)
        return keras.ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        k = self.patch_size
        channels = k * k * input_shape[-1] * (2 if self.both_signs else 1)
        if self.padding == "same":
            return (*input_shape[:-1], channels)
        shrink = [None if d is None else d - k + 1 for d in input_shape[1:3]]
        return (input_shape[0], *shrink, channels)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size, "epsilon": self.epsilon,
                "padding": self.padding, "both_signs": self.both_signs, "use_bias": self.use_bias}
