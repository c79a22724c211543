"""numba_bn: batch normalisation for NumPy arrays with compiled Numba kernels."""

from . import compiling
from .capi import calls as _calls
from .capi import register_backend, use_compiled_calls
from .conventions import CONVENTIONS, torch_momentum
from .folding import fold_into, fold_into_next
from .functional import backward, batch_norm, forward_eval, forward_train
from .layer import BatchNorm
from .moments import Moments, moments, population_stats
from .norm_layers import GroupNorm, InstanceNorm, LayerNorm
from .norms import (
    group_norm,
    group_norm_backward,
    group_norm_forward,
    instance_norm,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
)
from .warmup import warmup

compiling.install()  # one line on stderr while a driver compiles (NUMBA_BN_QUIET=1: none)
_calls.use_from_environment()  # NUMBA_BN_COMPILED_CALLS=DIR: the plugin's compiled calls

try:  # one source for the version: the installed distribution's metadata (pyproject.toml's)
    from importlib.metadata import version as _distribution_version

    __version__ = _distribution_version("numba-bn")
except ImportError:  # PackageNotFoundError is one: a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "CONVENTIONS",
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "Moments",
    "backward",
    "batch_norm",
    "fold_into",
    "fold_into_next",
    "forward_eval",
    "forward_train",
    "group_norm",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm",
    "instance_norm_backward",
    "instance_norm_forward",
    "layer_norm",
    "layer_norm_backward",
    "layer_norm_forward",
    "moments",
    "population_stats",
    "register_backend",
    "torch_momentum",
    "use_compiled_calls",
    "warmup",
]
