"""Recurrent models: normalized LSTM and GRU cells, recurrent batch norm, and a text classifier.

The cells take any norm in layer norm's place, as Ba et al. 2016 place it:
the input-to-hidden and the hidden-to-hidden pre-activations of the gates are
normalized separately (each sample over its features), and the LSTM's cell
state is normalized before the output tanh. `norm="batch"` is recurrent batch
norm (Cooijmans et al. 2016): the same positions, but each feature normalized
over the batch with statistics for each time step (`RecurrentBatchNormalization`).

Per-step statistics need each step's position and padding mask, which
`keras.layers.RNN` does not give its cell; `MaskedRNN` does. With the other
norms the cells run in `keras.layers.RNN` as well.
"""

import inspect

import keras
import tensorflow as tf
from keras import initializers

from kernorm import _private, ops, validation, weights
from kernorm.layer_config import ArgumentsConfig

from . import common, norms
from .transformer_layers import MaskedGlobalAveragePooling1D, PaddingMask

#: `max_steps` of the cells when none is given: per-step statistics for this many steps.
DEFAULT_MAX_STEPS = 128
#: Cooijmans et al. 2016 start the scale of recurrent batch norm at 0.1, away from the saturated tanh.
BATCH_NORM_GAMMA = 0.1
CELLS = ("lstm", "gru")


@keras.saving.register_keras_serializable(package="kernorm")
class RecurrentBatchNormalization(ArgumentsConfig, keras.layers.Layer):
    """Batch normalization of one time step, with statistics for each step (recurrent batch norm).

    **In training**, at step `t` each feature is normalized with the statistics
    of the batch at that step:

        outputs = gamma * (x_t - mean_t) / sqrt(var_t + epsilon) + beta

    where `mean_t` and the biased `var_t` run over the samples whose step `t` is
    real (not padding), and the moving statistics of step `t` are updated as

        moving_mean[t] = moving_mean[t] * momentum + mean_t * (1 - momentum)

    (likewise `moving_variance[t]`). A step with no real sample leaves them as
    they were. **In inference** `moving_mean[t]` and `moving_variance[t]` take
    the place of the batch statistics. Steps from `max_steps - 1` on share the
    last statistics; `gamma` and `beta` are shared by all steps.

    Inside an RNN loop, the statistics of each step are read after the previous
    step wrote them: the reads wait for the inputs, and the outputs for the
    writes, so a cell whose next state depends on these outputs orders them.

    Args:
        max_steps: number of steps with statistics of their own.
        momentum, epsilon, center, scale, beta_initializer, gamma_initializer,
            moving_mean_initializer, moving_variance_initializer,
            beta_regularizer, gamma_regularizer, beta_constraint,
            gamma_constraint: as in `kernorm.BatchNormalization`; the moving
            statistics are those of every step.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: `(batch, features)`, one time step.
        step: int scalar (keyword), the position of the step in its sequence.
        training: Python bool: batch statistics (True) or moving ones (False).
        mask: optional `(batch,)` bool; samples where it is False (padding) do
            not count towards the statistics.

    Example:

    >>> layer = RecurrentBatchNormalization(max_steps=16)
    >>> y = layer(np.random.rand(8, 4).astype("float32"), step=3, training=True)

    Reference:
        - [Cooijmans et al., 2016](https://arxiv.org/abs/1603.09025).
    """

    config_arguments = (
        "max_steps", "momentum", "epsilon", *weights.AFFINE_CONFIG, "moving_mean_initializer",
        "moving_variance_initializer",
    )  # fmt: skip

    def __init__(
        self, max_steps, momentum=0.99, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
        gamma_initializer="ones", moving_mean_initializer="zeros", moving_variance_initializer="ones",
        beta_regularizer=None, gamma_regularizer=None, beta_constraint=None, gamma_constraint=None, **kwargs,
    ):  # fmt: skip
        super().__init__(**kwargs)
        self.max_steps = common.positive_int(max_steps, "max_steps")
        self.momentum = validation.momentum(momentum)
        self.epsilon = validation.non_negative(epsilon, "epsilon")
        weights.set_affine_arguments(
            self, bool(center), bool(scale), beta_initializer, gamma_initializer, beta_regularizer, gamma_regularizer,
            beta_constraint, gamma_constraint,
        )
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                f"RecurrentBatchNormalization takes one time step, (batch, features). Received: {tuple(input_shape)}"
            )
        features = input_shape[-1]

        weights.add_affine_weights(self, (features,))
        statistics = (self.max_steps, features)
        self.moving_mean = weights.add_weight(self, "moving_mean", statistics, self.moving_mean_initializer, trainable=False)
        self.moving_variance = weights.add_weight(
            self, "moving_variance", statistics, self.moving_variance_initializer, trainable=False
        )
        self.input_spec = keras.layers.InputSpec(ndim=2, axes={-1: features})

    def call(self, inputs, step=None, training=None, mask=None):
        validation.float_inputs(inputs, self)
        if step is None:
            raise ValueError(f"Layer '{self.name}' needs `step`, the position of the time step in its sequence.")
        slot = tf.minimum(tf.cast(step, "int32"), self.max_steps - 1)
        if not (training and self.trainable):
            outputs = ops.normalize(
                inputs, tf.gather(self.moving_mean, slot), tf.gather(self.moving_variance, slot),
                self.gamma, self.beta, self.epsilon,
            )
            return tf.cast(outputs, self.compute_dtype)
        gamma = None if self.gamma is None else self.gamma[tf.newaxis]
        beta = None if self.beta is None else self.beta[tf.newaxis]
        outputs, mean, variance, count = ops.batch_norm(
            inputs, [0], gamma, beta, self.epsilon, validation.broadcast_mask(mask, inputs)
        )
        count = tf.reshape(count, [-1])
        with tf.control_dependencies([inputs]):
            for moving, statistic in ((self.moving_mean, mean), (self.moving_variance, variance)):
                row = ops.moving_average(tf.gather(moving, slot), tf.reshape(statistic, [-1]), self.momentum, count)
                moving.assign(tf.tensor_scatter_nd_update(moving, [[slot]], row[tf.newaxis]))
        # Reads placed after the writes (automatic control dependencies order them), and the outputs after the reads.
        with tf.control_dependencies([tf.identity(self.moving_mean), tf.identity(self.moving_variance)]):
            return tf.cast(tf.identity(outputs), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


class _NormalizedCell(ArgumentsConfig, keras.layers.Layer):
    """What the LSTM and GRU cells share: arguments, weights and the norms around the pre-activations."""

    #: How many gates the kernels hold side by side: 4 for the LSTM, 3 for the GRU.
    gates = None
    config_arguments = (
        "units", "norm", "norm_kwargs", "max_steps", "activation", "recurrent_activation", "kernel_initializer",
        "recurrent_initializer", "bias_initializer",
    )  # fmt: skip

    def __init__(
        self,
        units,
        norm="layer",
        norm_kwargs=None,
        max_steps=DEFAULT_MAX_STEPS,
        activation="tanh",
        recurrent_activation="sigmoid",
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = common.positive_int(units, "units")
        # A class or a partial is kept as the config of the layer it builds, so
        # that get_config is JSON; an unknown name fails here, not at build time.
        self.norm = norms.serializable(norm, norm_kwargs)
        self.norm_kwargs = dict(norm_kwargs or {})
        self.max_steps = common.positive_int(max_steps, "max_steps")
        self.activation = keras.activations.get(activation)
        self.recurrent_activation = keras.activations.get(recurrent_activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.recurrent_initializer = initializers.get(recurrent_initializer)
        self.bias_initializer = initializers.get(bias_initializer)

    def _build_kernels(self, input_shape, bias_shape, bias_initializer):
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(f"{type(self).__name__} takes (batch, features) at each step. Received: {tuple(input_shape)}")
        width = self.gates * self.units
        self.kernel = self.add_weight(
            shape=(input_shape[-1], width), name="kernel", initializer=self.kernel_initializer
        )
        self.recurrent_kernel = self.add_weight(
            shape=(self.units, width), name="recurrent_kernel", initializer=self.recurrent_initializer
        )
        self.bias = self.add_weight(shape=bias_shape, name="bias", initializer=bias_initializer)

    def _make_norm(self, features, name, shift=True):
        """A norm on `features` values per sample; `shift=False` leaves out its offset, where a bias stands in.

        The offset goes for norms given by name (Cooijmans et al. set it to 0
        for the same reason); a class, a partial or a config dict is used as
        given.
        """
        kwargs = dict(self.norm_kwargs)
        key = norms.norm_key(self.norm)
        if key == "batch":
            kwargs.setdefault("gamma_initializer", initializers.Constant(BATCH_NORM_GAMMA))
            if not shift:
                kwargs.setdefault("center", False)
            layer = RecurrentBatchNormalization(self.max_steps, name=name, **kwargs)
        else:
            if not shift and key in ("layer", "group", "instance"):
                kwargs.setdefault("center", False)
            layer = norms.vector_norm(self.norm, features, kwargs, name=name)
        # Built here: weights cannot be made inside the RNN's loop.
        layer.build((None, features))
        return layer

    def _normalize(self, layer, x, training, step, step_mask):
        if isinstance(layer, RecurrentBatchNormalization):
            if step is None:
                raise ValueError(
                    f"{type(self).__name__} with norm='batch' keeps statistics for each time step and needs the "
                    "position of each step: run it in kernorm.models.MaskedRNN, not keras.layers.RNN."
                )
            return layer(x, step=step, training=training, mask=step_mask)
        return layer(x, training=training)

    def _after_previous_step(self, inputs, states):
        """`inputs`, made to wait for the states, so per-step statistics are read after the last step wrote them."""
        with tf.control_dependencies(tf.nest.flatten(states)):
            return tf.identity(inputs)


@keras.saving.register_keras_serializable(package="kernorm")
class NormalizedLSTMCell(_NormalizedCell):
    """An LSTM cell with a norm on its pre-activations and its cell state (Ba et al. 2016).

        gates = N_x(x_t W) + N_h(h_{t-1} U) + b          # 4 * units: i, f, g, o
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(N_c(c_t))

    `N_x`, `N_h` and `N_c` are three norms of the kind `norm` names: "layer"
    normalizes each sample over the 4 * units pre-activations (over the units
    for `N_c`), "rms" the same without centring, "batch" each feature over the
    batch with statistics for each time step (`RecurrentBatchNormalization`,
    Cooijmans et al. 2016, scale initialized to 0.1), "none" nothing: then the
    cell is `keras.layers.LSTMCell`, with the same weights. Given by name,
    `N_x` and `N_h` have no offset (the bias `b` is theirs); `N_c` has one.

    Args:
        units: dimension of the hidden and cell states.
        norm: a name from `kernorm.norm_names()`, a Layer class, a callable
            returning a layer, a Keras config dict, or None.
        norm_kwargs: dict of extra arguments for the norms.
        max_steps: steps with batch statistics of their own (`norm="batch"`).
        activation: the activation of the candidate and of the output (tanh).
        recurrent_activation: the gates' activation (sigmoid).
        kernel_initializer: initializer for `W`, the input kernel.
        recurrent_initializer: initializer for `U`, the recurrent kernel.
        bias_initializer: initializer for `b`.
        unit_forget_bias: if True, add 1 to the forget gate's bias at
            initialization, as Keras does.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: `(batch, features)`, one time step.
        states: `[h, c]`, each `(batch, units)`.
        training: Python bool.
        step: int scalar, the position of the step; needed for `norm="batch"`.
        step_mask: optional `(batch,)` bool, False where the step is padding.

    Example:

    >>> layer = kernorm.models.MaskedRNN(NormalizedLSTMCell(64, norm="layer"), return_sequences=True)
    >>> y = layer(np.random.rand(2, 10, 8).astype("float32"))

    Reference:
        - [Ba et al., 2016](https://arxiv.org/abs/1607.06450).
        - [Cooijmans et al., 2016](https://arxiv.org/abs/1603.09025) (`norm="batch"`).
    """

    gates = 4
    config_arguments = (*_NormalizedCell.config_arguments, "unit_forget_bias")

    def __init__(self, units, norm="layer", norm_kwargs=None, max_steps=DEFAULT_MAX_STEPS, unit_forget_bias=True, **kwargs):
        super().__init__(units, norm, norm_kwargs, max_steps, **kwargs)
        self.unit_forget_bias = bool(unit_forget_bias)
        self.state_size = [self.units, self.units]
        self.output_size = self.units

    def build(self, input_shape):
        def forget_bias_initializer(_, *args, **kwargs):
            return keras.ops.concatenate([
                self.bias_initializer((self.units,), *args, **kwargs),
                initializers.get("ones")((self.units,), *args, **kwargs),
                self.bias_initializer((self.units * 2,), *args, **kwargs),
            ])  # fmt: skip

        bias_initializer = forget_bias_initializer if self.unit_forget_bias else self.bias_initializer
        self._build_kernels(input_shape, (4 * self.units,), bias_initializer)
        self.input_norm = self._make_norm(4 * self.units, "input_norm", shift=False)
        self.recurrent_norm = self._make_norm(4 * self.units, "recurrent_norm", shift=False)
        self.cell_norm = self._make_norm(self.units, "cell_norm")

    def call(self, inputs, states, training=None, step=None, step_mask=None):
        h_previous, c_previous = states[0], states[1]
        inputs = self._after_previous_step(inputs, states)

        def norm(layer, x):
            return self._normalize(layer, x, training, step, step_mask)

        gates = (
            norm(self.input_norm, keras.ops.matmul(inputs, self.kernel))
            + norm(self.recurrent_norm, keras.ops.matmul(h_previous, self.recurrent_kernel))
            + self.bias
        )
        i, f, g, o = keras.ops.split(gates, 4, axis=-1)
        c = self.recurrent_activation(f) * c_previous + self.recurrent_activation(i) * self.activation(g)
        h = self.recurrent_activation(o) * self.activation(norm(self.cell_norm, c))
        return h, [h, c]


@keras.saving.register_keras_serializable(package="kernorm")
class NormalizedGRUCell(_NormalizedCell):
    """A GRU cell with norms on its pre-activations (Ba et al. 2016), in Keras's `reset_after` form.

        x_z, x_r, x_n = split(x_t W)     h_z, h_r, h_n = split(h_{t-1} U)
        z, r = sigmoid(N_xg([x_z, x_r]) + N_hg([h_z, h_r]) + b_x[:2u] + b_h[:2u])
        n = tanh(N_xn(x_n) + b_x[2u:] + r * (N_hn(h_n) + b_h[2u:]))
        h_t = z * h_{t-1} + (1 - z) * n

    The gates' pre-activations are normalized together over their 2 * units
    values, input and recurrent parts separately, and the candidate's two parts
    each over their units. "layer", "rms", "batch" (statistics for each time
    step, `RecurrentBatchNormalization`) and "none" mean what they mean in
    `NormalizedLSTMCell`; with "none" the cell is `keras.layers.GRUCell` with
    `reset_after=True`, with the same weights. Given by name, the norms have no
    offset: the biases `b_x` and `b_h` stand in for them.

    Args:
        units: dimension of the hidden state.
        norm: a name from `kernorm.norm_names()`, a Layer class, a callable
            returning a layer, a Keras config dict, or None.
        norm_kwargs: dict of extra arguments for the norms.
        max_steps: steps with batch statistics of their own (`norm="batch"`).
        activation: the candidate's activation (tanh).
        recurrent_activation: the gates' activation (sigmoid).
        kernel_initializer: initializer for `W`, the input kernel.
        recurrent_initializer: initializer for `U`, the recurrent kernel.
        bias_initializer: initializer for the biases, `(2, 3 * units)`: `b_x`
            then `b_h`.
        **kwargs: base layer arguments such as `name`.

    Call arguments:
        inputs: `(batch, features)`, one time step.
        states: `[h]`, `(batch, units)`.
        training: Python bool.
        step: int scalar, the position of the step; needed for `norm="batch"`.
        step_mask: optional `(batch,)` bool, False where the step is padding.

    Reference:
        - [Ba et al., 2016](https://arxiv.org/abs/1607.06450).
        - [Cho et al., 2014](https://arxiv.org/abs/1406.1078).
        - [Cooijmans et al., 2016](https://arxiv.org/abs/1603.09025) (`norm="batch"`).
    """

    gates = 3

    def __init__(self, units, norm="layer", norm_kwargs=None, max_steps=DEFAULT_MAX_STEPS, **kwargs):
        super().__init__(units, norm, norm_kwargs, max_steps, **kwargs)
        self.state_size = self.units
        self.output_size = self.units

    def build(self, input_shape):
        self._build_kernels(input_shape, (2, 3 * self.units), self.bias_initializer)
        self.input_gate_norm = self._make_norm(2 * self.units, "input_gate_norm", shift=False)
        self.recurrent_gate_norm = self._make_norm(2 * self.units, "recurrent_gate_norm", shift=False)
        self.input_candidate_norm = self._make_norm(self.units, "input_candidate_norm", shift=False)
        self.recurrent_candidate_norm = self._make_norm(self.units, "recurrent_candidate_norm", shift=False)

    def call(self, inputs, states, training=None, step=None, step_mask=None):
        h_previous = states[0] if isinstance(states, (list, tuple)) else states
        inputs = self._after_previous_step(inputs, states)

        def norm(layer, x):
            return self._normalize(layer, x, training, step, step_mask)

        width = 2 * self.units
        x = keras.ops.matmul(inputs, self.kernel)
        h = keras.ops.matmul(h_previous, self.recurrent_kernel)
        input_bias, recurrent_bias = self.bias[0], self.bias[1]
        gates = (
            norm(self.input_gate_norm, x[:, :width]) + norm(self.recurrent_gate_norm, h[:, :width])
            + input_bias[:width] + recurrent_bias[:width]
        )
        z, r = keras.ops.split(self.recurrent_activation(gates), 2, axis=-1)
        candidate = self.activation(
            norm(self.input_candidate_norm, x[:, width:]) + input_bias[width:]
            + r * (norm(self.recurrent_candidate_norm, h[:, width:]) + recurrent_bias[width:])
        )
        h = z * h_previous + (1.0 - z) * candidate
        return h, [h]


@keras.saving.register_keras_serializable(package="kernorm")
class MaskedRNN(keras.layers.RNN):
    """`keras.layers.RNN` that also gives its cell each step's position and padding mask.

    A cell whose `call` takes `step` and `step_mask` (`NormalizedLSTMCell`,
    `NormalizedGRUCell`) gets at each step its position in the sequence (an
    int scalar: `t`, also when `go_backwards` runs the steps from the end) and
    the `(batch,)` mask of that step, or None without a mask. Recurrent batch
    norm needs both: statistics for each position, over the real samples only.
    Other cells run as in `keras.layers.RNN`, whose arguments this layer takes
    (`return_sequences`, `return_state`, `go_backwards`, `stateful`, `unroll`,
    ...); it works in `keras.layers.Bidirectional`. Positions count from 0 in
    each call, `stateful` or not.

    Args:
        cell: an RNN cell.
        **kwargs: the arguments of `keras.layers.RNN`.

    Call arguments:
        sequences: `(batch, time, features)`.
        initial_state: optional list of initial states.
        mask: optional `(batch, time)` bool, False at padding.
        training: Python bool.
    """

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if "step" not in inspect.signature(self.cell.call).parameters:
            return super().inner_loop(sequences, initial_state, mask, training)
        length = tf.shape(sequences)[1]
        if mask is not None:
            mask = tf.cast(mask, "bool")
        # Outside an unrolled loop the backend first runs the step once, at time 0, only for the output
        # shapes; in inference mode that run writes no statistics.
        shape_run = [not self.unroll]

        def step(inputs, states):
            *states, previous_output, count = states
            position = length - 1 - count if self.go_backwards else count
            step_mask = None if mask is None else tf.gather(mask, position, axis=1)
            first, shape_run[0] = shape_run[0], False
            output, new_states = self.cell(
                inputs, list(states), training=False if first else training, step=position, step_mask=step_mask
            )
            new_states = tf.nest.flatten(new_states)
            if step_mask is not None:
                # As the backend masks: a padded step keeps the states and repeats the last output (or gives zeros).
                real = step_mask[:, tf.newaxis]
                new_states = [tf.where(real, new, old) for new, old in zip(new_states, states)]
                output = tf.where(real, output, tf.zeros_like(output) if self.zero_output_for_mask else previous_output)
            return output, [*new_states, output, count + 1]

        # The mask goes to the step, not to the backend: the backend would mask the step counter too.
        batch = tf.shape(sequences)[0]
        no_output = tf.zeros((batch, self.cell.output_size), self.cell.compute_dtype)
        last_output, outputs, states = _private.rnn_loop()(
            step,
            sequences,
            [*initial_state, no_output, tf.constant(0)],
            go_backwards=self.go_backwards,
            unroll=self.unroll,
            input_length=sequences.shape[1],
            return_all_outputs=self.return_sequences,
        )
        return last_output, outputs, list(states)[:-2]


def _cell(kind, units, norm, norm_kwargs, max_steps, name):
    if kind == "lstm":
        return NormalizedLSTMCell(units, norm, norm_kwargs, max_steps, name=name)
    return NormalizedGRUCell(units, norm, norm_kwargs, max_steps, name=name)


def rnn_classifier(
    vocab_size,
    sequence_length,
    num_classes,
    cell="lstm",
    units=128,
    num_layers=1,
    bidirectional=False,
    dropout=0.0,
    norm="layer",
    norm_kwargs=None,
    embedding_dim=None,
    classifier_activation=None,
    name="rnn_classifier",
):
    """A recurrent text classifier: embeddings, normalized LSTM or GRU layers, masked mean pooling.

    Token embeddings, `num_layers` recurrent layers (`MaskedRNN` over a
    `NormalizedLSTMCell` or `NormalizedGRUCell`, in `keras.layers.Bidirectional`
    if `bidirectional`), the mean over the real tokens of the last layer's
    outputs, and a Dense head.

    Token id 0 is padding. The padding mask reaches the recurrence (a padded
    step leaves the states as they were), the norms (batch norm statistics
    count only real tokens) and the pooling, so appending padding changes
    neither the outputs at real tokens nor the pooled output nor the moving
    statistics.

    Args:
        vocab_size: number of token ids, padding (0) included.
        sequence_length: the longest sequence the pipeline gives; with
            `norm="batch"`, the steps that keep statistics of their own
            (longer sequences share the last step's).
        num_classes: number of output logits.
        cell: "lstm" or "gru".
        units: the state size of each recurrent layer (of each direction).
        num_layers: number of recurrent layers.
        bidirectional: run each layer both ways and concatenate the outputs.
        dropout: dropout rate on the embeddings, between recurrent layers and
            on the pooled features.
        norm: a name from `kernorm.norm_names()`, a Layer class, a callable
            returning a layer, a Keras config dict, or None. "layer"
            normalizes each sample over its features at each step; "batch"
            each feature over the real tokens of the batch at each step. See
            `NormalizedLSTMCell`.
        norm_kwargs: dict of extra arguments for every norm.
        embedding_dim: features of each token embedding; default `units`.
        classifier_activation: activation of the head; None gives logits.
        name: the model's name.

    Returns:
        A functional `keras.Model` mapping int32 token ids `(batch, length)` to
        `(batch, num_classes)`. The layer "sequence_output" gives the per-token
        features and "pool" the pooled ones.

    Raises:
        ValueError: for a `cell` other than "lstm" and "gru", an unknown norm
            name, or sizes and rates out of range.
        TypeError: for a `bidirectional` that is not a bool.
    """
    if cell not in CELLS:
        raise ValueError(f"Unknown cell {cell!r}. Known cells: {', '.join(CELLS)}.")
    vocab_size = common.positive_int(vocab_size, "vocab_size")
    sequence_length = common.positive_int(sequence_length, "sequence_length")
    units = common.positive_int(units, "units")
    num_layers = common.positive_int(num_layers, "num_layers")
    dropout = common.dropout_rate(dropout)
    embedding_dim = units if embedding_dim is None else common.positive_int(embedding_dim, "embedding_dim")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"Expected `bidirectional` to be a bool. Received: bidirectional={bidirectional!r}")

    tokens = keras.Input((None,), dtype="int32", name="token_ids")
    mask = PaddingMask(name="padding_mask")(tokens)
    x = keras.layers.Embedding(vocab_size, embedding_dim, name="token_embedding")(tokens)
    if dropout:
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    for i in range(1, num_layers + 1):
        rnn = MaskedRNN(
            _cell(cell, units, norm, norm_kwargs, sequence_length, name=f"{cell}_cell"),
            return_sequences=True,
            name=f"{cell}{i}",
        )
        if bidirectional:
            rnn = keras.layers.Bidirectional(rnn, name=f"bi{cell}{i}")
        x = rnn(x, mask=mask)
        if dropout and i < num_layers:
            x = keras.layers.Dropout(dropout, name=f"dropout{i}")(x)
    x = keras.layers.Identity(name="sequence_output")(x)
    x = MaskedGlobalAveragePooling1D(name="pool")(x, mask=mask)
    if dropout:
        x = keras.layers.Dropout(dropout, name="pool_dropout")(x)
    outputs = common.head(x, num_classes, classifier_activation)
    return keras.Model(tokens, outputs, name=name)
