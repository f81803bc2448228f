"""The kernorm model zoo: architectures whose normalization is a constructor argument.

    from kernorm import models
    model = models.resnet(20, (32, 32, 3), 10, norm="group")
    model = models.get("vit_tiny", input_shape=(32, 32, 3), num_classes=10, norm="batch")
    model = models.from_torchvision("resnet50", state_dict)  # pretrained weights

Every builder returns a functional `keras.Model` and takes `norm=` (a name from
`kernorm.norm_names()`, a Layer class, a callable returning a layer, a Keras
config dict, or None) and `norm_kwargs=`. `kernorm.models.norms` says what each
name normalizes over in CNNs, MLPs and Transformers.
"""

from . import convert
from .cnn import convnet, mlp
from .convert import from_timm, from_torchvision
from .norms import TokenGroupNormalization
from .recurrent import (
    MaskedRNN,
    NormalizedGRUCell,
    NormalizedLSTMCell,
    RecurrentBatchNormalization,
    rnn_classifier,
)
from .registry import get, names
from .resnet import ChannelPadShortcut, resnet
from .transformer import transformer_classifier, vit
from .transformer_layers import (
    ClassToken,
    FeedForward,
    MaskedGlobalAveragePooling1D,
    PaddingMask,
    PatchEmbedding,
    PositionEmbedding,
    SelectToken,
    SelfAttention,
    TransformerEncoderBlock,
)

__all__ = [
    "ChannelPadShortcut",
    "ClassToken",
    "FeedForward",
    "MaskedGlobalAveragePooling1D",
    "MaskedRNN",
    "NormalizedGRUCell",
    "NormalizedLSTMCell",
    "PaddingMask",
    "PatchEmbedding",
    "PositionEmbedding",
    "RecurrentBatchNormalization",
    "SelectToken",
    "SelfAttention",
    "TokenGroupNormalization",
    "TransformerEncoderBlock",
    "convert",
    "convnet",
    "from_timm",
    "from_torchvision",
    "get",
    "mlp",
    "names",
    "resnet",
    "rnn_classifier",
    "transformer_classifier",
    "vit",
]
