"""ResNets with the norm as a constructor argument: the CIFAR depths and the ImageNet depths of He et al."""

import keras

from . import common, norms

#: ImageNet ResNets: depth -> (block, blocks per stage). Widths 64, 128, 256, 512.
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
#: The CIFAR depths of He et al. 2016, Table 6. Any depth 6n + 2 builds.
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
BOTTLENECK_EXPANSION = 4
#: The norms' epsilon unless `norm_kwargs` names one: batch norm's in torchvision
#: (PyTorch's default for all its norm layers) and in He et al.'s Torch code.
EPSILON = 1e-5


def resnet(
    depth,
    input_shape,
    num_classes,
    norm="batch",
    norm_kwargs=None,
    zero_init_residual=False,
    variant=None,
    base_filters=None,
    shortcut=None,
    activation="relu",
    classifier_activation=None,
    name=None,
):
    """A ResNet (v1: Conv -> norm -> activation, the residual added before the last activation).

    - CIFAR ResNets (depth 6n + 2: 20, 32, 44, 56, 110, ...): a 3x3 stem of 16
      filters and three stages of n basic blocks with 16, 32 and 64 filters;
      the first block of stages 2 and 3 halves the resolution. Shortcuts are
      parameter-free by default (option A: subsample and pad with zero
      channels), as in the paper: ResNet-20 has 0.27M parameters.
    - ImageNet ResNets (18, 34 with basic blocks; 50, 101, 152 with bottleneck
      blocks): a 7x7 stride-2 stem of 64 filters, a 3x3 stride-2 max pool and
      four stages of 64, 128, 256 and 512 filters (x4 at the bottleneck
      output). The stride sits on the bottleneck's 3x3 convolution (as in
      torchvision's "v1.5"), and shortcuts that change shape are a 1x1
      convolution and a norm (option B).

    The conventions follow the reference networks, so that torchvision's
    weights convert exactly (`kernorm.models.convert`): strided convolutions
    pad `kernel_size // 2` on every side (Keras's "same" would pad (0, 1) on
    even sizes and shift the sampling grid), the stem's max pool pads one
    pixel on every side and ignores it (PyTorch's `padding=1`), and norms
    given by name take `epsilon=1e-5` unless `norm_kwargs` sets one. Every
    convolution followed by a norm has no bias. Depths 50 and 152 are also
    6n + 2: they build the ImageNet network unless `variant="cifar"`.

    Args:
        depth: number of weighted layers, e.g. 20 or 50.
        input_shape: `(height, width, channels)` of float images.
        num_classes: number of output logits.
        norm: a name from `kernorm.norm_names()` (see `kernorm.models.norms`
            for what each normalizes over in a CNN), a Layer class, a callable
            returning a layer, a Keras config dict, or None.
        norm_kwargs: dict of extra arguments for every norm layer; the
            epsilon is 1e-5 (`EPSILON`) unless it names one.
        zero_init_residual: initialise the scale of the last norm of every
            residual block to zero, so that each block starts as the identity
            (Goyal et al. 2017).
        variant: "cifar" or "imagenet"; None picks by depth.
        base_filters: filters of the first stage (16 for CIFAR, 64 for
            ImageNet); the later stages double it. Small values make small
            test networks.
        shortcut: "pad" (option A) or "projection" (option B) for the shortcuts
            that change shape; None: "pad" for CIFAR, "projection" for ImageNet.
        activation: the activation after each norm.
        classifier_activation: activation of the head; None gives logits.
        name: the model's name; `resnet{depth}` by default.

    Returns:
        A functional `keras.Model` mapping `(batch, *input_shape)` to `(batch, num_classes)`.

    Reference:
        - [He et al., 2016](https://arxiv.org/abs/1512.03385).
    """
    depth = common.positive_int(depth, "depth")
    variant = _variant(depth, variant)
    shortcut = shortcut or ("pad" if variant == "cifar" else "projection")
    if shortcut not in ("pad", "projection"):
        raise ValueError(f"Expected `shortcut` to be 'pad' or 'projection'. Received: shortcut={shortcut!r}")
    input_shape = common.image_shape(input_shape)
    base_filters = common.positive_int(base_filters or (16 if variant == "cifar" else 64), "base_filters")
    norm_kwargs = norms.with_default_epsilon(norm, norm_kwargs, EPSILON)
    builder = _Builder(norm, norm_kwargs, activation, zero_init_residual, shortcut)

    inputs = keras.Input(input_shape, name="inputs")
    if variant == "cifar":
        x = builder.conv_norm_act(inputs, base_filters, 3, 1, "stem")
        stages = [("basic", (depth - 2) // 6, base_filters * 2**i) for i in range(3)]
    else:
        x = builder.conv_norm_act(inputs, base_filters, 7, 2, "stem")
        # PyTorch's max pool (3, stride 2, padding 1) takes windows centred on
        # pixels 0, 2, 4, ...: a stride-1 pool whose "same" padding is one
        # ignored pixel on every side, subsampled. Zero padding would be exact
        # only after a non-negative activation.
        x = keras.layers.MaxPooling2D(3, strides=1, padding="same", name="stem_pool_window")(x)
        x = keras.layers.MaxPooling2D(1, strides=2, name="stem_pool")(x)
        block, counts = IMAGENET_DEPTHS[depth]
        stages = [(block, count, base_filters * 2**i) for i, count in enumerate(counts)]
    for s, (block, count, filters) in enumerate(stages, start=1):
        for b in range(1, count + 1):
            stride = 2 if s > 1 and b == 1 else 1
            x = getattr(builder, block)(x, filters, stride, f"stage{s}_block{b}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = common.head(x, num_classes, classifier_activation)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def _variant(depth, variant):
    if variant is None:
        if depth in IMAGENET_DEPTHS:
            return "imagenet"
        if depth >= 8 and (depth - 2) % 6 == 0:
            return "cifar"
        raise ValueError(
            f"Unsupported ResNet depth {depth}: expected one of the ImageNet depths "
            f"{sorted(IMAGENET_DEPTHS)} or a CIFAR depth 6n + 2 such as {list(CIFAR_DEPTHS)}."
        )
    if variant == "imagenet" and depth not in IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet ResNets have depth {sorted(IMAGENET_DEPTHS)}. Received: depth={depth}")
    if variant == "cifar" and (depth < 8 or (depth - 2) % 6):
        raise ValueError(f"CIFAR ResNets have depth 6n + 2 (20, 32, 44, 56, 110, ...). Received: depth={depth}")
    if variant not in ("cifar", "imagenet"):
        raise ValueError(f"Expected `variant` to be 'cifar', 'imagenet' or None. Received: variant={variant!r}")
    return variant


class _Builder:
    """Adds ResNet layers to a functional graph with one norm configuration."""

    def __init__(self, norm, norm_kwargs, activation, zero_init_residual, shortcut):
        self.norm = norm
        self.norm_kwargs = dict(norm_kwargs or {})
        self.activation = activation
        self.shortcut = shortcut
        self.use_bias = norms.is_identity(norm)
        self.last_norm_kwargs = self.norm_kwargs
        if zero_init_residual:
            self.last_norm_kwargs = {**self.norm_kwargs, **_zero_scale(norm, self.norm_kwargs)}

    def conv(self, x, filters, kernel_size, stride, name):
        padding = "same"
        if stride > 1 and kernel_size > 1:
            # The reference's symmetric padding; "same" pads (0, 1) on even sizes.
            x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
            padding = "valid"
        return keras.layers.Conv2D(
            filters, kernel_size, strides=stride, padding=padding, use_bias=self.use_bias,
            kernel_initializer="he_normal", name=f"{name}_conv",
        )(x)

    def conv_norm(self, x, filters, kernel_size, stride, name, last=False):
        x = self.conv(x, filters, kernel_size, stride, name)
        kwargs = self.last_norm_kwargs if last else self.norm_kwargs
        return norms.image_norm(self.norm, filters, kwargs, name=f"{name}_norm")(x)

    def conv_norm_act(self, x, filters, kernel_size, stride, name):
        x = self.conv_norm(x, filters, kernel_size, stride, name)
        return keras.layers.Activation(self.activation, name=f"{name}_act")(x)

    def basic(self, x, filters, stride, name):
        residual = self.conv_norm_act(x, filters, 3, stride, f"{name}_1")
        residual = self.conv_norm(residual, filters, 3, 1, f"{name}_2", last=True)
        return self.merge(x, residual, filters, stride, name)

    def bottleneck(self, x, filters, stride, name):
        residual = self.conv_norm_act(x, filters, 1, 1, f"{name}_1")
        residual = self.conv_norm_act(residual, filters, 3, stride, f"{name}_2")
        residual = self.conv_norm(residual, filters * BOTTLENECK_EXPANSION, 1, 1, f"{name}_3", last=True)
        return self.merge(x, residual, filters * BOTTLENECK_EXPANSION, stride, name)

    def merge(self, x, residual, filters, stride, name):
        if stride != 1 or x.shape[-1] != filters:
            if self.shortcut == "pad":
                x = ChannelPadShortcut(filters, stride, name=f"{name}_shortcut")(x)
            else:
                x = self.conv_norm(x, filters, 1, stride, f"{name}_shortcut")
        x = keras.layers.Add(name=f"{name}_add")([x, residual])
        return keras.layers.Activation(self.activation, name=f"{name}_out")(x)


def _zero_scale(norm, norm_kwargs):
    """The norm argument that initialises its scale to zero, or {} for a norm without a scale."""
    probe = norms.image_norm(norm, 64, norm_kwargs)
    config = probe.get_config()
    for argument in ("gamma_initializer", "scale_initializer"):
        if argument in config and config.get("scale", True) is not False:
            return {argument: "zeros"}
    return {}


@keras.saving.register_keras_serializable(package="kernorm")
class ChannelPadShortcut(keras.layers.Layer):
    """The parameter-free ResNet shortcut (option A of He et al. 2016).

    Subsamples the spatial axes by `strides` and appends zero channels up to
    `filters`:

        outputs = concat([x[:, ::strides, ::strides, :], zeros], axis=-1)

    Args:
        filters: number of output channels, at least the input's.
        strides: spatial subsampling factor.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: a channels-last tensor `(batch, height, width, channels)`.

    Example:

    >>> layer = ChannelPadShortcut(32, 2)
    >>> layer(np.ones((1, 8, 8, 16), "float32")).shape
    (1, 4, 4, 32)

    Reference:
        - [He et al., 2016](https://arxiv.org/abs/1512.03385), section 3.3.
    """

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.filters = common.positive_int(filters, "filters")
        self.strides = common.positive_int(strides, "strides")

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None or input_shape[-1] > self.filters:
            raise ValueError(
                f"ChannelPadShortcut needs (batch, height, width, channels) inputs with at most "
                f"`filters`={self.filters} channels. Received: input_shape={tuple(input_shape)}"
            )

    def call(self, inputs):
        x = inputs[:, :: self.strides, :: self.strides, :]
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, self.filters - x.shape[-1]]])

    def compute_output_shape(self, input_shape):
        def subsample(size):
            return None if size is None else -(-size // self.strides)

        return (input_shape[0], subsample(input_shape[1]), subsample(input_shape[2]), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}
