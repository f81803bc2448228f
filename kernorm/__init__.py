"""kernorm: fast, numerically safe normalization layers for Keras 3 on TensorFlow."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kernorm import ops  # noqa: E402
from kernorm.add_norm import AddNorm  # noqa: E402
from kernorm.batch_normalization import BatchNorm, BatchNormalization  # noqa: E402
from kernorm.folding import fold_batch_norm, recalibrate_batch_norm  # noqa: E402
from kernorm.group_normalization import GroupNorm, GroupNormalization  # noqa: E402
from kernorm.layer_normalization import LayerNorm, LayerNormalization  # noqa: E402
from kernorm.registry import get_norm, norm_names  # noqa: E402
from kernorm.rms_normalization import RMSNorm, RMSNormalization  # noqa: E402
from kernorm.token_group_normalization import TokenGroupNormalization  # noqa: E402

# The zoo's layers register themselves on import, so that `import kernorm` alone loads any
# `.keras` file kernorm or its zoo wrote. The zoo imports no data pipeline (TFDS) to do it.
from kernorm import models  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AddNorm",
    "BatchNorm",
    "BatchNormalization",
    "GroupNorm",
    "GroupNormalization",
    "LayerNorm",
    "LayerNormalization",
    "RMSNorm",
    "RMSNormalization",
    "TokenGroupNormalization",
    "fold_batch_norm",
    "get_norm",
    "models",
    "norm_names",
    "ops",
    "recalibrate_batch_norm",
]
