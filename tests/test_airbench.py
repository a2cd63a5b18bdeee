"""airbench in Keras: identity init, the network, lookahead, alternating flip, fractional epochs."""

import keras
import numpy as np
import pytest

from haet import augment, models
from haet.averaging import Lookahead, batch_norm_statistics
from haet.config import TrainConfig
from haet.engine import epoch_permutation, make_engine


def test_dirac_init_makes_the_first_filters_identities():
    kernel = np.asarray(models.Dirac()((3, 3, 4, 6)))
    for i in range(4):
        expected = np.zeros((3, 3, 4))
        expected[1, 1, i] = 1.0
        np.testing.assert_array_equal(kernel[..., i], expected)
    rest = kernel[..., 4:]
    bound = 1 / np.sqrt(3 * 3 * 4)  # PyTorch's default conv init
    assert np.abs(rest).max() <= bound and np.abs(rest).std() > 0.2 * bound
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 4)).astype("float32")
    conv = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, kernel_initializer=models.Dirac())
    np.testing.assert_allclose(np.asarray(conv(x))[..., :4], x, atol=1e-6)


def test_the_airbench_network():
    images = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype("float32")
    model = models.airbench(whitening_images=images)
    whitening = model.get_layer("whitening")
    assert tuple(whitening.kernel.shape) == (2, 2, 3, 24) and whitening.bias is not None
    assert model.output_shape == (None, 10)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == 1_971_352 and model.count_params() == 1_973_945
    bn = model.get_layer("block1_bn1")
    assert (bn.momentum, bn.epsilon, bn.scale, bn.dtype_policy.compute_dtype) == (0.6, 1e-12, False, "float32")
    assert model.get_layer("block1_bn1").input is model.get_layer("block1_pool").output
    with pytest.raises(ValueError, match="whitening_images"):
        models.airbench()


def test_the_whitening_bias_gate_stops_its_gradient_and_keeps_its_value():
    images = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype("float32")
    from haet.layers import PatchWhitening

    layer = PatchWhitening(2, 5e-4, padding="valid", both_signs=True, use_bias=True)
    layer.adapt(images)
    layer.bias.assign(np.full(24, 0.5, "float32"))

    def bias_gradient():
        return np.asarray(_gradient(lambda: keras.ops.sum(layer(images) ** 2), layer.bias))

    assert np.abs(bias_gradient()).max() > 0
    layer.set_bias_trainable(False)
    assert np.abs(bias_gradient()).max() == 0
    out = np.asarray(layer(images))
    layer.set_bias_trainable(True)
    np.testing.assert_allclose(np.asarray(layer(images)), out, rtol=1e-6)  # the value is used either way


def _gradient(loss, variable):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = loss()
        return tape.gradient(value, variable.value)
    import jax

    def f(v):
        with keras.StatelessScope(state_mapping=[(variable, v)]):
            return loss()

    return jax.grad(f)(variable.value)


def _model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3), dtype="uint8")
    h = keras.layers.Rescaling(1 / 255)(inputs)
    h = keras.layers.Conv2D(6, 3, name="conv")(h)
    h = keras.layers.BatchNormalization(momentum=0.5, name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(4, name="dense")(h))
    model.compile(keras.optimizers.SGD(0.5, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    return model


def test_bad_lookahead_settings_are_refused():
    for power in (-1.0, float("nan"), float("inf")):  # -1: the weights grew from 0.4 to 10 in 4 steps
        with pytest.raises(ValueError, match="power must be a number >= 0"):
            Lookahead(total_steps=100, power=power)


@pytest.mark.parametrize("start_step", [0, 4])
def test_lookahead_follows_airbench_step_by_step(start_step):
    """The engine's lookahead (updates every 2 steps, momentum 0.9**2 * (step / 13)**1,
    copied back; the average from the initial weights when it starts at step 0, else
    from its first update's values), and the copy back at the end of training
    (`LookaheadEnd`: step 13 is dropped), against Keras' own step with the same rule
    applied in NumPy between steps. Before, the engine also copied back at each epoch
    end (airbench before its March 2024 version), and the run ended on step 13's
    weights."""
    import types

    from haet.hooks import LookaheadEnd

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (20, 8, 8, 3)).astype("uint8"), rng.integers(0, 4, 20)
    steps_per_epoch, total = 5, 13
    lookahead = Lookahead(total_steps=total, decay=0.9, every_steps=2, power=1.0, start_step=start_step)
    ours = _model()
    engine = make_engine(ours, x, y, 4, seed=7, steps_per_execution=3, averages=[lookahead])
    for epoch in range(3):
        engine.start_epoch(epoch)
        while engine.steps_left_in_epoch and engine.epoch * steps_per_epoch + engine.step_in_epoch < total:
            engine.run(min(3, engine.steps_left_in_epoch,
                           total - engine.epoch * steps_per_epoch - engine.step_in_epoch))
    engine.sync()
    LookaheadEnd(lookahead).on_train_end(types.SimpleNamespace(engine=engine))

    theirs = _model()
    sources = [*theirs.trainable_variables, *batch_norm_statistics(theirs)]
    started = start_step == 0
    average, step = [np.asarray(v.value, np.float64) for v in sources], 0
    for epoch in range(3):
        order = epoch_permutation(7, epoch, 20)
        for s in range(steps_per_epoch):
            if step == total:
                break
            batch = order[s * 4:(s + 1) * 4]
            theirs.train_on_batch(x[batch], y[batch])
            step += 1
            current = [np.asarray(v.value, np.float64) for v in sources]
            if step % 2 == 0 and step >= start_step:
                rho = 0.9 ** 2 * min(step / total, 1.0) if started else 0.0
                average = [rho * a + (1 - rho) * c for a, c in zip(average, current)]
                started = True
                for variable, value in zip(sources, average):
                    variable.assign(value.astype("float32"))
    for variable, value in zip(sources, average):  # the end of training
        variable.assign(value.astype("float32"))
    ours_sources = [*ours.trainable_variables, *batch_norm_statistics(ours)]
    for a, b in zip(ours_sources, sources):
        np.testing.assert_allclose(np.asarray(a.value), np.asarray(b.value), rtol=1e-4, atol=1e-5, err_msg=a.path)
    for a, b in zip(lookahead.averages, average):
        np.testing.assert_allclose(np.asarray(a.value), b, rtol=1e-4, atol=1e-5)


def test_lookahead_ramps_over_the_same_fraction_of_the_plan_as_the_schedule():
    from haet.optimizers import SGD
    from haet.schedules import PlannedSchedule, lr_shape

    model = _model()
    schedule = PlannedSchedule(lr_shape("linear", 0.1))
    optimizer = SGD(learning_rate=schedule)
    schedule.attach(optimizer, 100)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.optimizer.build(model.trainable_variables)
    lookahead = Lookahead(plan=schedule.planned_steps, plan_offset=schedule.plan_offset)
    lookahead.build(model)
    schedule.plan_offset.assign(-20.0)  # re-planned: (50 - 20) / (100 - 20)
    values = [v.value for v in model.optimizer.variables]
    assert float(np.asarray(lookahead.done(50, values))) == pytest.approx(0.375)
    assert float(np.asarray(lookahead.done(50, values))) == pytest.approx(float(np.asarray(schedule.fraction(50))))


def test_lookahead_needs_the_run_length():
    with pytest.raises(ValueError, match="lookahead ramps its momentum"):
        TrainConfig(lookahead=True, epochs=0)  # wall-clock schedule, no plan
    TrainConfig(lookahead=True, epochs=3)
    TrainConfig(lookahead=True, optimizer="sgd", lr_schedule="one_cycle")


def test_alternating_flip_copies():
    images = np.arange(6 * 2 * 3 * 1, dtype=np.uint8).reshape(6, 2, 3, 1)
    copies = augment.alternating_flip_copies(images, seed=0)
    first, second = copies[:6], copies[6:]
    np.testing.assert_array_equal(second, first[:, :, ::-1])
    flipped = [not np.array_equal(a, b) for a, b in zip(first, images)]
    assert 0 < sum(flipped) < 6  # some mirrored, some not
    for a, b, f in zip(first, images, flipped):
        np.testing.assert_array_equal(a, b[:, ::-1] if f else b)
    with pytest.raises(ValueError, match="--nohorizontal_flip"):
        TrainConfig(alternating_flip=True, augmentation="crop_flip_cutout", horizontal_flip=True)


def test_the_airbench_flagfiles_train_a_fraction_of_an_epoch_and_save(tmp_path, cifar10_slice_dir, monkeypatch):
    """airbench94 at a tiny size for 2.5 epochs: whitening with its bias frozen after one
    epoch, identity init, lookahead from epoch 1, alternating flip, airbench TTA. The
    model evaluated holds the lookahead's average (its last update at step 10 of 13);
    before, it held step 13's weights."""
    from test_recipes import _flagfile_config

    from haet import training
    from haet.hooks import LookaheadEnd
    from haet.training import train

    evaluate, evaluated = training.evaluate, []

    def check(config, model, data, run):
        (end,) = [hook for hook in run.training.hooks if isinstance(hook, LookaheadEnd)]
        averages = [np.asarray(a.value) for a in end.lookahead.averages[:len(model.trainable_variables)]]
        for variable, average in zip(model.trainable_variables, averages):
            np.testing.assert_array_equal(np.asarray(variable.value), average, err_msg=variable.path)
        evaluated.append(int(np.asarray(end.lookahead.steps.value)))
        return evaluate(config, model, data, run)

    monkeypatch.setattr(training, "evaluate", check)

    config = _flagfile_config(
        "airbench94.flags", data_dir=cifar10_slice_dir, train_size=200, width_multiplier=0.0625, batch_size=40,
        epochs=2.5, whitening_bias_epochs=1, lookahead_start_epochs=1, budget_seconds=600.0, eval_batch_size=250,
        checkpoint_every=0.0)
    record, run_dir = train(config, results_dir=str(tmp_path))
    assert record["status"] == "completed" and record["stopped_by"] == "epochs"
    assert record["steps"] == 13 and record["epochs_completed"] == 2  # ceil(2.5 x 5); the third epoch cut short
    assert evaluated == [13]
    assert set(record["test_accuracy_variants"]) == {"final", "final_tta_airbench"}
    assert record["test_accuracy"] == record["test_accuracy_variants"]["final_tta_airbench"]
    model = keras.saving.load_model(f"{run_dir}/model.keras")
    whitening = model.get_layer("airbench").get_layer("whitening")
    assert float(np.asarray(whitening.bias_gate.value)) == 0.0 and np.abs(np.asarray(whitening.bias.value)).max() > 0
