"""Image classifiers, built from named blocks, and the input pipeline they share.

Every model returns float32 logits whatever the mixed-precision policy.
"""

import os
import zipfile

import keras
import numpy as np
from keras import layers, ops

from haet import fields
from haet.fields import Field, Kind
from haet.layers import CELU, GhostBatchNormalization, PatchWhitening

# UMBC HAET-2021 (xmhosseini/HAET2021, HAET_CIFAR10_train.py): where their widened
# ResNet-20 puts Dropout(0.25), as (stage, block, site) with stage and block counted
# from 0; "inner" follows the block's first conv-BN-ReLU, "output" follows the
# block's residual add and ReLU. Nine sites in all.
UMBC_DROPOUT_SITES = frozenset(
    {
        (0, 0, "output"),
        (0, 1, "inner"),
        (1, 0, "inner"),
        (1, 0, "output"),
        (1, 1, "inner"),
        (1, 2, "output"),
        (2, 1, "inner"),
        (2, 1, "output"),
        (2, 2, "inner"),
    }
)

# ResNet-20 v1 (He et al. 2016, CIFAR variant): filters per stage at width 1 and
# basic blocks per stage.
RESNET20_STAGE_FILTERS = (16, 32, 64)
RESNET20_BLOCKS_PER_STAGE = 3


def _conv(filters, kernel_size, strides, weight_decay, name):
    return layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(weight_decay) if weight_decay else None,
        name=name,
    )


def _conv_bn(x, filters, strides, weight_decay, name, relu):
    x = _conv(filters, 3, strides, weight_decay, f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    if relu:
        x = layers.Activation("relu", name=f"{name}_relu")(x)
    return x


def basic_block(x, filters, strides, weight_decay, dropout_sites, dropout_rate, name):
    """ResNet v1 basic block: conv-BN-ReLU, conv-BN, add shortcut, ReLU.

    The shortcut is the identity, or a 1x1 strided convolution (no BN, as in the
    Keras CIFAR-10 ResNet v1 example and UMBC) when the shape changes.
    `dropout_sites` is a subset of {"inner", "output"}.
    """
    shortcut = x
    y = _conv_bn(x, filters, strides, weight_decay, f"{name}_1", relu=True)
    if "inner" in dropout_sites:
        y = layers.Dropout(dropout_rate, name=f"{name}_1_dropout")(y)
    y = _conv_bn(y, filters, 1, weight_decay, f"{name}_2", relu=False)
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides, weight_decay, f"{name}_shortcut")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, y])
    x = layers.Activation("relu", name=f"{name}_out")(x)
    if "output" in dropout_sites:
        x = layers.Dropout(dropout_rate, name=f"{name}_out_dropout")(x)
    return x


def resnet20(
    width_multiplier=6,
    dropout_rate=0.25,
    weight_decay=1e-4,
    num_classes=10,
    input_shape=(32, 32, 3),
    dropout_sites=UMBC_DROPOUT_SITES,
    name=None,
):
    """ResNet-20 v1 for 32x32 images, widened, with UMBC's dropout placement.

    Three stages of three basic blocks with `16, 32, 64` filters times
    `width_multiplier` (stride 2 at the start of stages 2 and 3), a 3x3 stem conv with
    the first stage's width, global average pooling and a dense head. Convolutions
    use he_normal init, biases and L2 `weight_decay` on their kernels, as the UMBC
    HAET-2021 entry (Hosseini et al. 2021; their paper says 6x, their code uses 5x).

    Parameter counts (10 classes, 3 input channels): 274,442 at width 1 (the
    classic ResNet-20 plus biases and projection shortcuts); 9,741,322 at width 6.

    Args:
        width_multiplier: positive integer (an integral float such as 6.0 is
            accepted), filters per stage = (16, 32, 64) x this.
        dropout_rate: float in [0, 1), the rate at every site in `dropout_sites`.
        weight_decay: L2 factor on convolution kernels (loss += wd * sum(w**2)).
        num_classes: number of output logits (>= 2).
        input_shape: `(height, width, channels)` of the float input.
        dropout_sites: set of `(stage, block, "inner"|"output")`, 0-based.
        name: model name; default `resnet20x{width_multiplier}`.

    Returns:
        A `keras.Model` from float images `(batch, *input_shape)` to float32 logits
        `(batch, num_classes)`.

    Raises:
        ValueError: for a non-positive width, a rate outside [0, 1), a negative
            weight decay or fewer than 2 classes.
    """
    if (isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float))
            or width_multiplier < 1 or width_multiplier != int(width_multiplier)):
        raise ValueError(
            f"resnet20 needs a positive integer width_multiplier. Received: {width_multiplier!r}"
        )
    width_multiplier = int(width_multiplier)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1). Received: {dropout_rate!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0. Received: {weight_decay!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2. Received: {num_classes!r}")
    inputs = keras.Input(shape=input_shape, name="images")
    filters = [f * width_multiplier for f in RESNET20_STAGE_FILTERS]
    x = _conv_bn(inputs, filters[0], 1, weight_decay, "stem", relu=True)
    for stage, stage_filters in enumerate(filters):
        for block in range(RESNET20_BLOCKS_PER_STAGE):
            strides = 2 if stage > 0 and block == 0 else 1
            sites = {site for (s, b, site) in dropout_sites if (s, b) == (stage, block)}
            x = basic_block(
                x,
                stage_filters,
                strides,
                weight_decay,
                sites if dropout_rate > 0 else set(),
                dropout_rate,
                name=f"stage{stage + 1}_block{block + 1}",
            )
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    # float32 logits: softmax/cross-entropy in float16 lose precision.
    outputs = layers.Dense(
        num_classes, kernel_initializer="he_normal", dtype="float32", name="logits"
    )(x)
    return keras.Model(inputs, outputs, name=name or f"resnet20x{width_multiplier}")


# David Page's ResNet-9 (davidcpage/cifar10-fast, dawn.py): channels of the prep
# layer and of layers 1-3; layers 1 and 3 carry a residual of two conv blocks.
RESNET9_WIDTHS = (64, 128, 256, 512)
RESNET9_RESIDUAL_LAYERS = (1, 3)


def _check_sizes(width_multiplier, num_classes, input_shape, min_side, too_small):
    """The checks every builder makes: a positive width, >= 2 classes, images of at least `min_side`."""
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive. Received: {width_multiplier!r}")
    if min(input_shape[:2]) < min_side:
        raise ValueError(f"{too_small}. Received: input_shape={input_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2. Received: {num_classes!r}")


def _batch_norm(x, ghost_batch_splits, frozen_bn_scale, shift_decay, name):
    regularizer = keras.regularizers.L2(shift_decay) if shift_decay else None
    if ghost_batch_splits > 1:
        return GhostBatchNormalization(ghost_batch_splits, scale=not frozen_bn_scale, beta_regularizer=regularizer,
                                       name=name)(x)
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, scale=not frozen_bn_scale,
                                     beta_regularizer=regularizer, name=name)(x)


def _activation(x, activation, celu_alpha, name):
    if activation == "celu":
        return CELU(celu_alpha, name=f"{name}_celu")(x)
    return layers.Activation(activation, name=f"{name}_{activation}")(x)


def pytorch_default_initializer():
    """PyTorch's default init of `nn.Conv2d` and `nn.Linear` weights (kaiming_uniform with
    a = sqrt(5)): uniform in +-1/sqrt(fan_in), variance 1 / (3 fan_in), a sixth of
    he_uniform's. Page's ResNet-9 (davidcpage/cifar10-fast) and airbench
    (KellerJordan/cifar10-airbench) were tuned from it."""
    return keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")


def _conv_bn_act(x, filters, weight_decay, activation, celu_alpha, ghost_batch_splits, frozen_bn_scale,
                 shift_decay, name, pool=None, kernel_size=3, pytorch_init=False):
    """conv-BN-act, then max-pool(2) when `pool` is "after"; conv-pool-BN-act when it is "before"."""
    x = layers.Conv2D(
        filters, kernel_size, padding="same", use_bias=False,
        kernel_initializer=pytorch_default_initializer() if pytorch_init else "he_uniform",
        kernel_regularizer=keras.regularizers.L2(weight_decay) if weight_decay else None,
        name=f"{name}_conv",
    )(x)
    if pool == "before":
        x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    x = _batch_norm(x, ghost_batch_splits, frozen_bn_scale, shift_decay, f"{name}_bn")
    x = _activation(x, activation, celu_alpha, name)
    if pool == "after":
        x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    return x


def _check_whitening_images(images, input_shape):
    """Refuses whitening images (`PatchWhitening.adapt`) of another channel count than
    the model's input: the filters would not fit the images the model takes."""
    shape = np.shape(images)
    if len(shape) != 4 or shape[-1] != input_shape[-1]:
        raise ValueError(f"whitening_images must be (N, H, W, {input_shape[-1]}) images, as the model's input "
                         f"{tuple(input_shape)}. Received shape {shape}.")


# Models whose builder takes `whitening_images` (`build_backbone`).
WHITENED_MODELS = ("resnet9", "airbench")


def needs_whitening(model, prep="conv"):
    """Whether the network `model` (with `prep`, for resnet9) computes a whitening layer
    from training images: airbench always, resnet9 with `prep="whitening"`."""
    return model == "airbench" or (model == "resnet9" and prep == "whitening")

# What the first block of ResNet-9 is: Page's dawn.py conv, or his bag of tricks'
# frozen 3x3 PCA whitening followed by a trained 1x1 conv.
RESNET9_PREPS = ("conv", "whitening")
PAGE_WHITENING_EPSILON = 1e-2


def resnet9(
    num_classes=10,
    input_shape=(32, 32, 3),
    width_multiplier=1.0,
    activation="celu",
    celu_alpha=0.3,
    ghost_batch_splits=1,
    frozen_bn_scale=True,
    logit_scale=0.125,
    weight_decay=5e-4,
    prep="conv",
    whitening_images=None,
    pool_before_bn=False,
    bn_shift_weight_decay=0.0,
    pytorch_init=False,
    name=None,
):
    """David Page's ResNet-9 ("How to train your ResNet", myrtle.ai 2018;
    davidcpage/cifar10-fast; 94% on full CIFAR-10 in 26 s on a V100).

    prep: conv(64)-BN-act; layer1: conv(128)-BN-act-maxpool(2) + residual of two
    conv(128)-BN-act; layer2: conv(256)-BN-act-maxpool(2); layer3: conv(512)-BN-act-
    maxpool(2) + residual; global max pooling; dense without bias; logits times
    `logit_scale`. 3x3 convs without bias.

    The bag of tricks' variants (bag_of_tricks.ipynb): `prep="whitening"` replaces the
    prep conv by a frozen `PatchWhitening` of 3x3 patches (27 channels, epsilon
    1e-2, computed from `whitening_images`) and a trained 1x1 conv(64)-BN-act;
    `pool_before_bn` pools right after each pooling layer's conv (conv-pool-BN-act,
    a quarter of the BN and activation work); `bn_shift_weight_decay` puts an L2
    penalty on the batch-norm shifts (Page decays them at weight decay / 64 with
    64x their learning rate); `pytorch_init` initializes the conv and dense kernels as
    Page's code did (PyTorch's defaults, `pytorch_default_initializer`).

    Parameter count at width 1, 10 classes, RGB: 6,575,360 with frozen BN scales
    (6,570,880 trainable; the rest are BN moving statistics), 6,577,600 with learned
    scales (6,573,120 trainable); ghost batch norm changes neither.

    Args:
        num_classes: output logits (>= 2).
        input_shape: `(height, width, channels)`, height and width >= 8 (28x28
            MNIST pools to 3x3).
        width_multiplier: positive float scaling every layer's channels.
        activation: "celu" (Page's final version, alpha `celu_alpha`) or any Keras
            activation name, e.g. "relu".
        celu_alpha: CELU's alpha.
        ghost_batch_splits: >1 uses `GhostBatchNormalization` with that many groups.
        frozen_bn_scale: BN scales fixed at 1 (not trained).
        logit_scale: multiplies the logits (Page: 0.125 in dawn.py, 1/16 in the bag of tricks).
        weight_decay: L2 factor on conv and dense kernels (loss += wd * sum(w**2)).
        prep: "conv" or "whitening" (see above).
        whitening_images: with `prep="whitening"`: float `(N, H, W, C)` training
            images, normalized as the model's input, whose patches give the
            whitening filters.
        pool_before_bn: conv-pool-BN-act instead of conv-BN-act-pool.
        bn_shift_weight_decay: L2 factor on the batch-norm shifts (0: none).
        pytorch_init: conv and dense kernels from `pytorch_default_initializer`
            (Page's); False: he_uniform convs and a Glorot-uniform dense layer.
        name: model name; default "resnet9".

    Returns:
        `keras.Model` from float images `(batch, *input_shape)` to float32 logits.

    Raises:
        ValueError: non-positive width, images smaller than 8x8, fewer than 2
            classes, an unknown prep, or whitening without images.
    """
    _check_sizes(width_multiplier, num_classes, input_shape, 8, "resnet9 pools by 8: height and width must be >= 8")
    fields.positive(integer=True)(ghost_batch_splits, "ghost_batch_splits")  # (0 and -3: plain batch norm)
    fields.positive()(logit_scale, "logit_scale")
    if prep not in RESNET9_PREPS:
        raise ValueError(f"Unknown prep {prep!r}. Allowed: {', '.join(RESNET9_PREPS)}.")
    if prep == "whitening" and whitening_images is None:
        raise ValueError("prep='whitening' computes its filters from training images: pass whitening_images, "
                         "float (N, H, W, C) images normalized as the model's input.")
    if prep == "whitening":
        _check_whitening_images(whitening_images, input_shape)
    widths = [max(1, round(w * width_multiplier)) for w in RESNET9_WIDTHS]
    block = dict(weight_decay=weight_decay, activation=activation, celu_alpha=celu_alpha,
                 ghost_batch_splits=ghost_batch_splits, frozen_bn_scale=frozen_bn_scale,
                 shift_decay=bn_shift_weight_decay, pytorch_init=pytorch_init)
    pool = "before" if pool_before_bn else "after"
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    if prep == "whitening":
        whitening = PatchWhitening(3, PAGE_WHITENING_EPSILON, padding="same", name="prep_whitening")
        whitening.adapt(whitening_images)
        x = whitening(x)
    x = _conv_bn_act(x, widths[0], name="prep", kernel_size=1 if prep == "whitening" else 3, **block)
    for i, filters in enumerate(widths[1:], start=1):
        x = _conv_bn_act(x, filters, name=f"layer{i}", pool=pool, **block)
        if i in RESNET9_RESIDUAL_LAYERS:
            y = _conv_bn_act(x, filters, name=f"layer{i}_res1", **block)
            y = _conv_bn_act(y, filters, name=f"layer{i}_res2", **block)
            x = layers.Add(name=f"layer{i}_add")([x, y])
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Dense(num_classes, use_bias=False, name="dense",
                     kernel_initializer=pytorch_default_initializer() if pytorch_init else "glorot_uniform",
                     kernel_regularizer=keras.regularizers.L2(weight_decay) if weight_decay else None)(x)
    outputs = layers.Rescaling(logit_scale, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name or "resnet9")


@keras.saving.register_keras_serializable(package="haet")
class Dirac(keras.initializers.Initializer):
    """Conv kernels whose first `min(in, out)` filters are the identity (a 1 at the
    centre tap of their own input channel, 0 elsewhere) and whose other filters come
    from `base`: an implicit residual at initialization (airbench,
    KellerJordan/cifar10-airbench, airbench94.py: `torch.nn.init.dirac_` over PyTorch's
    default conv init, uniform in +-1/sqrt(fan_in), the `base` default here).

    Shape `(kh, kw, in, out)`, odd or even kernel sides (the centre is `k // 2`).
    """

    def __init__(self, base=None):
        self.base = keras.initializers.get(base or pytorch_default_initializer())

    def __call__(self, shape, dtype=None):
        kh, kw, cin, cout = shape
        kernel = self.base(shape, dtype=dtype)
        identity = np.zeros(shape, np.float32)
        n = min(cin, cout)
        identity[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
        keep = np.ones(shape, np.float32)
        keep[..., :n] = 0.0
        return kernel * ops.convert_to_tensor(keep, kernel.dtype) + ops.convert_to_tensor(identity, kernel.dtype)

    def get_config(self):
        return {"base": keras.initializers.serialize(self.base)}


# airbench94 (KellerJordan/cifar10-airbench): widths of its three conv groups at width 1,
# and its whitening layer.
AIRBENCH_WIDTHS = (64, 256, 256)
AIRBENCH_WHITENING = {"patch_size": 2, "epsilon": 5e-4}


def _airbench_batch_norm(x, shift_decay, name):
    # Scale frozen at 1, momentum 0.6 (PyTorch's 0.4), epsilon 1e-12, in float32 whatever the policy.
    return layers.BatchNormalization(momentum=0.6, epsilon=1e-12, scale=False, dtype="float32",
                                     beta_regularizer=keras.regularizers.L2(shift_decay) if shift_decay else None,
                                     name=name)(x)


def airbench(
    num_classes=10,
    input_shape=(32, 32, 3),
    width_multiplier=1.0,
    logit_scale=1 / 9,
    weight_decay=0.0,
    bn_shift_weight_decay=0.0,
    whitening_images=None,
    pytorch_init=False,
    name=None,
):
    """The network of airbench94 (Keller Jordan, KellerJordan/cifar10-airbench,
    airbench94.py: 94.01% on full CIFAR-10 in 3.83 s on an A100).

    whitening: a `PatchWhitening` of 2x2 patches ("valid", epsilon 5e-4, each filter and
    its negative: 24 channels for RGB) with a trained bias, computed from
    `whitening_images`; GELU; three groups of conv-maxpool(2)-BN-GELU-conv-BN-GELU with
    64, 256, 256 channels (times `width_multiplier`); MaxPool(3); a dense layer without
    bias; logits times `logit_scale`. 3x3 convs without bias, identity-initialized
    (`Dirac`); batch norm with frozen scale, momentum 0.6 (PyTorch's 0.4), epsilon
    1e-12, in float32. Differences: the patch covariance divides by n - 1 (airbench: n);
    a frozen whitening bias keeps its momentum's last moves (airbench stops updating it).

    Parameter count at width 1, 10 classes, RGB: 1,971,352 trainable (of 1,973,945; the
    rest are the whitening filters, its bias gate and the BN moving statistics).

    Args:
        num_classes: output logits (>= 2).
        input_shape: `(height, width, channels)`; height and width >= 25 (three pools by 2
            after the 2x2 whitening, then a 3x3 pool).
        width_multiplier: positive float scaling the groups' channels.
        logit_scale: multiplies the logits (airbench: 1/9).
        weight_decay: L2 factor on conv and dense kernels.
        bn_shift_weight_decay: L2 factor on the batch-norm shifts (0: none).
        whitening_images: float `(N, H, W, C)` training images normalized as the
            model's input (airbench: the first 5,000).
        pytorch_init: the dense head from `pytorch_default_initializer` (airbench's
            `nn.Linear` default); False: Glorot uniform. (The convs' non-identity filters
            always are.)
        name: model name; default "airbench".

    Returns:
        `keras.Model` from float images `(batch, *input_shape)` to float32 logits.

    Raises:
        ValueError: non-positive width, images too small, fewer than 2 classes, no
            whitening images.
    """
    _check_sizes(width_multiplier, num_classes, input_shape, 25, "airbench needs images of at least 25x25 pixels")
    fields.positive()(logit_scale, "logit_scale")
    if whitening_images is None:
        raise ValueError("airbench computes its whitening filters from training images: pass whitening_images, "
                         "float (N, H, W, C) images normalized as the model's input.")
    _check_whitening_images(whitening_images, input_shape)
    regularizer = keras.regularizers.L2(weight_decay) if weight_decay else None
    inputs = keras.Input(shape=input_shape, name="images")
    whitening = PatchWhitening(both_signs=True, use_bias=True, padding="valid", name="whitening",
                               **AIRBENCH_WHITENING)
    whitening.adapt(whitening_images)
    x = layers.Activation("gelu", name="whitening_gelu")(whitening(inputs))
    for i, width in enumerate(AIRBENCH_WIDTHS, start=1):
        width = max(1, round(width * width_multiplier))
        for j in (1, 2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=Dirac(),
                              kernel_regularizer=regularizer, name=f"block{i}_conv{j}")(x)
            if j == 1:
                x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
            x = _airbench_batch_norm(x, bn_shift_weight_decay, f"block{i}_bn{j}")
            x = layers.Activation("gelu", name=f"block{i}_gelu{j}")(x)
    x = layers.MaxPooling2D(3, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(num_classes, use_bias=False, kernel_regularizer=regularizer, name="dense",
                     kernel_initializer=pytorch_default_initializer() if pytorch_init else "glorot_uniform")(x)
    outputs = layers.Rescaling(logit_scale, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name or "airbench")


# Each model's stages in order, as layer-name prefixes (for freezing when fine-tuning),
# and its classification head (replaced when the class count changes).
STAGES = {"resnet20": ("stem", "stage1", "stage2", "stage3"),
          "resnet9": ("prep", "layer1", "layer2", "layer3"),
          "airbench": ("whitening", "block1", "block2", "block3"),
          "tiny_cnn": ("block1", "block2")}
HEADS = {"resnet20": ("logits",), "resnet9": ("dense", "logits"), "airbench": ("dense", "logits"),
         "tiny_cnn": ("logits",)}


def backbone_of(model):
    """The classifier inside a `with_input_pipeline` model (or `model` itself; of an
    `EnsembleModel`, its first member)."""
    if isinstance(model, EnsembleModel):
        return model.member_backbones()[0]
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested[-1] if nested else model


def transfer_weights(source, target, model_name, freeze_stages=0):
    """Copies a trained model's weights into a new one for fine-tuning.

    Every backbone layer of `target` with a layer of the same name and weight
    shapes in `source`'s backbone gets its weights, except the classification head
    (`HEADS[model_name]`: a new head for the new classes, freshly initialized). The
    input normalization is a constant of the model, not a weight: build the target
    with the source's statistics (`input_statistics_of`) to keep it. Then the layers
    of the first `freeze_stages` stages (`STAGES[model_name]`) are frozen: not trained, and their batch norm runs in
    inference mode (Keras' fine-tuning convention). Recipe: Yosinski et al. 2014,
    "How transferable are features in deep neural networks?"; Keras' transfer
    learning guide.

    Args:
        source: the trained model (uint8 input pipeline + backbone).
        target: the new model, same architecture; may differ in class count.
        model_name: a key of `STAGES`.
        freeze_stages: number of leading stages to freeze, 0 to `len(STAGES[model_name])`.

    Returns:
        dict: `layers_transferred`, `parameters_transferred`, `layers_not_transferred`
        (names of the backbone's layers with weights, head excluded, that found no
        layer of the same name and shapes and keep their fresh initialization: e.g.
        the first conv when the channel count changes), `layers_frozen`,
        `parameters_frozen`.

    Raises:
        ValueError: unknown model, `freeze_stages` out of range, no layer in common
            (different architectures), or a layer to freeze that got no weights.
    """
    if model_name not in STAGES:
        raise ValueError(f"Unknown model {model_name!r} for transfer. Allowed: {', '.join(sorted(STAGES))}.")
    stages = STAGES[model_name]
    if not 0 <= freeze_stages <= len(stages):
        raise ValueError(f"freeze_stages must be in [0, {len(stages)}] for {model_name} "
                         f"(stages {', '.join(stages)}). Received: {freeze_stages}")
    src = {layer.name: layer for layer in backbone_of(source).layers}
    moved = params = 0
    kept = []
    for layer in backbone_of(target).layers:
        if layer.name in HEADS[model_name] or not layer.weights:
            continue
        theirs = src[layer.name].get_weights() if layer.name in src else None
        if theirs is None or [w.shape for w in theirs] != [tuple(w.shape) for w in layer.weights]:
            kept.append(layer.name)
            continue
        layer.set_weights(theirs)
        moved += 1
        params += sum(int(np.prod(w.shape)) for w in theirs)
    if not moved:
        raise ValueError(
            f"No layer of {source.name} matches {target.name} by name and shape: fine-tune with the "
            "same --model and --width_multiplier as the saved model.")
    prefixes = stages[:freeze_stages]
    random_frozen = [name for name in kept if prefixes and name.startswith(prefixes)]
    if random_frozen:
        raise ValueError(
            f"freeze_stages={freeze_stages} would freeze {', '.join(random_frozen)} of {target.name} at their random "
            f"initialization: {source.name} has no layer of that name and shapes (another input shape or "
            "width). Freeze fewer stages, or fine-tune from a model of the same input shape and width.")
    frozen, frozen_params = freeze_leading_stages(target, model_name, freeze_stages)
    return {"layers_transferred": moved, "parameters_transferred": params,
            "layers_not_transferred": kept, "layers_frozen": frozen, "parameters_frozen": frozen_params}


def freeze_leading_stages(model, model_name, stages):
    """Freezes the layers of the first `stages` stages (`STAGES[model_name]`) of
    `model`'s backbone (`transfer_weights` does, after copying the weights; a resumed
    fine-tuning run does it to the model its checkpoint fills).

    Returns:
        `(layers_frozen, parameters_frozen)`: ints.

    Raises:
        ValueError: unknown model, or `stages` out of range.
    """
    if model_name not in STAGES:
        raise ValueError(f"Unknown model {model_name!r} for transfer. Allowed: {', '.join(sorted(STAGES))}.")
    if not 0 <= stages <= len(STAGES[model_name]):
        raise ValueError(f"freeze_stages must be in [0, {len(STAGES[model_name])}] for {model_name} "
                         f"(stages {', '.join(STAGES[model_name])}). Received: {stages}")
    prefixes = STAGES[model_name][:stages]
    frozen = frozen_params = 0
    for layer in backbone_of(model).layers:
        if prefixes and layer.name.startswith(prefixes):
            frozen_params += sum(int(np.prod(w.shape)) for w in layer.trainable_weights)
            layer.trainable = False
            frozen += 1
    return frozen, frozen_params


def tiny_cnn(num_classes=10, input_shape=(32, 32, 3), width_multiplier=1.0, weight_decay=0.0, name=None):
    """A two-block convnet for tests and for measuring the host's cost per step.

    conv(16)-BN-ReLU-maxpool(2), conv(32)-BN-ReLU, global average pooling, dense;
    channels times `width_multiplier`. 3x3 convs without bias, he_uniform init.
    Parameter count at width 1, 10 classes, RGB: 5,562 (5,466 trainable).

    Args:
        num_classes: output logits (>= 2).
        input_shape: `(height, width, channels)`, height and width >= 2.
        width_multiplier: positive float scaling the channels.
        weight_decay: L2 factor on conv and dense kernels.
        name: model name; default "tiny_cnn".

    Returns:
        `keras.Model` from float images `(batch, *input_shape)` to float32 logits.

    Raises:
        ValueError: non-positive width or fewer than 2 classes.
    """
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be positive. Received: {width_multiplier!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2. Received: {num_classes!r}")
    regularizer = keras.regularizers.L2(weight_decay) if weight_decay else None
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for i, filters in enumerate((16, 32), start=1):
        x = layers.Conv2D(max(1, round(filters * width_multiplier)), 3, padding="same", use_bias=False,
                          kernel_initializer="he_uniform", kernel_regularizer=regularizer, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.Activation("relu", name=f"block{i}_relu")(x)
        if i == 1:
            x = layers.MaxPooling2D(2, name="block1_pool")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, kernel_regularizer=regularizer, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name or "tiny_cnn")


def _check_resnet20(config):
    if config.width_multiplier != int(config.width_multiplier):
        raise ValueError(f"resnet20 needs an integer width_multiplier. Received: {config.width_multiplier!r}")


def _check_resnet9(config):
    if config.batch_size % config.ghost_batch_splits:
        raise ValueError(
            f"ghost_batch_splits={config.ghost_batch_splits} must divide batch_size={config.batch_size}: "
            "each ghost batch normalizes batch_size / ghost_batch_splits examples (Page: 16 groups of 32 "
            "at batch 512).")
    if config.activation != "celu":
        try:
            keras.activations.get(config.activation)
        except ValueError:
            raise ValueError(f"Unknown activation {config.activation!r}: use celu or a Keras activation "
                             "name such as relu, gelu or elu.") from None


def _with_shift_decay(builder):
    def build(bn_shift_weight_decay, bn_shift_lr_multiplier, weight_decay, **kwargs):
        shift_decay = weight_decay / bn_shift_lr_multiplier if bn_shift_weight_decay else 0.0
        return builder(weight_decay=weight_decay, bn_shift_weight_decay=shift_decay, **kwargs)

    return build


# The models the `--model` flag names: builder, the config fields it takes, its checks.
# Every builder also takes `num_classes` and `input_shape` and returns a keras.Model
# from float images to float32 logits.
MODELS = {
    "resnet20": Kind(resnet20, ("width_multiplier", "dropout_rate", "weight_decay"), _check_resnet20,
                     "UMBC's widened ResNet-20 v1"),
    "resnet9": Kind(_with_shift_decay(resnet9), ("width_multiplier", "activation", "celu_alpha", "ghost_batch_splits",
                               "frozen_bn_scale", "logit_scale", "weight_decay", "prep", "pool_before_bn",
                               "bn_shift_weight_decay", "bn_shift_lr_multiplier", "pytorch_init"), _check_resnet9,
                    "David Page's ResNet-9"),
    "airbench": Kind(_with_shift_decay(airbench), ("width_multiplier", "logit_scale", "weight_decay",
                                                   "bn_shift_weight_decay", "bn_shift_lr_multiplier",
                                                   "pytorch_init"), None,
                     "Keller Jordan's airbench94 network"),
    "tiny_cnn": Kind(tiny_cnn, ("width_multiplier", "weight_decay"), None, "a two-block convnet for tests"),
}

POOLINGS = (None, "avg", "max")


def _application(name, builder):
    """A constructor of `builder`'s network in the style of `keras.applications`."""

    def constructor(include_top=True, weights=None, input_shape=(32, 32, 3), pooling=None, classes=10, **kwargs):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of None, 'avg', 'max'. Received: pooling={pooling!r}")
        if include_top and pooling is not None:
            raise ValueError("pooling applies to include_top=False (the head pools as the network does).")
        if weights is not None and not os.path.exists(weights):
            raise ValueError(f"weights={weights!r} does not exist: pass None (random initialization) or the path "
                             "of a haet model.keras or a .weights.h5 of this network.")
        if (weights is not None and needs_whitening(builder.__name__, kwargs.get("prep", "conv"))
                and kwargs.get("whitening_images") is None):
            # The whitening filters are among the weights loaded below.
            kwargs["whitening_images"] = np.zeros((1, *tuple(input_shape)), np.float32)
        model = builder(num_classes=classes, input_shape=tuple(input_shape), **kwargs)
        if weights is not None:
            _load_weights(model, weights, include_top)
        if include_top:
            return model
        pool = model.get_layer("pool")
        features = pool.input
        if pooling == "avg":
            features = layers.GlobalAveragePooling2D(name="avg_pool")(features)
        elif pooling == "max":
            features = layers.GlobalMaxPooling2D(name="max_pool")(features)
        return keras.Model(model.inputs, features, name=f"{model.name}_features")

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = f"""`{builder.__name__}` in the style of `keras.applications`.

    Args:
        include_top: with the classification head (global pooling, dense layer, logits);
            without it the model ends at the last stage's feature map.
        weights: None (random initialization), or the path of a haet `model.keras`
            (its network's weights are copied layer by layer, matching names and
            shapes; the uint8 input pipeline is left out) or of a `.weights.h5` saved
            from this network.
        input_shape: `(height, width, channels)` of the float images it takes
            (normalized as the weights were trained; `with_input_pipeline` adds the
            uint8 pipeline).
        pooling: without the top: None (the 4-D feature map), "avg" or "max" (2-D features).
        classes: logits of the head.
        **kwargs: the other arguments of `haet.models.{builder.__name__}` (width_multiplier...).

    Returns:
        `keras.Model` from float images `(batch, *input_shape)` to float32 logits
        `(batch, classes)`, or to features.

    Raises:
        ValueError: a pooling with the top, unknown pooling, missing weights file, or
            weights that do not fit (no layer in common, or a head of another size).
    """
    return constructor


def load_saved_model(path, what, fix, compile=False):
    """Loads a saved Keras model (a run folder's `model.keras`), with an error that says what is wrong.

    Keras reports a damaged `.keras` file as "File not found" and a file of another
    format with a paragraph about SavedModels; the message here names the flag and
    the file, says what the file is, and how to fix it.

    Args:
        path: the file (str).
        what: the file as the message names it (e.g. "--init_from='m.keras'").
        fix: the last sentence of the message: what to do instead.
        compile: as `keras.saving.load_model` (False: no optimizer state restored).

    Returns:
        The `keras.Model`.

    Raises:
        ValueError: not a file, or a file Keras cannot load (damaged, another format,
            a model of custom layers this process has not registered).
    """
    if not os.path.isfile(path):
        raise ValueError(f"{what} is not a file. {fix}")
    try:
        return keras.saving.load_model(path, compile=compile)
    except Exception as e:  # Keras raises many kinds for a damaged or foreign file
        if path.endswith(".keras") and not zipfile.is_zipfile(path):
            reason = ("not a zip archive, as a .keras file is: truncated, overwritten, or not a saved Keras "
                      "model")
        else:
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        raise ValueError(f"{what} cannot be loaded as a Keras model ({reason}). {fix}") from None


def _load_weights(model, path, include_top):
    if not path.endswith(".keras"):
        model.load_weights(path)
        return
    source = backbone_of(load_saved_model(path, f"weights={path!r}",
                                          "Pass a haet model.keras or a .weights.h5 of this network."))
    copied, head = 0, {"logits", "dense"}
    for layer in model.layers:
        if not layer.weights:
            continue
        try:
            theirs = source.get_layer(layer.name)
        except ValueError:
            continue
        mine = [tuple(w.shape) for w in layer.weights]
        if [tuple(w.shape) for w in theirs.weights] != mine:
            if layer.name in head and include_top:
                raise ValueError(f"{path}'s head {layer.name!r} has shapes {[tuple(w.shape) for w in theirs.weights]}, "
                                 f"this model's {mine}: pass classes= as trained, or include_top=False.")
            continue
        layer.set_weights(theirs.get_weights())
        copied += 1
    if not copied:
        raise ValueError(f"No layer of {path} ({source.name}) matches this model by name and shape.")


ResNet20 = _application("ResNet20", resnet20)
ResNet9 = _application("ResNet9", resnet9)
Airbench = _application("Airbench", airbench)
TinyCNN = _application("TinyCNN", tiny_cnn)


# How the uint8 input is normalized (`with_input_pipeline`).
INPUT_NORMALIZATIONS = ("pixel_mean", "channel_standardize")

FIELDS = (
    Field("model", "resnet20", "The network. " + fields.table_help(MODELS) + ".",
          fields.one_of(MODELS, "model")),
    Field("width_multiplier", 6.0, "Channels x this (resnet20: an integer; its filters are (16, 32, 64) x it).",
          fields.positive()),
    Field("dropout_rate", 0.25, "resnet20: dropout rate at each of UMBC's nine sites, in [0, 1).",
          fields.in_range(0, 1, high_open=True)),
    Field("weight_decay", 1e-4, "L2 factor on conv and dense kernels: loss += weight_decay * sum(w**2).",
          fields.at_least(0)),
    Field("activation", "celu", "resnet9: celu (alpha --celu_alpha) or a Keras activation name (relu, gelu...)."),
    Field("celu_alpha", 0.3, "resnet9: CELU alpha (> 0).", fields.positive()),
    Field("ghost_batch_splits", 1, "resnet9: batch-norm groups per training batch, dividing --batch_size "
          "(1: plain batch norm).", fields.positive(integer=True)),
    Field("frozen_bn_scale", True, "resnet9: batch-norm scales fixed at 1."),
    Field("logit_scale", 0.125, "resnet9, airbench: logits multiplied by this (> 0; Page 1/8 then 1/16, "
          "airbench 1/9).", fields.positive()),
    Field("prep", "conv", "resnet9: the first block, conv (dawn.py's 3x3 conv-BN-act) or whitening (the bag "
          "of tricks': a frozen PCA whitening of 3x3 patches computed from the training images, then a 1x1 "
          "conv-BN-act).", fields.one_of(RESNET9_PREPS, "prep")),
    Field("pool_before_bn", False, "resnet9: conv-pool-BN-act in the pooling layers (bag of tricks) instead of "
          "conv-BN-act-pool."),
    Field("bn_shift_weight_decay", False, "resnet9, airbench: L2 weight decay on the batch-norm shifts too, of "
          "weight_decay / bn_shift_lr_multiplier (learning rate x decay as the kernels', as Page)."),
    Field("pytorch_init", False, "resnet9, airbench: conv and dense kernels initialized as PyTorch's "
          "nn.Conv2d / nn.Linear defaults, uniform in +-1/sqrt(fan_in) (Page's and airbench's code; airbench: "
          "its dense head, the convs being identity-initialized anyway); off: he_uniform convs and Glorot-uniform "
          "dense layers."),
    Field("whitening_bias_epochs", 3.0, "airbench: epochs during which the whitening layer's bias learns "
          "(then its gradient is stopped); 0: always.", fields.at_least(0)),
    Field("input_normalization", "pixel_mean", "pixel_mean: subtract the training images' per-pixel mean; "
          "channel_standardize: per-channel mean and standard deviation.", fields.one_of(INPUT_NORMALIZATIONS)),
    Field("init_from", None, "A saved model.keras to fine-tune (same --model and --width_multiplier): its "
          "backbone is copied by layer name, the head is new; use a lower learning rate."),
    Field("freeze_stages", 0, "With --init_from: leading backbone stages kept frozen (resnet9: prep, layer1, "
          "layer2, layer3; resnet20: stem, stage1, stage2, stage3).", fields.at_least(0, integer=True)),
    Field("ensemble_members", 1, "Independent copies of the network trained together in one compiled step "
          "within the one budget, each with its own initialization, data order and augmentation draws, on "
          "--batch_size images each per step; evaluated as the mean of their probabilities (the record also "
          "has each member's accuracy). 1: a single network.", fields.positive(integer=True)),
)


def check_config(config):
    """Checks the model settings of a run config (see `FIELDS`).

    Raises:
        ValueError: a setting the chosen model cannot use, naming the value.
    """
    kind = fields.choose(MODELS, "model", config.model)
    if kind.check:
        kind.check(config)
    only_resnet9 = [f"--{name}" for name, default in (("prep", "conv"), ("pool_before_bn", False))
                    if getattr(config, name) != default]
    if config.model != "resnet9" and only_resnet9:
        raise ValueError(f"{', '.join(only_resnet9)} apply to --model=resnet9, not {config.model}.")
    for name in ("bn_shift_weight_decay", "pytorch_init"):
        if getattr(config, name) and config.model not in ("resnet9", "airbench"):
            raise ValueError(f"--{name} applies to --model=resnet9 or airbench, not {config.model}.")
    if config.ensemble_members > 1 and config.init_from is not None:
        raise ValueError(f"--init_from would start all {config.ensemble_members} ensemble members from the same "
                         "weights: fine-tune one network (--ensemble_members=1), or train the ensemble from "
                         "random initializations.")
    if config.freeze_stages and not config.init_from:
        raise ValueError("freeze_stages needs --init_from (a trained model to fine-tune).")
    stages = STAGES.get(config.model, ())
    if config.freeze_stages > len(stages):
        raise ValueError(f"freeze_stages must be in [0, {len(stages)}] for {config.model}. "
                         f"Received: {config.freeze_stages}")


def build_backbone(config, num_classes, input_shape, whitening_images=None, name=None):
    """The classifier `config.model` of `MODELS`, from float images to float32 logits.

    `whitening_images`: float `(N, H, W, C)` training images normalized as the
    backbone's input, for resnet9 with `prep="whitening"` (else unused). `name`: the
    model's name (default the builder's)."""
    extra = {"whitening_images": whitening_images} if config.model in WHITENED_MODELS else {}
    if name is not None:
        extra["name"] = name
    kind = fields.choose(MODELS, "model", config.model)
    return kind.build(**{arg: getattr(config, arg) for arg in kind.args}, num_classes=num_classes,
                      input_shape=input_shape, **extra)


def build_backbones(config, num_classes, input_shape, whitening_images=None):
    """The `config.ensemble_members` networks of `build_backbone`, drawn one after the
    other from the seeded generators (each its own initialization), named
    `<model>_member<m>` when there are several."""
    if config.ensemble_members == 1:
        return [build_backbone(config, num_classes, input_shape, whitening_images)]
    return [build_backbone(config, num_classes, input_shape, whitening_images, name=f"{config.model}_member{m}")
            for m in range(config.ensemble_members)]


def build_model(name, **kwargs):
    """Calls the model function `MODELS[name].build` with `kwargs`.

    Raises:
        ValueError: for an unknown name.
    """
    return fields.choose(MODELS, "model", name).build(**kwargs)


def with_input_pipeline(backbone, mean, augmentation=None, variance=None, name=None):
    """Wraps `backbone` so that it takes raw uint8 images.

    Pipeline: cast to float, scale to [0, 1], normalize with the training images'
    statistics, then `augmentation` (active in training only), then `backbone`. The
    saved model thus classifies raw images with no outside preprocessing.
    - `mean` of shape `(H, W, C)`, `variance` None: subtract the per-pixel mean
      (UMBC: `x / 255 - mean(x_train / 255, axis=0)`);
    - `mean` and `variance` of shape `(C,)`: per-channel standardization
      (Page's ResNet-9: `(x / 255 - mean_c) / std_c`).

    Args:
        backbone: `keras.Model` from float images `(batch, H, W, C)` to logits.
        mean: float array, `(H, W, C)` or `(C,)`, on the [0, 1] scale.
        augmentation: a layer applied in training, or None.
        variance: None (unit variance) or float array shaped like `mean`.
        name: model name; default the backbone's.

    Returns:
        `keras.Model` from uint8 images `(batch, H, W, C)` to float32 logits.

    Raises:
        ValueError: if `mean` is neither per-pixel nor per-channel for the
            backbone's input, or `variance` is shaped differently.
    """
    inputs, x = _normalized_input(tuple(backbone.input_shape[1:]), mean, variance)
    if augmentation is not None:
        x = augmentation(x)
    outputs = backbone(x)
    return keras.Model(inputs, outputs, name=name or backbone.name)


def input_statistics_of(model):
    """The `(mean, variance)` a `with_input_pipeline` model (or `EnsembleModel`)
    normalizes its [0, 1]-scaled images with: float32 arrays of shape `(H, W, C)`
    (per pixel) or `(C,)` (per channel); None for a model without that pipeline."""
    try:
        layer = model.get_layer("normalize")
    except ValueError:
        return None
    if not isinstance(layer, layers.Normalization) or layer.input_mean is None:
        return None
    return np.asarray(layer.input_mean, np.float32), np.asarray(layer.input_variance, np.float32)


def _normalized_input(image_shape, mean, variance):
    """The uint8 input and the rescaled, normalized images of `with_input_pipeline`."""
    mean = np.asarray(mean, dtype=np.float32)
    if mean.shape == image_shape:
        axis = (1, 2, 3)
    elif mean.shape == image_shape[-1:]:
        axis = -1
    else:
        raise ValueError(
            f"mean has shape {mean.shape}, the model takes images of shape {image_shape}: use "
            "the training images' mean over axis 0 (per pixel) or over axes 0-2 (per channel)."
        )
    variance = np.ones_like(mean) if variance is None else np.asarray(variance, dtype=np.float32)
    if variance.shape != mean.shape:
        raise ValueError(f"variance has shape {variance.shape}, mean {mean.shape}; they must match.")
    inputs = keras.Input(shape=image_shape, dtype="uint8", name="uint8_images")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = layers.Normalization(axis=axis, mean=mean, variance=variance, name="normalize")(x)
    return inputs, x


# Ensembles trained in one step. The mechanism is one Keras model with N branches: it
# runs under both backends with every layer, recipe and averager haet has, and saves
# as any Keras model. Stacked (vmapped) parameters would be JAX-only, grouped
# convolutions would need every layer rewritten; `scripts/bench_ensembles.py` measures
# the branches against N separate steps (and a vmapped member under JAX).


@keras.saving.register_keras_serializable(package="haet")
class MemberBatch(layers.Layer):
    """The rows of a batch that ensemble member `member` of `members` sees.

    Training: the batch holds `members` equal blocks of rows, member-major (the
    engine gathers each member's own images, in its own order, into block
    `member`); this layer returns block `member`, `(batch / members, ...)`.
    Inference: every member sees every row, so the input is returned as it is.

    Raises:
        ValueError: `member` outside [0, members) at construction; in training, a
            batch whose row count (when known) is not a multiple of `members`.
    """

    def __init__(self, members, member, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(members, int) and members >= 1 and isinstance(member, int) and 0 <= member < members):
            raise ValueError(f"member must be in [0, members) and members >= 1. Received: member={member!r}, "
                             f"members={members!r}")
        self.members, self.member = members, member

    def call(self, x, training=False):
        if not training or self.members == 1:
            return x
        total = ops.shape(x)[0]
        if isinstance(total, int) and total % self.members:
            raise ValueError(f"A training batch of an ensemble of {self.members} holds one block of rows per "
                             f"member; {total} rows do not split into {self.members} blocks.")
        rows = total // self.members
        return x[self.member * rows:(self.member + 1) * rows]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "members": self.members, "member": self.member}


@keras.saving.register_keras_serializable(package="haet")
class MemberAverage(layers.Layer):
    """Joins the members' logits, each `(rows, classes)`.

    Training: their concatenation over rows, `(members * rows, classes)`, block m
    member m's logits on its own rows (each member's loss is computed on its own
    images). Inference: the ensemble's prediction, the log of the mean of the
    members' softmax probabilities, float32 `(rows, classes)`: its softmax is
    the averaged probabilities (Lakshminarayanan et al. 2017, deep ensembles), so
    the model is a classifier returning logits like any other.
    """

    def call(self, logits, training=False):
        logits = [ops.cast(x, "float32") for x in logits]
        if training:
            return ops.concatenate(logits, axis=0)
        # log(mean of the softmaxes) as a logsumexp of log-softmaxes: no log(0) where a
        # probability underflows.
        log_p = ops.stack([ops.log_softmax(x, axis=-1) for x in logits])
        return ops.logsumexp(log_p, axis=0) - float(np.log(len(logits)))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


@keras.saving.register_keras_serializable(package="haet")
class EnsembleModel(keras.Model):
    """`members` classifiers trained together in one step: a functional model from
    uint8 images `(batch, H, W, C)` to float32 logits `(batch, classes)` (built by
    `ensemble_with_input_pipeline`).

    - Training (`training=True`, what the engine and `fit` run): the batch is
      `members` blocks of rows; member m trains on block m (`MemberBatch`), with
      its own weights, batch-norm statistics and augmentation draws; the loss
      minimized is the sum of the members' losses (each member's gradient is that
      of its own loss, as if trained alone), and the loss reported (metrics,
      history) is their mean. They share the optimizer's state that is not per
      variable: its step count and, under mixed_float16, the loss scale (a step
      that overflows in one member is skipped for all).
    - Inference: every member sees every image; the logits are the log of the
      members' mean softmax probabilities (`MemberAverage`).
    - `member_model(m)`: member m alone as a uint8-input classifier sharing the
      ensemble's layers; `members_model()`: every member's logits at once
      (evaluation scores the ensemble and each member from one pass).
    """

    def __init__(self, *args, **kwargs):
        # Functional arguments only, so `keras.saving.load_model` revives it as functional.
        super().__init__(*args, **kwargs)
        self._member_models = {}
        self._members_model = None

    @property
    def ensemble_members(self):
        """The number of members (int)."""
        return sum(isinstance(layer, MemberBatch) for layer in self.layers)

    def member_backbones(self):
        """The members' networks (float images to logits), in member order."""
        return [layer for layer in self.layers if isinstance(layer, keras.Model)]

    def member_model(self, member):
        """Member `member` alone: uint8 images to its float32 logits, sharing this
        model's layers and variables (made once per member).

        Raises:
            ValueError: `member` outside [0, ensemble_members).
        """
        if not (isinstance(member, int) and 0 <= member < self.ensemble_members):
            raise ValueError(f"member must be in [0, {self.ensemble_members}). Received: {member!r}")
        if member not in self._member_models:
            inputs, x = self._normalized_inputs()
            self._member_models[member] = keras.Model(inputs, self.member_backbones()[member](x),
                                                      name=f"{self.name}_member{member}")
        return self._member_models[member]

    def _normalized_inputs(self):
        inputs = keras.Input(shape=self.input_shape[1:], dtype="uint8", name="uint8_images")
        return inputs, self.get_layer("normalize")(self.get_layer("rescale")(inputs))

    def members_model(self):
        """Every member's logits from one call: uint8 images `(batch, H, W, C)` to
        `(batch, members, classes)` logits (the members' compute dtype), sharing this
        model's layers and variables (made once). The ensemble's own output is the
        log of the mean over axis 1 of their softmax probabilities."""
        if self._members_model is None:
            inputs, x = self._normalized_inputs()
            logits = ops.stack([backbone(x) for backbone in self.member_backbones()], axis=1)
            self._members_model = keras.Model(inputs, logits, name=f"{self.name}_members")
        return self._members_model

    def member_weights(self, member, weights):
        """Member `member`'s share of `(trainable, non_trainable)` value lists of this
        model (the form `haet.engine.Predictor` takes), in `member_model`'s order."""
        return self.weights_of(self.member_model(member), weights)

    def weights_of(self, sub, weights):
        """The share of `(trainable, non_trainable)` value lists of this model that
        `sub` (`member_model(m)` or `members_model()`) takes, in `sub`'s order."""
        out = []
        for ours, values, theirs in ((self.trainable_variables, weights[0], sub.trainable_variables),
                                     (self.non_trainable_variables, weights[1], sub.non_trainable_variables)):
            index = {id(v): i for i, v in enumerate(ours)}
            out.append([values[index[id(v)]] for v in theirs])
        return tuple(out)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        total = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        members = self.ensemble_members
        if not training or members == 1 or total is None:
            return total
        # Keras' loss is the data loss averaged over all rows (the members' mean) plus
        # every member's weight penalty. Minimized: the sum of the members' losses;
        # reported: their mean (stop_gradient changes the value, not the gradient). The
        # penalty is summed as Keras summed it (under a TensorFlow distribution strategy
        # divided by the replicas), so `total - penalty` is exactly the data loss.
        penalty = sum((ops.cast(self._aggregate_additional_loss(loss), "float32") for loss in self.losses),
                      ops.zeros((), "float32"))
        data = total - penalty
        minimized = members * data + penalty
        reported = data + penalty / members
        return minimized + ops.stop_gradient(reported - minimized)


def ensemble_with_input_pipeline(backbones, mean, augmentation=None, variance=None, name=None):
    """An `EnsembleModel` of `backbones` (each float images to logits, same input and
    classes), taking raw uint8 images: the input pipeline of `with_input_pipeline`
    (rescale, normalize, `augmentation` in training), then the members.

    Returns:
        `EnsembleModel` from uint8 images `(batch, H, W, C)` to float32 logits.

    Raises:
        ValueError: fewer than one backbone, backbones with other input shapes or
            class counts, or `mean`/`variance` as `with_input_pipeline`.
    """
    backbones = list(backbones)
    if not backbones:
        raise ValueError("An ensemble needs at least one member.")
    shapes = {(tuple(b.input_shape[1:]), b.output_shape[-1]) for b in backbones}
    if len(shapes) != 1:
        raise ValueError(f"Ensemble members must take the same images and classes. Received: {sorted(shapes)}")
    inputs, x = _normalized_input(tuple(backbones[0].input_shape[1:]), mean, variance)
    if augmentation is not None:
        x = augmentation(x)
    members = len(backbones)
    logits = [backbone(MemberBatch(members, m, name=f"member{m}_batch")(x)) for m, backbone in enumerate(backbones)]
    outputs = MemberAverage(name="ensemble_average")(logits)
    return EnsembleModel(inputs, outputs, name=name or f"ensemble_of_{members}")


def for_every_member(model, batch):
    """`batch` (any array, rows first) repeated once per member of an `EnsembleModel`,
    so that in training mode every member takes all of it (`MemberBatch` gives member
    m block m); `batch` itself for a single network."""
    members = getattr(model, "ensemble_members", 1)
    return np.concatenate([batch] * members) if members > 1 else batch


def backbones_of(model):
    """Every classifier inside `model`: an ensemble's members, else `[backbone_of(model)]`."""
    if isinstance(model, EnsembleModel):
        return model.member_backbones()
    return [backbone_of(model)]
