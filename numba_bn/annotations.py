"""Type aliases for the hints of the public API, each defined once.

Hints describe; they do not check: the checks of :mod:`numba_bn.checks` decide at run time and
raise with the argument's name. Importing this module costs nothing that ``import numpy`` has not
paid already (``numpy.typing`` reuses ``numpy._typing``).
"""

from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

#: A NumPy array or a CUDA array (anything with ``__cuda_array_interface__``: Numba device
#: arrays, CuPy arrays, torch CUDA tensors). ``Any``: CUDA arrays share no common type, and the
#: backends accept them by protocol, not by class.
Array: TypeAlias = Any

#: A host array, the kind of array the CPU-only functions (folding, layer norm) take and return.
HostArray: TypeAlias = npt.NDArray[Any]

#: A host array of float64 values: per-channel statistics and folding's ``(scale, shift)``.
Float64Array: TypeAlias = npt.NDArray[np.float64]

#: An mpi4py intracommunicator (``MPI.COMM_WORLD``); ``Any`` because mpi4py is imported lazily.
Comm: TypeAlias = Any

#: ``device=``: "auto" follows the arrays (CUDA arrays run on the GPU).
Device: TypeAlias = Literal["auto", "cpu", "cuda"]

#: ``nan_policy=``: "raise" rejects a batch whose statistics are not finite.
NanPolicy: TypeAlias = Literal["propagate", "raise"]

#: ``activation=``: fused after the normalisation (and the residual).
Activation: TypeAlias = Literal["relu"] | None

#: ``convention=``: the framework whose momentum, eps, axis and running variance to follow
#: (:data:`numba_bn.CONVENTIONS`).
ConventionName: TypeAlias = Literal["torch", "keras", "flax", "onnx"]

#: ``backend=``: "cpu", "cuda", or a name given to :func:`numba_bn.register_backend`.
Backend: TypeAlias = str
