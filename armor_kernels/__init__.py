"""ARMOR kernels: the packed 2:4 + block-diagonal format, its reference ops and fast backends.

Importing never fails for want of a GPU, Triton or the compiled extension.
"""

from . import dispatch, reference, sparse24
from ._ops import armor_linear, blockdiag_matmul, sparse24_matmul
from .formats import (
    FORMAT_VERSION,
    WRAPPER_BUDGET,
    ArmorFormatError,
    ArmorWeights,
    block_pair,
    choose_block_size,
    layer_bytes,
    valid_block_sizes,
    wrapper_overhead,
)
from .sparse24 import Sparse24Error

__all__ = [
    "FORMAT_VERSION",
    "WRAPPER_BUDGET",
    "ArmorFormatError",
    "ArmorWeights",
    "Sparse24Error",
    "armor_linear",
    "block_pair",
    "blockdiag_matmul",
    "choose_block_size",
    "dispatch",
    "layer_bytes",
    "reference",
    "sparse24",
    "sparse24_matmul",
    "valid_block_sizes",
    "wrapper_overhead",
]
__version__ = "0.1.0"
