"""Small backend-neutral layers that Keras does not have."""

import keras
from keras import ops


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

    Input: `(batch, ..., channels)`; output: same shape and dtype.

    Raises:
        ValueError: `num_splits < 1` at construction.
    """

    def __init__(self, num_splits=1, momentum=0.9, epsilon=1e-5, center=True, scale=True, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be a positive integer. Received: num_splits={num_splits!r}")
        self.num_splits = num_splits
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale

    def build(self, input_shape):
        channels = input_shape[-1]
        # As keras.layers.BatchNormalization: no variable for a frozen scale or shift.
        self.gamma = self.add_weight(shape=(channels,), name="gamma", initializer="ones") if self.scale else None
        self.beta = self.add_weight(shape=(channels,), name="beta", initializer="zeros") if self.center else None
        self.moving_mean = self.add_weight(shape=(channels,), name="moving_mean",
                                           initializer="zeros", trainable=False)
        self.moving_variance = self.add_weight(shape=(channels,), name="moving_variance",
                                               initializer="ones", trainable=False)

    def call(self, inputs, training=False):
        x = ops.cast(inputs, "float32")
        if training:
            shape = ops.shape(x)
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
                      center=self.center, scale=self.scale)
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
