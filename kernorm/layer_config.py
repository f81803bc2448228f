"""`get_config` made of a layer's constructor arguments, for kernorm's layers and its zoo's."""

import keras
from keras import constraints, initializers, regularizers

#: How a config writes an argument, by the last word of its name; other arguments are written as they are.
SERIALIZERS = {
    "initializer": initializers.serialize,
    "regularizer": regularizers.serialize,
    "constraint": constraints.serialize,
    "activation": keras.activations.serialize,
}


def serialize(name, value):
    """The argument `name` as a config holds it: an initializer, regularizer, constraint or activation (by the
    last word of `name`) serialized, anything else as it is."""
    serializer = SERIALIZERS.get(name.rsplit("_", 1)[-1])
    return value if serializer is None else serializer(value)


class ArgumentsConfig:
    """A mixin for a layer whose config is its constructor's arguments, kept as attributes of their names.

    Put it before `keras.layers.Layer` among the bases, and name the arguments in `config_arguments`.
    """

    #: The arguments `get_config` adds to the base layer's, in this order; each is the layer's attribute of
    #: that name, written by `serialize`.
    config_arguments = ()

    def get_config(self):
        config = {name: serialize(name, getattr(self, name)) for name in self.config_arguments}
        return {**super().get_config(), **config}
