"""numba_bn: batch normalisation for NumPy arrays with compiled Numba kernels."""

from . import compiling
from .capi import register_backend
from .conventions import CONVENTIONS, torch_momentum
from .folding import fold_into, fold_into_next
from .functional import backward, batch_norm, forward_eval, forward_train
from .layer import BatchNorm
from .moments import Moments, moments, population_stats
from .warmup import warmup

compiling.install()  # one line on stderr while a driver compiles (NUMBA_BN_QUIET=1: none)

__version__ = "0.1.0"

__all__ = [
    "CONVENTIONS",
    "BatchNorm",
    "Moments",
    "backward",
    "batch_norm",
    "fold_into",
    "fold_into_next",
    "forward_eval",
    "forward_train",
    "moments",
    "population_stats",
    "register_backend",
    "torch_momentum",
    "warmup",
]
