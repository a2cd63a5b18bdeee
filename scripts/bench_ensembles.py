"""How to train N small networks at once: the measurements behind `--ensemble_members`.

    python scripts/bench_ensembles.py --flagfile=flags/page_bag_of_tricks_haet.flags \\
        --width_multiplier=0.25 --batch_size=128 --members=1,2,4 --json=results/bench/ensembles_cpu.json
    KERAS_BACKEND=jax python scripts/bench_ensembles.py ...   # adds the vmapped variant

Takes every training flag (the recipe of one member). For each N of `--members` it
times a training step of N members (one batch of `--batch_size` images each, on
random uint8 images or `--data_dir`'s), compilation excluded, best of 3:

- `separate`: one member's compiled Keras `train_step` run N times (N networks
  trained one after the other, or N runs); under JAX the faster of a compiled loop
  and dispatched steps (dispatched only, on a CPU), as `haet.bench.pure_step`;
- `branches`: the `haet.models.EnsembleModel` of N members (what
  `--ensemble_members` trains): one compiled Keras `train_step` of N branches;
- JAX only, in plain JAX with the same SGD update for all three so that only the
  mechanism differs (`sgd_` prefix): `sgd_separate` (one member's
  value-and-gradient and update, dispatched N times), `sgd_branches` (the
  ensemble's, once) and `sgd_vmap` (one member's step `jax.vmap`ped over N stacked
  copies of its weights and N batches: XLA batches each convolution over the
  members).

Rows: `members`, `variant`, `step_ms` (an ensemble step: all N members),
`images_per_second` (N x batch / step), `speedup` (against `separate` or
`sgd_separate`), `compile_seconds`. Written to `--json` (a new file) with the
device and versions.
"""

import dataclasses
import os
import sys

import keras
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from haet import bench, training  # noqa: E402
from haet import config as config_lib  # noqa: E402


def _built(config, data, settings):
    return bench.compiled_model(config, data, settings)[0]


def _jax_loops(settings):
    # Dispatched steps only on a CPU, where XLA runs a compiled loop's body several times
    # slower (haet.bench); both on accelerators, the faster counting.
    return ("dispatch",) if settings.device.get("platform") == "cpu" else ("fused", "dispatch")


def keras_steps(config, data, settings, members, steps):
    """Rows `separate` and `branches`: Keras' compiled `train_step` (the recipe's optimizer)."""
    single = dataclasses.replace(config, ensemble_members=1)
    x, y = bench.first_batch(data, single)
    loops = _jax_loops(settings)
    separate, separate_compile, _ = bench.pure_step(_built(single, data, settings), x, y, steps, loops)
    rows = [("separate", members * separate, separate_compile)]
    if members > 1:
        joint = dataclasses.replace(config, ensemble_members=members)
        x, y = bench.first_batch(data, joint)
        branches, compile_seconds, _ = bench.pure_step(_built(joint, data, settings), x, y, steps, loops)
        rows.append(("branches", branches, compile_seconds))
    return rows


def jax_steps(config, data, settings, members, steps, learning_rate=0.01):
    """Rows `sgd_separate`, `sgd_branches` and `sgd_vmap` (plain JAX, plain SGD)."""
    import jax
    import jax.numpy as jnp

    def sgd_step(model, scale):
        def loss(trainable, non_trainable, x, y):
            logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
            log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -scale * jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1)), non_trainable

        def step(trainable, non_trainable, x, y):
            (value, non_trainable), grads = jax.value_and_grad(loss, has_aux=True)(trainable, non_trainable, x, y)
            return [w - learning_rate * g for w, g in zip(trainable, grads)], non_trainable, value

        return step

    def weights(model):
        return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]

    single = dataclasses.replace(config, ensemble_members=1)
    member = _built(single, data, settings)
    x, y = bench.first_batch(data, dataclasses.replace(config, ensemble_members=members))
    y = np.asarray(y).reshape(len(x), -1).argmax(1) if np.ndim(y) > 1 else np.asarray(y, np.int32)
    batch = config.batch_size
    blocks = [(jax.device_put(x[m * batch:(m + 1) * batch]), jax.device_put(y[m * batch:(m + 1) * batch]))
              for m in range(members)]

    def timed(step, states, batches):
        """Seconds per ensemble step of `steps` rounds of `step` on each (state, batch) pair."""
        states = list(states)

        def run():
            for _ in range(steps):
                for i, batch in enumerate(batches):
                    trainable, non_trainable, _ = step(*states[i], *batch)
                    states[i] = (trainable, non_trainable)
            jax.block_until_ready(states)

        seconds, compile_seconds = bench.best_of(run)
        return seconds / steps, compile_seconds

    one = jax.jit(sgd_step(member, 1.0))
    rows = [("sgd_separate", *timed(one, [weights(member)] * members, blocks))]
    if members == 1:
        return rows
    ensemble = _built(dataclasses.replace(config, ensemble_members=members), data, settings)
    joint = jax.jit(sgd_step(ensemble, float(members)))
    rows.append(("sgd_branches", *timed(joint, [weights(ensemble)], [(jax.device_put(x), jax.device_put(y))])))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[weights(member)] * members)
    stacked_batch = (jnp.stack([b[0] for b in blocks]), jnp.stack([b[1] for b in blocks]))
    rows.append(("sgd_vmap", *timed(jax.jit(jax.vmap(sgd_step(member, 1.0))), [stacked], [stacked_batch])))
    return rows


# haet.bench defines the training flags, --bench_steps (ensemble steps per timed run) and --json.
flags.DEFINE_list("members", ["1", "2", "4"], "Ensemble sizes N to measure.")


def main(argv):
    del argv  # (haet.cli.run refuses arguments other than flags)
    bench.check_json_flag()
    f = flags.FLAGS
    try:
        members = bench.positive_integers(f.members, "--members")
        if not members:
            raise ValueError("--members takes positive integers, comma-separated. Received none.")
        config = config_lib.config_from_flags(f)
        config_lib.warn_ignored_settings(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        bench.prepare_data_dir(config, folder, 10)
        config = dataclasses.replace(config, data_dir=folder, classes=(), validation_size=0)
        with training.settings_of(config) as settings:
            data = training.prepare_data(config)
            for n in members:
                measured = keras_steps(config, data, settings, n, f.bench_steps)
                if keras.backend.backend() == "jax":
                    measured += jax_steps(config, data, settings, n, f.bench_steps)
                base = {name: seconds for name, seconds, _ in measured}
                for name, seconds, compile_seconds in measured:
                    reference = base["sgd_separate" if name.startswith("sgd_") else "separate"]
                    rows.append({"members": n, "variant": name, "batch_size": config.batch_size,
                                 "step_ms": round(1e3 * seconds, 3),
                                 "images_per_second": round(n * config.batch_size / seconds, 1),
                                 "speedup": round(reference / seconds, 3), "compile_seconds": round(compile_seconds, 2),
                                 "model": config.model, "width_multiplier": config.width_multiplier,
                                 "precision": settings.precision, "backend": keras.backend.backend(),
                                 "device": settings.device["name"]})
                    print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    if f.json:
        bench.write_rows(f.json, rows)

if __name__ == "__main__":
    from haet import cli

    cli.run(main)
