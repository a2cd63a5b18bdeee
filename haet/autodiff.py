"""One gradient function for the TensorFlow and JAX backends (Keras 3 has none of its own
outside the training step): used by Grad-CAM (`haet.explain`) and the training-health
monitor (`haet.hooks.TrainingHealth`)."""

import keras
import numpy as np


def value_and_gradient(fn, x):
    """Value, auxiliary output and gradient of a scalar function, as NumPy arrays,
    computed eagerly (op by op; for a function called once).

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
    return _gradient_function(fn, compiled=False)(x)


def compiled_value_and_gradient(fn):
    """`value_and_gradient` of `fn(x, *args)` with respect to `x`, compiled once
    (`tf.function`, `jax.jit`) for a function called again and again with arrays of
    the same shapes. Everything that changes between calls must be an argument: the
    values a compiled function closes over are constants of it.

    Why: the training-health monitor's probe gradient (ResNet-20 at batch 32 with
    the affine augmentation, on a 2-core Intel Xeon) took 0.7 s a call eagerly
    under either backend, and 10.7 s for JAX's first; compiled, 0.11 s (TensorFlow)
    and 0.14 s (JAX) after a first call of 3.2 and 4.8 s. Under TensorFlow each eager call also traced the augmentation's
    `vectorized_map` again (and warned of "retracing").

    Args:
        fn: function of `(x, *args)` returning `(scalar, aux)` (see `value_and_gradient`).

    Returns:
        A function of `(x, *args)` returning `(value, aux, gradient)` as NumPy.

    Raises:
        NotImplementedError: a backend other than tensorflow and jax.
    """
    return _gradient_function(fn, compiled=True)


def _gradient_function(fn, compiled):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def differentiated(x, *args):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value, aux = fn(x, *args)
            return value, aux, tape.gradient(value, x)

        if compiled:
            differentiated = tf.function(differentiated, reduce_retracing=True)

        def call(x, *args):
            return differentiated(tf.nest.map_structure(tf.convert_to_tensor, x), *args)
    elif backend == "jax":
        import jax

        value_and_grad = jax.value_and_grad(fn, has_aux=True)
        if compiled:
            value_and_grad = jax.jit(value_and_grad)

        def call(x, *args):
            (value, aux), gradient = value_and_grad(x, *args)
            return value, aux, gradient
    else:
        raise NotImplementedError(f"Gradients are implemented for tensorflow and jax, not {backend!r}.")

    def numpy(tree):
        return [np.asarray(t) for t in tree] if isinstance(tree, (list, tuple)) else np.asarray(tree)

    def numpy_results(x, *args):
        value, aux, gradient = call(x, *args)
        return float(np.asarray(value)), numpy(aux) if aux is not None else None, numpy(gradient)

    return numpy_results
