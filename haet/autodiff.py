"""One gradient function for the TensorFlow and JAX backends (Keras 3 has none of its own
outside the training step): used by Grad-CAM (`haet.explain`) and the training-health
monitor (`haet.hooks.TrainingHealth`)."""

import keras
import numpy as np


def value_and_gradient(fn, x):
    """Value, auxiliary output and gradient of a scalar function, as NumPy arrays.

    Args:
        fn: function of `x` returning `(scalar, aux)`, written with `keras.ops` or
            Keras layers (traced by `tf.GradientTape` or `jax.value_and_grad`).
        x: the argument to differentiate against: an array or a list of arrays
            (e.g. a model's trainable values).

    Returns:
        `(value, aux, gradient)`: float, `aux` as NumPy (a list stays a list), and
        the gradient shaped like `x`.

    Raises:
        NotImplementedError: a backend other than tensorflow and jax.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.nest.map_structure(tf.convert_to_tensor, x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value, aux = fn(x)
        gradient = tape.gradient(value, x)
    elif backend == "jax":
        import jax

        (value, aux), gradient = jax.value_and_grad(fn, has_aux=True)(x)
    else:
        raise NotImplementedError(f"Gradients are implemented for tensorflow and jax, not {backend!r}.")

    def numpy(tree):
        return [np.asarray(t) for t in tree] if isinstance(tree, (list, tuple)) else np.asarray(tree)

    return float(np.asarray(value)), numpy(aux) if aux is not None else None, numpy(gradient)
