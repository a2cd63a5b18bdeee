"""The pure training step of the UMBC recipe (ResNet-20 x1, batch 32) under each affine fill mode.

    KERAS_BACKEND=tensorflow python scripts/bench_fill_modes.py [DATA_DIR]

`haet.bench` times the pure step with the layer's initial fill mode (nearest) while a run
draws one of the four each epoch; this prints the step time under each (milliseconds).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from haet import bench, training  # noqa: E402
from haet.augment import FILL_MODES  # noqa: E402
from haet.config import TrainConfig  # noqa: E402

config = TrainConfig(data_dir=sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10",
                     width_multiplier=1, batch_size=32)
with training.settings_of(config) as settings:
    data = training.prepare_data(config)
    model, augmentation, _ = bench.compiled_model(config, data, settings)
    for mode in FILL_MODES:
        augmentation.set_fill_mode(mode)
        seconds, _, _ = bench.pure_step(model, data.x_fit[:32], data.y_fit[:32], 10)
        print(f"{mode} {seconds * 1e3:.1f} ms", flush=True)
